"""Optimizer wrappers seen through: the real ``torch.optim.Optimizer`` behind them (private)."""

from __future__ import annotations

from typing import Any

import torch

from .errors import InvalidArgumentError


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The optimizer a trainer's wrapper drives, found through ``.optimizer`` links.

    accelerate's ``AcceleratedOptimizer`` and Lightning's ``LightningOptimizer``
    expose the optimizer they wrap as ``.optimizer``; a wrapper of a wrapper
    is followed to the end. A plain optimizer is returned as it is.

    Raises:
        InvalidArgumentError: what is left is not a ``torch.optim.Optimizer``.

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
        >>> class Wrapper:
        ...     def __init__(self, optimizer): self.optimizer = optimizer
        >>> unwrap_optimizer(Wrapper(Wrapper(opt))) is opt
        True
    """
    seen: set[int] = set()
    while id(optimizer) not in seen:
        seen.add(id(optimizer))
        inner = getattr(optimizer, "optimizer", None)
        if inner is None:
            break
        optimizer = inner
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise InvalidArgumentError(
            f"expected a torch.optim.Optimizer (or a wrapper exposing one as .optimizer); "
            f"got {type(optimizer).__name__}; pass the optimizer your trainer steps"
        )
    return optimizer
