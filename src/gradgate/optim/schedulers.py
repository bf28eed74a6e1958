"""Scheduler surgery: new optimizer groups join a running schedule at its current point."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.optim import lr_scheduler as lrs

__all__ = ["extend_scheduler", "lifting_scheduler", "peak_lr", "schedulers"]


def schedulers(scheduler: Any) -> Iterator[Any]:
    """The scheduler and, for Sequential/Chained ones, every scheduler inside.

    A wrapper that exposes its scheduler as ``.scheduler`` (accelerate's
    ``AcceleratedScheduler``) is seen through.

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)
        >>> warm = torch.optim.lr_scheduler.LinearLR(opt, 0.1, total_iters=2)
        >>> cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5)
        >>> seq = torch.optim.lr_scheduler.SequentialLR(opt, [warm, cos], milestones=[2])
        >>> [type(s).__name__ for s in schedulers(seq)]
        ['SequentialLR', 'LinearLR', 'CosineAnnealingLR']
    """
    if scheduler is None:
        return
    while not isinstance(scheduler, lrs.LRScheduler) and hasattr(scheduler, "scheduler"):
        scheduler = scheduler.scheduler
    yield scheduler
    for inner in getattr(scheduler, "_schedulers", []):
        yield from schedulers(inner)


def peak_lr(optimizer: torch.optim.Optimizer, scheduler: Any = None, group: int = 0) -> float:
    """The highest learning rate the schedule gives ``group``, not its momentary value.

    OneCycleLR's ``max_lr``, CyclicLR's ``max_lr``, else the group's
    ``initial_lr`` (what cosine, step, warm-up and lambda schedules scale
    down from), else its ``lr``.

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)
        >>> sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=10)
        >>> opt.param_groups[0]["lr"] < peak_lr(opt, sched) == 3e-3
        True
    """
    g = optimizer.param_groups[group]
    if "max_lr" in g:
        return float(g["max_lr"])
    for sched in schedulers(scheduler):
        if isinstance(sched, lrs.CyclicLR):
            return float(sched.max_lrs[group])
    return float(g.get("initial_lr", g["lr"]))


def extend_scheduler(sched: Any, optimizer: torch.optim.Optimizer, new: list[int]) -> None:
    """Grow a scheduler's per-group lists for the groups at positions ``new``.

    A new group's ``lr`` is its peak: OneCycleLR's and CyclicLR's ``max_lr``,
    the base of every other schedule. It then starts at the point the
    schedule has reached, with the first group's shape (OneCycleLR's
    divisors, CyclicLR's base-to-peak ratio, the first LambdaLR lambda).
    """
    groups = optimizer.param_groups
    ref = groups[0]
    for i in new:
        g = groups[i]
        g.setdefault("initial_lr", g["lr"])
        if isinstance(sched, lrs.OneCycleLR):
            div = ref["max_lr"] / ref["initial_lr"]
            final_div = ref["initial_lr"] / ref["min_lr"]
            g["max_lr"] = g["lr"]
            g["initial_lr"] = g["max_lr"] / div
            g["min_lr"] = g["initial_lr"] / final_div
            if getattr(sched, "cycle_momentum", False):
                for key in ("max_momentum", "base_momentum"):
                    g[key] = ref[key]
                for key in ("betas", "momentum"):
                    if key in ref:
                        g[key] = ref[key]
        if isinstance(sched, lrs.CyclicLR):
            low = sched.base_lrs[0] / sched.max_lrs[0] if sched.max_lrs[0] else 1.0
            sched.max_lrs.append(g["lr"])
            g["initial_lr"] = g["lr"] * low
            if getattr(sched, "cycle_momentum", False):
                sched.base_momentums.append(sched.base_momentums[0])
                sched.max_momentums.append(sched.max_momentums[0])
        if isinstance(sched, lrs.ReduceLROnPlateau):
            sched.min_lrs.append(sched.min_lrs[0] if sched.min_lrs else 0.0)
        if isinstance(sched, (lrs.LambdaLR, lrs.MultiplicativeLR)):
            sched.lr_lambdas.append(sched.lr_lambdas[0])
        if hasattr(sched, "base_lrs") and not isinstance(sched, lrs.ReduceLROnPlateau):
            sched.base_lrs.append(g["initial_lr"])
        if hasattr(sched, "_last_lr"):
            sched._last_lr.append(g["lr"])
    if isinstance(sched, (lrs.OneCycleLR, lrs.CyclicLR, lrs.LambdaLR, lrs.MultiplicativeLR)):
        _recompute(sched, new)
    elif isinstance(sched, (lrs.CosineAnnealingLR, lrs.CosineAnnealingWarmRestarts)):
        _recompute_closed_form(sched, new)


def _recompute(sched: Any, new: list[int]) -> None:
    """Set the new groups' lr to what the scheduler says for the current step."""
    if isinstance(sched, lrs.MultiplicativeLR):
        return
    flag = "_get_lr_called_within_step"
    old = getattr(sched, flag, False)
    setattr(sched, flag, True)
    try:
        if isinstance(sched, lrs.LambdaLR):
            values = [
                base * fn(sched.last_epoch)
                for base, fn in zip(sched.base_lrs, sched.lr_lambdas, strict=True)
            ]
        else:
            values = sched.get_lr()
    finally:
        setattr(sched, flag, old)
    for i in new:
        value = float(values[i])
        sched.optimizer.param_groups[i]["lr"] = value
        sched._last_lr[i] = value


def _recompute_closed_form(sched: Any, new: list[int]) -> None:
    """Cosine schedules are recurrent; place new groups on the closed-form curve."""
    if isinstance(sched, lrs.CosineAnnealingLR):
        t, period = sched.last_epoch, sched.T_max
    else:
        t, period = sched.T_cur, sched.T_i
    for i in new:
        base = sched.base_lrs[i]
        value = sched.eta_min + (base - sched.eta_min) * (1 + math.cos(math.pi * t / period)) / 2
        sched.optimizer.param_groups[i]["lr"] = value
        sched._last_lr[i] = value


def lifting_scheduler(scheduler: Any) -> str | None:
    """The scheduler (by name) that will raise an lr-0 group above 0, if any.

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.0)
        >>> lifting_scheduler(torch.optim.lr_scheduler.CosineAnnealingLR(opt, 5, eta_min=0.1))
        'CosineAnnealingLR(eta_min=0.1)'
    """
    for sched in schedulers(scheduler):
        name = type(sched).__name__
        if isinstance(sched, (lrs.CosineAnnealingLR, lrs.CosineAnnealingWarmRestarts)):
            if sched.eta_min > 0:
                return f"{name}(eta_min={sched.eta_min})"
        elif isinstance(sched, (lrs.OneCycleLR, lrs.CyclicLR)):
            return name
    return None
