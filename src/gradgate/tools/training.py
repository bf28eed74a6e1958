"""The one training loop of the tools: ``gradgate demo``, ``gradgate bench`` and bench/ scripts.

A plain supervised loop (cross-entropy, shuffled mini-batches from a seeded
generator) so that every tool trains the same way and differs only in what it
freezes and what it feeds the model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .._progress import progress

__all__ = ["EpochRecord", "accuracy", "train_epochs"]


class EpochRecord(TypedDict):
    """One epoch of :func:`train_epochs`: mean training loss, held-out accuracy, wall time."""

    epoch: int
    loss: float
    accuracy: float | None
    seconds: float


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)`` in eval mode; the mode is restored after.

    Example:
        >>> accuracy(nn.Identity(), torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([1, 1]))
        0.5
    """
    was = model.training
    model.eval()
    try:
        return float((model(x).argmax(1) == y).float().mean())
    finally:
        model.train(was)


def train_epochs(
    model: Callable[[torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    data: Any,
    epochs: int,
    *,
    seed: int,
    batch_size: int = 64,
    evaluate: Callable[[], float] | None = None,
    label: str = "",
    log: Callable[[str], None] | None = None,
    show_progress: bool = False,
) -> list[EpochRecord]:
    """Train ``model`` on ``data`` for ``epochs`` epochs with cross-entropy.

    Batches are shuffled by a generator seeded with ``seed``, so two calls with
    the same arguments see the same batches in the same order (progress bar or
    not). After each epoch ``evaluate()`` gives the held-out accuracy and
    ``log`` receives one line ``"{label} epoch N: loss L  held-out accuracy A  (T ms)"``.

    Args:
        model: an ``nn.Module`` (put in train mode each epoch) or any callable.
        optimizer: steps whatever ``model`` trains.
        data: a ``Dataset`` of ``(input, label)`` pairs.
        epochs: how many passes over ``data``.
        seed: seeds the shuffling.
        batch_size: mini-batch size.
        evaluate: held-out accuracy, called after each epoch.
        label: names the run in log lines and on the progress bar.
        log: where the per-epoch lines go (``print``); None for silence.
        show_progress: a progress bar on a terminal (never changes the batches).

    Returns:
        One :class:`EpochRecord` per epoch.

    Example:
        >>> torch.manual_seed(0) and None
        >>> net = nn.Linear(2, 2)
        >>> data = torch.utils.data.TensorDataset(torch.randn(8, 2), torch.tensor([0, 1] * 4))
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> [r["epoch"] for r in train_epochs(net, opt, data, 2, seed=0)]
        [1, 2]
    """
    records: list[EpochRecord] = []
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        # A FeatureCache reads whole batches through its own collate function.
        loader = DataLoader(
            data,
            batch_size=batch_size,
            shuffle=True,
            generator=generator,
            collate_fn=getattr(data, "collate_fn", None),
        )
        if isinstance(model, nn.Module):
            model.train()
        total = torch.zeros(())
        count = 0
        for x, y in progress(loader, enabled=show_progress, desc=f"{label} epoch {epoch}/{epochs}"):
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.detach() * len(y)
            count += len(y)
        seconds = time.perf_counter() - start
        acc = evaluate() if evaluate is not None else None
        mean = float(total) / max(count, 1)
        records.append({"epoch": epoch, "loss": mean, "accuracy": acc, "seconds": seconds})
        if log is not None:
            shown = "" if acc is None else f"  held-out accuracy {acc:.3f}"
            log(f"  {label} epoch {epoch}: loss {mean:.4f}{shown}  ({seconds * 1000:.0f} ms)")
    return records
