from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, Literal

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as lrs

import gradgate as gg


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Linear(8, 2)
    )


STAGES = ["0", "2", "4", "5"]


def _w(model: nn.Module, path: str) -> torch.Tensor:
    layer = model.get_submodule(path)
    assert isinstance(layer, nn.Linear)
    return layer.weight


SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], Any] | None] = {
    "none": None,
    "OneCycleLR": lambda o: lrs.OneCycleLR(o, max_lr=0.05, total_steps=200),
    "CosineAnnealingLR": lambda o: lrs.CosineAnnealingLR(o, T_max=30, eta_min=1e-4),
    "ReduceLROnPlateau": lambda o: lrs.ReduceLROnPlateau(o, patience=0, factor=0.5),
}


def _epoch(model: nn.Module, opt: torch.optim.Optimizer, sched: Any, epoch: int) -> float:
    g = torch.Generator().manual_seed(epoch)
    total = 0.0
    for _ in range(3):
        x = torch.randn(16, 4, generator=g)
        loss = model(x).pow(2).mean() + 1.0 / (epoch + 1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += loss.item()
        if isinstance(sched, lrs.OneCycleLR):
            sched.step()
    if isinstance(sched, lrs.ReduceLROnPlateau):
        sched.step(10.0 + epoch)  # a worsening metric: the lr keeps dropping
    elif sched is not None and not isinstance(sched, lrs.OneCycleLR):
        sched.step()
    return total


def test_stages_and_freeze_to() -> None:
    model = _model()
    st = gg.stages(model, *STAGES)
    assert len(st) == 4 and st.names == STAGES
    handle = gg.freeze_to(model, st, 2)
    assert [p.requires_grad for p in model.parameters()] == [False] * 4 + [True] * 4
    gg.freeze_to(model, st, -1)
    assert [p.requires_grad for p in model.parameters()] == [False] * 6 + [True] * 2
    gg.freeze_to(model, st, 0)
    assert all(p.requires_grad for p in model.parameters())
    handle.undo()
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(gg.InvalidArgumentError, match="overlap"):
        gg.stages(model, "0", "**.weight")
    with pytest.raises(gg.InvalidArgumentError, match=r"n must be in \[-4, 4\]"):
        gg.freeze_to(model, st, 5)
    assert gg.stages(model).names == ["0", "1", "2", "3", "4", "5"]


@pytest.mark.parametrize("sched_name", list(SCHEDULERS))
def test_gradual_unfreeze_with_schedulers(sched_name: str) -> None:
    model = _model()
    opt = torch.optim.Adam(gg.param_groups(model, lr=0.01))
    make = SCHEDULERS[sched_name]
    sched = make(opt) if make else None
    sch = gg.GradualUnfreeze(
        model, STAGES, at=[6, 4, 2, 0], optimizer=opt, scheduler=sched, lr_mult=0.5
    )
    assert [p.requires_grad for p in model.parameters()] == [False] * 6 + [True] * 2
    history: dict[int, list[float]] = {}
    snapshots: dict[str, torch.Tensor] = {}
    for epoch in range(10):
        unfrozen = sch.step(epoch)
        for i in unfrozen:
            snapshots.pop(STAGES[i], None)
        frozen = {
            s: _w(model, s).detach().clone() for s in STAGES if not _w(model, s).requires_grad
        }
        with gg.guard(model, opt):
            _epoch(model, opt, sched, epoch)
        for s, w in frozen.items():
            assert torch.equal(w, _w(model, s)), f"{s} moved while frozen"
        for g, group in enumerate(opt.param_groups):
            history.setdefault(g, []).append(group["lr"])
    assert len(opt.param_groups) == 4
    assert sch.unfrozen == [3, 2, 1, 0]
    if sched_name != "none":
        for g in range(1, 4):
            lrs_after = history[g][-3:]
            assert len(set(lrs_after)) > 1 or sched_name == "ReduceLROnPlateau", history[g]
    if sched_name == "ReduceLROnPlateau":
        assert history[3][-1] < history[3][-4]  # the newest group was reduced too
    assert all(p.requires_grad for p in model.parameters())


def test_discriminative_rates_and_warmup() -> None:
    model = _model()
    opt = torch.optim.SGD(gg.param_groups(model, lr=1.0), lr=1.0)
    sch = gg.GradualUnfreeze(model, STAGES, at=[2, 1, 1, 0], optimizer=opt, warmup_steps=3)
    sch.step(1)  # stages 1 and 2 join (model order), each starting at a quarter of its rate
    assert [g["lr"] for g in opt.param_groups[1:]] == pytest.approx([0.01 / 4, 0.1 / 4])
    sch.step(2)  # stage 0 joins; the others are half-way
    assert [g["lr"] for g in opt.param_groups[1:]] == pytest.approx([0.01 / 2, 0.1 / 2, 0.001 / 4])
    sch.step(3)
    sch.step(4)
    assert [g["lr"] for g in opt.param_groups[1:]] == pytest.approx([0.01, 0.1, 0.001 * 3 / 4])
    sch.step(5)
    assert opt.param_groups[3]["lr"] == pytest.approx(0.001)
    with pytest.raises(gg.InvalidArgumentError, match="warmup"):
        gg.GradualUnfreeze(model, STAGES, [0, 0, 0, 0], opt, lrs.StepLR(opt, 1), warmup_steps=2)
    with pytest.raises(gg.InvalidArgumentError, match="one entry per stage"):
        gg.GradualUnfreeze(model, STAGES, [0, 0], opt)


@pytest.mark.parametrize("sched_name", ["OneCycleLR", "CosineAnnealingLR", "ReduceLROnPlateau"])
def test_gradual_unfreeze_resume_is_bit_identical(sched_name: str) -> None:
    make = SCHEDULERS[sched_name]
    assert make is not None

    def build() -> tuple[nn.Sequential, torch.optim.Optimizer, Any, gg.GradualUnfreeze]:
        model = _model()
        opt = torch.optim.Adam(gg.param_groups(model, lr=0.01))
        sched = make(opt)
        sch = gg.GradualUnfreeze(model, STAGES, at=[6, 4, 2, 0], optimizer=opt, scheduler=sched)
        return model, opt, sched, sch

    model, opt, sched, sch = build()
    saved: Any = None
    for epoch in range(9):
        if epoch == 5:  # stopped after two unfreeze events
            saved = copy.deepcopy(
                (model.state_dict(), opt.state_dict(), sched.state_dict(), sch.state_dict())
            )
        sch.step(epoch)
        _epoch(model, opt, sched, epoch)
    expected = model.state_dict()

    model2, opt2, sched2, sch2 = build()
    sch2.load_state_dict(saved[3])  # the schedule first: it rebuilds the groups
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    sched2.load_state_dict(saved[2])
    for epoch in range(5, 9):
        sch2.step(epoch)
        _epoch(model2, opt2, sched2, epoch)
    for k, v in expected.items():
        assert torch.equal(v, model2.state_dict()[k]), k


def test_resume_with_a_different_optimizer_is_refused() -> None:
    model = _model()
    opt = torch.optim.Adam(gg.param_groups(model, lr=0.01))
    sch = gg.GradualUnfreeze(model, STAGES, at=[3, 2, 1, 0], optimizer=opt)
    sch.step(2)
    state = sch.state_dict()
    model2 = _model()
    opt2 = torch.optim.Adam(gg.param_groups(model2, lr=0.01, rules={"5": {"lr": 0.5}}))
    sch2 = gg.GradualUnfreeze(model2, STAGES, at=[3, 2, 1, 0], optimizer=opt2)
    with pytest.raises(gg.InvalidArgumentError, match="optimizer groups"):
        sch2.load_state_dict(state)


@pytest.mark.parametrize("sched_name", list(SCHEDULERS))
@pytest.mark.parametrize("curve", ["linear", "cubic"])
def test_progressive_freeze(curve: Literal["linear", "cubic"], sched_name: str) -> None:
    model = _model()
    opt = torch.optim.Adam(gg.param_groups(model, lr=0.01))
    make = SCHEDULERS[sched_name]
    sched = make(opt) if make else None
    pf = gg.ProgressiveFreeze(
        model, STAGES, start=2, end=8, curve=curve, optimizer=opt, scheduler=sched
    )
    frozen_at: dict[int, torch.Tensor] = {}
    with gg.guard(model, opt):
        for epoch in range(10):
            for i in pf.step(epoch):
                frozen_at[i] = _w(model, STAGES[i]).detach().clone()
            _epoch(model, opt, sched, epoch)
            for i, w in frozen_at.items():
                assert torch.equal(w, _w(model, STAGES[i]))
    assert pf.boundary == 3 and sorted(frozen_at) == [0, 1, 2]
    assert model[5].weight.requires_grad
    assert gg.lint(opt, model, sched) == []
    head, rest = pf.split(model)
    assert len(head) == 5 and isinstance(rest[0], nn.Linear)
    state = pf.state_dict()
    model2 = _model()
    pf2 = gg.ProgressiveFreeze(model2, STAGES, start=0, end=1)
    pf2.load_state_dict(state)
    assert [p.requires_grad for p in model2.parameters()] == [False] * 6 + [True] * 2
    assert pf2.due(5) == pf.due(5)


def test_cubic_freezes_later_than_linear() -> None:
    model = _model()
    lin = gg.ProgressiveFreeze(model, STAGES, start=0, end=10)
    cub = gg.ProgressiveFreeze(model, STAGES, start=0, end=10, curve="cubic")
    assert [lin.due(t) for t in range(11)] != [cub.due(t) for t in range(11)]
    assert all(cub.due(t) <= lin.due(t) for t in range(11))
    with pytest.raises(gg.InvalidArgumentError, match="curve must be one of"):
        gg.ProgressiveFreeze(model, STAGES, start=0, end=10, curve="square")  # type: ignore[arg-type]


PEAK = 3e-3

PEAK_SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "OneCycleLR": lambda o: lrs.OneCycleLR(o, max_lr=PEAK, total_steps=30),
    "CosineAnnealingLR": lambda o: lrs.CosineAnnealingLR(o, T_max=10),
    "CyclicLR": lambda o: lrs.CyclicLR(o, base_lr=PEAK / 10, max_lr=PEAK, step_size_up=4),
}


@pytest.mark.parametrize("sched_name", list(PEAK_SCHEDULERS))
def test_gradual_unfreeze_rates_are_relative_to_the_schedules_peak(sched_name: str) -> None:
    model = _model()
    opt = torch.optim.SGD(gg.param_groups(model, lr=PEAK), lr=PEAK, momentum=0.9)
    sched = PEAK_SCHEDULERS[sched_name](opt)
    sch = gg.GradualUnfreeze(
        model, STAGES, at=[6, 4, 2, 0], optimizer=opt, scheduler=sched, lr_mult=0.5
    )
    assert sch.base_lr == pytest.approx(PEAK)  # not OneCycleLR's starting max_lr / 25
    expected = {s: PEAK * 0.5 ** (3 - i) for i, s in enumerate(STAGES)}
    for epoch in range(10):
        sch.step(epoch)
        for _ in range(3):
            x = torch.randn(8, 4)
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
            if sched_name != "CosineAnnealingLR":
                sched.step()
            lr0 = opt.param_groups[0]["lr"]
            for group in opt.param_groups[1:]:
                stage = group["param_names"][0].split(".")[0]
                # every group follows the first group's curve, scaled to its own peak
                assert group["lr"] / lr0 == pytest.approx(expected[stage] / PEAK)
        if sched_name == "CosineAnnealingLR":
            sched.step()
    assert len(opt.param_groups) == 4
    for g, group in enumerate(opt.param_groups):
        stage = group["param_names"][0].split(".")[0]
        if sched_name == "OneCycleLR":
            assert group["max_lr"] == pytest.approx(expected[stage])
        elif sched_name == "CyclicLR":
            assert sched.max_lrs[g] == pytest.approx(expected[stage])
        else:
            assert group["initial_lr"] == pytest.approx(expected[stage])


class _FakeWrapper(nn.Module):
    """A Rewrappable stand-in: counts how often a schedule asked for a fresh wrapper."""

    def __init__(self, module: nn.Module, built: list[tuple[str, ...]]) -> None:
        super().__init__()
        self.module = module
        self.built = built
        self.trainable = tuple(n for n, p in module.named_parameters() if p.requires_grad)
        built.append(self.trainable)

    def gg_refresh(self) -> nn.Module:
        now = tuple(n for n, p in self.module.named_parameters() if p.requires_grad)
        return self if now == self.trainable else _FakeWrapper(self.module, self.built)


def test_gradual_unfreeze_refreshes_a_wrapper_it_was_given() -> None:
    model = _model()
    built: list[tuple[str, ...]] = []
    opt = torch.optim.Adam(gg.param_groups(model, lr=0.01))
    sch = gg.GradualUnfreeze(_FakeWrapper(model, built), STAGES, at=[2, 2, 1, 0], optimizer=opt)
    assert sch.model is model and len(built) == 2  # built, then refreshed for the first freeze
    first = sch.wrapped
    assert sch.step(0) == [] and sch.wrapped is first
    sch.step(1)
    sch.step(2)
    assert [len(t) for t in built] == [8, 2, 4, 8]
    assert isinstance(sch.wrapped, _FakeWrapper) and sch.wrapped.trainable == built[-1]


def test_schedules_never_import_the_distributed_helpers() -> None:
    import ast
    import inspect

    import gradgate.schedules

    tree = ast.parse(inspect.getsource(gradgate.schedules))
    imported = [
        node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
    ] + [a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names]
    assert not [m for m in imported if "distributed" in m]


def test_one_guard_spans_a_gradual_unfreeze_run() -> None:
    model = _model()
    opt = torch.optim.Adam(gg.param_groups(model, lr=0.01))
    sch = gg.GradualUnfreeze(model, STAGES, at=[99, 3, 1, 0], optimizer=opt)
    finished = False
    with pytest.raises(gg.FrozenTensorChangedError, match=r"\b0\.weight"), gg.guard(model, opt):
        for epoch in range(5):
            sch.step(epoch)  # stages 2 and 1 join mid-run and train under the same guard
            _epoch(model, opt, None, epoch)
        finished = True
        with torch.no_grad():
            _w(model, "0").add_(1.0)  # stage 0 is still frozen
        _epoch(model, opt, None, 5)
    assert finished and sch.unfrozen == [3, 2, 1]
