"""Human-readable reports: ``summary`` (what trains) and ``grad_report`` (what got gradients)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._format import render_table
from ._index import gc_paused, owner_of, sizes
from ._state import ModelState
from .errors import InvalidArgumentError

__all__ = ["GradReport", "Summary", "grad_report", "summary"]


@dataclass(frozen=True)
class SummaryRow:
    """One module's line in a ``Summary``."""

    path: str
    type: str
    depth: int
    params: int
    trainable: int
    frozen: int
    state: str
    mode: str


@dataclass(frozen=True)
class Summary:
    """Per-module table of what trains and what is frozen, with totals.

    Counts are numbers of elements; a parameter shared by several modules is
    counted once in every total. ``str()`` renders the table.

    Example:
        >>> import torch, gradgate as gg
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> _ = gg.freeze(net, "0")
        >>> s = gg.summary(net)
        >>> s.total == s.trainable + s.frozen, s.frozen
        (True, 6)
    """

    model: str
    rows: list[SummaryRow]
    total: int
    trainable: int
    frozen: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary of the rows and totals."""
        return {
            "model": self.model,
            "rows": [r.__dict__.copy() for r in self.rows],
            "total": self.total,
            "trainable": self.trainable,
            "frozen": self.frozen,
        }

    def __str__(self) -> str:
        body = [
            [
                ("  " * (r.depth - 1) + r.path.rpartition(".")[2]) if r.depth else r.path,
                r.type,
                f"{r.params:,}",
                f"{r.trainable:,}",
                f"{r.frozen:,}",
                r.state,
                r.mode,
            ]
            for r in self.rows
        ]
        table = render_table(
            ["module", "type", "params", "trainable", "frozen", "state", "mode"],
            body,
            right={2, 3, 4},
        )
        pct = 100.0 * self.trainable / self.total if self.total else 0.0
        return (
            f"{table}\n"
            f"total {self.total:,} parameters: {self.trainable:,} trainable "
            f"({pct:.1f}%), {self.frozen:,} frozen"
        )


def _state(trainable: int, frozen: int, sticky: bool) -> str:
    if trainable and frozen:
        return "partial"
    if trainable:
        return "trainable"
    if frozen or sticky:
        return "frozen"
    return "-"


def summary(model: nn.Module, depth: int = 2) -> Summary:
    """Tabulate, per module down to ``depth``, what trains and what is frozen.

    Args:
        model: the model to describe (nothing is changed).
        depth: how many levels below the root get their own row.

    Returns:
        A ``Summary``; ``str()`` is a table, ``.to_dict()`` JSON-ready.

    Example:
        >>> import torch, gradgate as gg
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
        >>> _ = gg.freeze(net, "1")
        >>> [r.state for r in gg.summary(net).rows]
        ['partial', 'trainable', 'frozen']
    """
    if not isinstance(depth, int) or depth < 0:
        raise InvalidArgumentError(f"depth must be a non-negative int; got {depth!r}")
    with gc_paused():
        return _summary(model, depth)


def _summary(model: nn.Module, depth: int) -> Summary:
    record = ModelState(model)
    index = record.index
    names, parent = index.names, index.parent
    level = [0] * len(names)
    for i in range(1, len(names)):
        level[i] = level[parent[i]] + 1
    shown = [i for i, lv in enumerate(level) if lv <= depth]
    train = [0] * len(names)
    froz = [0] * len(names)
    # Row each module's parameters count towards: its nearest shown ancestor
    # and that one's ancestors (parents come before children in pre-order).
    rows_of: list[tuple[int, ...]] = [()] * len(names)
    for i in range(len(names)):
        up = rows_of[parent[i]] if i else ()
        rows_of[i] = (*up, i) if level[i] <= depth else up
    seen: dict[int, set[int]] = {}
    shared = index.shared
    alias_sizes = sizes(p for _, p in index.aliases)
    counts = record.element_counts()  # rows: W's frozen and trainable rows; R none
    for (_, p), owner, n in zip(index.aliases, index.alias_owner, alias_sizes, strict=True):
        key = id(p)
        n_train, n_froz = (n, 0) if p.requires_grad else (0, n)
        if key in counts:
            n_train, n_froz = counts[key]
        for row in rows_of[owner]:
            if key in shared:
                ids = seen.setdefault(row, set())
                if key in ids:
                    continue
                ids.add(key)
            train[row] += n_train
            froz[row] += n_froz
    # Held, not merely marked: a module whose parameters were made trainable
    # by other means is never shown as "eval (sticky)".
    held = record.held(shown)
    rows = []
    for i in shown:
        name, module = names[i], index.mods[i]
        sticky = held[i]
        mode = "eval (sticky)" if sticky else ("train" if module.training else "eval")
        rows.append(
            SummaryRow(
                path=name or type(model).__name__,
                type=type(module).__name__,
                depth=level[i],
                params=train[i] + froz[i],
                trainable=train[i],
                frozen=froz[i],
                state=_state(train[i], froz[i], sticky),
                mode=mode,
            )
        )
    # The root's row counts every parameter once (tied ones by identity).
    total_train, total = train[0], train[0] + froz[0]
    return Summary(
        model=type(model).__name__,
        rows=rows,
        total=total,
        trainable=total_train,
        frozen=total - total_train,
    )


@dataclass(frozen=True)
class GradReport:
    """What ``backward()`` left on the parameters: dead branches and leaks.

    Attributes:
        missing: trainable parameters without a gradient (a dead branch).
        unexpected: frozen parameters that hold a gradient.
        norms: ``(module path, gradient L2 norm, parameters with a gradient)``
            for every module that owns parameters.

    Example:
        >>> import torch, gradgate as gg
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> _ = gg.freeze(net, "0")
        >>> net(torch.ones(1, 2)).sum().backward()
        >>> gg.grad_report(net).ok
        True
    """

    missing: list[str]
    unexpected: list[str]
    norms: list[tuple[str, float, int]]

    @property
    def ok(self) -> bool:
        """True when nothing is missing and nothing unexpected holds a gradient."""
        return not self.missing and not self.unexpected

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary."""
        return {
            "missing": list(self.missing),
            "unexpected": list(self.unexpected),
            "norms": [{"module": m, "norm": n, "with_grad": k} for m, n, k in self.norms],
        }

    def __str__(self) -> str:
        table = render_table(
            ["module", "grad norm", "params with grad"],
            [[m or "(root)", f"{n:.4g}", str(k)] for m, n, k in self.norms],
            right={1, 2},
        )
        lines = [table]
        lines.append(
            "missing gradients (trainable, no grad): "
            + (", ".join(self.missing) if self.missing else "none")
        )
        lines.append(
            "unexpected gradients (frozen, has grad): "
            + (", ".join(self.unexpected) if self.unexpected else "none")
        )
        return "\n".join(lines)


def grad_report(model: nn.Module) -> GradReport:
    """Report, after ``backward()``, which parameters did and did not get gradients.

    Args:
        model: the model after a backward pass.

    Returns:
        A ``GradReport`` with ``missing``, ``unexpected`` and per-module norms.

    Example:
        >>> import torch, gradgate as gg
        >>> net = torch.nn.ModuleDict({"a": torch.nn.Linear(2, 1), "b": torch.nn.Linear(2, 1)})
        >>> net["a"](torch.ones(1, 2)).sum().backward()
        >>> gg.grad_report(net).missing
        ['b.weight', 'b.bias']
    """
    record = ModelState(model)
    index = record.index
    missing: list[str] = []
    unexpected: list[str] = []
    sq: dict[str, float] = {}
    count: dict[str, int] = {}
    for name, p in index.params.items():
        owner = owner_of(name)
        sq.setdefault(owner, 0.0)
        count.setdefault(owner, 0)
        g = p.grad
        if p.requires_grad and g is None:
            missing.append(name)
        elif not p.requires_grad and g is not None:
            unexpected.append(name)
        if g is not None:
            with torch.no_grad():
                dense = g.coalesce().values() if g.is_sparse else g
                sq[owner] += float(dense.detach().double().pow(2).sum())
            count[owner] += 1
    norms = [(m, sq[m] ** 0.5, count[m]) for m in sq]
    return GradReport(missing=missing, unexpected=unexpected, norms=norms)
