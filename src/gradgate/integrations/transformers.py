"""``GradgateFinetuning`` for the Hugging Face ``Trainer``: freeze, unfreeze, guard, save.

Needs ``pip install "gradgate[transformers]"``.
"""

from __future__ import annotations

import math
import os
from typing import Any

from torch import nn

from ..checkpoint import save_trainable
from ..errors import MissingDependencyError
from ..selection import Selector
from ._core import FinetuneCore, GuardOption, ModeOption, UnfreezeSpec

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError as e:  # pragma: no cover - exercised without the extra
    raise MissingDependencyError(
        "gradgate.integrations.transformers needs transformers; "
        "pip install 'gradgate[transformers]'"
    ) from e

__all__ = ["GradgateFinetuning", "TRAINABLE_FILE"]

TRAINABLE_FILE = "trainable.safetensors"
"""Name of the ``gg.save_trainable`` file written into each checkpoint folder."""


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
    inference mode although the Trainer calls ``model.train()``.

    Args:
        freeze: selector of what is frozen (see ``gg.select``).
        train_only: selector of what trains; everything else is frozen.
        unfreeze: ``[(epoch, selector), ...]`` made trainable at that epoch.
        lr_mult: new groups' lr relative to group 0's lr at that moment.
        mode: train/eval behaviour of frozen modules, as in ``gg.freeze``.
        guard: ``gg.guard`` check over training (``"fast"``, ``"exact"``,
            ``"both"``) or ``None``; a write into a frozen tensor raises
            ``gg.FrozenTensorChanged`` out of ``train()``.
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
            self.core.prepare(model)
            self._prepared = True

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
        if not self._prepared:
            self.core.prepare(model)
            self._prepared = True
        self.core.align(model, optimizer, lr_scheduler)
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
        """With ``save_trainable``, write only what trains into the checkpoint folder."""
        if self.save_trainable and model is not None:
            folder = os.path.join(str(args.output_dir), f"checkpoint-{state.global_step}")
            save_trainable(model, os.path.join(folder, TRAINABLE_FILE))

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        """The guard's last check."""
        self.core.stop_guard(check=True)
