"""Adaptive freezing: freeze the leading stages that have stopped learning (AutoFreeze).

Every ``every`` optimizer steps, ``AutoFreeze`` compares how strongly each
trainable stage is still being pushed by its gradients with the previous
window (the AutoFreeze paper's gradient-norm change, arXiv 2102.01386) and
freezes the longest converged prefix of stages through ``gg.freeze`` and
``gg.sync``. The frozen prefix can then be served from a ``gg.FeatureCache``
(``split``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from . import schedules
from .distributed import GatedDDP, rewrap
from .errors import InvalidArgumentError
from .freezing import freeze
from .optim import sync
from .schedules import Stages, split_sequential
from .selection import Selector

__all__ = ["AutoFreeze", "Decision"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    """One check of ``AutoFreeze``: what it measured and what it froze.

    Attributes:
        step: the optimizer step count at the check.
        grad_norm: per stage, the mean gradient norm over the window that just
            ended (``None`` for stages that were already frozen).
        change: per stage, ``|previous - current| / previous`` of ``grad_norm``
            (``None`` where there is no previous window or the stage is frozen).
        froze: names of the stages frozen by this check (often empty).
        frozen: names of all frozen stages after the check.

    Example:
        >>> Decision(50, [1.0], [None], [], []).to_dict()["step"]
        50
    """

    step: int
    grad_norm: list[float | None]
    change: list[float | None]
    froze: list[str] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the record."""
        return asdict(self)


def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidArgumentError(
            f"{name} must be a whole number >= {low}; got {value!r}"
            + ("" if high is None else f" (this model has {high} stages)")
        )
    if high is not None and value > high:
        raise InvalidArgumentError(
            f"{name}={value} asks for more trainable stages than there are ({high}); "
            f"pass min_trainable between 1 and {high}"
        )
    return value


def _optimizer_params(optimizer: Any) -> set[int]:
    groups = getattr(optimizer, "param_groups", None)
    if groups is None:
        raise InvalidArgumentError(
            f"optimizer must be a torch optimizer (or a wrapper with param_groups); "
            f"got {type(optimizer).__name__}"
        )
    return {id(p) for g in groups for p in g["params"]}


def _shorten(names: Sequence[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


class AutoFreeze:
    """Freeze the longest prefix of stages whose gradients have stopped changing.

    Call ``af.step()`` after each ``optimizer.step()`` (before ``zero_grad``:
    it reads the gradients). It adds each trainable stage's gradient norm to
    a window; every ``every`` steps it takes the window's mean norm ``g`` per
    stage and its relative change ``|g_prev - g| / g_prev`` from the last
    window, and freezes the leading trainable stages whose change is below
    ``threshold``, stopping at the first that is still changing. It never
    freezes a stage behind a trainable one, never leaves fewer than
    ``min_trainable`` stages training and never unfreezes; ``threshold=0``
    never freezes. Frozen stages go through ``gg.freeze`` (sticky eval, grad
    ``None``) and ``gg.sync`` (optimizer state dropped, scheduler aligned).

    Under DDP pass the ``gg.distributed.wrap`` wrapper as ``model``: the
    window statistics are all-reduced (averaged) over the ranks before each
    decision, so every rank freezes the same stages at the same step, and a
    freeze rebuilds the wrapper; run ``af.wrapped``.

    Resume: ``load_state_dict`` re-applies the freezes, so load it before the
    optimizer's and scheduler's state.

    Args:
        model: the model (or its ``gg.distributed.wrap`` wrapper).
        stages: the stages, front to back (``gg.stages`` or selectors); by
            default the model's top-level children that hold a trainable
            parameter. Together they must hold every trainable parameter.
        optimizer: the optimizer over the model's trainable parameters.
        scheduler: a learning-rate scheduler to keep aligned (``gg.sync``).
        every: steps per window (and between decisions).
        threshold: the relative gradient-norm change under which a stage counts
            as converged.
        min_trainable: stages that always keep training (the last ones).

    Raises:
        InvalidArgumentError: a bad ``every``/``threshold``/``min_trainable``,
            stages that do not partition the trainable parameters, or an
            optimizer that lacks some of them. Nothing is changed then.

    Example:
        >>> import torch, gradgate as gg
        >>> net = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(3)])
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.0)  # nothing changes: all converged
        >>> af = gg.AutoFreeze(net, optimizer=opt, every=2, threshold=0.5)
        >>> for _ in range(4):
        ...     net(torch.ones(1, 4)).sum().backward(); opt.step(); af.step()
        ...     opt.zero_grad()
        []
        []
        []
        ['0', '1']
        >>> af.frozen, net[0].weight.requires_grad
        (['0', '1'], False)
    """

    def __init__(
        self,
        model: nn.Module,
        stages: Stages | Sequence[Selector] | None = None,
        *,
        optimizer: torch.optim.Optimizer,
        scheduler: Any = None,
        every: int = 50,
        threshold: float = 0.05,
        min_trainable: int = 1,
    ) -> None:
        self.wrapper: GatedDDP | None = model if isinstance(model, GatedDDP) else None
        inner = model.module if isinstance(model, GatedDDP) else model
        self.model: nn.Module = inner
        self.every = _check_int("every", every, 1)
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, (int, float))
            or not math.isfinite(threshold)
            or threshold < 0
        ):
            raise InvalidArgumentError(
                f"threshold must be a finite number >= 0 (0 never freezes); got {threshold!r}"
            )
        self.threshold = float(threshold)
        self.stages = self._partition(stages)
        self.min_trainable = _check_int("min_trainable", min_trainable, 1, len(self.stages))
        self._check_optimizer(optimizer)
        self.optimizer = optimizer
        self.scheduler = scheduler
        by_name = dict(inner.named_parameters())
        self._params = [[by_name[n] for n in names] for names in self.stages.parameters]
        self.boundary = 0
        self.steps = 0
        self.history: list[Decision] = []
        self._sums = self._zeros()
        self._count = 0
        self._previous: list[float] | None = None

    def _zeros(self) -> list[torch.Tensor]:
        return [torch.zeros((), dtype=torch.float64) for _ in self.stages]

    def _partition(self, value: Stages | Sequence[Selector] | None) -> Stages:
        model = self.model
        if value is None:
            children = [
                name
                for name, child in model.named_children()
                if any(p.requires_grad for p in child.parameters())
            ]
            if not children:
                raise InvalidArgumentError(
                    f"{type(model).__name__} has no child module with a trainable parameter; "
                    "pass stages=[...] (selectors, front to back)"
                )
            st = schedules.stages(model, *children)
        else:
            st = value if isinstance(value, Stages) else Stages(model, list(value))
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        covered: set[str] = set()
        for name, params in zip(st.names, st.parameters, strict=True):
            if not set(trainable).intersection(params):
                raise InvalidArgumentError(
                    f"stage {name!r} has no trainable parameter (it is frozen already); "
                    "stages must partition the trainable part: leave it out"
                )
            covered.update(params)
        missing = [n for n in trainable if n not in covered]
        if missing:
            raise InvalidArgumentError(
                f"stages {st.names} do not cover the trainable parameters "
                f"{_shorten(missing)}; add a stage for them (or freeze them first)"
            )
        return st

    def _check_optimizer(self, optimizer: Any) -> None:
        held = _optimizer_params(optimizer)
        missing = [
            n for n, p in self.model.named_parameters() if p.requires_grad and id(p) not in held
        ]
        if missing:
            raise InvalidArgumentError(
                f"the optimizer does not hold the trainable parameters {_shorten(missing)}; "
                "build it over the model after freezing, e.g. "
                "torch.optim.AdamW(gg.param_groups(model, lr=...))"
            )

    @property
    def frozen(self) -> list[str]:
        """Names of the stages frozen so far (a prefix of ``stages.names``)."""
        return list(self.stages.names[: self.boundary])

    @property
    def wrapped(self) -> nn.Module:
        """The module to run: the current DDP wrapper (rebuilt on freeze), else the model."""
        return self.wrapper if self.wrapper is not None else self.model

    def _accumulate(self) -> None:
        seen = False
        for i in range(self.boundary, len(self.stages)):
            grads = [p.grad for p in self._params[i] if p.grad is not None]
            if grads:
                seen = True
                # stays on the gradients' device: no host sync per step
                norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).double())
                self._sums[i] = self._sums[i].to(norm.device) + norm
        if not seen:
            raise InvalidArgumentError(
                f"AutoFreeze.step() found no gradient on the trainable stages "
                f"{self.stages.names[self.boundary :]}; call it after optimizer.step() and "
                "before optimizer.zero_grad()"
            )
        self._count += 1

    def _window_means(self) -> list[float]:
        means = torch.stack([s.cpu() for s in self._sums]) / self._count
        if dist.is_available() and dist.is_initialized():
            # every rank decides from the same numbers, so all freeze alike
            shared = means.to("cuda" if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(shared, op=dist.ReduceOp.SUM)
            means = shared.cpu() / dist.get_world_size()
        return [float(v) for v in means.tolist()]

    def step(self) -> list[str]:
        """Count one optimizer step; on every ``every``-th, decide. Return the stages frozen now."""
        self._accumulate()
        self.steps += 1
        if self.steps % self.every:
            return []
        return self._decide()

    def _converged_until(self, change: list[float | None]) -> int:
        last = len(self.stages) - self.min_trainable
        k = self.boundary
        while k < last:
            c = change[k]
            if c is None or not c < self.threshold:
                break
            k += 1
        return k

    def _decide(self) -> list[str]:
        means = self._window_means()
        live = range(self.boundary, len(self.stages))
        grad_norm: list[float | None] = [means[i] if i in live else None for i in range(len(means))]
        change: list[float | None] = [None] * len(means)
        if self._previous is not None:
            for i in live:
                before, now = self._previous[i], means[i]
                if before > 0:
                    change[i] = abs(before - now) / before
                else:
                    change[i] = 0.0 if now == 0 else math.inf
        cut = self._converged_until(change)
        froze = self.stages.names[self.boundary : cut]
        if froze:
            self._freeze_to(cut)
            log.info("AutoFreeze step %d: froze %s (change %s)", self.steps, froze, change)
        else:
            log.debug("AutoFreeze step %d: nothing to freeze (change %s)", self.steps, change)
        self.history.append(Decision(self.steps, grad_norm, change, list(froze), self.frozen))
        self._previous = means
        self._sums = self._zeros()
        self._count = 0
        return list(froze)

    def _freeze_to(self, cut: int) -> None:
        freeze(self.model, *self.stages[self.boundary : cut])
        self.boundary = cut
        sync(self.optimizer, self.model, self.scheduler)
        if self.wrapper is not None:
            now = tuple(n for n, p in self.model.named_parameters() if p.requires_grad)
            if now != self.wrapper.gg_trainable:
                self.wrapper = rewrap(self.wrapper)

    def split(self, model: nn.Module | None = None) -> tuple[nn.Sequential, nn.Sequential]:
        """``(frozen prefix, rest)`` of an ``nn.Sequential`` whose children are the stages.

        The prefix is what a ``gg.FeatureCache`` can serve from now on; the
        rest is what still runs each step. With nothing frozen the prefix is
        empty.

        Raises:
            InvalidArgumentError: the model is not an ``nn.Sequential``, or a
                frozen stage is not one of its children.

        Example:
            >>> import torch, gradgate as gg
            >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
            >>> af = gg.AutoFreeze(net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
            >>> [len(part) for part in af.split()]
            [0, 2]
        """
        seq = self.model if model is None else model
        return split_sequential(seq, self.stages, self.boundary)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: settings, step count, frozen prefix, window, history."""
        return {
            "stages": list(self.stages.names),
            "every": self.every,
            "threshold": self.threshold,
            "min_trainable": self.min_trainable,
            "steps": self.steps,
            "boundary": self.boundary,
            "sums": [float(v) for v in self._sums],
            "count": self._count,
            "previous": None if self._previous is None else list(self._previous),
            "history": [d.to_dict() for d in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Re-apply the recorded freezes and restore the window.

        Call it before loading the optimizer's and scheduler's state: it
        removes the frozen stages from the optimizer as the original run did.

        Raises:
            InvalidArgumentError: the state was saved for other stages, or a
                stage it froze trains here while a later one is frozen.
        """
        if list(state["stages"]) != list(self.stages.names):
            raise InvalidArgumentError(
                f"this AutoFreeze state was saved for stages {state['stages']}, but these "
                f"are {self.stages.names}; build AutoFreeze with the same stages"
            )
        boundary = int(state["boundary"])
        if boundary < self.boundary:
            raise InvalidArgumentError(
                f"the state has {boundary} frozen stages but {self.boundary} are frozen "
                "already; AutoFreeze never unfreezes: load it into a fresh AutoFreeze"
            )
        self.every = _check_int("every", state["every"], 1)
        self.threshold = float(state["threshold"])
        self.min_trainable = _check_int(
            "min_trainable", state["min_trainable"], 1, len(self.stages)
        )
        if boundary > self.boundary:
            self._freeze_to(boundary)
        self.steps = int(state["steps"])
        self._sums = [torch.tensor(float(v), dtype=torch.float64) for v in state["sums"]]
        self._count = int(state["count"])
        prev = state["previous"]
        self._previous = None if prev is None else [float(v) for v in prev]
        self.history = [Decision(**d) for d in state["history"]]
