"""The shared table of tiny models run through every behaviour test (PEFT-style)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from gradgate.tools.agent import Agent


class TiedLM(nn.Module):
    """Embedding and decoder share one weight (tied weights)."""

    def __init__(self, vocab: int = 11, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.body = nn.Sequential(nn.Linear(dim, dim), nn.Tanh())
        self.decoder = nn.Linear(dim, vocab, bias=False)
        self.decoder.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.decoder(self.body(self.embed(x)))
        return out


class LSTMNet(nn.Module):
    """A recurrent front-end with a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(4, 6, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        last: torch.Tensor = self.head(out[:, -1])
        return last


class Block(nn.Module):
    """A transformer block with its own dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 8)
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.layer(self.embed(x)).mean(1))
        return out


def conv_bn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    )


def nested() -> nn.Module:
    return nn.Sequential(
        nn.Sequential(nn.Linear(4, 6), nn.Sequential(nn.Linear(6, 6), nn.ReLU())),
        nn.Linear(6, 2),
    )


def param_free() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.ReLU(), nn.Linear(6, 2))


@dataclass(frozen=True)
class Case:
    """A model, a selector that splits it, and an input for it."""

    name: str
    factory: Callable[[], nn.Module]
    selectors: tuple[str, ...]
    make_input: Callable[[], torch.Tensor]

    def __str__(self) -> str:
        return self.name


CASES = [
    Case("conv_bn", conv_bn, ("0", "1"), lambda: torch.randn(4, 3, 8, 8)),
    Case("transformer", Block, ("layer",), lambda: torch.randn(3, 4, 5)),
    Case("tied", TiedLM, ("body",), lambda: torch.randint(0, 11, (3, 4))),
    Case("nested", nested, ("0.1",), lambda: torch.randn(3, 4)),
    Case("param_free", param_free, ("0", "1"), lambda: torch.randn(3, 4)),
    Case("lstm", LSTMNet, ("rnn",), lambda: torch.randn(3, 5, 4)),
    Case("seed", Agent, ("front_end",), lambda: torch.randn(2, 3, 28, 28)),
]


def state_of(model: nn.Module) -> tuple[list[tuple[str, bool]], list[tuple[str, bool, bool]]]:
    """Every requires_grad flag and every train/sticky mode, for exact comparison."""
    from gradgate import is_sticky

    grads = [(n, p.requires_grad) for n, p in model.named_parameters()]
    modes = [(n, m.training, is_sticky(m)) for n, m in model.named_modules()]
    return grads, modes
