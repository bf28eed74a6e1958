"""Optimizer wrappers: the real ``torch.optim.Optimizer`` behind a trainer's wrapper (private).

Trainers hand out wrappers (accelerate's ``AcceleratedOptimizer``,
Lightning's ``LightningOptimizer``) that expose the optimizer they wrap as
``.optimizer``. Step hooks, state and groups live on the wrapped object, so
``guard``, ``save_trainable``/``load_trainable``, ``sync`` and ``lint`` all
work on what this module returns.
"""

from __future__ import annotations

import torch

from .errors import InvalidArgumentError

__all__ = ["unwrap_optimizer"]

_MAX_DEPTH = 16  # wrappers of wrappers are rare; a cycle must not loop forever


def unwrap_optimizer(optimizer: object, argument: str = "optimizer") -> torch.optim.Optimizer:
    """Return the ``torch.optim.Optimizer`` that ``optimizer`` is or wraps (via ``.optimizer``).

    Args:
        optimizer: an optimizer, or a wrapper exposing one as ``.optimizer``.
        argument: the argument's name, used in the error message.

    Raises:
        InvalidArgumentError: neither it nor anything it wraps is an optimizer.

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)
        >>> class Wrapper:
        ...     def __init__(self, optimizer): self.optimizer = optimizer
        >>> unwrap_optimizer(Wrapper(opt)) is opt
        True
    """
    current = optimizer
    for _ in range(_MAX_DEPTH):
        inner = getattr(current, "optimizer", None)
        if inner is None or inner is current:
            break
        if not isinstance(inner, torch.optim.Optimizer) and not hasattr(inner, "optimizer"):
            break
        current = inner
    if isinstance(current, torch.optim.Optimizer):
        return current
    raise InvalidArgumentError(
        f"{argument}: expected a torch.optim.Optimizer or a wrapper exposing one as "
        f"`.optimizer` (accelerate, Lightning); got {type(optimizer).__name__}"
    )
