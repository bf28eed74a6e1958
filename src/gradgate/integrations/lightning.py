"""``GradgateFinetuning`` for Lightning: freeze, unfreeze on schedule, guard, resume, DDP.

Needs ``pip install "gradgate[lightning]"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch.nn.parallel import DistributedDataParallel

from ..errors import InvalidArgumentError, MissingDependencyError
from ..selection import Selector
from ._core import FinetuneCore, GuardOption, ModeOption, UnfreezeSpec

try:
    import lightning.pytorch as pl
except ImportError as e:  # pragma: no cover - exercised without the extra
    raise MissingDependencyError(
        "gradgate.integrations.lightning needs Lightning; pip install 'gradgate[lightning]'"
    ) from e

__all__ = ["GradgateFinetuning"]


class GradgateFinetuning(pl.Callback):
    """A Lightning ``Callback`` that freezes, unfreezes on schedule and guards the fit.

    ``freeze``/``train_only`` apply in ``setup``, before ``configure_optimizers``;
    at ``on_fit_start`` the optimizer is brought in line with ``gg.sync`` (an
    optimizer built over all parameters loses the frozen ones, so weight
    decay cannot move them). ``unfreeze=[(epoch, selector), ...]`` makes a
    part trainable at the start of that epoch, in a new group of the (single)
    optimizer at ``lr_mult`` x group 0's current lr, which the optimizer's
    scheduler then drives. Frozen modules stay in inference mode (``mode``)
    although Lightning switches the model to training mode every epoch and
    after validation. Under DDP the wrapper is rebuilt after an unfreeze, so
    the new parameters are all-reduced. The applied unfreezes travel in the
    checkpoint: ``fit(ckpt_path=...)`` replays them before the optimizer
    state loads.

    Args:
        freeze: selector of what is frozen for the whole fit (see ``gg.select``).
        train_only: selector of what trains; everything else is frozen.
        unfreeze: ``[(epoch, selector), ...]`` made trainable at that epoch.
        lr_mult: new groups' lr relative to group 0's lr at that moment.
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
        >>> cb.state_dict()
        {'applied': [], 'epochs': [2]}
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
        super().__init__()
        self.core = FinetuneCore(
            freeze,
            train_only=train_only,
            unfreeze=unfreeze,
            lr_mult=lr_mult,
            mode=mode,
            guard=guard,
            summary=summary,
        )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Freeze before ``configure_optimizers`` runs."""
        if stage == "fit":
            self.core.prepare(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Align the optimizer, replay a restored run's unfreezes, start the guard."""
        optimizer, scheduler = _single_optimizer(trainer)
        self.core.align(pl_module, optimizer, scheduler)
        self.core.report(pl_module)
        if self.core.applied:
            _rewrap(trainer, pl_module)
        self.core.start_guard(pl_module, trainer.optimizers)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Apply the unfreezes due at this epoch."""
        optimizer, scheduler = _single_optimizer(trainer)
        if not self.core.due(trainer.current_epoch):
            return
        self.core.stop_guard(check=True)
        self.core.advance(pl_module, trainer.current_epoch, optimizer, scheduler)
        _rewrap(trainer, pl_module)
        self.core.start_guard(pl_module, trainer.optimizers)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The guard's last check."""
        self.core.stop_guard(check=True)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Remove the guard's hooks; the exception itself propagates unchanged."""
        self.core.stop_guard(check=False)

    def state_dict(self) -> dict[str, Any]:
        """The applied unfreezes, saved in Lightning's checkpoint."""
        return self.core.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the applied unfreezes; they are replayed at ``on_fit_start``."""
        self.core.load_state_dict(state_dict)


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


def _rewrap(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Rebuild Lightning's DDP wrapper: DDP registers only parameters trainable when built.

    Without this an unfrozen parameter is never all-reduced and the ranks
    silently diverge (Lightning #20340).
    """
    strategy = trainer.strategy
    if not isinstance(strategy, pl.strategies.DDPStrategy):
        return
    old = strategy.model
    if not isinstance(old, DistributedDataParallel):
        return
    old._remove_autograd_hooks()
    strategy.model = pl_module
    strategy.configure_ddp()
