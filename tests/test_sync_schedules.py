"""A group ``gg.sync`` adds follows the schedule the others are on, for every torch scheduler."""

from __future__ import annotations

import inspect
import io
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as lrs

import gradgate as gg

PEAK = 0.1
Factory = Callable[[torch.optim.Optimizer], Any]

# Every scheduler in torch.optim.lr_scheduler, at a point where a late group
# shows whether it joined the right curve (warm-ups still warming, decays
# already decayed). ``peak`` is group 0's peak under it.
FACTORIES: dict[str, Factory] = {
    "LambdaLR": lambda o: lrs.LambdaLR(o, lambda s: 0.9**s),
    "MultiplicativeLR": lambda o: lrs.MultiplicativeLR(o, lambda s: 0.95),
    "StepLR": lambda o: lrs.StepLR(o, step_size=3, gamma=0.5),
    "MultiStepLR": lambda o: lrs.MultiStepLR(o, milestones=[2, 9, 14], gamma=0.5),
    "ConstantLR": lambda o: lrs.ConstantLR(o, factor=0.25, total_iters=10),
    "LinearLR": lambda o: lrs.LinearLR(o, start_factor=0.1, total_iters=12),
    "ExponentialLR": lambda o: lrs.ExponentialLR(o, gamma=0.9),
    "PolynomialLR": lambda o: lrs.PolynomialLR(o, total_iters=20, power=2.0),
    "CosineAnnealingLR": lambda o: lrs.CosineAnnealingLR(o, T_max=12, eta_min=0.01),
    "CosineAnnealingWarmRestarts": lambda o: lrs.CosineAnnealingWarmRestarts(
        o, T_0=4, T_mult=2, eta_min=0.01
    ),
    "CyclicLR": lambda o: lrs.CyclicLR(
        o, base_lr=0.01, max_lr=PEAK, step_size_up=3, cycle_momentum=False
    ),
    "OneCycleLR": lambda o: lrs.OneCycleLR(o, max_lr=PEAK, total_steps=40, cycle_momentum=False),
    "SequentialLR": lambda o: lrs.SequentialLR(
        o,
        [lrs.LinearLR(o, start_factor=0.1, total_iters=10), lrs.CosineAnnealingLR(o, 20, 0.01)],
        milestones=[10],
    ),
    "ChainedScheduler": lambda o: lrs.ChainedScheduler(
        [lrs.ConstantLR(o, factor=0.5, total_iters=9), lrs.ExponentialLR(o, gamma=0.95)]
    ),
    "ReduceLROnPlateau": lambda o: lrs.ReduceLROnPlateau(o, factor=0.5, patience=0),
}


def _scheduler_classes() -> set[str]:
    return {
        name
        for name, cls in vars(lrs).items()
        if inspect.isclass(cls)
        and issubclass(cls, lrs.LRScheduler)
        and not name.startswith("_")
        and cls is not lrs.LRScheduler
        and cls.__module__ == lrs.__name__
    }


def test_every_torch_scheduler_is_covered() -> None:
    assert _scheduler_classes() - set(FACTORIES) == set()


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))


def _step(model: nn.Module, opt: torch.optim.Optimizer, sched: Any, t: int) -> None:
    opt.zero_grad()
    model(torch.randn(5, 3)).pow(2).mean().backward()
    opt.step()
    if isinstance(sched, lrs.ReduceLROnPlateau):
        sched.step(1.0)  # never improves: a reduction every step
    else:
        sched.step()


def _trained_with_0_frozen(name: str, steps: int) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    """``_model()`` with layer 0 frozen, its optimizer at PEAK and a ``name`` scheduler, after
    ``steps`` steps."""
    model = _model()
    gg.freeze(model, "0")
    opt = torch.optim.SGD(gg.param_groups(model, lr=PEAK))
    sched = FACTORIES[name](opt)
    for t in range(steps):
        _step(model, opt, sched, t)
    return model, opt, sched


def _lrs(opt: torch.optim.Optimizer) -> list[float]:
    return [float(g["lr"]) for g in opt.param_groups]


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_a_late_group_keeps_its_ratio_to_group_0_at_every_step(name: str) -> None:
    model, opt, sched = _trained_with_0_frozen(name, 5)
    gg.unfreeze(model, "0")
    if name == "ReduceLROnPlateau":
        # It keeps no record of the rate it started from: a new group without
        # a rule joins at the rate the others have now, reductions included.
        gg.sync(opt, model, sched)
        ratio = 1.0
    else:
        # A rule's lr is the new group's peak: a quarter of group 0's.
        gg.sync(opt, model, sched, rules={"0": {"lr": PEAK / 4}})
        ratio = 0.25
    lr0, lr1 = _lrs(opt)
    assert lr1 == pytest.approx(ratio * lr0, rel=1e-9), (lr0, lr1)
    for t in range(5, 40):
        _step(model, opt, sched, t)
        lr0, lr1 = _lrs(opt)
        assert lr1 == pytest.approx(ratio * lr0, rel=1e-9, abs=1e-15), (t, lr0, lr1)


def test_a_group_added_during_a_sequential_warm_up_sits_on_the_warm_up() -> None:
    model, opt, sched = _trained_with_0_frozen("SequentialLR", 4)
    warm = _lrs(opt)[0]
    assert warm < 0.5 * PEAK  # still warming up
    gg.unfreeze(model, "0")
    gg.sync(opt, model, sched)
    assert _lrs(opt) == pytest.approx([warm, warm])  # not the cosine's PEAK


def test_reduce_lr_on_plateau_new_group_inherits_the_reductions() -> None:
    model, opt, sched = _trained_with_0_frozen("ReduceLROnPlateau", 3)
    assert _lrs(opt)[0] == pytest.approx(PEAK / 4)  # the first metric is a best
    gg.unfreeze(model, "0")
    gg.sync(opt, model, sched)
    assert _lrs(opt) == pytest.approx([PEAK / 4, PEAK / 4])
    _step(model, opt, sched, 3)
    assert _lrs(opt) == pytest.approx([PEAK / 8, PEAK / 8])


@pytest.mark.parametrize("name", ["CosineAnnealingLR", "CosineAnnealingWarmRestarts"])
def test_cosine_floor_scales_with_the_new_group_and_survives_a_resume(name: str) -> None:
    model, opt, sched = _trained_with_0_frozen(name, 3)
    gg.unfreeze(model, "0")
    gg.sync(opt, model, sched, rules={"0": {"lr": PEAK / 10}})
    assert isinstance(sched, getattr(lrs, name))  # still the user's scheduler type
    assert sched.gg_eta_mins == pytest.approx([0.01, 0.001])
    state = sched.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)  # the state stays plain data
    for t in range(3, 30):
        _step(model, opt, sched, t)
        lr0, lr1 = _lrs(opt)
        assert lr1 == pytest.approx(lr0 / 10), t


def test_sync_without_a_rule_joins_at_the_rate_the_groups_were_built_with() -> None:
    # Issue 25.7: SGD's constructor default (0.001) was nobody's choice.
    model = _model()
    gg.freeze(model, "0")
    opt = torch.optim.SGD(gg.param_groups(model, lr=0.1))
    assert opt.defaults["lr"] != 0.1
    gg.unfreeze(model, "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gg.sync(opt, model)
    assert _lrs(opt) == [0.1, 0.1]


def test_sync_uses_the_constructor_lr_when_a_built_group_uses_it() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    gg.freeze(model, "0")
    groups: list[dict[str, Any]] = [
        {"params": list(model[1].parameters()), "lr": 0.01},
        {"params": list(model[2].parameters())},
    ]
    opt = torch.optim.SGD(groups, lr=0.2)
    gg.unfreeze(model, "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gg.sync(opt, model)
    assert _lrs(opt) == [0.01, 0.2, 0.2]


def test_sync_says_so_when_it_cannot_know_the_rate() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    gg.freeze(model, "0")
    opt = torch.optim.AdamW(gg.param_groups(model, lr=0.1, layer_decay=(0.5, ["1", "2"])))
    gg.unfreeze(model, "0")
    with pytest.warns(UserWarning, match=r"different rates \(0\.05, 0\.1\).*rules=") as rec:
        gg.sync(opt, model)
    assert "0.weight" in str(rec[0].message)
    assert _lrs(opt)[-1] == 0.05  # group 0's, as the warning says
    # With a rule there is nothing to guess.
    model2 = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    gg.freeze(model2, "0")
    opt2 = torch.optim.AdamW(gg.param_groups(model2, lr=0.1, layer_decay=(0.5, ["1", "2"])))
    gg.unfreeze(model2, "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gg.sync(opt2, model2, rules={"0": {"lr": 0.025}})
    assert _lrs(opt2)[-1] == 0.025
