"""Lightning: EfficientNet-Lite0 (ImageNet weights) fine-tuned on digits with GradgateFinetuning.

The backbone is frozen (its BatchNorm in inference mode, although Lightning
calls ``model.train()`` every epoch) while a new head trains; at epoch 1 the
last block's convolutions join at a tenth of the head's learning rate under a
cosine schedule. That block's BatchNorm stays frozen too: unfrozen, it would
normalise with the statistics of 32-image batches from another domain while
training, and with its barely moved running statistics (momentum 0.01) at
evaluation; on seed 1 that cost 0.873 -> 0.513 held-out. The stem, never
unfrozen, is proven bit-identical. The baseline it must beat is chance on the
ten digits (the share of the most common digit in the held-out set, about
0.10).

Lightning's model summary counts the frozen modules as "in eval mode"; that is
intended (gradgate holds frozen BatchNorm and Dropout in inference mode).

Run: python examples/lightning_efficientnet.py [--images N] [--epochs E] [--seed S]
"""

from __future__ import annotations

import argparse
import re
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradgate as gg
from gradgate.integrations.lightning import GradgateFinetuning
from gradgate.tools.zoo import digits_64, efficientnet_lite0


def last_block_convs(name: str, module: nn.Module) -> bool:
    """A selector: the convolutions of block 15 (its BatchNorm stays frozen)."""
    return isinstance(module, nn.Conv2d) and re.match(r"backbone\._blocks\.15\.", name) is not None


class DigitsClassifier(pl.LightningModule):
    """The pretrained backbone with a fresh 10-way head."""

    def __init__(self, epochs: int) -> None:
        super().__init__()
        self.backbone = efficientnet_lite0()
        self.head = nn.Linear(1280, 10)
        self.epochs = epochs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.backbone.features(x))
        return out

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        # Over all parameters: GradgateFinetuning takes the frozen ones out.
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.05)
        return [opt], [torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.epochs + 1)]


def main(images: int = 600, epochs: int = 5, seed: int = 0) -> dict[str, float]:
    """Fine-tune; return held-out accuracy, its baseline and whether the frozen stem held."""
    pl.seed_everything(seed, verbose=False)
    x, y = digits_64()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:images]
    x, y = x[order], y[order]
    cut = int(0.75 * images)
    chance = torch.bincount(y[cut:]).max().item() / len(y[cut:])
    model = DigitsClassifier(epochs)
    stem = gg.fingerprint(model.backbone._conv_stem)
    callback = GradgateFinetuning("backbone", unfreeze=[(1, last_block_convs)])
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    trainer.fit(model, DataLoader(TensorDataset(x[:cut], y[:cut]), batch_size=32, shuffle=True))
    model.eval()
    with torch.no_grad():
        accuracy = (model(x[cut:]).argmax(1) == y[cut:]).float().mean().item()
    opt = trainer.optimizers[0]
    out = {
        "accuracy": accuracy,
        "chance": chance,
        "stem_unchanged": float(gg.fingerprint(model.backbone._conv_stem) == stem),
        "groups": float(len(opt.param_groups)),
        "last_block_lr_ratio": opt.param_groups[-1]["lr"] / opt.param_groups[0]["lr"],
    }
    print(
        f"result: held-out accuracy {accuracy:.3f} on {len(y) - cut} digits vs chance "
        f"{chance:.3f}; frozen stem bit-identical: "
        f"{bool(out['stem_unchanged'])}; groups {len(opt.param_groups)} "
        f"(last block at {out['last_block_lr_ratio']:.2f} x the head's lr)"
    )
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args()
    main(a.images, a.epochs, a.seed)
