"""``GradgateFinetuning`` for the Hugging Face ``Trainer``: freeze, unfreeze, guard, save.

Needs ``pip install "gradgate[transformers]"``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from torch import nn

from ..checkpoint import save_trainable
from ..errors import CheckpointError, MissingDependencyError
from ..selection import Selector
from ._core import FinetuneCore, GuardOption, ModeOption, UnfreezeSpec

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

__all__ = ["STATE_FILE", "TRAINABLE_FILE", "GradgateFinetuning", "GradgateTrainer"]

TRAINABLE_FILE = "trainable.safetensors"
"""Name of the ``gg.save_trainable`` file written into each checkpoint folder."""

STATE_FILE = "gradgate_finetuning.json"
"""Name of the file holding ``GradgateFinetuning``'s state in each checkpoint folder."""


class GradgateFinetuning(TrainerCallback):
    """An HF ``TrainerCallback`` that freezes, unfreezes on schedule and guards training.

    Pass it in ``Trainer(callbacks=[...])``: ``freeze``/``train_only`` apply
    at ``on_init_end``, before ``train()`` builds the optimizer (added later
    with ``add_callback``, it freezes at ``on_train_begin`` and takes the
    frozen parameters out of the optimizer). An optimizer given through
    ``optimizers=`` is brought in line with ``gg.sync`` at train start, so
    weight decay cannot move a frozen weight. ``unfreeze=[(epoch, selector),
    ...]`` makes a part trainable at the start of that epoch in a new group
    at ``lr_mult`` x group 0's current lr, which the Trainer's scheduler
    (linear, cosine, ... warm-up) then drives. Frozen modules stay in
    inference mode although the Trainer calls ``model.train()``. Each
    checkpoint folder gets ``gradgate_finetuning.json`` (which unfreezes ran);
    resuming after an unfreeze needs ``GradgateTrainer``, which replays them
    before the Trainer loads the optimizer state.

    Args:
        freeze: selector of what is frozen (see ``gg.select``).
        train_only: selector of what trains; everything else is frozen.
        unfreeze: ``[(epoch, selector), ...]`` made trainable at that epoch.
        lr_mult: new groups' lr relative to group 0's lr at that moment.
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
            mode=mode,
            guard=guard,
            summary=summary,
        )
        self.save_trainable = save_trainable
        self._prepared = False

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
        """Align the optimizer with what trains and start the guard."""
        assert model is not None  # the Trainer always passes its model
        self._prepare_once(model)
        self.core.align(model, optimizer, lr_scheduler)
        self.core.report(model)
        self.core.start_guard(model, [optimizer])

    def on_epoch_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        optimizer: Any = None,
        lr_scheduler: Any = None,
        **kwargs: Any,
    ) -> None:
        """Apply the unfreezes due at this epoch."""
        assert model is not None
        # state.epoch is a float that counts finished steps; it is whole at an epoch start
        # except on a resume in the middle of one.
        epoch = math.floor((state.epoch or 0.0) + 1e-6)
        if self.core.due(epoch):
            self.core.stop_guard(check=True)
            self.core.advance(model, epoch, optimizer, lr_scheduler)
            self.core.start_guard(model, [optimizer])

    def on_save(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        """Write the applied unfreezes (and, with ``save_trainable``, what trains) into the
        checkpoint folder."""
        if not state.is_world_process_zero:
            return
        folder = os.path.join(str(args.output_dir), f"checkpoint-{state.global_step}")
        with open(os.path.join(folder, STATE_FILE), "w") as f:
            json.dump(self.core.state_dict(), f)
        if self.save_trainable and model is not None:
            save_trainable(model, os.path.join(folder, TRAINABLE_FILE))

    def _prepare_once(self, model: nn.Module) -> None:
        if not self._prepared:
            self.core.prepare(model)
            self._prepared = True

    def restore(self, checkpoint: str) -> None:
        """Read the state ``on_save`` wrote into ``checkpoint``; ``GradgateTrainer`` calls it.

        The restored unfreezes are replayed into the optimizer as soon as it
        exists, before the Trainer loads the checkpoint's optimizer state.

        Raises:
            CheckpointError: the folder has no readable state file, or it was
                written with a different ``unfreeze=`` schedule.
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
        self.core.load_state_dict(saved)

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        """The guard's last check."""
        self.core.stop_guard(check=True)


class GradgateTrainer(Trainer):
    """A ``Trainer`` that resumes a ``GradgateFinetuning`` run after an unfreeze.

    The plain ``Trainer`` loads a checkpoint's optimizer state right after it
    builds the optimizer, before any callback runs, so the groups an unfreeze
    added do not exist yet and ``torch`` refuses the state ("different number
    of parameter groups"). This subclass reads each ``GradgateFinetuning``'s
    state from the checkpoint in ``train()`` and replays its unfreezes in
    ``create_optimizer``, so the optimizer has the saved groups, in the saved
    order, when the state loads. It changes nothing else; use it in place of
    ``Trainer``, or put it first in the bases of your own subclass
    (``class MyTrainer(GradgateTrainer, SFTTrainer)``).

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
            # A callback added with add_callback freezes here, before the optimizer exists.
            callback._prepare_once(self._module())
            if isinstance(folder, str):
                callback.restore(folder)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def create_optimizer(self, model: nn.Module | None = None) -> Any:
        """``Trainer.create_optimizer``; then each callback aligns it, replaying its unfreezes."""
        optimizer = super().create_optimizer(model)
        for callback in self._gradgate_callbacks():
            callback.core.align(self._module(), optimizer, None)
        return optimizer

    def _module(self) -> nn.Module:
        assert isinstance(self.model, nn.Module)  # Trainer.__init__ refuses a missing model
        return self.model

    def _gradgate_callbacks(self) -> list[GradgateFinetuning]:
        return [c for c in self.callback_handler.callbacks if isinstance(c, GradgateFinetuning)]
