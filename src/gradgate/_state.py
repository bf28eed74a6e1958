"""The model-state record: what is frozen, trainable or partial, read once per call (private).

A public call builds one ``ModelState`` (one ``ModelIndex`` walk) and passes
it to every helper it uses; nothing below a public call re-indexes the
model. The record reads flags when asked and caches what it derived, so it
describes the model as it was when first read: a call that changes flags
reads what it needs before, or builds its plan from the index alone.

What it answers, and the one place each answer is defined:

- ``trains``: per module, whether a trainable parameter lies under it;
- ``has_params``: per module, whether any parameter lies under it;
- ``held``: per module, whether a freeze holds it in sticky eval;
- ``frozen_modules``: modules that hold no trainable parameter and are frozen
  (held in eval, or with parameters none of which trains);
- ``partials``: partial (row-frozen) tensors, through ``subtensor``'s interface;
- ``check_saved``: a file's row sets against the model's (a checkpoint load);
- ``plan_freeze``: what a freeze walk leaves to the partial tensors (a ``FreezePlan``).

This module is the one place the rest of the library meets rows: no other
module imports ``subtensor`` (``gradgate/__init__`` re-exports ``gg.rows``).
- ``entries`` / ``frozen_entries`` / ``trainable_state``: named tensors,
  the frozen ones (what a guard watches and a checkpoint fingerprints), the
  trainable ones (what a checkpoint stores).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import subtensor
from ._index import ModelIndex, trainable_flags
from ._sticky import sticky_flags
from .selection import Selector

__all__ = ["FreezePlan", "ModelState", "TensorEntry", "model_entries", "plan_freeze"]

FreezePlan = subtensor.FreezePlan


@dataclass
class TensorEntry:
    """A named tensor of a model and where it lives: ``owner`` holds it as ``leaf``.

    Example:
        >>> import torch
        >>> [(e.name, e.kind, e.leaf) for e in ModelState(torch.nn.Linear(1, 1)).entries()]
        [('weight', 'parameter', 'weight'), ('bias', 'parameter', 'bias')]
    """

    name: str
    tensor: torch.Tensor
    kind: str  # "parameter" or "buffer"
    owner: nn.Module
    leaf: str
    position: int  # the owner's position in the ModelIndex


def model_entries(index: ModelIndex) -> list[TensorEntry]:
    """Every parameter then every buffer of a model, tied tensors once, without recursion.

    The order is ``named_parameters()`` then ``named_buffers()``, so
    fingerprints match a walk with torch's own iterators, but the walk is
    iterative: a 3000-deep chain of modules does not hit the recursion limit.
    """
    out: list[TensorEntry] = []
    seen: set[int] = set()
    mods = index.mods
    for (name, p), owner in zip(index.aliases, index.alias_owner, strict=True):
        if id(p) not in seen:
            seen.add(id(p))
            out.append(
                TensorEntry(name, p, "parameter", mods[owner], name.rpartition(".")[2], owner)
            )
    visited: set[int] = set()
    for i, (mname, module) in enumerate(zip(index.names, mods, strict=True)):
        if id(module) in visited:
            continue
        visited.add(id(module))
        prefix = mname + "." if mname else ""
        for bname, b in module._buffers.items():
            if b is not None and id(b) not in seen:
                seen.add(id(b))
                out.append(TensorEntry(prefix + bname, b, "buffer", module, bname, i))
    return out


class ModelState:
    """One read of a model: its index and what is frozen, trainable, partial or held.

    Example:
        >>> import torch, gradgate as gg
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
        >>> _ = net[0].requires_grad_(False)
        >>> [n for n, _ in ModelState(net).frozen_modules()]
        ['', '0']
    """

    def __init__(self, model: nn.Module | ModelIndex) -> None:
        self.index = model if isinstance(model, ModelIndex) else ModelIndex(model)
        self.model = self.index.model
        self._trains: list[bool] | None = None
        self._has_params: list[bool] | None = None
        self._held: dict[int, bool] | None = None
        self._partials: dict[int, subtensor.PartialRows] | None = None
        self._entries: list[TensorEntry] | None = None

    @property
    def trains(self) -> list[bool]:
        """Per module (by position): whether a trainable parameter lies under it."""
        if self._trains is None:
            self._trains = trainable_flags(self.index)
        return self._trains

    @property
    def has_params(self) -> list[bool]:
        """Per module (by position): whether any parameter lies under it."""
        if self._has_params is None:
            index = self.index
            flags = [False] * len(index.names)
            for owner in index.alias_owner:
                flags[owner] = True
            parent = index.parent
            for i in range(len(flags) - 1, 0, -1):
                if flags[i]:
                    flags[parent[i]] = True
            self._has_params = flags
        return self._has_params

    def held(self, positions: Sequence[int] | None = None) -> dict[int, bool]:
        """For modules at ``positions`` (default all): whether a freeze holds them in eval."""
        if positions is not None and self._held is None:
            return sticky_flags(self.index, positions, trains=self.trains)
        if self._held is None:
            self._held = sticky_flags(self.index, trains=self.trains)
        return self._held if positions is None else {i: self._held[i] for i in positions}

    def frozen_modules(self) -> list[tuple[str, nn.Module]]:
        """Modules that hold no trainable parameter and are frozen, each once, in pre-order.

        A module counts as frozen when a freeze holds it in inference mode,
        or when it has parameters and none of them trains (however they
        were frozen).
        """
        trains, has_params, held = self.trains, self.has_params, self.held()
        index = self.index
        out: list[tuple[str, nn.Module]] = []
        seen: set[int] = set()
        for i, (name, module) in enumerate(zip(index.names, index.mods, strict=True)):
            if id(module) in seen:
                continue
            seen.add(id(module))
            if not trains[i] and (held[i] or has_params[i]):
                out.append((name, module))
        return out

    @property
    def partials(self) -> dict[int, subtensor.PartialRows]:
        """Partial (row-frozen) tensors by ``id`` of the whole tensor (``subtensor``'s record)."""
        if self._partials is None:
            self._partials = subtensor.partials(self.model, self.index)
        return self._partials

    def check_saved(
        self, state: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """``saved`` (a file's tensors) once its row sets are checked against ``state``.

        ``state`` is this record's ``trainable_state()``. A file whose trained
        rows differ from the model's trainable rows raises ``CheckpointError``
        naming both; older files' duplicate row-number entries are dropped.

        Example:
            >>> import torch
            >>> lin = torch.nn.Linear(1, 1)
            >>> record = ModelState(lin)
            >>> sorted(record.check_saved(record.trainable_state(), {"weight": lin.weight}))
            ['weight']
        """
        return subtensor.check_rows(state, saved)

    def element_counts(self) -> dict[int, tuple[int, int]]:
        """``id(tensor) -> (trainable, frozen)`` elements of partial tensors (``W`` and ``R``)."""
        return subtensor.element_counts(self.model, self.index) if self.partials else {}

    def entries(self) -> list[TensorEntry]:
        """Every parameter then every buffer, tied tensors once (see ``model_entries``)."""
        if self._entries is None:
            self._entries = model_entries(self.index)
        return self._entries

    def frozen_entries(self, buffers: bool) -> list[TensorEntry]:
        """Frozen parameters, then (with ``buffers``) buffers of frozen modules.

        A partial tensor's ``W`` is an ordinary frozen parameter (zeros in its
        trainable rows), so what is watched or fingerprinted is its frozen rows.

        Example:
            >>> import torch
            >>> lin = torch.nn.Linear(1, 1).requires_grad_(False)
            >>> [e.name for e in ModelState(lin).frozen_entries(buffers=True)]
            ['weight', 'bias']
        """
        entries = self.entries()
        frozen_params = [e for e in entries if e.kind == "parameter" and not e.tensor.requires_grad]
        if not buffers:
            return frozen_params
        frozen_ids = {id(m) for _, m in self.frozen_modules()}
        params = {id(e.tensor) for e in frozen_params}
        return frozen_params + [
            e
            for e in entries
            if e.kind == "buffer" and id(e.owner) in frozen_ids and id(e.tensor) not in params
        ]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Trainable parameters plus buffers of modules that are not frozen, by name.

        A partial tensor's trainable rows are a trainable parameter like any
        other; their row numbers are stored once, under ``__rows__.<name>``.
        """
        frozen = {id(m) for _, m in self.frozen_modules()}
        out: dict[str, torch.Tensor] = {}
        for e in self.entries():
            trains = e.tensor.requires_grad if e.kind == "parameter" else id(e.owner) not in frozen
            if trains:
                out[e.name] = e.tensor
        if self.partials:
            out = subtensor.trainable_rows_state(self.model, out, self.index)
        return out


def plan_freeze(
    index: ModelIndex,
    action: str,
    selectors: Sequence[Selector],
    exclude: Selector | None = None,
) -> tuple[list[Any], FreezePlan]:
    """The selectors a freeze walk resolves, and what it leaves to the partial tensors.

    ``gg.rows`` items are replaced by the tensors they name; the plan is
    empty (and the walk sees only plain flags) unless rows are given or in
    force. Raises before anything changes.

    Example:
        >>> import torch
        >>> selectors, plan = plan_freeze(ModelIndex(torch.nn.Linear(1, 1)), "freeze", ["weight"])
        >>> selectors, plan.fixed, plan.trains
        (['weight'], {}, set())
    """
    return subtensor.plan(index.model, action, selectors, exclude, index)
