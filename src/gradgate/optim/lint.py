"""``lint``: the ways an optimizer (and scheduler) can still move a frozen weight."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._index import ModelIndex
from .._optimizers import unwrap_optimizer
from .schedulers import lifting_scheduler
from .sync import held_elsewhere

__all__ = ["Finding", "lint"]


@dataclass(frozen=True)
class Finding:
    """One problem ``lint`` found: a code, the parameters involved, and the fix.

    Example:
        >>> Finding("GG101", "frozen parameter with state", ["w"], "call gg.sync").code
        'GG101'
    """

    code: str
    message: str
    params: list[str] = field(default_factory=list)
    fix: str = ""

    def __str__(self) -> str:
        shown = ", ".join(self.params[:5]) + (", ..." if len(self.params) > 5 else "")
        return f"{self.code} {self.message} [{shown}] -> {self.fix}"


def _is_lr_zero_freeze(group: dict[str, Any]) -> bool:
    """A group whose own learning rate is 0, not one a schedule brought to 0 for now.

    Schedulers record the rate a group was built with as ``initial_lr``; a
    warm-up starting from 0 or a decay ending at 0 keeps it above 0.
    """
    base = group.get("initial_lr", group["lr"])
    return float(base) == 0.0


def lint(optimizer: Any, model: nn.Module, scheduler: Any = None) -> list[Finding]:
    """Find the ways this optimizer (and scheduler) can move a frozen weight.

    Codes: ``GG101`` frozen parameters in the optimizer holding state or a
    gradient; ``GG102`` frozen parameters in the optimizer (LBFGS can move
    them through its curvature history even with ``grad=None``); ``GG103`` an
    lr-0 group used as a freeze (and the scheduler that will lift it);
    ``GG104`` trainable parameters missing from every group (and from every
    other optimizer ``gg.sync`` has seen); ``GG105`` a parameter in two
    groups (or twice in one).

    A group a schedule holds at lr 0 for the moment (a warm-up's first step,
    the end of a linear decay: its ``initial_lr`` is above 0) is not a
    freeze. OneCycleLR and CyclicLR rewrite every group's lr when they are
    built, so an lr-0 freeze is visible to ``lint`` only before they are.
    Optimizer wrappers exposing ``.optimizer`` (accelerate, Lightning) are
    accepted.

    Example:
        >>> import torch, gradgate as gg
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> opt = torch.optim.Adam([{"params": net[0].parameters(), "lr": 0.0},
        ...                         {"params": net[1].parameters()}])
        >>> [f.code for f in gg.lint(opt, net)]
        ['GG103']
    """
    opt = unwrap_optimizer(optimizer)
    index = ModelIndex(model)  # the one read of the model for this call
    names = dict(index.canonical)
    is_lbfgs = isinstance(opt, torch.optim.LBFGS)
    findings: list[Finding] = []
    seen: dict[int, int] = {}
    dup: list[str] = []
    stateful: list[str] = []
    idle: list[str] = []
    for gi, group in enumerate(opt.param_groups):
        for p in group["params"]:
            name = names.get(id(p), f"<param not in model {tuple(p.shape)}>")
            if id(p) in seen:
                dup.append(name)
            seen[id(p)] = gi
            if id(p) in names and not p.requires_grad:
                if opt.state.get(p) or p.grad is not None:
                    stateful.append(name)
                else:
                    idle.append(name)
        params = [names.get(id(p), "?") for p in group["params"]]
        if params and _is_lr_zero_freeze(group):
            lifter = lifting_scheduler(scheduler)
            msg = f"group {gi} has lr=0: a freeze by learning rate still computes every gradient"
            if lifter:
                msg += f", and {lifter} will raise an lr-0 group above 0"
            findings.append(
                Finding(
                    "GG103",
                    msg,
                    params,
                    "gg.freeze(model, <those parameters>) and gg.sync(optimizer, model)",
                )
            )
    if stateful:
        findings.insert(
            0,
            Finding(
                "GG101",
                "frozen parameters are still in the optimizer with state or a gradient: "
                "momentum, Adam moments or weight decay will move them",
                stateful,
                "gg.sync(optimizer, model)",
            ),
        )
    if idle:
        findings.append(
            Finding(
                "GG102",
                "frozen parameters are still in the optimizer"
                + (" (LBFGS moves them through its history)" if is_lbfgs else ""),
                idle,
                "gg.sync(optimizer, model)",
            )
        )
    absent = [(n, p) for n, p in index.params.items() if p.requires_grad and id(p) not in seen]
    elsewhere = held_elsewhere(opt, [p for _, p in absent]) if absent else set()
    missing = [n for n, p in absent if id(p) not in elsewhere]
    if missing:
        findings.append(
            Finding(
                "GG104",
                "trainable parameters are in no optimizer group and will never update",
                missing,
                "gg.sync(optimizer, model) adds them (or freeze them)",
            )
        )
    if dup:
        findings.append(
            Finding(
                "GG105",
                "parameters appear in more than one place in the optimizer",
                dup,
                "rebuild the optimizer from gg.param_groups(model, ...)",
            )
        )
    return findings
