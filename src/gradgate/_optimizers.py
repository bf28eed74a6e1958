"""Trainer wrappers: the real optimizer and scheduler behind them, found one way (private).

Trainers hand out wrappers (accelerate's ``AcceleratedOptimizer`` and
``AcceleratedScheduler``, Lightning's ``LightningOptimizer``) that expose
what they wrap as ``.optimizer`` / ``.scheduler``. Step hooks, state and
groups live on the wrapped object, so ``guard``, ``save_trainable``/
``load_trainable``, ``sync``, ``lint``, the schedules and the trainer
callbacks all work on what this module returns. The walk is cycle-safe: a
chain of wrappers that loops back ends with an error, never a hang.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import lr_scheduler as lrs

from .errors import InvalidArgumentError

__all__ = ["unwrap", "unwrap_optimizer", "unwrap_scheduler"]


def unwrap(obj: Any, attr: str, stop: tuple[type, ...] = ()) -> tuple[list[Any], bool]:
    """The chain ``obj, obj.<attr>, obj.<attr>.<attr>, ...`` and whether it loops.

    The walk ends at an object without ``attr`` (or with ``None`` there), at
    an instance of ``stop``, or when it would revisit an object (then the
    second value is ``True``).

    Example:
        >>> class Wrapper:
        ...     optimizer = "real"
        >>> unwrap(Wrapper(), "optimizer")[0][-1]
        'real'
        >>> loop = Wrapper(); loop.optimizer = Wrapper(); loop.optimizer.optimizer = loop
        >>> len(unwrap(loop, "optimizer")[0]), unwrap(loop, "optimizer")[1]
        (2, True)
    """
    chain = [obj]
    seen = {id(obj)}
    current = obj
    while not isinstance(current, stop):
        inner = getattr(current, attr, None)
        if inner is None:
            return chain, False
        if id(inner) in seen:
            return chain, True
        seen.add(id(inner))
        chain.append(inner)
        current = inner
    return chain, False


def unwrap_optimizer(optimizer: object, argument: str = "optimizer") -> torch.optim.Optimizer:
    """Return the ``torch.optim.Optimizer`` that ``optimizer`` is or wraps (via ``.optimizer``).

    An optimizer that itself wraps another (a Lookahead-style optimizer) is
    seen through to the innermost one, as before.

    Args:
        optimizer: an optimizer, or a wrapper exposing one as ``.optimizer``.
        argument: the argument's name, used in the error message.

    Raises:
        InvalidArgumentError: neither it nor anything it wraps is an optimizer,
            or the ``.optimizer`` chain loops back without reaching one.

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)
        >>> class Wrapper:
        ...     def __init__(self, optimizer): self.optimizer = optimizer
        >>> unwrap_optimizer(Wrapper(opt)) is opt
        True
    """
    chain, loops = unwrap(optimizer, "optimizer")
    found = [o for o in chain if isinstance(o, torch.optim.Optimizer)]
    if found:
        return found[-1]
    names = " -> ".join(type(o).__name__ for o in chain)
    raise InvalidArgumentError(
        f"{argument}: expected a torch.optim.Optimizer or a wrapper exposing one as "
        f"`.optimizer` (accelerate, Lightning); got {type(optimizer).__name__}"
        + (f" whose `.optimizer` chain loops ({names} -> back) without one" if loops else "")
    )


def unwrap_scheduler(scheduler: Any) -> Any:
    """The learning-rate scheduler that ``scheduler`` is or wraps (via ``.scheduler``).

    ``None`` stays ``None``; an object that is neither a torch scheduler nor
    wraps one is returned as it is (a user's own scheduler-like object).

    Raises:
        InvalidArgumentError: the ``.scheduler`` chain loops back without a
            torch scheduler in it.

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)
        >>> sched = torch.optim.lr_scheduler.StepLR(opt, 1)
        >>> class Wrapper:
        ...     def __init__(self, scheduler): self.scheduler = scheduler
        >>> unwrap_scheduler(Wrapper(sched)) is sched, unwrap_scheduler(None)
        (True, None)
    """
    if scheduler is None:
        return None
    chain, loops = unwrap(scheduler, "scheduler", stop=(lrs.LRScheduler, lrs.ReduceLROnPlateau))
    if loops and not isinstance(chain[-1], (lrs.LRScheduler, lrs.ReduceLROnPlateau)):
        names = " -> ".join(type(o).__name__ for o in chain)
        raise InvalidArgumentError(
            f"scheduler: the `.scheduler` chain of {type(scheduler).__name__} loops "
            f"({names} -> back) without a torch.optim.lr_scheduler scheduler in it"
        )
    return chain[-1]
