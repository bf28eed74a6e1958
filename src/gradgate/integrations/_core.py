"""What both trainer callbacks do, written once; the adapters only translate hooks (private).

A trainer callback has five moments: before the optimizer exists
(``prepare``: freeze), once it exists (``align``: drop frozen parameters
from it, build the schedule, replay a resumed run's schedule, start the
guard), at the start of each epoch (``on_epoch``: an epoch schedule steps),
after each optimizer step (``on_optimizer_step``: a step schedule such as
``AutoFreeze`` steps), and at the end (``finish``: the guard's last check).

There is one schedule engine: ``unfreeze=[(epoch, selector), ...]`` builds a
``gg.GradualUnfreeze`` and ``schedule=`` builds any gradgate schedule; the
callbacks only step it, keep its state in the trainer's checkpoint and
rebuild DDP after it changed the trainable set.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import CyclicLR, OneCycleLR

from .._optimizers import unwrap_optimizer, unwrap_scheduler
from .._options import choice
from ..distributed import rewrap
from ..errors import CheckpointError, InvalidArgumentError
from ..freezing import Mode, freeze, train_only
from ..integrity import Check, Guard, guard
from ..optim import rule_items, sync
from ..optim.groups import decay_rules
from ..optim.schedulers import schedulers
from ..optim.sync import claim
from ..reports import summary
from ..schedules import GradualUnfreeze
from ..selection import Selector

__all__ = [
    "FinetuneCore",
    "Live",
    "ScheduleFactory",
    "Unfreeze",
    "per_optimizer_step",
    "rebuild_ddp",
    "trainable_ids",
]

GuardOption = Literal["fast", "exact", "both"] | None
ModeOption = Literal["eval", "norm", "keep"]
UnfreezeSpec = Sequence[tuple[int, Selector]]
ScheduleFactory = Callable[[nn.Module, torch.optim.Optimizer, Any], Any]
"""``(model, optimizer, scheduler) -> schedule``, called once the trainer built its optimizer."""

_STATE_VERSION = 2


@dataclass(frozen=True)
class Unfreeze:
    """One scheduled unfreeze: at the start of ``epoch``, ``selector`` trains."""

    epoch: int
    selector: Selector


Live = Callable[[], tuple[Any, Sequence[Any]]]
"""The trainer's current DDP wrapper (or module) and optimizers, read after a schedule change."""


def _constant(value: float, stage: int) -> float:
    return value  # picklable (a ddp_spawn launch pickles the callback)


def per_optimizer_step(schedule: Any) -> bool:
    """Whether ``schedule.step`` takes no argument (stepped after each optimizer step).

    ``AutoFreeze.step()`` counts optimizer steps; ``GradualUnfreeze.step(t)``
    and ``ProgressiveFreeze.step(t)`` take the epoch.

    Example:
        >>> class EveryStep:
        ...     def step(self): return []
        >>> per_optimizer_step(EveryStep())
        True
    """
    params = inspect.signature(schedule.step).parameters.values()
    return not any(
        p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        for p in params
    )


TENSOR_KEY = "__gradgate_tensor__"  # stands for a tensor moved out of a JSON state


def split_tensors(value: Any, out: list[torch.Tensor]) -> Any:
    """``value`` with every tensor replaced by ``{TENSOR_KEY: k}`` (``out[k]`` holds it).

    A callback state that must be JSON (the HF Trainer's checkpoint folder)
    keeps its tensors (the weight snapshots of AutoFreeze's measured rules) in a side file.
    """
    if isinstance(value, torch.Tensor):
        out.append(value)
        return {TENSOR_KEY: len(out) - 1}
    if isinstance(value, Mapping):
        return {k: split_tensors(v, out) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [split_tensors(v, out) for v in value]
    return value


def join_tensors(value: Any, tensors: Sequence[torch.Tensor] | None, where: str) -> Any:
    """Undo ``split_tensors``; ``CheckpointError`` when a tensor it names is missing."""
    if isinstance(value, Mapping):
        if set(value) == {TENSOR_KEY}:
            k = value[TENSOR_KEY]
            if (
                tensors is None
                or isinstance(k, bool)
                or not isinstance(k, int)
                or not 0 <= k < len(tensors)
            ):
                raise CheckpointError(
                    f"the callback state names tensor {k!r} but {where} "
                    f"{'is missing' if tensors is None else f'holds {len(tensors)}'}; "
                    "resume from a checkpoint folder written whole by this callback"
                )
            return tensors[k]
        return {key: join_tensors(v, tensors, where) for key, v in value.items()}
    if isinstance(value, list):
        return [join_tensors(v, tensors, where) for v in value]
    return value


def trainable_ids(model: nn.Module) -> frozenset[int]:
    """The ids of ``model``'s parameters that require gradients (what DDP registers).

    Example:
        >>> len(trainable_ids(torch.nn.Linear(1, 1)))
        2
    """
    return frozenset(id(p) for p in model.parameters() if p.requires_grad)


def rebuild_ddp(wrapper: Any) -> bool:
    """Rebuild ``wrapper`` in place if it is a DDP whose trainable set changed; say if it was.

    The trainer's loop keeps the wrapper object it holds, so it is rebuilt
    in place (``gg.distributed.rewrap(..., in_place=True)``): DDP registers
    only the parameters that require gradients when it is built, so an
    unfrozen part would never be all-reduced and the ranks would diverge
    silently (Lightning #20340), and a frozen one would stall the reducer.

    Example:
        >>> rebuild_ddp(torch.nn.Linear(1, 1))  # not a DDP: nothing to do
        False
    """
    if not isinstance(wrapper, DistributedDataParallel):
        return False
    rewrap(wrapper, in_place=True)
    return True


class _PlacedUnfreeze(GradualUnfreeze):
    """The ``unfreeze=`` shorthand: a ``GradualUnfreeze`` whose groups join on the schedule.

    A new group's peak is ``lr_mult`` x the schedule's peak (``lr_for``), as
    in any ``GradualUnfreeze``; it starts where group 0's schedule has got
    to (its lr x group 0's ``lr / initial_lr``), also under schedulers
    ``gg.sync`` does not place new groups on yet (StepLR, MultiStepLR,
    ExponentialLR, ...). OneCycleLR and CyclicLR place it themselves.
    """

    def lr_for(self, i: int) -> float:
        """Stage ``i``'s lr now: its peak times how far group 0 is down its schedule."""
        peak = super().lr_for(i)
        ref = self.optimizer.param_groups[0]
        cyclic = any(isinstance(s, (OneCycleLR, CyclicLR)) for s in schedulers(self.scheduler))
        if cyclic or "max_lr" in ref or not ref.get("initial_lr"):
            return peak
        return peak * float(ref["lr"]) / float(ref["initial_lr"])

    def _unfreeze(self, due: list[int]) -> None:
        # The peak goes in as the group's initial_lr (the base every schedule scales).
        peaks = [(self.stages[i], {"initial_lr": GradualUnfreeze.lr_for(self, i)}) for i in due]
        base, self.rules = self.rules, [*rule_items(self.rules), *peaks]
        try:
            super()._unfreeze(due)
        finally:
            self.rules = base


class FinetuneCore:
    """The framework-free half of ``GradgateFinetuning`` (see the adapters' docstrings).

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> core = FinetuneCore("0", unfreeze=[(1, "0")], guard=None)
        >>> core.prepare(net)
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> core.align(net, opt, None)
        >>> len(opt.param_groups[0]["params"]), core.on_epoch(net, 1)
        (2, True)
        >>> opt.param_groups[1]["lr"]
        0.010000000000000002
    """

    def __init__(
        self,
        freeze: Selector | None = None,
        *,
        train_only: Selector | None = None,
        unfreeze: UnfreezeSpec = (),
        lr_mult: float = 0.1,
        schedule: ScheduleFactory | None = None,
        mode: ModeOption = "eval",
        guard: GuardOption = "fast",
        summary: bool = False,
    ) -> None:
        if freeze is not None and train_only is not None:
            raise InvalidArgumentError(
                "GradgateFinetuning got both freeze= and train_only=; pass one: freeze names "
                "what stops training, train_only what keeps training"
            )
        if isinstance(lr_mult, bool) or not isinstance(lr_mult, (int, float)) or lr_mult <= 0:
            raise InvalidArgumentError(f"lr_mult must be a positive number; got {lr_mult!r}")
        if schedule is not None and not callable(schedule):
            raise InvalidArgumentError(
                "schedule must be a factory called once the trainer built its optimizer, "
                "e.g. schedule=lambda model, optimizer, scheduler: gg.AutoFreeze(model, "
                f"optimizer=optimizer, scheduler=scheduler); got {type(schedule).__name__}"
            )
        self.mode: Mode = choice(Mode, "mode", mode)
        self.check: Check | None = None if guard is None else choice(Check, "guard", guard)
        self.freeze_selector = freeze
        self.train_only_selector = train_only
        self.unfreezes = _parse_unfreeze(unfreeze)
        if schedule is not None and self.unfreezes:
            raise InvalidArgumentError(
                "GradgateFinetuning got both unfreeze= and schedule=; unfreeze=[(epoch, "
                "selector), ...] is a gg.GradualUnfreeze: pass one of them"
            )
        self.lr_mult = float(lr_mult)
        self.weight_decay: float | None = None  # the HF adapter sets TrainingArguments'
        self.factory = schedule
        self.summary = summary
        self.schedule: Any = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self._restored: dict[str, Any] | None = None
        self._guard: Guard | None = None

    # ------------------------------------------------------------ the fit

    def prepare(self, model: nn.Module) -> None:
        """Apply ``freeze``/``train_only`` before the trainer builds its optimizer."""
        self.schedule, self.optimizer, self.scheduler = None, None, None
        if self.freeze_selector is not None:
            freeze(model, self.freeze_selector, mode=self.mode.value)
        elif self.train_only_selector is not None:
            train_only(model, self.train_only_selector, mode=self.mode.value)

    def align(self, model: nn.Module, optimizer: Any, scheduler: Any) -> None:
        """Once the optimizer exists: own it, drop frozen parameters, build the schedule.

        The fit's optimizer becomes the one gradgate adds to (an optimizer of
        an earlier fit of the same model no longer counts, issue 23.11). A
        restored schedule state is loaded into the schedule here, so its
        groups exist before the trainer loads the optimizer state. Calling it
        again with the same optimizer only hands a newly built scheduler on.
        """
        opt, sched = unwrap_optimizer(optimizer), unwrap_scheduler(scheduler)
        if self.optimizer is opt:
            if sched is not None and self.scheduler is None:
                self.scheduler = sched
                if self.schedule is not None and getattr(self.schedule, "scheduler", 0) is None:
                    self.schedule.scheduler = sched
            return
        claim(opt, model)
        added = sync(opt, model, sched, rules=self.new_group_rules(model, opt))["added"]
        if added:
            warnings.warn(
                f"trainable parameters missing from the optimizer were added to it in a new "
                f"group at its default options: {added[:5]}; build the optimizer over them, "
                "or freeze them",
                UserWarning,
                stacklevel=3,
            )
        self.optimizer, self.scheduler = opt, sched
        self.schedule = self._build(model, opt, sched)
        restored, self._restored = self._restored, None
        if restored is not None:
            self._load_schedule(restored)
        self.ensure_complete(model)

    def _build(self, model: nn.Module, opt: torch.optim.Optimizer, sched: Any) -> Any:
        if self.unfreezes:
            return _PlacedUnfreeze(
                model,
                [u.selector for u in self.unfreezes],
                at=[u.epoch for u in self.unfreezes],
                optimizer=opt,
                scheduler=sched,
                lr_mult=functools.partial(_constant, self.lr_mult),
                rules=self.new_group_rules(model, opt),
            )
        if self.factory is None:
            return None
        made = self.factory(model, opt, sched)
        missing = [a for a in ("step", "state_dict", "load_state_dict") if not hasattr(made, a)]
        if missing:
            raise InvalidArgumentError(
                f"schedule= returned {type(made).__name__}, which has no {', '.join(missing)}; "
                "return a gradgate schedule (gg.GradualUnfreeze, gg.ProgressiveFreeze, "
                "gg.AutoFreeze) built over the model, optimizer and scheduler it is given"
            )
        return made

    def new_group_rules(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
    ) -> list[tuple[Selector, dict[str, float]]]:
        """``gg.sync`` rules for the groups the callback adds: ``param_groups``' weight decay.

        The decay is ``weight_decay`` when set (the HF adapter sets
        ``TrainingArguments.weight_decay``), else the fit's optimizer's
        default (what Lightning's ``configure_optimizers`` gave it). New
        groups get it, except the parameters ``gg.param_groups`` keeps out of
        decay (biases, norms, other 1-D tensors: ``optim.groups.
        no_decay_names``), which get 0. With neither, the optimizer's defaults.

        Example:
            >>> core = FinetuneCore()
            >>> core.weight_decay = 0.1
            >>> [opts for _, opts in core.new_group_rules(torch.nn.Linear(2, 2))]
            [{'weight_decay': 0.1}, {'weight_decay': 0.0}]
        """
        decay = self.weight_decay
        opt = optimizer if optimizer is not None else self.optimizer
        if decay is None and opt is not None:
            decay = opt.defaults.get("weight_decay")
        if decay is None:
            return []
        return decay_rules(model, float(decay))

    @property
    def steps_per_optimizer_step(self) -> bool:
        """Whether the schedule steps after each optimizer step (else at each epoch start)."""
        return self.schedule is not None and per_optimizer_step(self.schedule)

    def on_epoch(self, model: nn.Module, epoch: int, live: Live | None = None) -> bool:
        """Step an epoch schedule at the start of ``epoch``; say if the trainable set changed.

        With ``live`` (the trainer's current DDP wrapper and optimizers), a
        change is followed by the one rewrap both callbacks need (see ``_step``).
        """
        if self.schedule is None or self.steps_per_optimizer_step:
            return False
        return self._step(model, lambda: self.schedule.step(epoch), live)

    def on_optimizer_step(self, model: nn.Module, live: Live | None = None) -> bool:
        """Step a per-step schedule (``AutoFreeze``) after an optimizer step (gradients still
        there); say if the trainable set changed (``live`` as in ``on_epoch``)."""
        if not self.steps_per_optimizer_step:
            return False
        return self._step(model, self.schedule.step, live)

    def _step(self, model: nn.Module, step: Callable[[], Any], live: Live | None) -> bool:
        """Step the schedule; after a change check the optimizer and, given the trainer's
        wrapper and optimizers, check the guard, rebuild DDP and watch the new sets."""
        changed = bool(step())
        if changed:
            self.ensure_complete(model)
            if live is not None:
                wrapper, optimizers = live()
                self.stop_guard(check=True)
                rebuild_ddp(wrapper)
                self.start_guard(model, optimizers)
        return changed

    def ensure_complete(self, model: nn.Module) -> None:
        """Refuse to go on while a trainable parameter is missing from the fit's optimizer.

        The schedules add what they unfreeze through ``gg.sync``; this is the
        check that nothing was left out silently (issue 23.11).
        """
        opt = self.optimizer
        if opt is None:
            return
        left = sync(opt, model, self.scheduler, rules=self.new_group_rules(model))["left"]
        if left:
            raise InvalidArgumentError(
                f"GradgateFinetuning made {left[:5]} trainable but the fit's optimizer does not "
                "hold them (another optimizer holds them, and gg.sync will not step them twice); "
                "build one optimizer over the model, or freeze them"
            )

    def report(self, model: nn.Module) -> None:
        """Print ``gg.summary`` of the model when ``summary=True`` was asked for."""
        if self.summary:
            print(summary(model))

    # ------------------------------------------------------------ the guard

    def start_guard(self, model: nn.Module, optimizers: Sequence[Any]) -> None:
        """Watch every frozen tensor from now on (no-op with ``guard=None``)."""
        self.stop_guard(check=False)
        if self.check is not None:
            opts = [unwrap_optimizer(o) for o in optimizers]
            self._guard = guard(model, opts, check=self.check.value).__enter__()

    def stop_guard(self, check: bool) -> None:
        """Remove the guard's hooks; with ``check``, compare everything one last time."""
        g, self._guard = self._guard, None
        if g is not None:
            # An exit that is told of an exception removes the hooks without checking.
            g.__exit__(None if check else RuntimeError, None, None)

    # ------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        """The schedule's own ``state_dict()`` and what it is (saved in the checkpoint)."""
        if self.schedule is not None:
            state: Any = self.schedule.state_dict()
        elif self._restored is not None:
            state = self._restored["schedule"]
        elif self.unfreezes:  # not built yet: the plan, with nothing applied
            state = {"at": [u.epoch for u in self.unfreezes], "unfrozen": [], "events": []}
        else:
            state = None
        return {"version": _STATE_VERSION, "kind": self._kind(), "schedule": state}

    def _kind(self) -> str:
        if self.unfreezes:
            return "GradualUnfreeze"
        if self.schedule is not None:
            return type(self.schedule).__name__
        return "schedule" if self.factory is not None else "none"

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()``; the schedule loads it once it is built (in ``align``).

        The ``unfreeze=`` shorthand's state is checked here, before anything
        changes; a state written by gradgate 0.1 (``{"applied", "epochs"}``)
        is still read.

        Raises:
            CheckpointError: the state is damaged, or it was written with
                another ``unfreeze=``/``schedule=``.
        """
        if not isinstance(state, Mapping):
            raise CheckpointError(
                f"the checkpoint's GradgateFinetuning state is a {type(state).__name__}, not a "
                "mapping; resume from a checkpoint saved by a run with this callback"
            )
        saved = _upgrade(state) if "applied" in state and "version" not in state else dict(state)
        if saved.get("version") != _STATE_VERSION:
            raise CheckpointError(
                f"the checkpoint's GradgateFinetuning state has version {saved.get('version')!r}"
                f", this gradgate reads {_STATE_VERSION}; resume from a checkpoint it wrote"
            )
        kind = self._kind()
        if saved.get("kind") != kind and "schedule" not in (kind, saved.get("kind")):
            raise CheckpointError(
                f"the checkpoint's GradgateFinetuning ran a {saved.get('kind')} schedule, this "
                f"one runs {kind}; resume with the same unfreeze=/schedule="
            )
        if self.unfreezes:
            self._check_unfreeze_state(saved)
        if self.schedule is not None:
            self._load_schedule(saved)
        else:
            self._restored = saved

    def _check_unfreeze_state(self, state: Mapping[str, Any]) -> None:
        epochs = [u.epoch for u in self.unfreezes]
        inner = state.get("schedule")
        at = inner.get("at") if isinstance(inner, Mapping) else None
        if at is None or list(at) != epochs:
            raise CheckpointError(
                f"the checkpoint's GradgateFinetuning ran unfreeze epochs {at}, "
                f"this one has {epochs}; resume with the same unfreeze= schedule"
            )
        assert isinstance(inner, Mapping)
        key = "applied" if state.get("legacy") else "unfrozen"
        done = inner.get(key)
        if not isinstance(done, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(epochs) for i in done
        ):
            raise CheckpointError(
                f"the checkpoint's GradgateFinetuning state has {key}={done!r}, expected "
                f"indices into the {len(epochs)} unfreeze steps; the state is damaged, resume "
                "from another checkpoint"
            )

    def _load_schedule(self, state: Mapping[str, Any]) -> None:
        schedule_state = state["schedule"]
        if schedule_state is None or self.schedule is None:
            if (schedule_state is None) != (self.schedule is None):
                raise CheckpointError(
                    "the checkpoint's GradgateFinetuning state and this callback disagree on "
                    "whether there is a schedule; resume with the same unfreeze=/schedule="
                )
            return
        legacy = bool(state.get("legacy"))
        plan = self.unfreezes and "groups" not in schedule_state
        if plan and not legacy and not schedule_state.get("events"):
            return  # a plan saved before the schedule was built: nothing to re-apply
        try:
            if legacy:
                # gradgate 0.1 applied each unfreeze in its own group, in this order.
                for index in schedule_state["applied"]:
                    if index not in self.schedule.unfrozen:
                        self.schedule._unfreeze([index])
            else:
                self.schedule.load_state_dict(schedule_state)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(
                f"the checkpoint's {state.get('kind')} state does not fit this callback's "
                f"schedule ({type(e).__name__}: {e}); resume with the same unfreeze=/schedule="
            ) from e


def _upgrade(state: Mapping[str, Any]) -> dict[str, Any]:
    """A gradgate 0.1 state (``{"applied": [...], "epochs": [...]}``) in today's form."""
    return {
        "version": _STATE_VERSION,
        "kind": "GradualUnfreeze",
        "legacy": True,
        "schedule": {"at": state.get("epochs"), "applied": state.get("applied")},
    }


def _parse_unfreeze(spec: UnfreezeSpec) -> list[Unfreeze]:
    out: list[Unfreeze] = []
    for item in spec:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise InvalidArgumentError(
                f"unfreeze must be a list of (epoch, selectors) pairs; got item {item!r}"
            )
        epoch, selector = item
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise InvalidArgumentError(
                f"unfreeze epoch must be a whole number >= 0; got {epoch!r} for {selector!r}"
            )
        out.append(Unfreeze(epoch, selector))
    return out
