"""Transfer learning: EfficientNet-Lite0 (real ImageNet weights) on digits, unfrozen gradually.

The first epochs train only a new head; later epochs unfreeze the convolutions of the
last blocks, then of the middle ones, each in its own optimizer group at a lower
learning rate (gg.GradualUnfreeze). Every BatchNorm stays frozen in inference mode,
and the stem never moves.

Run: python examples/transfer_efficientnet.py [--images N] [--epochs E]
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradgate as gg
from gradgate.tools.zoo import digits_64, efficientnet_lite0


def convs_in(pattern: str) -> Callable[[str, nn.Module], bool]:
    """A selector: the convolutions under the module paths matching ``pattern``."""
    rx = re.compile(pattern)

    def pick(name: str, m: nn.Module) -> bool:
        return isinstance(m, nn.Conv2d) and rx.match(name) is not None

    pick.__name__ = f"convs_in({pattern})"
    return pick


class Classifier(nn.Module):
    """The pretrained backbone with a fresh 10-way head."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = efficientnet_lite0()
        self.head = nn.Linear(1280, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.backbone.features(x))
        return out


def main(images: int = 600, epochs: int = 6) -> dict[str, float]:
    """Fine-tune stage by stage; return the final held-out accuracy and proofs."""
    torch.manual_seed(0)
    x, y = digits_64()
    x, y = x[:images], y[:images]
    cut = int(0.75 * images)
    model = Classifier()
    stages = gg.stages(
        model,
        ["backbone._conv_stem", "backbone._blocks.[0-7]"],
        convs_in("backbone._blocks.(8|9)"),
        convs_in("backbone._blocks.1[0-5]|backbone._conv_head"),
        "head",
    )
    # BatchNorm stays frozen in inference mode in every stage: with small batches from
    # another domain its batch statistics would wreck what the head has learned.
    gg.freeze(model, nn.BatchNorm2d)
    gg.freeze(model, "backbone._fc")  # ImageNet's classifier is not used
    opt = torch.optim.AdamW(gg.param_groups(model, lr=1e-2, weight_decay=0.01))
    # the head alone first, then the last blocks, then the middle ones; the stem never
    schedule = gg.GradualUnfreeze(
        model, stages, at=[epochs + 1, epochs - 1, epochs - 2, 0], optimizer=opt, lr_mult=0.01
    )
    stem = gg.fingerprint(model.backbone._conv_stem)
    print(gg.summary(model, depth=1))
    acc = 0.0
    for epoch in range(epochs):
        new = schedule.step(epoch)
        if new:
            print(f"epoch {epoch}: unfroze {[stages.names[i] for i in new]}")
        model.train()
        with gg.guard(model, opt):
            for xb, yb in DataLoader(TensorDataset(x[:cut], y[:cut]), batch_size=32, shuffle=True):
                loss = F.cross_entropy(model(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
        model.eval()
        with torch.no_grad():
            acc = float((model(x[cut:]).argmax(1) == y[cut:]).float().mean())
        print(f"epoch {epoch}: loss {loss.item():.3f}, held-out accuracy {acc:.3f}")
    same = gg.fingerprint(model.backbone._conv_stem) == stem
    print(f"stem (never unfrozen) bit-identical: {same}")
    return {"accuracy": acc, "stem_unchanged": float(same), "groups": len(opt.param_groups)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    main(args.images, args.epochs)
