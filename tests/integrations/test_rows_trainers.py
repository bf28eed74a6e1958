"""Row-frozen models in the trainers' own loops, with gradient accumulation and clipping.

Neither trainer gets a gradgate callback: the model with ``gg.rows`` in force is
handed over as is, and the trained rows must equal those of a hand-written
loop doing the same accumulation, clipping and steps.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, SequentialSampler

import cases
import gradgate as gg
from integrations import frameworks as fw

VOCAB, DIM = 40, 8
NEW = [36, 37, 38, 39]
OLD = [i for i in range(VOCAB) if i not in NEW]
N = 16  # samples


class Tokens(Dataset[dict[str, torch.Tensor]]):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(3)
        self.ids = torch.randint(0, VOCAB, (N, 6), generator=g)
        self.ids[:, 0] = torch.tensor(NEW * (N // len(NEW)))
        self.labels = torch.randint(0, VOCAB, (N, 6), generator=g)

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class LM(nn.Module):
    """``cases.TiedLM`` returning the loss as the transformers Trainer expects."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lm = cases.TiedLM(VOCAB, DIM)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.lm(input_ids)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))
        return {"loss": 20 * loss}  # gradients large enough for max_grad_norm=1.0 to clip


def _row_model(mode: str) -> LM:
    model = LM()
    if mode == "train_only":
        gg.train_only(model, gg.rows("lm.embed.weight", NEW))
    else:
        gg.freeze(model, gg.rows("lm.embed.weight", OLD))
    return model


def _by_hand(
    mode: str, batch: int, accumulate: int, clip: float, lr: float, epochs: int
) -> tuple[LM, list[float]]:
    """The loop both trainers run: mean loss per micro-batch / accumulate, clip, step, clear."""
    model = _row_model(mode)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    loader = DataLoader(Tokens(), batch_size=batch, shuffle=False)
    norms = []
    for _ in range(epochs):
        for i, b in enumerate(loader):
            (model(**b)["loss"] / accumulate).backward()
            if (i + 1) % accumulate == 0:
                norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
                opt.step()
                model.zero_grad()
    return model, norms


def _rows_of(model: LM) -> torch.Tensor:
    w: torch.Tensor = model.state_dict()["lm.embed.weight"]
    return w


def _check(trained: LM, reference: LM, norms: list[float]) -> None:
    start = _rows_of(LM())
    w, ref = _rows_of(trained), _rows_of(reference)
    assert max(norms) > 1.0  # the clipping did clip
    assert torch.equal(w[OLD], start[OLD])  # frozen rows bit-identical
    assert not torch.equal(w[NEW], start[NEW])
    torch.testing.assert_close(w[NEW], ref[NEW], rtol=1e-5, atol=1e-6)
    for key, value in reference.state_dict().items():  # the rest of the model too
        torch.testing.assert_close(trained.state_dict()[key], value, rtol=1e-5, atol=1e-6)


def test_transformers_trainer_accumulates_and_clips_rows_like_a_plain_loop(
    tmp_path: Path,
) -> None:
    import pytest

    mode = "train_only"
    pytest.importorskip("transformers")
    from transformers import Trainer

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    class InOrder(Trainer):
        def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Any:
            data: Any = self.train_dataset
            return SequentialSampler(data)

    model = _row_model(mode)
    args = fw.hf_args(
        tmp_path / "hf",
        num_train_epochs=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        max_grad_norm=1.0,
        learning_rate=0.5,
        weight_decay=0.0,
        optim="sgd",
        lr_scheduler_type="constant",
        logging_strategy="no",
        save_strategy="no",
        seed=0,
        dataloader_num_workers=0,
    )
    InOrder(model=model, args=args, train_dataset=Tokens()).train()
    reference, norms = _by_hand(mode, batch=2, accumulate=4, clip=1.0, lr=0.5, epochs=2)
    _check(model, reference, norms)


class LitLM(pl.LightningModule):
    """The usual Lightning code: SGD over ``self.parameters()``, nothing gradgate-specific."""

    def __init__(self, model: LM) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss: torch.Tensor = self.model(**batch)["loss"]
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.5)


def test_lightning_accumulates_and_clips_rows_like_a_plain_loop(tmp_path: Path) -> None:
    mode = "freeze"  # the rest of the model trains too
    model = _row_model(mode)
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        accumulate_grad_batches=2,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(LitLM(model), DataLoader(Tokens(), batch_size=2, shuffle=False))
    reference, norms = _by_hand(mode, batch=2, accumulate=2, clip=1.0, lr=0.5, epochs=2)
    _check(model, reference, norms)
