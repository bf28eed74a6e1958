"""Train/eval modes and weight decay of what a callback or a validation hook unfreezes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import gradgate as gg

pytest.importorskip("lightning")
pytest.importorskip("transformers")

import lightning.pytorch as pl

from gradgate.integrations import lightning, transformers
from integrations import frameworks as fw


class UnfreezeOnValidation(pl.Callback):
    """Unfreeze ``late`` at the end of the first validation (a metric-driven unfreeze)."""

    def __init__(self) -> None:
        self.done = False
        self.train_modes: list[bool] = []

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        bn = pl_module.late[1]
        bn.register_forward_pre_hook(
            lambda m, args: self.train_modes.append(m.training) if self.done else None
        )

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not self.done and not trainer.sanity_checking:
            gg.unfreeze(pl_module, "late")
            config = trainer.lr_scheduler_configs
            gg.sync(trainer.optimizers[0], pl_module, config[0].scheduler if config else None)
            self.done = True


def test_a_part_unfrozen_in_a_lightning_validation_hook_trains_in_training_mode(
    tmp_path: Path,
) -> None:
    spy = UnfreezeOnValidation()
    model = fw.lightning_net()
    trainer = fw.lightning_trainer(
        tmp_path,
        epochs=2,
        callbacks=[lightning.GradgateFinetuning(["backbone", "late"]), spy],
        check_val_every_n_epoch=1,
    )
    data = fw.DataLoader(fw.image_data(), batch_size=8)
    bn = model.get_submodule("late.1")
    stats = bn.get_buffer("running_mean").clone()
    trainer.fit(model, data, data)
    # Epoch 1's training forwards (4) ran the unfrozen BatchNorm in training mode; the
    # validation forwards after it (2) in eval.
    assert spy.train_modes[:4] == [True] * 4
    assert not torch.equal(bn.get_buffer("running_mean"), stats)  # its statistics moved
    assert not gg.is_sticky(bn)


def test_hf_groups_the_callback_adds_get_the_trainers_weight_decay(tmp_path: Path) -> None:
    from transformers import TrainingArguments

    model = fw.hf_model()
    callback = transformers.GradgateFinetuning(
        ["bert.encoder.layer.0", "bert.encoder.layer.1"], unfreeze=[(1, "bert.encoder.layer.1")]
    )
    args = TrainingArguments(
        output_dir=str(tmp_path),
        num_train_epochs=2,
        per_device_train_batch_size=8,
        weight_decay=0.25,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
    )
    trainer = transformers.GradgateTrainer(
        model=model, args=args, train_dataset=fw.TokenData(), callbacks=[callback]
    )
    trainer.train()
    assert trainer.optimizer is not None
    names = {id(p): n for n, p in model.named_parameters()}
    layer1 = {
        names[id(p)]: g["weight_decay"]
        for g in trainer.optimizer.param_groups
        for p in g["params"]
        if names[id(p)].startswith("bert.encoder.layer.1.")
    }
    assert len(layer1) == len(list(model.get_submodule("bert.encoder.layer.1").parameters()))
    for name, decay in layer1.items():
        no_decay = name.endswith(".bias") or "LayerNorm" in name
        assert decay == (0.0 if no_decay else 0.25), name  # not AdamW's default 0.01
