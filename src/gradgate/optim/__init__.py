"""Optimizers and schedulers that cannot move a frozen weight: param_groups, sync, lint."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim import lr_scheduler as lrs

from .. import subtensor
from ..errors import InvalidArgumentError
from ..selection import Selector, select

__all__ = ["DEFAULT_NO_DECAY", "Finding", "LayerDecay", "lint", "param_groups", "sync"]

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def _is_no_decay(name: str, module: nn.Module) -> bool:
    return isinstance(module, NORM_TYPES)


DEFAULT_NO_DECAY: tuple[Selector, ...] = ("**.bias", _is_no_decay)
"""Biases and every parameter of a normalisation layer get no weight decay."""

Rules = Mapping[Any, Mapping[str, Any]] | Sequence[tuple[Selector, Mapping[str, Any]]]


@dataclass(frozen=True)
class LayerDecay:
    """Layer-wise learning-rate decay over stages ordered front to back.

    Stage ``i`` of ``n`` trains at ``lr * decay ** (n - 1 - i)``: the last
    stage (the head) at ``lr``, earlier ones ever slower (ULMFiT's
    discriminative rates, fastai's ``slice``). Parameters in no stage train
    at ``lr``.

    Example:
        >>> LayerDecay(["front_end", "back_end"], 0.5).factors()
        [0.5, 1.0]
    """

    stages: Sequence[Selector]
    decay: float

    def factors(self) -> list[float]:
        """The learning-rate multiplier of each stage, front to back."""
        n = len(self.stages)
        return [self.decay ** (n - 1 - i) for i in range(n)]


def _rule_items(rules: Rules) -> list[tuple[Selector, Mapping[str, Any]]]:
    if isinstance(rules, Mapping):
        return list(rules.items())
    return [(sel, opts) for sel, opts in rules]


def _options_by_param(
    model: nn.Module, rules: Rules, names: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Options from ``rules`` for each named parameter (later rules win)."""
    out: dict[str, dict[str, Any]] = {n: {} for n in names}
    for sel, opts in _rule_items(rules):
        if not isinstance(opts, Mapping):
            raise InvalidArgumentError(
                f"rule for {sel!r} must map option names to values; got {opts!r}"
            )
        for pname in select(model, sel).parameters:
            if pname in out:
                out[pname].update(opts)
    return out


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    rules: Rules = (),
    no_decay: Selector | Sequence[Selector] | None = DEFAULT_NO_DECAY,
    layer_decay: LayerDecay | tuple[float, Sequence[Selector]] | None = None,
) -> list[dict[str, Any]]:
    """Parameter groups of the trainable parameters, for any ``torch.optim`` optimizer.

    Each group carries ``param_names`` (so a resumed run can rebuild it by
    name). Frozen parameters are left out entirely.

    Args:
        model: the model, already frozen as wanted.
        lr: base learning rate.
        weight_decay: weight decay for parameters not matched by ``no_decay``.
        rules: ``{selector: {option: value}}`` (or a list of pairs) applied in
            order, e.g. ``{"back_end.fc2": {"lr": 1e-2}}``; an explicit
            ``lr`` in a rule is not scaled by ``layer_decay``.
        no_decay: selectors whose parameters get ``weight_decay=0`` (default:
            biases and normalisation layers); ``None`` decays everything.
        layer_decay: a ``LayerDecay`` (or ``(decay, stages)``) for
            discriminative learning rates.

    Returns:
        A list of group dicts: ``params``, ``param_names``, ``lr``,
        ``weight_decay`` and any rule options.

    Example:
        >>> import torch, gradgate as gg
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
        >>> groups = gg.param_groups(net, lr=0.1, weight_decay=0.01)
        >>> [(g["param_names"], g["weight_decay"]) for g in groups]
        [(['0.weight'], 0.01), (['0.bias', '1.weight', '1.bias'], 0.0)]
        >>> opt = torch.optim.AdamW(groups)
    """
    rows = subtensor.trainable_of(model)  # rows (issue 16): a partial tensor's trainable rows
    named = [(n, rows.get(id(p), p)) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    if not named:
        raise InvalidArgumentError(
            f"{type(model).__name__} has no trainable parameter; freeze less, or unfreeze first"
        )
    if isinstance(layer_decay, tuple):
        layer_decay = LayerDecay(stages=layer_decay[1], decay=layer_decay[0])
    decay_off: set[str] = set()
    if no_decay is not None:
        sels = list(no_decay) if isinstance(no_decay, (list, tuple)) else [no_decay]
        for sel in sels:
            with contextlib.suppress(LookupError):  # a model without biases is fine
                decay_off.update(select(model, sel).parameters)
    factor = dict.fromkeys(names, 1.0)
    if layer_decay is not None:
        for sel, f in zip(layer_decay.stages, layer_decay.factors()):
            for pname in select(model, sel).parameters:
                if pname in factor:
                    factor[pname] = f
    options = _options_by_param(model, rules, names)
    groups: dict[tuple[Any, ...], dict[str, Any]] = {}
    for name, p in named:
        opts = dict(options[name])
        opts.setdefault("lr", lr * factor[name])
        opts.setdefault("weight_decay", 0.0 if name in decay_off else weight_decay)
        key = tuple(sorted((k, repr(v)) for k, v in opts.items()))
        group = groups.setdefault(key, {"params": [], "param_names": [], **opts})
        group["params"].append(p)
        group["param_names"].append(name)
    return list(groups.values())


def _schedulers(scheduler: Any) -> Iterator[Any]:
    """The scheduler and, for Sequential/Chained ones, every scheduler inside."""
    if scheduler is None:
        return
    yield scheduler
    for inner in getattr(scheduler, "_schedulers", []):
        yield from _schedulers(inner)


def _extend_scheduler(sched: Any, optimizer: torch.optim.Optimizer, new: list[int]) -> None:
    """Grow a scheduler's per-group lists for the groups at positions ``new``."""
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
            ratio = sched.max_lrs[0] / sched.base_lrs[0] if sched.base_lrs[0] else 1.0
            sched.max_lrs.append(g["lr"] * ratio)
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
    flag = "_get_lr_called_within_step"
    old = getattr(sched, flag, False)
    setattr(sched, flag, True)
    try:
        if isinstance(sched, lrs.MultiplicativeLR):
            return
        if isinstance(sched, lrs.LambdaLR):
            values = [
                base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)
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


def sync(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    scheduler: Any = None,
    rules: Rules = (),
) -> dict[str, list[str]]:
    """Bring an optimizer (and scheduler) in line with the model's trainable set.

    Call it after any freeze or unfreeze. Newly frozen parameters lose their
    gradient and optimizer state and leave their group (groups stay, possibly
    empty, so schedulers keep their per-group lists aligned); newly trainable
    ones join in new groups with options from ``rules`` (else the optimizer's
    defaults), and the scheduler learns the new groups' schedules.

    Args:
        optimizer: any ``torch.optim`` optimizer over (some of) ``model``.
        model: the model whose ``requires_grad`` flags are the truth.
        scheduler: optional LR scheduler (Sequential/Chained included).
        rules: ``{selector: {option: value}}`` for the new groups.

    Returns:
        ``{"removed": [...], "added": [...]}`` parameter names.

    Example:
        >>> import torch, gradgate as gg
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> opt = torch.optim.Adam(gg.param_groups(net, lr=1e-3))
        >>> _ = gg.freeze(net, "0")
        >>> gg.sync(opt, net)["removed"]
        ['0.weight', '0.bias']
    """
    names = {id(p): n for n, p in model.named_parameters()}
    rows = subtensor.trainable_of(model)  # rows (issue 16): W leaves, its trainable rows join
    names.update({id(r): names[key] for key, r in rows.items()})
    removed: list[str] = []
    present: set[int] = set()
    is_lbfgs = isinstance(optimizer, torch.optim.LBFGS)
    for group in optimizer.param_groups:
        keep, keep_names = [], []
        for p in group["params"]:
            if (p.requires_grad and id(p) not in rows) or id(p) not in names:
                keep.append(p)
                present.add(id(p))
                if "param_names" in group:
                    keep_names.append(names.get(id(p), "?"))
            else:
                p.grad = None
                optimizer.state.pop(p, None)
                removed.append(names[id(p)])
        group["params"][:] = keep  # in place: LBFGS keeps a reference to this list
        if "param_names" in group:
            group["param_names"] = keep_names
    fresh = [
        (n, rows.get(id(p), p))
        for n, p in model.named_parameters()
        if p.requires_grad and id(rows.get(id(p), p)) not in present
    ]
    added = [n for n, _ in fresh]
    if fresh:
        if is_lbfgs:
            optimizer.param_groups[0]["params"].extend(p for _, p in fresh)
            if "param_names" in optimizer.param_groups[0]:
                optimizer.param_groups[0]["param_names"].extend(added)
        else:
            options = _options_by_param(model, rules, added)
            new_groups: dict[tuple[Any, ...], dict[str, Any]] = {}
            with_names = "param_names" in optimizer.param_groups[0]
            for n, p in fresh:
                opts = options[n]
                key = tuple(sorted((k, repr(v)) for k, v in opts.items()))
                g = new_groups.setdefault(key, {"params": [], **opts})
                g["params"].append(p)
                if with_names:
                    g.setdefault("param_names", []).append(n)
            start = len(optimizer.param_groups)
            for g in new_groups.values():
                optimizer.add_param_group(g)
            positions = list(range(start, len(optimizer.param_groups)))
            for sched in _schedulers(scheduler):
                _extend_scheduler(sched, optimizer, positions)
    if is_lbfgs and (removed or added):
        # Its curvature history spans the old flat parameter vector.
        optimizer.state.clear()
        optimizer._numel_cache = None  # type: ignore[attr-defined]
    return {"removed": removed, "added": added}


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


_LIFTS_ZERO = "will raise an lr-0 group above 0"


def _lifting_scheduler(scheduler: Any, index: int) -> str | None:
    for sched in _schedulers(scheduler):
        name = type(sched).__name__
        if isinstance(sched, (lrs.CosineAnnealingLR, lrs.CosineAnnealingWarmRestarts)):
            if sched.eta_min > 0:
                return f"{name}(eta_min={sched.eta_min})"
        elif isinstance(sched, (lrs.OneCycleLR, lrs.CyclicLR)):
            return name
    return None


def lint(
    optimizer: torch.optim.Optimizer, model: nn.Module, scheduler: Any = None
) -> list[Finding]:
    """Find the ways this optimizer (and scheduler) can move a frozen weight.

    Codes: ``GG101`` frozen parameters in the optimizer holding state or a
    gradient; ``GG102`` frozen parameters in the optimizer (LBFGS can move
    them through its curvature history even with ``grad=None``); ``GG103`` an
    lr-0 group used as a freeze (and the scheduler that will lift it);
    ``GG104`` trainable parameters missing from every group; ``GG105`` a
    parameter in two groups (or twice in one). OneCycleLR and CyclicLR rewrite
    every group's lr when they are built, so an lr-0 freeze is visible to
    ``lint`` only before they are.

    Example:
        >>> import torch, gradgate as gg
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> opt = torch.optim.Adam([{"params": net[0].parameters(), "lr": 0.0},
        ...                         {"params": net[1].parameters()}])
        >>> [f.code for f in gg.lint(opt, net)]
        ['GG103']
    """
    names = {id(p): n for n, p in model.named_parameters()}
    rows = subtensor.trainable_of(model)  # rows (issue 16): W counts as frozen, R as trainable
    names.update({id(r): names[key] for key, r in rows.items()})
    is_lbfgs = isinstance(optimizer, torch.optim.LBFGS)
    findings: list[Finding] = []
    seen: dict[int, int] = {}
    dup: list[str] = []
    stateful: list[str] = []
    idle: list[str] = []
    for gi, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            name = names.get(id(p), f"<param not in model {tuple(p.shape)}>")
            if id(p) in seen:
                dup.append(name)
            seen[id(p)] = gi
            if id(p) in names and (not p.requires_grad or id(p) in rows):
                if optimizer.state.get(p) or p.grad is not None:
                    stateful.append(name)
                else:
                    idle.append(name)
        params = [names.get(id(p), "?") for p in group["params"]]
        base = group.get("initial_lr", group["lr"])
        if params and (group["lr"] == 0 or base == 0):
            lifter = _lifting_scheduler(scheduler, gi)
            msg = f"group {gi} has lr=0: a freeze by learning rate still computes every gradient"
            if lifter:
                msg += f", and {lifter} {_LIFTS_ZERO}"
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
    missing = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and id(rows.get(id(p), p)) not in seen
    ]
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
