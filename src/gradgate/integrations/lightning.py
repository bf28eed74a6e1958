"""``GradgateFinetuning`` for Lightning: freeze, run a schedule, guard, resume, DDP.

Needs ``pip install "gradgate[lightning]"``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ..errors import InvalidArgumentError, MissingDependencyError
from ..selection import Selector
from ._core import (
    FinetuneCore,
    GuardOption,
    Live,
    ModeOption,
    ScheduleFactory,
    UnfreezeSpec,
    rebuild_ddp,
    trainable_ids,
)

try:
    import lightning.pytorch as pl
except ImportError as e:  # pragma: no cover - exercised without the extra
    raise MissingDependencyError(
        "gradgate.integrations.lightning needs Lightning; pip install 'gradgate[lightning]'"
    ) from e

__all__ = ["GradgateFinetuning"]

_log = logging.getLogger("gradgate")


def _explain_eval_mode(model: Any) -> None:
    """Say once, before Lightning's own notice, why frozen modules are in eval mode."""
    held = sum(1 for m in model.modules() if not m.training)
    if held and not getattr(_explain_eval_mode, "said", False):
        _explain_eval_mode.said = True  # type: ignore[attr-defined]
        _log.warning(
            "gradgate: %d frozen module(s) are held in eval mode on purpose (BatchNorm keeps "
            "its pretrained statistics, Dropout is off); Lightning's 'Found %d module(s) in "
            "eval mode' notice counts them and is expected (said once; see "
            "docs/integrations.md)",
            held,
            held,
        )


class GradgateFinetuning(pl.Callback):
    """A Lightning ``Callback`` that freezes, runs a gradgate schedule and guards the fit.

    ``freeze``/``train_only`` apply in ``setup``, before ``configure_optimizers``;
    at ``on_fit_start`` the optimizer is brought in line with ``gg.sync`` (an
    optimizer built over all parameters loses the frozen ones, so weight
    decay cannot move them) and becomes the one this fit adds to: an
    optimizer of an earlier fit of the same model that is still alive no
    longer counts.

    A schedule changes the trainable set during the fit. ``schedule=`` takes
    any gradgate schedule as a factory called once the optimizer exists::

        schedule=lambda model, optimizer, scheduler: gg.AutoFreeze(
            model, optimizer=optimizer, scheduler=scheduler, every=16)

    (likewise ``gg.GradualUnfreeze``, ``gg.ProgressiveFreeze``). A schedule
    whose ``step`` takes an argument (``GradualUnfreeze``,
    ``ProgressiveFreeze``) is stepped with the epoch at each epoch start; one
    whose ``step()`` takes none (``AutoFreeze``) after each optimizer step.
    ``unfreeze=[(epoch, selector), ...]`` is shorthand for a
    ``GradualUnfreeze`` over those selectors, each joining in a new group at
    ``lr_mult`` x the schedule's peak lr, placed where the scheduler has got
    to. Frozen modules stay in inference mode (``mode``) although Lightning
    switches the model to training mode every epoch and after validation.
    Under DDP the wrapper is rebuilt (in place) after every change, so the
    ranks stay identical. The schedule's ``state_dict`` travels in the
    checkpoint: ``fit(ckpt_path=...)`` re-applies it before the optimizer
    state loads. Under ``strategy="ddp_spawn"`` the factory must be picklable
    (a module-level function or ``functools.partial``, not a lambda).

    Args:
        freeze: selector of what is frozen for the whole fit (see ``gg.select``).
        train_only: selector of what trains; everything else is frozen.
        unfreeze: ``[(epoch, selector), ...]`` made trainable at that epoch.
        lr_mult: an unfrozen part's lr relative to the schedule's peak lr.
        schedule: ``(model, optimizer, scheduler) -> schedule``; not with ``unfreeze``.
        mode: train/eval behaviour of frozen modules, as in ``gg.freeze``.
        guard: ``gg.guard`` check over the fit (``"fast"``, ``"exact"``,
            ``"both"``), or ``None``; a write into a frozen tensor raises
            ``gg.FrozenTensorChangedError`` out of ``fit()``.
        summary: print ``gg.summary`` of the model at fit start.

    Raises:
        InvalidArgumentError: a bad option, or more than one optimizer.

    Example:
        >>> from gradgate.integrations.lightning import GradgateFinetuning
        >>> cb = GradgateFinetuning("backbone", unfreeze=[(2, "backbone.layer4")])
        >>> cb.state_dict()["kind"]
        'GradualUnfreeze'
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
        super().__init__()
        self.core = FinetuneCore(
            freeze,
            train_only=train_only,
            unfreeze=unfreeze,
            lr_mult=lr_mult,
            schedule=schedule,
            mode=mode,
            guard=guard,
            summary=summary,
        )
        self._global_step = -1

    @property
    def schedule(self) -> Any:
        """The schedule this fit runs (built at ``on_fit_start``), or ``None``."""
        return self.core.schedule

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Freeze before ``configure_optimizers`` runs."""
        if stage == "fit":
            self.core.prepare(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Align the optimizer, build (and on resume restore) the schedule, start the guard."""
        optimizer, scheduler = _single_optimizer(trainer)
        before = trainable_ids(pl_module)
        self.core.align(pl_module, optimizer, scheduler)
        self.core.report(pl_module)
        if trainer.is_global_zero:
            _explain_eval_mode(pl_module)
        if trainable_ids(pl_module) != before:  # a restored schedule, or one built unfrozen
            rebuild_ddp(trainer.strategy.model)
        self._global_step = trainer.global_step
        self.core.start_guard(pl_module, trainer.optimizers)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Step an epoch schedule."""
        self.core.on_epoch(pl_module, trainer.current_epoch, _live(trainer))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        """Step a per-step schedule after each optimizer step (gradients are still there)."""
        if trainer.global_step == self._global_step:
            return  # accumulating: no optimizer step in this batch
        self._global_step = trainer.global_step
        self.core.on_optimizer_step(pl_module, _live(trainer))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The guard's last check."""
        self.core.stop_guard(check=True)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Remove the guard's hooks; the exception itself propagates unchanged."""
        self.core.stop_guard(check=False)

    def state_dict(self) -> dict[str, Any]:
        """The schedule's state, saved in Lightning's checkpoint."""
        return self.core.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the schedule's state; it is re-applied at ``on_fit_start``."""
        self.core.load_state_dict(state_dict)


def _live(trainer: pl.Trainer) -> Live:
    """The trainer's DDP wrapper and optimizers, read when a schedule changed something."""
    return lambda: (trainer.strategy.model, trainer.optimizers)


def _single_optimizer(trainer: pl.Trainer) -> tuple[Any, Any]:
    optimizers = trainer.optimizers
    if len(optimizers) != 1:
        raise InvalidArgumentError(
            f"GradgateFinetuning drives exactly one optimizer; configure_optimizers returned "
            f"{len(optimizers)}; use gg.freeze/gg.sync by hand for several"
        )
    opt = optimizers[0]
    schedulers = [c.scheduler for c in trainer.lr_scheduler_configs]
    if len(schedulers) > 1:
        raise InvalidArgumentError(
            f"GradgateFinetuning extends one scheduler to new groups; found {len(schedulers)}; "
            "chain them with torch.optim.lr_scheduler.ChainedScheduler"
        )
    return opt, (schedulers[0] if schedulers else None)
