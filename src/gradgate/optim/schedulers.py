"""Scheduler surgery: new optimizer groups join a running schedule at its current point."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.optim import lr_scheduler as lrs

from .._optimizers import unwrap_scheduler

__all__ = [
    "GroupFloorCosineAnnealingLR",
    "GroupFloorCosineAnnealingWarmRestarts",
    "extend_scheduler",
    "lifting_scheduler",
    "peak_lr",
    "schedulers",
]


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
    scheduler = unwrap_scheduler(scheduler)  # cycle-safe
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


def _group_peak(sched_list: list[Any], optimizer: torch.optim.Optimizer, i: int) -> float:
    """Group ``i``'s peak under the schedulers ``sched_list`` (see ``peak_lr``)."""
    g = optimizer.param_groups[i]
    if "max_lr" in g:
        return float(g["max_lr"])
    for sched in sched_list:
        if isinstance(sched, lrs.CyclicLR) and i < len(sched.max_lrs):
            return float(sched.max_lrs[i])
    return float(g.get("initial_lr", g["lr"]))


def extend_scheduler(scheduler: Any, optimizer: torch.optim.Optimizer, new: list[int]) -> None:
    """Let the groups at positions ``new`` join ``scheduler`` (Sequential/Chained included).

    A new group's ``lr`` is its peak: OneCycleLR's and CyclicLR's ``max_lr``,
    the base of every other schedule. Every scheduler's per-group lists grow
    with the first group's shape (OneCycleLR's divisors, CyclicLR's
    base-to-peak ratio, the first LambdaLR lambda, a cosine floor
    ``eta_min`` scaled to the new peak). The group then starts where the
    first group is now, scaled to its peak: ``lr = peak * lr_0 / peak_0``.
    Every schedule in ``torch.optim.lr_scheduler`` is a multiple of its
    group's peak once the floors scale with it, so the ratio holds at every
    later step too: during a ``SequentialLR`` warm-up a new group sits on
    the warm-up's curve, under ``ReduceLROnPlateau`` it carries the
    reductions already made (relative to group 0's ``initial_lr`` when a
    scheduler set one, else its lr now).

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(1, 1)
        >>> opt = torch.optim.SGD([net.weight], lr=1.0)
        >>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        >>> opt.step(); sched.step()
        >>> opt.add_param_group({"params": [net.bias], "lr": 0.1})
        >>> extend_scheduler(sched, opt, [1])
        >>> [g["lr"] for g in opt.param_groups]
        [0.5, 0.05]
    """
    found = list(schedulers(scheduler))
    if not found or not new:
        return
    groups = optimizer.param_groups
    old = [i for i in range(len(groups)) if i not in new]
    peaks = {i: _group_peak(found, optimizer, i) for i in old}
    ref = 0 if peaks.get(0) else next((i for i in old if peaks[i] > 0), None)
    ratio = float(groups[ref]["lr"]) / peaks[ref] if ref is not None else None
    for sched in found:
        _extend_lists(sched, optimizer, new)
    for sched in found:
        _scale_floor(sched, optimizer, new)
    for i in new:
        g = groups[i]
        if ratio is None:
            value = _fallback_lr(found, optimizer, i)
        else:
            value = _group_peak(found, optimizer, i) * ratio
        g["lr"] = value
        for sched in found:
            last = getattr(sched, "_last_lr", None)
            if isinstance(last, list) and i < len(last):
                last[i] = value


def _extend_lists(sched: Any, optimizer: torch.optim.Optimizer, new: list[int]) -> None:
    """Grow one scheduler's per-group lists for the groups at positions ``new``."""
    groups = optimizer.param_groups
    ref = groups[0]
    for i in new:
        g = groups[i]
        g.setdefault("initial_lr", g["lr"])
        if isinstance(sched, lrs.OneCycleLR):
            div = ref["max_lr"] / ref["initial_lr"]
            final_div = ref["initial_lr"] / ref["min_lr"]
            if "max_lr" not in g:
                g["max_lr"] = g["lr"]
                g["initial_lr"] = g["max_lr"] / div
                g["min_lr"] = g["initial_lr"] / final_div
            if getattr(sched, "cycle_momentum", False):
                for key in ("max_momentum", "base_momentum"):
                    g[key] = ref[key]
                for key in ("betas", "momentum"):
                    if key in ref:
                        g[key] = ref[key]
        if isinstance(sched, lrs.CyclicLR) and len(sched.max_lrs) <= i:
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
        if isinstance(getattr(sched, "_last_lr", None), list):
            sched._last_lr.append(g["lr"])


def _scale_floor(sched: Any, optimizer: torch.optim.Optimizer, new: list[int]) -> None:
    """Give new groups under a cosine schedule with a floor their own, scaled ``eta_min``.

    Torch's cosine schedules share one ``eta_min``: a group at ``k`` x group
    0's base would end at group 0's floor, not at ``k`` x it, and its ratio to
    group 0 would drift every step. The scheduler becomes its
    ``GroupFloor`` subclass (same state, one floor per group).
    """
    if not isinstance(sched, (lrs.CosineAnnealingLR, lrs.CosineAnnealingWarmRestarts)):
        return
    base0 = float(sched.base_lrs[0]) if sched.base_lrs else 0.0
    floors = getattr(sched, "gg_eta_mins", None)
    eta = float(sched.eta_min)
    if not floors and (eta == 0 or base0 == 0):
        return
    floors = list(floors) if floors else [eta] * (len(sched.base_lrs) - len(new))
    for i in new:
        while len(floors) < i:
            floors.append(eta)
        floors.insert(i, eta * float(sched.base_lrs[i]) / base0 if base0 else eta)
    setattr(sched, "gg_eta_mins", floors)  # noqa: B010 (a torch class has no such field)
    if not isinstance(sched, _GroupFloor):
        sched.__class__ = (
            GroupFloorCosineAnnealingLR
            if isinstance(sched, lrs.CosineAnnealingLR)
            else GroupFloorCosineAnnealingWarmRestarts
        )


class _GroupFloor:
    """A cosine schedule with one ``eta_min`` per group (``gg_eta_mins``).

    Each group's lr is the parent class's formula with that group's floor, so
    recurrent and closed-form steps stay torch's own.
    """

    eta_min: float
    gg_eta_mins: list[float]

    def _per_group(self, compute: Callable[[], list[Any]]) -> list[Any]:
        shared = self.eta_min
        out = list(compute())
        try:
            for i, floor in enumerate(getattr(self, "gg_eta_mins", [])):
                if i < len(out) and floor != shared:
                    self.eta_min = floor
                    out[i] = compute()[i]
        finally:
            self.eta_min = shared
        return out

    def get_lr(self) -> list[Any]:
        """The parent's ``get_lr``, each group with its own floor."""
        return self._per_group(super().get_lr)  # type: ignore[misc]

    def _get_closed_form_lr(self) -> list[Any]:
        return self._per_group(super()._get_closed_form_lr)  # type: ignore[misc]


class GroupFloorCosineAnnealingLR(_GroupFloor, lrs.CosineAnnealingLR):
    """``CosineAnnealingLR`` with one ``eta_min`` per group (made by ``gg.sync``)."""


class GroupFloorCosineAnnealingWarmRestarts(_GroupFloor, lrs.CosineAnnealingWarmRestarts):
    """``CosineAnnealingWarmRestarts`` with one ``eta_min`` per group (made by ``gg.sync``)."""


def _fallback_lr(found: list[Any], optimizer: torch.optim.Optimizer, i: int) -> float:
    """No group with a positive peak to scale from: the innermost closed form, or the peak."""
    g = optimizer.param_groups[i]
    for sched in reversed(found):
        if isinstance(sched, (lrs.CosineAnnealingLR, lrs.CosineAnnealingWarmRestarts)):
            if isinstance(sched, lrs.CosineAnnealingLR):
                t, period = sched.last_epoch, sched.T_max
            else:
                t, period = sched.T_cur, sched.T_i
            floors = getattr(sched, "gg_eta_mins", None)
            eta = floors[i] if floors else sched.eta_min
            base = sched.base_lrs[i]
            return float(eta + (base - eta) * (1 + math.cos(math.pi * t / period)) / 2)
        if isinstance(sched, lrs.LambdaLR):
            return float(sched.base_lrs[i] * sched.lr_lambdas[i](sched.last_epoch))
    return float(g["lr"])


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
