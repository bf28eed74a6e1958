"""Optimizers and schedulers cannot move a frozen weight once ``sync`` ran; without it they do."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as lrs

import gradgate as gg

OptFactory = Callable[[Any, bool], torch.optim.Optimizer]

OPTIMIZERS: dict[str, OptFactory] = {
    "SGD": lambda p, f: torch.optim.SGD(
        p, lr=0.01, momentum=0.9, nesterov=True, weight_decay=0.01, foreach=f
    ),
    "Adam": lambda p, f: torch.optim.Adam(p, lr=0.01, weight_decay=0.01, foreach=f),
    "AdamW": lambda p, f: torch.optim.AdamW(p, lr=0.01, weight_decay=0.01, foreach=f),
    "Adamax": lambda p, f: torch.optim.Adamax(p, lr=0.01, weight_decay=0.01, foreach=f),
    "NAdam": lambda p, f: torch.optim.NAdam(p, lr=0.01, weight_decay=0.01, foreach=f),
    "RAdam": lambda p, f: torch.optim.RAdam(p, lr=0.01, weight_decay=0.01, foreach=f),
    "RMSprop": lambda p, f: torch.optim.RMSprop(
        p, lr=0.01, momentum=0.9, weight_decay=0.01, foreach=f
    ),
    "Adagrad": lambda p, f: torch.optim.Adagrad(p, lr=0.01, weight_decay=0.01, foreach=f),
    "Adadelta": lambda p, f: torch.optim.Adadelta(p, lr=1.0, weight_decay=0.01, foreach=f),
    "ASGD": lambda p, f: torch.optim.ASGD(p, lr=0.01, weight_decay=0.01, foreach=f),
    "Rprop": lambda p, f: torch.optim.Rprop(p, lr=0.01, foreach=f),
}

SchedFactory = Callable[[torch.optim.Optimizer], Any]

SCHEDULERS: dict[str, SchedFactory | None] = {
    "none": None,
    "OneCycleLR": lambda o: lrs.OneCycleLR(o, max_lr=0.02, total_steps=40, cycle_momentum=False),
    "CyclicLR": lambda o: lrs.CyclicLR(
        o, base_lr=0.001, max_lr=0.02, step_size_up=4, cycle_momentum=False
    ),
    "CosineAnnealingLR": lambda o: lrs.CosineAnnealingLR(o, T_max=10, eta_min=1e-3),
    "LambdaLR": lambda o: lrs.LambdaLR(o, lambda s: 0.97**s),
}


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))


def _step(model: nn.Module, opt: torch.optim.Optimizer, sched: Any = None) -> None:
    x = torch.randn(16, 4)
    opt.zero_grad(set_to_none=False)  # zero tensors, not None: the trap's setting
    model(x).pow(2).mean().backward()
    opt.step()
    if sched is not None:
        sched.step()


def _frozen(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n, p.detach().clone()) for n, p in model.named_parameters() if not p.requires_grad]


def _trainable(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n, p.detach().clone()) for n, p in model.named_parameters() if p.requires_grad]


def _assert_same(a: Iterable[tuple[str, torch.Tensor]], model: nn.Module) -> None:
    params = dict(model.named_parameters())
    for name, value in a:
        assert torch.equal(value, params[name]), f"{name} moved"


def _assert_moved(a: Iterable[tuple[str, torch.Tensor]], model: nn.Module) -> None:
    params = dict(model.named_parameters())
    for name, value in a:
        assert not torch.equal(value, params[name]), f"{name} did not train"


@pytest.mark.parametrize("sched_name", list(SCHEDULERS))
@pytest.mark.parametrize("scenario", ["from_start", "after_steps", "unfreeze_later"])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_sync_keeps_frozen_bit_identical(
    opt_name: str, foreach: bool, scenario: str, sched_name: str
) -> None:
    model = _model()
    make_opt, make_sched = OPTIMIZERS[opt_name], SCHEDULERS[sched_name]
    if scenario == "from_start" or scenario == "unfreeze_later":
        gg.freeze(model, "0")
    opt = make_opt(gg.param_groups(model, lr=0.01), foreach)
    sched = make_sched(opt) if make_sched else None
    for _ in range(5):
        _step(model, opt, sched)
    if scenario == "after_steps":
        gg.freeze(model, "0")
    elif scenario == "unfreeze_later":
        gg.unfreeze(model, "0")
        gg.freeze(model, "2")
    report = gg.sync(opt, model, sched, rules={"0": {"lr": 0.005}})
    if scenario == "unfreeze_later":
        assert report["added"] == ["0.weight", "0.bias"]
        assert report["removed"] == ["2.weight", "2.bias"]
    assert [f.code for f in gg.lint(opt, model, sched)] == []
    frozen, trainable = _frozen(model), _trainable(model)
    with gg.guard(model, opt, check="both"):
        for _ in range(10):
            _step(model, opt, sched)
    _assert_same(frozen, model)
    _assert_moved(trainable, model)


TRAPPED = [n for n in OPTIMIZERS if n != "Rprop"]  # Rprop steps by sign(0) == 0


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_hand_freeze_without_sync_is_a_trap_lint_reports(opt_name: str, foreach: bool) -> None:
    model = _model()
    opt = OPTIMIZERS[opt_name](model.parameters(), foreach)
    for _ in range(5):
        _step(model, opt)
    for p in model[0].parameters():  # the seed's way, mid-run
        p.requires_grad_(False)
    codes = [f.code for f in gg.lint(opt, model)]
    assert codes == ["GG101"]
    assert gg.lint(opt, model)[0].params == ["0.weight", "0.bias"]
    frozen = _frozen(model)
    for _ in range(10):
        _step(model, opt)
    if opt_name in TRAPPED:
        params = dict(model.named_parameters())
        assert any(not torch.equal(v, params[n]) for n, v in frozen), "trap did not spring"
    gg.sync(opt, model)
    assert gg.lint(opt, model) == []


def test_lbfgs_sync_takes_frozen_out() -> None:
    model = _model()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, history_size=5, max_iter=4)
    x = torch.randn(16, 4)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss: torch.Tensor = model(x).pow(2).mean()
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    gg.freeze(model, "0")
    # LBFGS keeps its whole history on the first parameter: GG101 there, GG102 for the rest
    assert [f.code for f in gg.lint(opt, model)] == ["GG101", "GG102"]
    gg.sync(opt, model)
    assert gg.lint(opt, model) == []
    frozen, trainable = _frozen(model), _trainable(model)
    for _ in range(10):
        opt.step(closure)
    _assert_same(frozen, model)
    _assert_moved(trainable, model)
    gg.unfreeze(model, "0")
    assert gg.sync(opt, model)["added"] == ["0.weight", "0.bias"]
    before = _trainable(model)
    opt.step(closure)
    _assert_moved(before[:2], model)


def test_lr_zero_freeze_is_reported_with_its_scheduler() -> None:
    model = _model()
    groups: list[dict[str, Any]] = [
        {"params": model[0].parameters(), "lr": 0.0},
        {"params": list(model[2].parameters()) + list(model[4].parameters())},
    ]
    opt = torch.optim.Adam(groups, lr=0.01)
    sched = lrs.CosineAnnealingLR(opt, T_max=10, eta_min=1e-4)
    findings = gg.lint(opt, model, sched)
    assert [f.code for f in findings] == ["GG103"]
    assert "CosineAnnealingLR(eta_min=0.0001)" in findings[0].message
    assert findings[0].params == ["0.weight", "0.bias"]
    for _ in range(3):
        _step(model, opt, sched)
    assert opt.param_groups[0]["lr"] > 0  # the trap: the scheduler lifted the 0


def test_lint_missing_and_duplicates() -> None:
    model = _model()
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)
    findings = {f.code: f for f in gg.lint(opt, model)}
    assert findings["GG104"].params == ["2.weight", "2.bias", "4.weight", "4.bias"]
    opt.param_groups[0]["params"].append(model[0].weight)
    assert "GG105" in {f.code for f in gg.lint(opt, model)}
    assert "gg.sync" in str(findings["GG104"])


def test_param_groups_rules_no_decay_and_layer_decay() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    gg.freeze(model, "0.bias")
    groups = gg.param_groups(
        model,
        lr=1.0,
        weight_decay=0.1,
        rules={"2.weight": {"momentum": 0.5}},
        layer_decay=gg.LayerDecay(["0", "1", "2"], 0.5),
    )
    flat = {n: g for g in groups for n in g["param_names"]}
    assert "0.bias" not in flat  # frozen parameters are left out
    assert flat["0.weight"]["lr"] == 0.25 and flat["0.weight"]["weight_decay"] == 0.1
    assert flat["1.weight"]["lr"] == 0.5 and flat["1.weight"]["weight_decay"] == 0.0
    assert flat["2.bias"]["weight_decay"] == 0.0 and flat["2.bias"]["lr"] == 1.0
    assert flat["2.weight"]["momentum"] == 0.5
    assert sum(len(g["params"]) for g in groups) == 5
    torch.optim.SGD(groups, lr=1.0)  # accepted as is
    with pytest.raises(gg.NoMatchError):
        gg.param_groups(model, lr=1.0, rules={"nothing": {"lr": 0.1}})
    gg.freeze(model)
    with pytest.raises(gg.InvalidArgumentError, match="no trainable parameter"):
        gg.param_groups(model, lr=1.0)


@pytest.mark.parametrize("sched_name", ["OneCycleLR", "CosineAnnealingLR", "CyclicLR", "LambdaLR"])
def test_unfreeze_mid_run_follows_schedule_and_resumes_identically(sched_name: str) -> None:
    make_sched = SCHEDULERS[sched_name]
    assert make_sched is not None

    def build() -> tuple[nn.Sequential, torch.optim.Optimizer, Any]:
        model = _model()
        gg.freeze(model, "0")
        opt = torch.optim.Adam(gg.param_groups(model, lr=0.01))
        return model, opt, make_sched(opt)

    model, opt, sched = build()
    for _ in range(5):
        _step(model, opt, sched)
    gg.unfreeze(model, "0")
    gg.sync(opt, model, sched, rules={"0": {"lr": 0.002}})
    assert len(opt.param_groups) == 2
    new_lr = opt.param_groups[1]["lr"]
    assert new_lr > 0
    if sched_name == "CosineAnnealingLR":  # the floor scales with the peak (issue 23.13)
        assert new_lr == pytest.approx(0.2 * opt.param_groups[0]["lr"])
    _step(model, opt, sched)
    torch.manual_seed(123)
    saved = (
        copy.deepcopy(model.state_dict()),
        copy.deepcopy(opt.state_dict()),
        copy.deepcopy(sched.state_dict()),
    )
    seen = set()
    for _ in range(5):
        _step(model, opt, sched)
        seen.add(opt.param_groups[1]["lr"])
    assert len(seen) > 1  # the new group follows the schedule
    expected = copy.deepcopy(model.state_dict())

    model2, opt2, sched2 = build()
    gg.unfreeze(model2, "0")
    gg.sync(opt2, model2, sched2, rules={"0": {"lr": 0.002}})
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    sched2.load_state_dict(saved[2])
    torch.manual_seed(123)
    for _ in range(5):
        _step(model2, opt2, sched2)
    for k, v in expected.items():
        assert torch.equal(v, model2.state_dict()[k]), k


def test_reduce_lr_on_plateau_learns_new_groups() -> None:
    model = _model()
    gg.freeze(model, "0")
    opt = torch.optim.SGD(gg.param_groups(model, lr=0.1), lr=0.1)
    sched = lrs.ReduceLROnPlateau(opt, patience=0, min_lr=0.01)
    gg.unfreeze(model, "0")
    gg.sync(opt, model, sched)
    assert len(sched.min_lrs) == len(opt.param_groups) == 2
    for loss in (1.0, 2.0, 3.0):
        sched.step(loss)
    assert opt.param_groups[1]["lr"] < 0.1


def test_onecycle_with_momentum_cycling_extends_new_groups() -> None:
    model = _model()
    gg.freeze(model, "0")
    opt = torch.optim.Adam(gg.param_groups(model, lr=0.01))
    sched = lrs.OneCycleLR(opt, max_lr=0.02, total_steps=20)
    _step(model, opt, sched)
    gg.unfreeze(model, "0")
    gg.sync(opt, model, sched, rules={"0": {"lr": 0.004}})
    new = opt.param_groups[-1]
    assert new["max_lr"] == 0.004 and "base_momentum" in new
    for _ in range(5):
        _step(model, opt, sched)


def _two_part_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))  # "0" backbone, "2" head


def _two_optimizers(
    model: nn.Sequential,
) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    head = torch.optim.Adam(model[2].parameters(), lr=0.01)
    backbone = torch.optim.SGD(model[0].parameters(), lr=0.05, momentum=0.9)
    return backbone, head


def _steps(model: nn.Module, opts: Iterable[torch.optim.Optimizer], n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    opts = list(opts)
    for _ in range(n):
        x = torch.randn(16, 4, generator=g)
        for o in opts:
            o.zero_grad()
        model(x).pow(2).mean().backward()
        for o in opts:
            o.step()


def _holders(model: nn.Module, *opts: torch.optim.Optimizer) -> dict[str, int]:
    count = {n: 0 for n, _ in model.named_parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    for o in opts:
        for g in o.param_groups:
            for p in g["params"]:
                count[names[id(p)]] += 1
    return count


@pytest.mark.parametrize("cycle", [False, True])
@pytest.mark.parametrize("order", ["backbone_first", "head_first"])
def test_sync_with_two_optimizers_steps_each_parameter_once(order: str, cycle: bool) -> None:
    # Reference: plain torch, each optimizer over its own part, no gradgate.
    ref = _two_part_model()
    ref_opts = _two_optimizers(ref)
    ref[0].requires_grad_(False)
    _steps(ref, ref_opts, 3, seed=1)
    ref[0].requires_grad_(True)
    _steps(ref, ref_opts, 4, seed=2)

    model = _two_part_model()
    backbone, head = _two_optimizers(model)
    gg.freeze(model, "0")
    if cycle:  # both already synced once: each has a ledger of what it held
        for o in (backbone, head):
            gg.sync(o, model)
    _steps(model, (backbone, head), 3, seed=1)
    gg.unfreeze(model, "0")
    order_ = (backbone, head) if order == "backbone_first" else (head, backbone)
    reports = [gg.sync(o, model) for o in order_]
    assert _holders(model, backbone, head) == dict.fromkeys(
        ["0.weight", "0.bias", "2.weight", "2.bias"], 1
    )
    assert [p for g in backbone.param_groups for p in g["params"]] == list(model[0].parameters())
    assert gg.lint(backbone, model) == [] and gg.lint(head, model) == []
    if order == "backbone_first" or cycle:
        assert reports[-1 if order == "backbone_first" else 0]["left"] == ["0.weight", "0.bias"]
    _steps(model, (backbone, head), 4, seed=2)
    for (n, a), b in zip(ref.named_parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b), f"{n} was not stepped exactly as by its own optimizer alone"


def test_sync_params_selects_what_joins_and_refuses_a_double_holding() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    gg.freeze(model, "0", "1")
    a = torch.optim.Adam(gg.param_groups(model, lr=0.01))  # the head
    b = torch.optim.SGD(model[1].parameters(), lr=0.1)  # layer 1, frozen for now
    gg.sync(a, model)
    gg.sync(b, model)
    gg.unfreeze(model)
    groups_before = [[id(p) for p in g["params"]] for g in a.param_groups]
    with pytest.raises(gg.InvalidArgumentError, match=r"selects '1.weight', which another"):
        gg.sync(a, model, params=["0", "1"])
    assert [[id(p) for p in g["params"]] for g in a.param_groups] == groups_before
    report = gg.sync(b, model, params="0")  # layer 1 returns to b, layer 0 joins by choice
    assert report == {
        "removed": [],
        "added": ["0.weight", "0.bias", "1.weight", "1.bias"],
        "left": ["2.weight", "2.bias"],
    }
    assert gg.sync(a, model)["left"] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert _holders(model, a, b) == {n: 1 for n, _ in model.named_parameters()}
    gg.freeze(model, "2")
    with pytest.raises(gg.NoMatchError):  # a bad rule changes nothing either
        gg.sync(a, model, rules={"nothing": {"lr": 1.0}})
    assert [[id(p) for p in g["params"]] for g in a.param_groups] == groups_before


def test_sync_announces_what_it_drops_and_adds() -> None:
    from gradgate._events import subscribe

    model = _model()
    opt = torch.optim.SGD(gg.param_groups(model, lr=0.1), lr=0.1)
    for p in model[0].parameters():  # by hand: sync is the first to hear of it
        p.requires_grad_(False)
    heard: list[Any] = []
    stop = subscribe(heard.append)
    try:
        gg.sync(opt, model)
        gg.sync(opt, model)  # nothing changed: nothing announced
    finally:
        stop()
    assert [(c.action, c.model) for c in heard] == [("sync", model)]
    assert heard[0].frozen == (model[0].weight, model[0].bias) and heard[0].unfrozen == ()


def _accelerated(opt: torch.optim.Optimizer, sched: Any) -> tuple[Any, Any]:
    from accelerate import Accelerator  # type: ignore[import-untyped]

    acc = Accelerator(cpu=True)
    prepared: tuple[Any, Any] = acc.prepare(opt, sched)
    return prepared


def _lightning(opt: torch.optim.Optimizer, sched: Any) -> tuple[Any, Any]:
    from lightning.pytorch.core.optimizer import LightningOptimizer

    # Stepping a LightningOptimizer needs a Trainer's strategy; sync and lint do not.
    wrapped = LightningOptimizer(opt)
    wrapped.step = opt.step  # type: ignore[method-assign,assignment]
    return wrapped, sched


@pytest.mark.parametrize("wrap", [_accelerated, _lightning], ids=["accelerate", "lightning"])
def test_sync_and_lint_see_through_optimizer_wrappers(
    wrap: Callable[[torch.optim.Optimizer, Any], tuple[Any, Any]],
) -> None:
    from accelerate.state import AcceleratorState  # type: ignore[import-untyped]

    model = _model()
    gg.freeze(model, "0")
    inner = torch.optim.Adam(gg.param_groups(model, lr=0.01))
    inner_sched = lrs.LambdaLR(inner, lambda s: 0.9**s)
    try:
        opt, sched = wrap(inner, inner_sched)
        assert opt is not inner
        _step(model, opt, sched)
        gg.unfreeze(model, "0")
        gg.freeze(model, "2")
        assert [f.code for f in gg.lint(opt, model, sched)] == ["GG101", "GG104"]
        report = gg.sync(opt, model, sched, rules={"0": {"lr": 0.001}})
        assert (report["added"], report["removed"]) == (
            ["0.weight", "0.bias"],
            ["2.weight", "2.bias"],
        )
        assert len(inner_sched.base_lrs) == len(inner.param_groups) == 2  # seen through the wrapper
        assert gg.lint(opt, model, sched) == []
        frozen = _frozen(model)
        _step(model, opt, sched)
        _assert_same(frozen, model)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(gg.InvalidArgumentError, match=r"expected a torch\.optim\.Optimizer"):
        gg.sync(object(), model)  # type: ignore[arg-type]


def test_lint_tells_a_schedules_momentary_zero_from_an_lr_zero_freeze() -> None:
    model = _model()
    opt: torch.optim.Optimizer = torch.optim.AdamW(gg.param_groups(model, lr=0.01))
    warmup = lrs.LambdaLR(opt, lambda s: min(1.0, s / 10))  # every group at lr 0 on step 0
    assert all(g["lr"] == 0 for g in opt.param_groups)
    assert gg.lint(opt, model, warmup) == []

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    decay = lrs.LinearLR(opt, start_factor=1.0, end_factor=0.0, total_iters=3)
    for _ in range(3):
        _step(model, opt, decay)
    assert opt.param_groups[0]["lr"] == 0  # the end of a linear decay
    assert gg.lint(opt, model, decay) == []

    model = _model()
    groups: list[dict[str, Any]] = [
        {"params": model[0].parameters(), "lr": 0.0},  # a freeze by learning rate
        {"params": list(model[2].parameters()) + list(model[4].parameters())},
    ]
    opt = torch.optim.SGD(groups, lr=0.1)
    warmup = lrs.LambdaLR(opt, lambda s: min(1.0, s / 10))
    findings = gg.lint(opt, model, warmup)
    assert [(f.code, f.params) for f in findings] == [("GG103", ["0.weight", "0.bias"])]
