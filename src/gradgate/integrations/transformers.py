"""``GradgateFinetuning`` for the Hugging Face ``Trainer``: freeze, schedule, guard, save.

Needs ``pip install "gradgate[transformers]"``.
"""

from __future__ import annotations

import json
import math
import os
import weakref
from typing import Any

import torch
from torch import nn

from ..checkpoint import save_trainable
from ..errors import CheckpointError, InvalidArgumentError, MissingDependencyError
from ..selection import Selector
from ._core import (
    FinetuneCore,
    GuardOption,
    Live,
    ModeOption,
    ScheduleFactory,
    UnfreezeSpec,
    join_tensors,
    rebuild_ddp,
    split_tensors,
    trainable_ids,
)

try:
    from transformers import (
        Trainer,
        TrainerCallback,
        TrainerControl,
        TrainerState,
        TrainingArguments,
    )
    from transformers.trainer_utils import get_last_checkpoint
except ImportError as e:  # pragma: no cover - exercised without the extra
    raise MissingDependencyError(
        "gradgate.integrations.transformers needs transformers; "
        "pip install 'gradgate[transformers]'"
    ) from e

__all__ = [
    "STATE_FILE",
    "TENSORS_FILE",
    "TRAINABLE_FILE",
    "GradgateFinetuning",
    "GradgateTrainer",
]

TRAINABLE_FILE = "trainable.safetensors"
"""Name of the ``gg.save_trainable`` file written into each checkpoint folder."""

STATE_FILE = "gradgate_finetuning.json"
"""Name of the file holding ``GradgateFinetuning``'s state in each checkpoint folder."""

TENSORS_FILE = "gradgate_finetuning_tensors.pt"
"""Name of the file holding the tensors of that state (AutoFreeze's default ``progress``
rule and its ``contribution`` rule keep weight copies), written only when the state has any."""


class GradgateFinetuning(TrainerCallback):
    """An HF ``TrainerCallback`` that freezes, runs a gradgate schedule and guards training.

    Pass it in ``Trainer(callbacks=[...])``: ``freeze``/``train_only`` apply
    at ``on_init_end``, before ``train()`` builds the optimizer (added later
    with ``add_callback``, it freezes at ``on_train_begin`` and takes the
    frozen parameters out of the optimizer). An optimizer given through
    ``optimizers=`` is brought in line with ``gg.sync`` at train start, so
    weight decay cannot move a frozen weight, and the fit's optimizer becomes
    the one gradgate adds to (an earlier fit's optimizer no longer counts).

    ``schedule=`` takes any gradgate schedule as a factory called once the
    optimizer exists (``lambda model, optimizer, scheduler:
    gg.AutoFreeze(model, optimizer=optimizer, scheduler=scheduler)``, likewise
    ``gg.GradualUnfreeze``, ``gg.ProgressiveFreeze``); a schedule whose
    ``step`` takes an argument is stepped with the epoch at each epoch start,
    ``AutoFreeze`` after each optimizer step. ``unfreeze=[(epoch, selector),
    ...]`` is shorthand for a ``GradualUnfreeze``: each part joins in a new
    group at ``lr_mult`` x the schedule's peak lr, where the Trainer's
    scheduler (linear, cosine, ... warm-up) has got to, with
    ``TrainingArguments.weight_decay`` (0 for biases and norms, the
    ``gg.param_groups`` rule). Frozen modules stay in inference mode although
    the Trainer calls ``model.train()``. Each checkpoint folder gets
    ``gradgate_finetuning.json`` (the schedule's ``state_dict``, which must be
    JSON-ready: gradgate's are). Use ``GradgateTrainer`` to resume a run whose
    schedule changed something (it re-applies the schedule before the Trainer
    loads the optimizer state) and under DDP (it rebuilds the DDP wrapper
    after every change; with a plain ``Trainer`` the callback refuses to run
    a schedule under DDP).

    Args:
        freeze: selector of what is frozen (see ``gg.select``).
        train_only: selector of what trains; everything else is frozen.
        unfreeze: ``[(epoch, selector), ...]`` made trainable at that epoch.
        lr_mult: an unfrozen part's lr relative to the schedule's peak lr.
        schedule: ``(model, optimizer, scheduler) -> schedule``; not with ``unfreeze``.
        mode: train/eval behaviour of frozen modules, as in ``gg.freeze``.
        guard: ``gg.guard`` check over training (``"fast"``, ``"exact"``,
            ``"both"``) or ``None``; a write into a frozen tensor raises
            ``gg.FrozenTensorChangedError`` out of ``train()``.
        summary: print ``gg.summary`` of the model at train start.
        save_trainable: at each checkpoint also write ``trainable.safetensors``
            (``gg.save_trainable``: only what trains, bound to the frozen
            base's fingerprint) into the checkpoint folder.

    Example:
        >>> from gradgate.integrations.transformers import GradgateFinetuning
        >>> cb = GradgateFinetuning(train_only="classifier", guard="exact")
        >>> cb.core.check.value
        'exact'
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
        save_trainable: bool = False,
    ) -> None:
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
        self.save_trainable = save_trainable
        self._prepared = False
        self._trainer: weakref.ref[Trainer] | None = None  # set by GradgateTrainer
        self._stale = False

    @property
    def schedule(self) -> Any:
        """The schedule this run uses (built once the optimizer exists), or ``None``."""
        return self.core.schedule

    def on_init_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        """Freeze before the optimizer is built."""
        if model is not None:
            self._prepare_once(model)

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        optimizer: Any = None,
        lr_scheduler: Any = None,
        **kwargs: Any,
    ) -> None:
        """Align the optimizer with what trains, build the schedule, start the guard."""
        assert model is not None  # the Trainer always passes its model
        self._prepare_once(model)
        self.align(args, model, optimizer, lr_scheduler)
        if self._stale:
            rebuild_ddp(self._wrapper())
            self._stale = False
        if self.core.schedule is not None and _distributed() and self._wrapper() is None:
            raise InvalidArgumentError(
                "GradgateFinetuning runs a schedule that changes what trains, and under DDP "
                "the wrapper must then be rebuilt on every rank; a plain Trainer does not let "
                "a callback reach it: use gradgate.integrations.transformers.GradgateTrainer"
            )
        self.core.report(model)
        self.core.start_guard(model, [optimizer])

    def align(self, args: TrainingArguments, model: nn.Module, optimizer: Any, sched: Any) -> None:
        """Bring the optimizer in line and build (or restore) the schedule."""
        self.core.weight_decay = float(args.weight_decay)
        before = trainable_ids(model)
        self.core.align(model, optimizer, sched)
        # The DDP wrapper is rebuilt at train begin: in create_scheduler the Trainer
        # has not published it yet (model_wrapped).
        self._stale = self._stale or trainable_ids(model) != before

    def on_epoch_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        """Step an epoch schedule."""
        assert model is not None
        # state.epoch is a float that counts finished steps; it is whole at an epoch start
        # except on a resume in the middle of one.
        epoch = math.floor((state.epoch or 0.0) + 1e-6)
        self.core.on_epoch(model, epoch, self._live(optimizer))

    def on_optimizer_step(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        """Step a per-step schedule (``AutoFreeze``): after the step, before ``zero_grad``."""
        assert model is not None
        self.core.on_optimizer_step(model, self._live(optimizer))

    def _live(self, optimizer: Any) -> Live:
        """The Trainer's DDP wrapper and optimizer, read when a schedule changed something."""
        return lambda: (self._wrapper(), [optimizer])

    def _wrapper(self) -> Any:
        trainer = self._trainer() if self._trainer is not None else None
        return None if trainer is None else trainer.model_wrapped

    def on_save(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        """Write the schedule's state (and, with ``save_trainable``, what trains) into the
        checkpoint folder."""
        if not state.is_world_process_zero:
            return
        folder = os.path.join(str(args.output_dir), f"checkpoint-{state.global_step}")
        tensors: list[torch.Tensor] = []
        state = split_tensors(self.core.state_dict(), tensors)
        if tensors:
            torch.save(tensors, os.path.join(folder, TENSORS_FILE))
        with open(os.path.join(folder, STATE_FILE), "w") as f:
            json.dump(state, f)
        if self.save_trainable and model is not None:
            save_trainable(model, os.path.join(folder, TRAINABLE_FILE))

    def _prepare_once(self, model: nn.Module) -> None:
        if not self._prepared:
            self.core.prepare(model)
            self._prepared = True

    def restore(self, checkpoint: str) -> None:
        """Read the state ``on_save`` wrote into ``checkpoint``; ``GradgateTrainer`` calls it.

        The restored schedule is re-applied as soon as the optimizer and its
        scheduler exist, before the Trainer loads the checkpoint's optimizer
        state.

        Raises:
            CheckpointError: the folder has no readable state file, or it was
                written with a different ``unfreeze=``/``schedule=``.
        """
        path = os.path.join(checkpoint, STATE_FILE)
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(
                f"cannot resume GradgateFinetuning from {checkpoint!r}: {path} is missing or "
                f"unreadable ({e}); resume from a checkpoint saved by a run with this callback"
            ) from e
        if not isinstance(saved, dict):
            raise CheckpointError(f"{path} holds {type(saved).__name__}, not the callback state")
        tensor_path = os.path.join(checkpoint, TENSORS_FILE)
        tensors = None
        if os.path.exists(tensor_path):
            try:
                tensors = torch.load(tensor_path, map_location="cpu", weights_only=True)
            except Exception as e:  # a damaged file: say which, change nothing
                raise CheckpointError(f"cannot read {tensor_path} ({e})") from e
            if not isinstance(tensors, list) or not all(
                isinstance(t, torch.Tensor) for t in tensors
            ):
                raise CheckpointError(
                    f"{tensor_path} holds {type(tensors).__name__}, not the list of tensors "
                    "this callback writes; resume from a checkpoint folder written whole by it"
                )
        self.core.load_state_dict(join_tensors(saved, tensors, tensor_path))

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        """The guard's last check."""
        self.core.stop_guard(check=True)


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class GradgateTrainer(Trainer):
    """A ``Trainer`` that resumes ``GradgateFinetuning`` schedules and rebuilds DDP for them.

    The plain ``Trainer`` loads a checkpoint's optimizer state right after it
    builds the optimizer and scheduler, before any callback runs, so the
    groups a schedule added do not exist yet and ``torch`` refuses the state
    ("different number of parameter groups"). This subclass reads each
    ``GradgateFinetuning``'s state from the checkpoint in ``train()`` and
    re-applies its schedule in ``create_scheduler``, so the optimizer has the
    saved groups, in the saved order, when the state loads. It also lets the
    callbacks reach the DDP wrapper (``model_wrapped``), which they rebuild in
    place after a schedule changed what trains. It changes nothing else; use
    it in place of ``Trainer``, or put it first in the bases of your own
    subclass (``class MyTrainer(GradgateTrainer, SFTTrainer)``).

    Example:
        >>> from gradgate.integrations.transformers import GradgateTrainer
        >>> from transformers import Trainer
        >>> issubclass(GradgateTrainer, Trainer)
        True
    """

    def train(
        self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any
    ) -> Any:
        """``Trainer.train``; on a resume, first restore the callbacks' state."""
        folder = resume_from_checkpoint
        if folder is True:
            # None: the Trainer raises its own "no valid checkpoint" error below.
            folder = get_last_checkpoint(self.args.output_dir)  # type: ignore[no-untyped-call]
        for callback in self._gradgate_callbacks():
            callback._trainer = weakref.ref(self)
            # A callback added with add_callback freezes here, before the optimizer exists.
            callback._prepare_once(self._module())
            if isinstance(folder, str):
                callback.restore(folder)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        """``Trainer.create_scheduler``; then each callback aligns the optimizer and builds
        (or re-applies) its schedule."""
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        opt = optimizer if optimizer is not None else self.optimizer
        for callback in self._gradgate_callbacks():
            callback.align(self.args, self._module(), opt, scheduler)
        return scheduler

    def _module(self) -> nn.Module:
        assert isinstance(self.model, nn.Module)  # Trainer.__init__ refuses a missing model
        return self.model

    def _gradgate_callbacks(self) -> list[GradgateFinetuning]:
        return [c for c in self.callback_handler.callbacks if isinstance(c, GradgateFinetuning)]
