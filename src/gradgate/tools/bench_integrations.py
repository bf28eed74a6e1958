"""The trainers' own way of freezing against ``GradgateFinetuning``, on small real models.

Two fine-tunes with a frozen pretrained part and a fresh head:

- Lightning: EfficientNet-Lite0 (ImageNet weights) on scikit-learn's digits.
  Two anchors: Lightning's ``BackboneFinetuning`` (its freeze leaves the
  backbone's BatchNorm layers training, whatever ``train_bn`` says: that
  option only applies at the unfreeze), and a ``BaseFinetuning`` that
  freezes with ``train_bn=False``, which stops BatchNorm with
  ``track_running_stats=False`` and so normalises with batch statistics.
- HF Trainer: MiniLM (all-MiniLM-L6-v2) classifying standard-library
  sentences; the anchor sets ``requires_grad=False`` on the encoder by hand.

Per strategy: seconds per epoch (strategies interleaved, one warm-up round
discarded, median and min-max), whether any byte of the frozen part changed
(``gg.fingerprint`` before/after, BatchNorm statistics included), and the
largest absolute difference between what the frozen part computes in the
trainer's training mode and what it computes at inference, on a fixed batch.
Ratios are medians of per-repetition ratios (gradgate / anchor).

Run: gradgate bench integrations --repeats 3 --json docs/bench/integrations.json
"""

from __future__ import annotations

import argparse
import copy
import functools
import logging
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradgate as gg

from .._format import render_table
from . import zoo
from .output import RATIO_NOTE, machine_info


@dataclass
class Trial:
    """One fit of one epoch: its time and what happened to the frozen part."""

    seconds: float
    frozen_bytes_changed: bool
    frozen_output_max_diff: float


def _frozen_output_diff(
    frozen: nn.Module, pristine: nn.Module, forward: Callable[[Any], torch.Tensor]
) -> float:
    """Max |frozen part as the trainer runs it - the untouched part at inference|.

    The trainer switches the whole model to training mode each epoch, so that
    is the mode the frozen part is run in here.
    """
    frozen.train()
    pristine.eval()
    with torch.no_grad():
        return float((forward(frozen) - forward(pristine)).abs().max())


# Loaded once per process and copied into each trial: loading is not timed, but repeated it made
# one run too long for the loaded CI machine.


@functools.cache
def _efficientnet() -> zoo.EfficientNetLite0:
    return zoo.efficientnet_lite0()


@functools.cache
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    return zoo.digits_64()


@functools.cache
def _minilm() -> tuple[nn.Module, Any]:
    return zoo.minilm()


@functools.cache
def _sentences(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    sentences, labels, _ = zoo.stdlib_sentences(per_class)
    return zoo.tokenize(_minilm()[1], sentences), labels


# ---------------------------------------------------------------- Lightning


def _lightning_trial(strategy: str, images: int, batch: int) -> Trial:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import BackboneFinetuning, BaseFinetuning

    from gradgate.integrations.lightning import GradgateFinetuning

    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = copy.deepcopy(_efficientnet())
            self.head = nn.Linear(1280, 10)

        def training_step(self, b: Any, batch_idx: int) -> torch.Tensor:
            x, y = b
            return F.cross_entropy(self.head(self.backbone.features(x)), y)

        def configure_optimizers(self) -> Any:
            # The usual Lightning code: one optimizer over every parameter.
            return torch.optim.AdamW(self.parameters(), lr=3e-3, weight_decay=0.05)

    class FreezeWithBatchNorm(BaseFinetuning):
        def freeze_before_training(self, pl_module: pl.LightningModule) -> None:
            self.freeze(pl_module.backbone, train_bn=False)

        def finetune_function(self, *args: Any) -> None:
            pass

    class EpochTimer(pl.Callback):
        seconds = 0.0

        def on_train_epoch_start(self, *args: Any) -> None:
            self.start = time.perf_counter()

        def on_train_epoch_end(self, *args: Any) -> None:
            self.seconds = time.perf_counter() - self.start

    torch.manual_seed(0)
    x, y = _digits()
    x, y = x[:images], y[:images]
    model = Classifier()
    pristine = copy.deepcopy(model.backbone)
    before = gg.fingerprint(model.backbone)
    freezing: pl.Callback
    if strategy == "backbone":
        freezing = BackboneFinetuning(unfreeze_backbone_at_epoch=100)
    elif strategy == "base":
        freezing = FreezeWithBatchNorm()
    else:
        freezing = GradgateFinetuning("backbone")
    timer = EpochTimer()
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[freezing, timer],
    )
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True))
    changed = gg.fingerprint(model.backbone) != before
    diff = _frozen_output_diff(model.backbone, pristine, lambda m: m.features(x[:batch]))
    return Trial(timer.seconds, changed, diff)


# ---------------------------------------------------------------- Hugging Face


def _hf_trial(strategy: str, per_class: int, batch: int) -> Trial:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from gradgate.integrations.transformers import GradgateFinetuning

    class Classifier(nn.Module):
        def __init__(self, encoder: nn.Module, classes: int) -> None:
            super().__init__()
            self.encoder = encoder
            self.head = nn.Linear(384, classes)

        def forward(self, ids_mask: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            logits = self.head(self.encoder(ids_mask))
            return {"loss": F.cross_entropy(logits, labels), "logits": logits}

    class EpochTimer(TrainerCallback):
        seconds = 0.0

        def on_epoch_begin(self, *args: Any, **kwargs: Any) -> None:
            self.start = time.perf_counter()

        def on_epoch_end(self, *args: Any, **kwargs: Any) -> None:
            self.seconds = time.perf_counter() - self.start

    torch.manual_seed(0)
    ids, labels = _sentences(per_class)
    encoder = copy.deepcopy(_minilm()[0])
    model = Classifier(encoder, int(labels.max()) + 1)
    pristine = copy.deepcopy(model.encoder)
    before = gg.fingerprint(model.encoder)
    callbacks: list[TrainerCallback] = [EpochTimer()]
    if strategy == "anchor":
        for p in model.encoder.parameters():
            p.requires_grad = False
    else:
        callbacks.insert(0, GradgateFinetuning("encoder"))
    data = [{"ids_mask": ids[i], "labels": labels[i]} for i in range(len(labels))]
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            num_train_epochs=1,
            per_device_train_batch_size=batch,
            learning_rate=3e-3,
            weight_decay=0.05,
            save_strategy="no",
            logging_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks).train()
    changed = gg.fingerprint(model.encoder) != before
    diff = _frozen_output_diff(model.encoder, pristine, lambda m: m(ids[:batch]))
    return Trial(callbacks[-1].seconds, changed, diff)  # type: ignore[attr-defined]


# ---------------------------------------------------------------- the run


STRATEGIES: dict[str, tuple[str, str]] = {
    "lightning BackboneFinetuning": ("lightning", "backbone"),
    "lightning BaseFinetuning(train_bn=False)": ("lightning", "base"),
    "lightning GradgateFinetuning": ("lightning", "gradgate"),
    "hf requires_grad=False": ("hf", "anchor"),
    "hf GradgateFinetuning": ("hf", "gradgate"),
}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Interleave the strategies; one warm-up round, then ``args.repeats`` measured ones."""
    torch.set_num_threads(args.threads)
    names = [n for n, (framework, _) in STRATEGIES.items() if framework in args.frameworks]
    trials: dict[str, list[Trial]] = {n: [] for n in names}
    for round_ in range(args.warmup + args.repeats):
        for name in names:
            framework, strategy = STRATEGIES[name]
            if framework == "lightning":
                trial = _lightning_trial(strategy, args.images, args.batch)
            else:
                trial = _hf_trial(strategy, args.per_class, args.batch)
            if round_ >= args.warmup:
                trials[name].append(trial)
    strategies: dict[str, Any] = {}
    for name, ts in trials.items():
        seconds = [t.seconds for t in ts]
        strategies[name] = {
            "seconds": {
                "median": statistics.median(seconds),
                "min": min(seconds),
                "max": max(seconds),
            },
            "frozen_bytes_changed": any(t.frozen_bytes_changed for t in ts),
            "frozen_output_max_diff": max(t.frozen_output_max_diff for t in ts),
        }
    ratios: dict[str, float] = {}
    for framework in args.frameworks:
        *anchors, ours = (n for n in names if STRATEGIES[n][0] == framework)
        for anchor in anchors:
            per_rep = [
                b.seconds / a.seconds for a, b in zip(trials[anchor], trials[ours], strict=True)
            ]
            ratios[f"seconds per epoch: {ours} / {anchor}"] = statistics.median(per_rep)
    workload = []
    if "lightning" in args.frameworks:
        workload.append(
            f"lightning: EfficientNet-Lite0 (ImageNet weights) frozen backbone + linear head "
            f"on {args.images} digits_64 images, batch {args.batch}, AdamW over all parameters"
        )
    if "hf" in args.frameworks:
        workload.append(
            f"hf: MiniLM-L6 frozen encoder + linear head on {6 * args.per_class} stdlib "
            f"sentences (32 tokens), batch {args.batch}, Trainer's AdamW + linear schedule"
        )
    return {
        "workload": "; ".join(workload),
        "machine": machine_info(args.threads),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "strategies": strategies,
        "ratios": ratios,
    }


def table(result: dict[str, Any]) -> str:
    """The result as a plain-text table."""
    rows = [
        [
            name,
            f"{s['seconds']['median']:.3f}",
            f"{s['seconds']['min']:.3f}-{s['seconds']['max']:.3f}",
            "yes" if s["frozen_bytes_changed"] else "no",
            f"{s['frozen_output_max_diff']:.3g}",
        ]
        for name, s in result["strategies"].items()
    ]
    headers = ["strategy", "s/epoch median", "min-max", "frozen bytes changed", "out diff"]
    ratios = "\n".join(f"{k}: {v:.3f}" for k, v in result["ratios"].items())
    return render_table(headers, rows, right={1, 2, 4}) + "\n" + ratios


def quiet_frameworks() -> None:
    """Keep the trainers' own logging and warnings out of the measured output."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")


def to_markdown(result: dict[str, Any], command: str) -> str:
    """The docs/BENCHMARKS.md section: seconds per epoch, frozen bytes, output difference.

    Example:
        >>> r = {"workload": "w", "machine": {"cpu": "c", "threads": 1, "torch": "t",
        ...      "commit": "x"}, "strategies": {}, "ratios": {"a / b": 0.5}}
        >>> "| a / b | 0.500 |" in to_markdown(r, "gradgate bench integrations")
        True
    """
    m = result["machine"]
    lines = [
        "### `integrations`",
        "",
        f"Command: `{command}`  ",
        f"Machine: {m['cpu']}, {m['threads']} threads, torch {m['torch']}, commit {m['commit']}",
        f"Workload: {result['workload']}",
        "",
        "| strategy | s/epoch median | min s | max s | frozen bytes changed | out diff |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in result["strategies"].items():
        sec = s["seconds"]
        lines.append(
            f"| {name} | {sec['median']:.3f} | {sec['min']:.3f} | {sec['max']:.3f} | "
            f"{'yes' if s['frozen_bytes_changed'] else 'no'} | "
            f"{s['frozen_output_max_diff']:.3g} |"
        )
    lines += ["", "| ratio (median of per-repetition ratios) | value |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in result["ratios"].items()]
    lines += ["", RATIO_NOTE]
    return "\n".join(lines) + "\n"
