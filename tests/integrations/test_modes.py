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


def _decay_by_name(model: torch.nn.Module, optimizer: Any, prefix: str) -> dict[str, float]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {
        names[id(p)]: g["weight_decay"]
        for g in optimizer.param_groups
        for p in g["params"]
        if names[id(p)].startswith(prefix)
    }


def _param_groups_decay(model: torch.nn.Module, decay: float) -> dict[str, float]:
    """What ``gg.param_groups`` gives every parameter (all trainable) at ``decay``."""
    frozen = [p for p in model.parameters() if not p.requires_grad]
    model.requires_grad_(True)
    try:
        groups = gg.param_groups(model, lr=1.0, weight_decay=decay)
    finally:
        for p in frozen:
            p.requires_grad_(False)
    return {n: g["weight_decay"] for g in groups for n in g["param_names"]}


def test_hf_groups_the_callback_adds_get_param_groups_weight_decay(tmp_path: Path) -> None:

    model = fw.hf_model()
    layer1 = model.get_submodule("bert.encoder.layer.1")
    # A 1-D tensor that is neither a bias nor a norm (a layer scale): param_groups
    # keeps it out of decay (timm's rule); DEFAULT_NO_DECAY alone would decay it.
    layer1.register_parameter("gamma", torch.nn.Parameter(torch.ones(16)))
    callback = transformers.GradgateFinetuning(
        ["bert.encoder.layer.0", "bert.encoder.layer.1"], unfreeze=[(1, "bert.encoder.layer.1")]
    )
    args = fw.hf_args(
        tmp_path,
        num_train_epochs=2,
        per_device_train_batch_size=8,
        weight_decay=0.25,
        save_strategy="no",
    )
    trainer = transformers.GradgateTrainer(
        model=model, args=args, train_dataset=fw.TokenData(), callbacks=[callback]
    )
    trainer.train()
    assert trainer.optimizer is not None
    got = _decay_by_name(model, trainer.optimizer, "bert.encoder.layer.1.")
    assert len(got) == len(list(layer1.parameters()))
    for name, decay in got.items():
        no_decay = name.endswith((".bias", ".gamma")) or "LayerNorm" in name
        assert decay == (0.0 if no_decay else 0.25), name  # not AdamW's default 0.01
    expected = _param_groups_decay(model, 0.25)
    assert got == {n: expected[n] for n in got}  # the one rule gg.param_groups uses


def test_lightning_groups_the_callback_adds_get_param_groups_weight_decay(
    tmp_path: Path,
) -> None:
    """Lightning's optimizer (``configure_optimizers``: AdamW, weight decay 0.1 over
    all parameters) gives the decay; what the callback adds follows param_groups'
    rule with it: the conv kernel decays, its bias and the BatchNorm's do not."""
    model = fw.lightning_net()
    callback = lightning.GradgateFinetuning(["backbone", "late"], unfreeze=[(1, "late")])
    trainer = fw.lightning_trainer(tmp_path, epochs=2, callbacks=[callback])
    trainer.fit(model, fw.DataLoader(fw.image_data(), batch_size=8))
    got = _decay_by_name(model, trainer.optimizers[0], "late.")
    assert got == {
        "late.0.weight": 0.1,
        "late.0.bias": 0.0,
        "late.1.weight": 0.0,
        "late.1.bias": 0.0,
    }
    expected = _param_groups_decay(model, 0.1)
    assert got == {n: expected[n] for n in got}
