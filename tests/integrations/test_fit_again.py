"""A second fit of the same model object: the callback owns the fit's optimizer (issue 23.11).

An optimizer from an earlier fit that is still alive (the old Trainer keeps
it, or it is simply not garbage-collected yet) held the parts the schedule
unfreezes; ``gg.sync`` would leave them to it. The callbacks make the fit's
optimizer the owner, so what they unfreeze joins it; garbage collection is
switched off in these tests so the old optimizers are certainly alive.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
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


@pytest.fixture
def no_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def lightning_fit(tmp: Path, model: fw.Net, ckpt_path: str | None = None, **extra: Any) -> Any:
    callback = lightning.GradgateFinetuning(["backbone", "late"], unfreeze=[(1, "late")])
    trainer = fw.lightning_trainer(tmp, epochs=3, callbacks=[callback], **extra)
    data = fw.DataLoader(fw.image_data(), batch_size=8)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return trainer


def late(model: torch.nn.Module, name: str) -> str:
    return gg.fingerprint(model.get_submodule(name))


@pytest.mark.usefixtures("no_gc")
def test_lightning_second_fit_of_the_same_model_trains_the_unfrozen_part(tmp_path: Path) -> None:
    model = fw.lightning_net()
    first = lightning_fit(tmp_path / "a", model)
    assert first.optimizers  # the first fit's optimizer is alive, holding "late"
    after_first = late(model, "late")
    second = lightning_fit(tmp_path / "b", model)
    assert late(model, "late") != after_first  # trained again after the second unfreeze
    late_params = {id(p) for p in model.late.parameters()}
    held = {id(p) for g in second.optimizers[0].param_groups for p in g["params"]}
    assert late_params <= held


@pytest.mark.usefixtures("no_gc")
def test_lightning_resumes_the_same_model_object_from_its_checkpoint(tmp_path: Path) -> None:
    # Lightning's own test_callbacks_restore scenario: fit, then fit(ckpt_path=...) again.
    model = fw.lightning_net()
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)
    callback = lightning.GradgateFinetuning(["backbone", "late"], unfreeze=[(1, "late")])
    trainer = fw.lightning_trainer(
        tmp_path, epochs=2, callbacks=[callback, ckpt], enable_checkpointing=True
    )
    data = fw.DataLoader(fw.image_data(), batch_size=8)
    trainer.fit(model, data)
    path = sorted((tmp_path / "ckpt").glob("*.ckpt"))[-1]  # after the unfreeze
    again = lightning.GradgateFinetuning(["backbone", "late"], unfreeze=[(1, "late")])
    resumed = fw.lightning_trainer(tmp_path / "r", epochs=3, callbacks=[again])
    resumed.fit(model, data, ckpt_path=str(path))  # no "different number of parameter groups"
    assert len(resumed.optimizers[0].param_groups) == len(trainer.optimizers[0].param_groups)


@pytest.mark.usefixtures("no_gc")
def test_hf_second_train_of_the_same_model_trains_the_unfrozen_part(tmp_path: Path) -> None:

    model = fw.hf_model()
    trainers = []
    prints = []
    for run in ("a", "b"):
        callback = transformers.GradgateFinetuning(
            ["bert.encoder.layer.0", "bert.encoder.layer.1"],
            unfreeze=[(1, "bert.encoder.layer.1")],
        )
        args = fw.hf_args(
            tmp_path / run,
            num_train_epochs=2,
            per_device_train_batch_size=8,
            save_strategy="no",
        )
        trainer = transformers.GradgateTrainer(
            model=model, args=args, train_dataset=fw.TokenData(), callbacks=[callback]
        )
        trainer.train()
        trainers.append(trainer)  # alive: its optimizer still holds layer 1
        prints.append(late(model, "bert.encoder.layer.1"))
        assert trainer.optimizer is not None
        held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
        assert {id(p) for p in model.get_submodule("bert.encoder.layer.1").parameters()} <= held
    assert prints[1] != prints[0]  # the second run trained layer 1 again
