"""Schedules: gradual unfreezing and progressive freezing that survive resume."""

from __future__ import annotations

import enum
import inspect
import numbers
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, Protocol, cast, runtime_checkable

import torch
from torch import nn

from ._index import ModelIndex, covering_paths, current
from ._options import choice
from .errors import InvalidArgumentError
from .freezing import Freezing, ModeName, apply_indexed, freeze, unfreeze
from .optim import Rules, peak_lr, rule_items, sync
from .optim.sync import sync_indexed
from .selection import Selector, describe_selectors, select

__all__ = ["GradualUnfreeze", "ProgressiveFreeze", "Stages", "freeze_to", "stages"]


class Stages(Sequence[Selector]):
    """An ordered (front to back) list of non-overlapping selectors of one model.

    Example:
        >>> import torch, gradgate as gg
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> gg.stages(net).names
        ['0', '1']
    """

    def __init__(self, model: nn.Module, selectors: Sequence[Selector]) -> None:
        if not selectors:
            raise InvalidArgumentError("stages need at least one selector")
        owner: dict[int, int] = {}
        self.parameters: list[list[str]] = []
        for i, sel in enumerate(selectors):
            chosen = select(model, sel)
            for name, p in chosen.named_parameters():
                if id(p) in owner:
                    raise InvalidArgumentError(
                        f"stages overlap: {name!r} is in stage {owner[id(p)]} and stage {i}"
                    )
                owner[id(p)] = i
            self.parameters.append(chosen.parameters)
        self._selectors = list(selectors)
        self.names = [describe_selectors([s]).replace("'", "") for s in selectors]

    def __getitem__(self, i: Any) -> Any:
        return self._selectors[i]

    def __len__(self) -> int:
        return len(self._selectors)

    def __iter__(self) -> Iterator[Selector]:
        return iter(self._selectors)

    def __repr__(self) -> str:
        return f"Stages({self.names})"


def stages(model: nn.Module, *selectors: Selector) -> Stages:
    """Define stages front to back; with no selector, the model's own grouping.

    With no selector, a model that has timm's ``group_matcher()`` is split
    the way timm groups it for layer-wise decay (``stem``, each block, the
    head); any other model into its top-level children. A ``torch.compile``,
    DDP or ``DataParallel`` wrapper is looked through: the stages are the
    wrapped model's, under the wrapper's names (``_orig_mod.0``).

    Raises:
        NoMatchError: a stage selector matches nothing.
        InvalidArgumentError: two stages share a parameter.

    Example:
        >>> import gradgate as gg
        >>> from gradgate.tools.agent import Agent
        >>> gg.stages(Agent(), "front_end", "back_end.fc1", "back_end.fc2").names
        ['front_end', 'back_end.fc1', 'back_end.fc2']
    """
    if not selectors:
        inner, prefix = looked_through(model)
        matcher = getattr(inner, "group_matcher", None)
        if callable(matcher):
            groups = _timm_groups(inner, matcher(coarse=False))
            selectors = tuple(
                path_selector(prefix + g[0])
                if len(g) == 1
                else [path_selector(prefix + n) for n in g]
                for g in groups
            )
        else:
            selectors = tuple(path_selector(prefix + name) for name, _ in inner.named_children())
    return Stages(model, selectors)


def path_selector(path: str) -> str:
    """A selector matching exactly the module path or parameter name ``path``.

    A name with glob characters (a ``ModuleDict`` key like ``a[0]``) becomes an
    escaped ``re:`` pattern, so it selects itself and nothing else.

    Example:
        >>> print(path_selector("blocks.0"), path_selector("heads.a[0]"))
        blocks.0 re:heads\\.a\\[0\\]
    """
    return path if not re.search(r"[*?\[\]]", path) else "re:" + re.escape(path)


def looked_through(model: nn.Module) -> tuple[nn.Module, str]:
    """The model inside ``torch.compile``, DDP and ``DataParallel`` wrappers, and its name prefix.

    A wrapper has one child, so "its top-level children" would be one stage
    that can never freeze; stages are the wrapped model's children, named as
    the wrapper names them (``_orig_mod.0``, ``module.layer1``).

    Example:
        >>> import torch
        >>> from gradgate.schedules import looked_through
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> looked_through(torch.compile(net)) == (net, "_orig_mod.")
        True
    """
    prefix = ""
    while True:
        if type(model).__name__ == "OptimizedModule" and isinstance(
            getattr(model, "_orig_mod", None), nn.Module
        ):
            name = "_orig_mod"
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            name = "module"
        else:
            return model, prefix
        model, prefix = getattr(model, name), f"{prefix}{name}."


_MATCH_PREV_GROUP = 99999.0  # timm's marker: this pattern belongs to the group before


def _timm_groups(model: nn.Module, spec: Any) -> list[list[str]]:
    """Group parameter names as timm's ``group_with_matcher`` does, front to back.

    ``spec`` maps a group name to a regex (its match's numeric groups order
    the parameters) or to a list of ``(regex, suffix)``; names no pattern
    matches form the last group.
    """
    if not isinstance(spec, dict):
        raise InvalidArgumentError(
            f"{type(model).__name__}.group_matcher() returned {type(spec).__name__}; "
            "gg.stages understands timm's dict form; pass the stages explicitly"
        )
    rules: list[tuple[re.Pattern[str], tuple[float, ...], tuple[float, ...]]] = []
    for ordinal, value in enumerate(spec.values()):
        if value is None:
            continue
        entries = value if isinstance(value, (list, tuple)) else [(value, None)]
        for pattern, suffix in entries:
            rules.append((re.compile(pattern), (float(ordinal),), tuple(map(float, suffix or ()))))
    keys: dict[tuple[float, ...], list[str]] = {}
    index = ModelIndex(model)
    for name in index.params:
        key: tuple[float, ...] = (float("inf"),)
        for rx, prefix, suffix in rules:
            m = rx.match(name)
            if m:
                numbers = tuple(float(g) for g in m.groups() if g is not None)
                key = prefix + numbers + suffix
                break
        keys.setdefault(key, []).append(name)
    groups: list[list[str]] = []
    for key in sorted(keys):
        if groups and key[-1] == _MATCH_PREV_GROUP:
            groups[-1] += keys[key]
        else:
            groups.append(list(keys[key]))
    return [covering_paths(index, g) for g in groups]


def _is_step(value: object) -> bool:
    """A step or epoch count: a real number, not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _as_stages(model: nn.Module, value: Stages | Sequence[Selector]) -> Stages:
    return value if isinstance(value, Stages) else Stages(model, list(value))


def freeze_to(
    model: nn.Module, stage_list: Stages | Sequence[Selector], n: int, mode: ModeName = "eval"
) -> Freezing:
    """Freeze the stages before ``n`` and make the rest trainable (fastai's ``freeze_to``).

    ``n`` may be negative: ``freeze_to(model, s, -1)`` trains only the last stage.
    ``n == len(stages)`` freezes every stage, which warns (as fastai does).
    Parameters in no stage are left as they are.

    Returns:
        One ``Freezing`` handle whose ``undo()`` reverts both steps.

    Example:
        >>> import torch, gradgate as gg
        >>> net = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(3)])
        >>> _ = gg.freeze_to(net, gg.stages(net), -1)
        >>> [p.requires_grad for p in net.parameters()]
        [False, False, False, False, True, True]
    """
    st = _as_stages(model, stage_list)
    if not -len(st) <= n <= len(st):
        raise InvalidArgumentError(f"n must be in [{-len(st)}, {len(st)}]; got {n}")
    cut = n % len(st) if n < 0 else n
    if cut == len(st):
        warnings.warn(
            f"freeze_to(n={n}) freezes all {len(st)} stages: nothing in them will "
            "train; use n=-1 to train the last stage",
            UserWarning,
            stacklevel=2,
        )
    first = unfreeze(model, *st[cut:]) if cut < len(st) else None
    second = freeze(model, *st[:cut], mode=mode) if cut > 0 else None
    handles = [h for h in (first, second) if h is not None]
    combined = handles[0]
    for h in handles[1:]:
        combined.extend(h)
    return combined


def _group_names(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[list[str]]:
    names = ModelIndex(model).canonical
    return [[names.get(id(p), "?") for p in g["params"]] for g in optimizer.param_groups]


@runtime_checkable
class Rewrappable(Protocol):
    """A module wrapper that must be rebuilt when the trainable set changes.

    ``gg.distributed.wrap``'s DDP wrapper is one: it hears every change
    gradgate announces, and ``gg_refresh()`` returns it as it is or, if the
    trainable set changed since it was built, a rebuilt wrapper. Schedules
    given such a wrapper refresh it after each change; they never import
    the distributed helpers.

    Example:
        >>> import torch
        >>> isinstance(torch.nn.Linear(1, 1), Rewrappable)
        False
    """

    module: nn.Module

    def gg_refresh(self) -> nn.Module:
        """This wrapper if it fits the trainable set, else a new one around ``module``.

        A ``gg_refresh`` that also takes ``index`` (a walk of ``module``, as
        ``GatedDDP``'s does) is handed the schedule step's own walk.
        """
        ...


def refresh(wrapper: Rewrappable, index: ModelIndex | None = None) -> nn.Module:
    """``wrapper.gg_refresh()``, handing on the caller's walk of the model when it takes one.

    Example:
        >>> class Same(torch.nn.Module):
        ...     def __init__(self): super().__init__(); self.module = torch.nn.Linear(1, 1)
        ...     def gg_refresh(self): return self
        >>> w = Same(); refresh(w) is w
        True
    """
    method = wrapper.gg_refresh
    if index is not None and "index" in inspect.signature(method).parameters:
        return method(index=index)  # type: ignore[call-arg]
    return method()


def split_sequential(
    model: nn.Module, stages: Stages, boundary: int
) -> tuple[nn.Sequential, nn.Sequential]:
    """``(frozen prefix, rest)`` of a Sequential whose first ``boundary`` stages are frozen.

    The stages must be named by the Sequential's children (``gg.stages`` of a
    Sequential names them so); ProgressiveFreeze and AutoFreeze hand the
    prefix to a ``FeatureCache`` through this. A Sequential inside a
    ``torch.compile`` or ``DataParallel`` wrapper is split too (stages
    ``_orig_mod.0``, ...): the parts are the wrapped Sequential's, uncompiled.

    Example:
        >>> import torch, gradgate as gg
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))
        >>> head, rest = split_sequential(net, gg.stages(net, "0", "1", "2"), 2)
        >>> len(head), len(rest)
        (2, 1)
    """
    inner, prefix = looked_through(model)
    if not isinstance(inner, nn.Sequential):
        raise InvalidArgumentError(
            f"split() needs an nn.Sequential whose children are the stages; got "
            f"{type(inner).__name__}. Build the model as nn.Sequential(stage0, stage1, ...)"
        )
    model = inner
    if boundary == 0:
        return cast(nn.Sequential, model[:0]), model
    children = [prefix + name for name, _ in model.named_children()]
    last = stages.names[boundary - 1]
    if last not in children:
        raise InvalidArgumentError(
            f"split() needs stages named by the Sequential's children; {last!r} is not one "
            f"of {children}"
        )
    cut = children.index(last) + 1
    return cast(nn.Sequential, model[:cut]), cast(nn.Sequential, model[cut:])


class GradualUnfreeze:
    """Unfreeze stages on schedule, each in its own optimizer group with a lower rate.

    Stage ``i`` (of ``n``, front to back) becomes trainable at ``at[i]`` (an
    epoch or a step: whatever you pass to ``step``) and trains at
    ``base_lr * lr_mult ** (n - 1 - i)`` (or ``base_lr * lr_mult(i)``) at the
    schedule's peak. ``base_lr`` defaults to the peak of the first group: its
    ``max_lr`` under OneCycleLR or CyclicLR, else its ``initial_lr`` (never a
    warm-up's momentary value). Its group joins through ``gg.sync``, so the
    scheduler follows it, at the point the schedule has reached. Stages with
    ``at[i] <= 0`` train from the start; the others are frozen when the
    schedule is made.

    Resume: ``load_state_dict`` re-applies the unfreezes and re-creates the
    optimizer groups in the same order, so load the schedule *before* the
    optimizer and scheduler state.

    Under DDP pass the ``gg.distributed.wrap`` wrapper (any ``Rewrappable``)
    as ``model``: each unfreeze rebuilds it, and ``schedule.wrapped`` is the
    one to run (the old one raises ``StaleWrapperError`` instead of letting
    ranks diverge).

    Example:
        >>> import torch, gradgate as gg
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> opt = torch.optim.SGD(gg.param_groups(net, lr=0.1), lr=0.1)
        >>> sch = gg.GradualUnfreeze(net, gg.stages(net), at=[2, 0], optimizer=opt)
        >>> sch.step(1), sch.step(2), opt.param_groups[-1]["lr"]
        ([], [0], 0.010000000000000002)
    """

    def __init__(
        self,
        model: nn.Module,
        stages: Stages | Sequence[Selector],
        at: Sequence[int],
        optimizer: torch.optim.Optimizer,
        scheduler: Any = None,
        lr_mult: float | Callable[[int], float] = 0.1,
        warmup_steps: int = 0,
        rules: Rules = (),
        base_lr: float | None = None,
    ) -> None:
        if isinstance(at, (str, bytes)) or not isinstance(at, Sequence):
            raise InvalidArgumentError(
                f"GradualUnfreeze(at=...) must be a list of steps, one per stage; got {at!r}"
            )
        wrong = [t for t in at if not _is_step(t)]
        if wrong:
            raise InvalidArgumentError(
                f"GradualUnfreeze(at=...) must hold numbers (the step or epoch at which each "
                f"stage unfreezes); got {wrong[0]!r} in at={list(at)!r}"
            )
        self.wrapper: Rewrappable | None = model if isinstance(model, Rewrappable) else None
        model = self.wrapper.module if self.wrapper is not None else model
        self.model = model
        self.stages = _as_stages(model, stages)
        if len(at) != len(self.stages):
            raise InvalidArgumentError(
                f"at needs one entry per stage: {len(self.stages)} stages, {len(at)} entries"
            )
        if warmup_steps and scheduler is not None:
            raise InvalidArgumentError(
                "warmup_steps ramps a new group's lr itself; with a scheduler, let the "
                "scheduler do the warm-up (e.g. SequentialLR with LinearLR)"
            )
        self.at = list(at)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.lr_mult = lr_mult
        self.warmup_steps = warmup_steps
        self.rules = rules
        self.base_lr = float(base_lr if base_lr is not None else peak_lr(optimizer, scheduler))
        self.unfrozen: list[int] = [i for i, t in enumerate(self.at) if t <= 0]
        self._warm: dict[int, tuple[float, int]] = {}
        self.events: list[list[int]] = []
        later = [self.stages[i] for i, t in enumerate(self.at) if t > 0]
        if later:
            freeze(model, *later)
        if self.unfrozen:
            unfreeze(model, *[self.stages[i] for i in self.unfrozen])
        sync(optimizer, model, scheduler)
        self._rewrap()

    def _rewrap(self, index: ModelIndex | None = None) -> None:
        if self.wrapper is not None:
            fresh = refresh(self.wrapper, index)
            self.wrapper = fresh if isinstance(fresh, Rewrappable) else None

    @property
    def wrapped(self) -> nn.Module:
        """The module to run: the current DDP wrapper (rebuilt on unfreeze), else the model."""
        return cast(nn.Module, self.wrapper) if self.wrapper is not None else self.model

    def lr_for(self, i: int) -> float:
        """The learning rate stage ``i`` gets when it is unfrozen."""
        if callable(self.lr_mult):
            return self.base_lr * float(self.lr_mult(i))
        return self.base_lr * float(self.lr_mult) ** (len(self.stages) - 1 - i)

    def _unfreeze(self, due: list[int]) -> None:
        index = ModelIndex(self.model)  # the one walk of this step: unfreeze, sync, rewrap
        apply_indexed(index, "unfreeze", [self.stages[i] for i in due])
        index = current(index)
        rules = [*rule_items(self.rules), *[(self.stages[i], {"lr": self.lr_for(i)}) for i in due]]
        before = len(self.optimizer.param_groups)
        sync_indexed(self.optimizer, index, self.scheduler, rules=rules)
        if self.warmup_steps:
            for g in range(before, len(self.optimizer.param_groups)):
                target = float(self.optimizer.param_groups[g]["lr"])
                self._warm[g] = (target, 0)
                self.optimizer.param_groups[g]["lr"] = target / (self.warmup_steps + 1)
        self.unfrozen += due
        self.events.append(list(due))
        self._rewrap(index)

    def step(self, t: int) -> list[int]:
        """Apply what is due at epoch/step ``t``; return the stages unfrozen now."""
        for g, (target, k) in list(self._warm.items()):
            k += 1
            self.optimizer.param_groups[g]["lr"] = target * min(
                1.0, (k + 1) / (self.warmup_steps + 1)
            )
            self._warm[g] = (target, k)
            if k + 1 >= self.warmup_steps + 1:
                del self._warm[g]
        due = sorted(
            (i for i, when in enumerate(self.at) if when <= t and i not in self.unfrozen),
            reverse=True,  # back to front: the head side first
        )
        if due:
            self._unfreeze(due)
        return due

    def state_dict(self) -> dict[str, Any]:
        """Which stages were unfrozen (in order) and the optimizer groups by parameter name."""
        return {
            "at": list(self.at),
            "unfrozen": list(self.unfrozen),
            "events": [list(e) for e in self.events],
            "warm": {int(g): list(v) for g, v in self._warm.items()},
            "groups": _group_names(self.optimizer, self.model),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Re-apply the recorded unfreezes; call before loading optimizer/scheduler state."""
        for due in state["events"]:
            pending = [i for i in due if i not in self.unfrozen]
            if pending:
                self._unfreeze(pending)
        self.at = list(state["at"])
        self._warm = {int(g): (float(v[0]), int(v[1])) for g, v in state["warm"].items()}
        got = _group_names(self.optimizer, self.model)
        if got != state["groups"]:
            raise InvalidArgumentError(
                f"after re-applying the schedule the optimizer groups are {got}, but the "
                f"checkpoint has {state['groups']}; build the optimizer as in the original run"
            )


class Curve(enum.Enum):
    """How fast ``ProgressiveFreeze`` freezes."""

    LINEAR = "linear"
    CUBIC = "cubic"


class ProgressiveFreeze:
    """Freeze the leading stages over time (FreezeOut-style); the last stage never freezes.

    Between ``start`` and ``end`` the number of frozen leading stages grows
    from 0 to ``n - 1`` along ``curve`` (``"cubic"`` freezes later). Each
    ``step(t)`` freezes what is due and, when an optimizer is given, calls
    ``gg.sync`` so nothing frozen moves. ``boundary`` is the number of frozen
    leading stages: for an ``nn.Sequential`` model, ``model[:boundary]`` can
    be cached with ``gg.FeatureCache`` from then on (see ``split``).

    Example:
        >>> import torch, gradgate as gg
        >>> net = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(3)])
        >>> pf = gg.ProgressiveFreeze(net, gg.stages(net), start=0, end=4)
        >>> [len(pf.step(t)) for t in range(5)], pf.boundary
        ([0, 0, 1, 0, 1], 2)
    """

    def __init__(
        self,
        model: nn.Module,
        stages: Stages | Sequence[Selector],
        start: int,
        end: int,
        curve: Literal["linear", "cubic"] = "linear",
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
    ) -> None:
        for arg, value in (("start", start), ("end", end)):
            if not _is_step(value):
                raise InvalidArgumentError(
                    f"ProgressiveFreeze({arg}=...) must be a number (a step or epoch); "
                    f"got {value!r}"
                )
        if end <= start:
            raise InvalidArgumentError(f"end must be after start; got start={start}, end={end}")
        self.model = model
        self.stages = _as_stages(model, stages)
        self.start, self.end = start, end
        self.curve: Curve = choice(Curve, "curve", curve)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.boundary = 0

    def due(self, t: int) -> int:
        """How many leading stages should be frozen at ``t``."""
        frac = min(1.0, max(0.0, (t - self.start) / (self.end - self.start)))
        if self.curve is Curve.CUBIC:
            frac = frac**3
        return int((len(self.stages) - 1) * frac + 1e-9)

    def _freeze_to(self, k: int) -> list[int]:
        new = list(range(self.boundary, k))
        if new:
            index = ModelIndex(self.model)  # the one walk of this step: freeze, sync
            apply_indexed(index, "freeze", [self.stages[i] for i in new])
            self.boundary = k
            if self.optimizer is not None:
                sync_indexed(self.optimizer, current(index), self.scheduler)
        return new

    def step(self, t: int) -> list[int]:
        """Freeze what is due at ``t``; return the stages frozen now."""
        return self._freeze_to(self.due(t))

    def split(self, model: nn.Module) -> tuple[nn.Sequential, nn.Sequential]:
        """``(frozen head, rest)`` of a Sequential whose stages are its leading children
        (one inside a ``torch.compile`` or ``DataParallel`` wrapper too)."""
        return split_sequential(model, self.stages, self.boundary)

    def state_dict(self) -> dict[str, Any]:
        """The frozen boundary and the schedule's settings."""
        return {
            "boundary": self.boundary,
            "start": self.start,
            "end": self.end,
            "curve": self.curve.value,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Re-apply the freezes; call before loading optimizer/scheduler state."""
        self.start, self.end = int(state["start"]), int(state["end"])
        self.curve = choice(Curve, "curve", state["curve"])
        self._freeze_to(int(state["boundary"]))
