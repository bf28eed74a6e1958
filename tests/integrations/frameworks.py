"""One small fine-tune per trainer, behind one interface, for the conformance suite.

Each ``Framework`` builds a tiny model from code (no downloads) with a
frozen ``backbone`` that holds BatchNorm/Dropout or transformer layers, a
``late`` part unfrozen mid-run, and a trainable ``head``; ``fit`` runs the
trainer with a ``GradgateFinetuning`` and records the learning rates of
every optimizer step.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradgate as gg

__all__ = ["DataLoader", "Net", "Run", "fit_hf", "fit_lightning", "hf_model", "image_data"]

Poke = Callable[[nn.Module], None]
SchedulerFactory = Callable[[torch.optim.Optimizer, int], Any]


@dataclass
class Run:
    """What a fit left behind."""

    model: nn.Module
    lrs: list[list[float]] = field(default_factory=list)
    frozen_training_flags: set[bool] = field(default_factory=set)
    checkpoints: list[Path] = field(default_factory=list)
    epoch_states: list[dict[str, torch.Tensor]] = field(default_factory=list)


def _copy_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- schedule factories
# Module-level and partial: a ddp_spawn launch pickles the callback with its factory.


def _gradual(model: nn.Module, optimizer: Any, scheduler: Any, stages: Any, at: Any) -> Any:
    return gg.GradualUnfreeze(model, stages, at=at, optimizer=optimizer, scheduler=scheduler)


def _progressive(
    model: nn.Module, optimizer: Any, scheduler: Any, stages: Any, start: int, end: int
) -> Any:
    return gg.ProgressiveFreeze(
        model, stages, start=start, end=end, optimizer=optimizer, scheduler=scheduler
    )


def _autofreeze(model: nn.Module, optimizer: Any, scheduler: Any, stages: Any, every: int) -> Any:
    # threshold 10: every window counts as converged, so the first decision with a
    # previous window (step 2 x every) freezes all but the last stage.
    return gg.AutoFreeze(
        model, stages, optimizer=optimizer, scheduler=scheduler, every=every, threshold=10.0
    )


def gradual(stages: Any, at: list[int]) -> Any:
    return functools.partial(_gradual, stages=stages, at=at)


def progressive(stages: Any, start: int, end: int) -> Any:
    return functools.partial(_progressive, stages=stages, start=start, end=end)


def autofreeze(stages: Any, every: int) -> Any:
    return functools.partial(_autofreeze, stages=stages, every=every)


def _measured(
    model: nn.Module, optimizer: Any, scheduler: Any, stages: Any, every: int, rule: str
) -> Any:
    return gg.AutoFreeze(
        model, stages, optimizer=optimizer, scheduler=scheduler, every=every, rule=rule
    )


def measured(stages: Any, every: int, rule: str) -> Any:
    """AutoFreeze under a measured rule (progress, contribution): its state holds weight
    copies (tensors)."""
    return functools.partial(_measured, stages=stages, every=every, rule=rule)


def _record_modes(model: nn.Module, part: str, run: Run) -> None:
    """Record ``training`` of every module in ``part`` at each forward."""
    for module in model.get_submodule(part).modules():
        module.register_forward_pre_hook(
            lambda m, args: run.frozen_training_flags.add(bool(m.training))
        )


# ---------------------------------------------------------------- Lightning


class Net(pl.LightningModule):
    """A conv+BN+Dropout backbone, a ``late`` conv block, a linear head.

    Its optimizer is AdamW over ALL parameters with weight decay: the usual
    Lightning code.
    """

    def __init__(
        self,
        poke: Poke | None = None,
        scheduler: str = "step",
        after_backward: Poke | None = None,
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.poke, self.scheduler, self.after_backward = poke, scheduler, after_backward
        self.backbone = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.3)
        )
        self.late = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.late(self.backbone(x)))  # type: ignore[no-any-return]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.poke is not None:
            self.poke(self)
        return F.cross_entropy(self(x), y)

    def on_after_backward(self) -> None:
        # Lightning zeroes gradients between training_step and backward, so a
        # gradient planted for the optimizer step is planted here.
        if self.after_backward is not None:
            self.after_backward(self)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y), sync_dist=True)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)
        sched = SCHEDULERS[self.scheduler](opt, 12)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def lightning_net(
    poke: Poke | None = None, scheduler: str = "step", after_backward: Poke | None = None
) -> Net:
    return Net(poke, scheduler, after_backward)


SCHEDULERS: dict[str, SchedulerFactory] = {
    "step": lambda opt, total: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5),
    "cosine": lambda opt, total: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total),
    "cosine_floor": lambda opt, total: torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, T_max=total, eta_min=1e-3
    ),
    "onecycle": lambda opt, total: torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=1e-2, total_steps=total + 1
    ),
}


def image_data(n: int = 32) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(
        torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)
    )


def lightning_trainer(tmp: Path, epochs: int = 3, **kwargs: Any) -> Any:
    options: dict[str, Any] = {
        "max_epochs": epochs,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": str(tmp),
    }
    options.update(kwargs)
    return pl.Trainer(**options)


class LrRecorder(pl.Callback):
    """Records every group's lr after each optimizer step."""

    def __init__(self, run: Run) -> None:
        self.run = run

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        self.run.lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.run.epoch_states.append(_copy_state(pl_module))


def fit_lightning(
    tmp: Path,
    callback: Any,
    poke: Poke | None = None,
    scheduler: str = "step",
    epochs: int = 3,
    ckpt_path: str | None = None,
    save_every_epoch: bool = False,
    after_backward: Poke | None = None,
) -> Run:
    model = lightning_net(poke, scheduler, after_backward)
    run = Run(model)
    _record_modes(model, "backbone", run)
    callbacks = [callback, LrRecorder(run)]
    extra: dict[str, Any] = {}
    if save_every_epoch:
        ckpt = pl.callbacks.ModelCheckpoint(
            dirpath=tmp / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}"
        )
        callbacks.append(ckpt)
        extra["enable_checkpointing"] = True
    trainer = lightning_trainer(tmp, epochs, callbacks=callbacks, **extra)
    data = image_data()
    trainer.fit(
        model,
        DataLoader(data, batch_size=8),
        DataLoader(data, batch_size=16),
        ckpt_path=ckpt_path,
    )
    if save_every_epoch:
        run.checkpoints = sorted((tmp / "ckpt").glob("*.ckpt"))
    return run


# ---------------------------------------------------------------- Hugging Face


def hf_model(poke: Poke | None = None) -> nn.Module:
    """A 3-layer BERT from a config: embeddings + layer 0 frozen, layer 1 late, layer 2 and
    the classifier train."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(  # type: ignore[call-arg]
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
    )
    model = BertForSequenceClassification(config)
    if poke is not None:
        model.register_forward_pre_hook(lambda m, args: poke(m))
    return model


class TokenData(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self, n: int = 32) -> None:
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, 40, (n, 8), generator=g)
        self.labels = torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def hf_args(output_dir: Path | str, **kwargs: Any) -> Any:
    """``TrainingArguments`` for a quiet CPU run (no reports, no progress bar), then ``kwargs``."""
    from transformers import TrainingArguments

    quiet: dict[str, Any] = {"report_to": [], "use_cpu": True, "disable_tqdm": True}
    return TrainingArguments(output_dir=str(output_dir), **{**quiet, **kwargs})


def fit_hf(
    tmp: Path,
    callback: Any,
    poke: Poke | None = None,
    scheduler: str = "linear",
    epochs: int = 3,
    resume: str | None = None,
    save_every_epoch: bool = False,
    optimizers: Callable[[nn.Module], Any] | None = None,
    trainer_cls: type[Any] | None = None,
) -> Run:
    from transformers import Trainer, TrainerCallback

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    model = hf_model(poke)
    run = Run(model)
    _record_modes(model, "bert.encoder.layer.0", run)

    class Recorder(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            run.lrs.append([g["lr"] for g in kw["optimizer"].param_groups])

        def on_epoch_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            run.epoch_states.append(_copy_state(kw["model"]))

    args = hf_args(
        tmp / "hf",
        num_train_epochs=epochs,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        weight_decay=0.1,
        lr_scheduler_type=scheduler,
        warmup_steps=2,
        logging_strategy="no",
        save_strategy="epoch" if save_every_epoch else "no",
        seed=0,
        dataloader_num_workers=0,
    )
    kwargs: dict[str, Any] = {}
    if optimizers is not None:
        kwargs["optimizers"] = optimizers(model)
    trainer = (trainer_cls or Trainer)(
        model=model,
        args=args,
        train_dataset=TokenData(),
        callbacks=[callback, Recorder()],
        **kwargs,
    )
    trainer.train(resume_from_checkpoint=resume)
    if save_every_epoch:
        run.checkpoints = sorted(
            (tmp / "hf").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])
        )
    return run
