"""What both trainer callbacks do, written once; the adapters only translate hooks (private).

A trainer callback has four moments: before the optimizer exists
(``prepare``: freeze), once it exists (``align``: drop frozen parameters
from it, replay a resumed run's unfreezes, start the guard), at the start of
each epoch (``advance``: the unfreezes that are due), and at the end
(``finish``: the guard's last check).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from .._optimizers import unwrap_optimizer, unwrap_scheduler
from .._options import choice
from ..errors import CheckpointError, InvalidArgumentError
from ..freezing import Mode, freeze, train_only, unfreeze
from ..integrity import Check, Guard, guard
from ..optim import sync
from ..reports import summary
from ..selection import Selector

__all__ = ["FinetuneCore", "Unfreeze"]

GuardOption = Literal["fast", "exact", "both"] | None
ModeOption = Literal["eval", "norm", "keep"]
UnfreezeSpec = Sequence[tuple[int, Selector]]


def _everything(name: str, module: nn.Module) -> bool:
    return name == ""


@dataclass(frozen=True)
class Unfreeze:
    """One scheduled unfreeze: at the start of ``epoch``, ``selector`` trains."""

    epoch: int
    selector: Selector


class FinetuneCore:
    """The framework-free half of ``GradgateFinetuning`` (see the adapters' docstrings).

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> core = FinetuneCore("0", unfreeze=[(1, "0")], guard=None)
        >>> core.prepare(net)
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> core.align(net, opt, None)
        >>> len(opt.param_groups[0]["params"]), core.advance(net, 1, opt, None)
        (2, [0])
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
        self.mode: Mode = choice(Mode, "mode", mode)
        self.check: Check | None = None if guard is None else choice(Check, "guard", guard)
        self.freeze_selector = freeze
        self.train_only_selector = train_only
        self.unfreezes = _parse_unfreeze(unfreeze)
        self.lr_mult = float(lr_mult)
        self.summary = summary
        self.applied: list[int] = []
        self._pending: list[int] = []
        self._guard: Guard | None = None

    def prepare(self, model: nn.Module) -> None:
        """Apply ``freeze``/``train_only`` before the trainer builds its optimizer."""
        self.applied, self._pending = [], []
        if self.freeze_selector is not None:
            freeze(model, self.freeze_selector, mode=self.mode.value)
        elif self.train_only_selector is not None:
            train_only(model, self.train_only_selector, mode=self.mode.value)

    def align(self, model: nn.Module, optimizer: Any, scheduler: Any) -> None:
        """Once the optimizer exists: drop frozen parameters, replay restored unfreezes.

        Calling it again changes nothing: each restored unfreeze is replayed
        once, into the optimizer that exists at the first call (on an HF
        resume that is the one the checkpoint's state is about to load into).
        """
        opt, sched = unwrap_optimizer(optimizer), unwrap_scheduler(scheduler)
        added = sync(opt, model, sched)["added"]
        if added:
            warnings.warn(
                f"trainable parameters missing from the optimizer were added to it in a new "
                f"group at its default options: {added[:5]}; build the optimizer over them, "
                "or freeze them",
                UserWarning,
                stacklevel=3,
            )
        pending, self._pending = self._pending, []
        for index in pending:
            self._unfreeze(model, index, opt, sched)

    def report(self, model: nn.Module) -> None:
        """Print ``gg.summary`` of the model when ``summary=True`` was asked for."""
        if self.summary:
            print(summary(model))

    def due(self, epoch: int) -> list[int]:
        """Indices of the unfreezes due at ``epoch`` and not applied yet."""
        return [
            i for i, u in enumerate(self.unfreezes) if u.epoch <= epoch and i not in self.applied
        ]

    def advance(self, model: nn.Module, epoch: int, optimizer: Any, scheduler: Any) -> list[int]:
        """Apply the unfreezes due at ``epoch``; return their indices."""
        due = self.due(epoch)
        opt, sched = unwrap_optimizer(optimizer), unwrap_scheduler(scheduler)
        for index in due:
            self._unfreeze(model, index, opt, sched)
            self.applied.append(index)
        return due

    def _unfreeze(
        self, model: nn.Module, index: int, opt: torch.optim.Optimizer, sched: Any
    ) -> None:
        unfreeze(model, self.unfreezes[index].selector)
        sync(opt, model, sched, rules=[(_everything, self._new_group_options(opt))])

    def _new_group_options(self, opt: torch.optim.Optimizer) -> dict[str, float]:
        """Options that place a new group at ``lr_mult`` x group 0 on every schedule.

        ``initial_lr`` (a scheduler's base) scales too, so closed-form and
        lambda schedules compute the new group's lr from a base that keeps the
        ratio; OneCycleLR derives everything from ``max_lr``.
        """
        ref = opt.param_groups[0]
        if "max_lr" in ref:
            return {"lr": self.lr_mult * ref["max_lr"]}
        options = {"lr": self.lr_mult * ref["lr"]}
        if "initial_lr" in ref:
            options["initial_lr"] = self.lr_mult * ref["initial_lr"]
        return options

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

    def state_dict(self) -> dict[str, Any]:
        """Which unfreezes have been applied (they are replayed on resume)."""
        return {"applied": list(self.applied), "epochs": [u.epoch for u in self.unfreezes]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()``; the replay happens in ``align``."""
        epochs = [u.epoch for u in self.unfreezes]
        if list(state.get("epochs", [])) != epochs:
            raise CheckpointError(
                f"the checkpoint's GradgateFinetuning ran unfreeze epochs {state.get('epochs')}, "
                f"this one has {epochs}; resume with the same unfreeze= schedule"
            )
        applied = state.get("applied")
        if not isinstance(applied, list) or not all(
            isinstance(i, int) and 0 <= i < len(epochs) for i in applied
        ):
            raise CheckpointError(
                f"the checkpoint's GradgateFinetuning state has applied={applied!r}, expected "
                f"indices into the {len(epochs)} unfreeze steps; the state is damaged, resume "
                "from another checkpoint"
            )
        self.applied = list(applied)
        self._pending = list(applied)


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
