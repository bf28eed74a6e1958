from __future__ import annotations

import copy
import gc
import math
import pickle
import runpy
from pathlib import Path
from typing import Any, cast

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.optim import lr_scheduler as lrs

import gradgate as gg

STAGES = ["0", "2", "4", "6"]


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
        nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4),
    )  # fmt: skip


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(32, 8, generator=g)
    return x, (x[:, :4] * 2).tanh()


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    x, y = _batch(step)
    loss = F.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def _set_grads(model: nn.Sequential, norms: list[float]) -> None:
    """Give stage ``i`` a gradient of exactly norm ``norms[i]`` (trainable parameters only)."""
    for path, norm in zip(STAGES, norms, strict=True):
        params = [p for p in model.get_submodule(path).parameters() if p.requires_grad]
        total = sum(p.numel() for p in params)
        for p in params:
            p.grad = torch.full_like(p, norm / math.sqrt(total))


def _flags(model: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def _frozen_prefix_holds(model: nn.Sequential, af: gg.AutoFreeze) -> None:
    for i, path in enumerate(STAGES):
        want = i >= af.boundary
        assert all(p.requires_grad is want for p in model.get_submodule(path).parameters())
    assert af.frozen == STAGES[: af.boundary]


def test_freezes_only_a_converged_prefix() -> None:
    # stage 1 is perfectly converged, but stage 0 in front of it keeps changing
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    af = gg.AutoFreeze(model, optimizer=opt, every=2, threshold=0.1)
    assert af.stages.names == STAGES
    for step in range(12):
        _set_grads(model, [1.0 + (step // 2) % 2, 1.0, 1.0, 1.0])
        assert af.step() == []
    assert af.frozen == [] and all(_flags(model).values())
    assert len(af.history) == 6
    assert af.history[0].change == [None] * 4  # no previous window yet
    assert af.history[-1].change == pytest.approx([1.0, 0.0, 0.0, 0.0])
    assert af.history[-1].grad_norm == pytest.approx([2.0, 1.0, 1.0, 1.0])
    # once stage 0 settles, the converged prefix runs up to the last stage
    for _ in range(4):
        _set_grads(model, [1.0, 1.0, 1.0, 1.0])
        froze = af.step()
    assert froze == ["0", "2", "4"] and af.boundary == 3
    _frozen_prefix_holds(model, af)
    assert [n for g in opt.param_groups for n in g["params"]] == list(model[6].parameters())


def test_a_compiled_model_is_split_into_the_wrapped_models_stages() -> None:
    # torch.compile's wrapper has one child: as one stage it could never freeze
    model = _model()
    compiled = cast(nn.Module, torch.compile(model, backend="eager"))
    opt = torch.optim.SGD(compiled.parameters(), lr=0.1)
    af = gg.AutoFreeze(compiled, optimizer=opt, every=2, threshold=0.1)
    assert af.stages.names == ["_orig_mod." + s for s in STAGES]
    for _ in range(4):
        _set_grads(model, [1.0, 1.0, 1.0, 1.0])
        froze = af.step()
    assert froze == ["_orig_mod.0", "_orig_mod.2", "_orig_mod.4"] and af.boundary == 3
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = _batch(0)
    opt.zero_grad(set_to_none=True)
    F.mse_loss(compiled(x), y).backward()
    opt.step()
    for n, p in model.named_parameters():
        assert (p.grad is None) is n.startswith(("0.", "2.", "4.")), n
        assert torch.equal(p, before[n]) is n.startswith(("0.", "2.", "4.")), n
    other = _model()
    plain = gg.AutoFreeze(other, optimizer=torch.optim.SGD(other.parameters(), lr=0.1))
    with pytest.raises(gg.InvalidArgumentError, match=r"differ only by the prefix '_orig_mod\.'"):
        plain.load_state_dict(af.state_dict())  # saved compiled, loaded plain: refused, told why
    head, rest = af.split()  # the moving-cache recipe works on the compiled model too
    children = list(model.children())
    assert list(head.children()) == children[:5] and list(rest.children()) == children[5:]


def test_a_ddp_wrapper_autofreeze_could_not_rebuild_is_refused(one_rank: None) -> None:
    # a plain DDP kept reducing frozen parameters: the step after a freeze failed in DDP
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    plain = nn.parallel.DistributedDataParallel(model)
    with pytest.raises(gg.InvalidArgumentError, match=r"got a DistributedDataParallel, which"):
        gg.AutoFreeze(plain, optimizer=opt)
    hidden = torch.compile(gg.distributed.wrap(model), backend="eager")
    with pytest.raises(gg.InvalidArgumentError, match=r"GatedDDP inside OptimizedModule.*compile"):
        gg.AutoFreeze(cast(nn.Module, hidden), optimizer=opt)
    assert all(_flags(model).values())  # refused before anything changed
    wrapped = gg.distributed.wrap(cast(nn.Module, torch.compile(model, backend="eager")))
    af = gg.AutoFreeze(wrapped, optimizer=opt)
    assert af.stages.names == ["_orig_mod." + s for s in STAGES]


def test_aggressive_threshold_respects_min_trainable_and_never_unfreezes() -> None:
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=0.1)
    af = gg.AutoFreeze(model, optimizer=opt, every=3, threshold=1e9, min_trainable=2)
    boundaries = []
    for step in range(20):
        _train_step(model, opt, step)
        af.step()
        boundaries.append(af.boundary)
        _frozen_prefix_holds(model, af)
    # the first window has nothing to compare with; the second freezes all it may
    assert boundaries == [0] * 5 + [2] * 15
    assert af.frozen == ["0", "2"]
    assert [d.froze for d in af.history] == [[], ["0", "2"], [], [], [], []]
    assert [d.step for d in af.history] == [3, 6, 9, 12, 15, 18]


def test_threshold_zero_never_freezes_even_when_nothing_changes() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    af = gg.AutoFreeze(model, optimizer=opt, every=1, threshold=0.0)
    for _ in range(10):
        _train_step(model, opt, 0)  # the same batch: gradients repeat exactly
        af.step()
    assert af.frozen == [] and all(_flags(model).values())
    assert all(d.froze == [] for d in af.history)
    assert af.history[-1].change == [0.0, 0.0, 0.0, 0.0]


def test_frozen_stages_are_bit_identical_from_the_step_they_froze() -> None:
    model = _model()
    opt = torch.optim.AdamW(gg.param_groups(model, lr=1e-2, weight_decay=0.1))
    sched = lrs.CosineAnnealingLR(opt, T_max=60, eta_min=1e-4)
    af = gg.AutoFreeze(model, optimizer=opt, scheduler=sched, every=4, threshold=1e9)
    prints: dict[str, str] = {}
    for step in range(40):
        _train_step(model, opt, step)
        for name in af.step():
            stage = model.get_submodule(name)
            prints[name] = gg.fingerprint(stage)
            assert all(p.grad is None and p not in opt.state for p in stage.parameters())
            assert not stage.training and gg.is_sticky(stage)
        sched.step()
        for name, fp in prints.items():
            assert gg.fingerprint(model.get_submodule(name)) == fp, (name, step)
    assert sorted(prints) == ["0", "2", "4"]
    assert not gg.lint(opt, model, sched)
    assert model[6].weight.requires_grad


def _run(
    steps: int, every: int, state: dict[str, Any] | None = None, **kwargs: Any
) -> tuple[Any, ...]:
    model = _model()
    opt = torch.optim.Adam(gg.param_groups(model, lr=3e-2, weight_decay=0.01))
    sched = lrs.StepLR(opt, step_size=7, gamma=0.7)
    rule = kwargs or {"threshold": 0.05}
    af = gg.AutoFreeze(model, optimizer=opt, scheduler=sched, every=every, **rule)
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        af.load_state_dict(state["af"])  # before the optimizer: it rebuilds the groups
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start = af.steps
    for step in range(start, steps):
        _train_step(model, opt, step)
        af.step()
        sched.step()
    return model, opt, sched, af


def test_resume_is_bit_identical(tmp_path: Path) -> None:
    every, total, stop = 5, 60, 23  # the stop falls inside a window
    reference = _run(total, every)
    ref_model, _, _, ref_af = reference
    assert ref_af.boundary > 0, "the run must freeze something to test resuming it"
    froze_at = [d.step for d in ref_af.history if d.froze]
    assert froze_at[0] < stop < froze_at[-1], froze_at
    model, opt, sched, af = _run(stop, every)
    path = tmp_path / "ckpt.pt"
    torch.save(
        {
            "model": model.state_dict(),
            "opt": opt.state_dict(),
            "sched": sched.state_dict(),
            "af": af.state_dict(),
        },
        path,
    )
    resumed_model, _, _, resumed_af = _run(total, every, torch.load(path, weights_only=True))
    assert resumed_af.history == ref_af.history
    assert resumed_af.frozen == ref_af.frozen
    for (name, a), b in zip(ref_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name
    assert gg.fingerprint(resumed_model) == gg.fingerprint(ref_model)


def test_resume_refuses_other_stages_and_unfreezing() -> None:
    _, _, _, af = _run(30, 5)
    state = af.state_dict()
    model = _model()
    other = gg.AutoFreeze(
        model,
        ["0", ["2", "4"], "6"],
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
    )
    with pytest.raises(gg.InvalidArgumentError, match=r"saved for stages \['0', '2', '4', '6'\]"):
        other.load_state_dict(state)
    assert all(_flags(model).values())
    fewer = dict(state, boundary=0)
    with pytest.raises(gg.InvalidArgumentError, match="never unfreezes"):
        af.load_state_dict(fewer)
    assert af.boundary > 0


@settings(max_examples=25, deadline=None)
@given(
    every=st.integers(1, 4),
    threshold=st.sampled_from([0.0, 0.05, 0.3, 1.0, 1e9]),
    min_trainable=st.integers(1, 4),
    lr=st.sampled_from([0.0, 1e-3, 5e-2]),
)
def test_invariants_hold_for_any_setting(
    every: int, threshold: float, min_trainable: int, lr: float
) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    af = gg.AutoFreeze(
        model, optimizer=opt, every=every, threshold=threshold, min_trainable=min_trainable
    )
    last = 0
    for step in range(12):
        _train_step(model, opt, step)
        af.step()
        assert af.boundary >= last  # never unfreezes
        assert len(STAGES) - af.boundary >= min_trainable
        _frozen_prefix_holds(model, af)
        last = af.boundary
    for d in af.history:
        for name in d.froze:
            change = d.change[STAGES.index(name)]
            assert change is not None and change < threshold
    if threshold == 0.0:
        assert af.frozen == []


def test_split_serves_the_frozen_prefix_from_a_feature_cache() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    af = gg.AutoFreeze(model, optimizer=opt, every=1, threshold=0.5, min_trainable=2)
    head, rest = af.split()
    assert len(head) == 0 and rest is model
    for step in range(2):
        _train_step(model, opt, step)
        af.step()
    assert af.frozen == ["0", "2"]
    head, rest = af.split()
    assert [type(m) for m in head] == [nn.Linear, nn.Tanh, nn.Linear]
    x, y = _batch(0)
    cache = gg.FeatureCache(head, torch.utils.data.TensorDataset(x, y), progress=False)
    feats = torch.stack([cache[i][0] for i in range(len(x))])
    assert torch.equal(rest(feats), model(x))
    assert torch.equal(cache[3][1], y[3])


class _Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.front = nn.Linear(4, 4)
        self.back = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.back(self.front(x))
        return out


def test_split_needs_a_sequential() -> None:
    model = _Pair()
    af = gg.AutoFreeze(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(gg.InvalidArgumentError, match=r"needs an nn\.Sequential.*got _Pair"):
        af.split()


BAD: list[tuple[dict[str, Any], str]] = [
    ({"every": 0}, r"every must be a whole number >= 1; got 0"),
    ({"every": 2.5}, r"every must be a whole number >= 1; got 2.5"),
    ({"every": True}, r"every must be a whole number >= 1; got True"),
    ({"threshold": -0.1}, r"threshold must be a finite number >= 0 .*got -0.1"),
    ({"threshold": float("nan")}, r"threshold must be a finite number >= 0 .*got nan"),
    ({"threshold": "0.1"}, r"threshold must be a finite number >= 0 .*got '0.1'"),
    ({"min_trainable": 0}, r"min_trainable must be a whole number >= 1; got 0"),
    ({"min_trainable": 5}, r"min_trainable=5 asks for more trainable stages than there are \(4\)"),
    ({"stages": ["0", "2"]}, r"do not cover the trainable parameters 4.weight, 4.bias, 6.wei"),
    ({"stages": ["0", "**.weight"]}, r"stages overlap: '0.weight'"),
    ({"stages": ["0", "nope"]}, r"nope"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD)
def test_bad_arguments_are_refused_and_change_nothing(kwargs: dict[str, Any], message: str) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before, flags, groups = (
        gg.fingerprint(model),
        _flags(model),
        list(opt.param_groups[0]["params"]),
    )
    with pytest.raises(gg.GradgateError, match=message) as info:
        gg.AutoFreeze(model, optimizer=opt, **kwargs)
    assert isinstance(info.value, (ValueError, LookupError))
    assert gg.fingerprint(model) == before and _flags(model) == flags
    assert opt.param_groups[0]["params"] == groups and len(opt.param_groups) == 1


def test_a_frozen_stage_and_a_short_optimizer_are_refused() -> None:
    model = _model()
    gg.freeze(model, "0")
    with pytest.raises(ValueError, match="stage '0' has no trainable parameter"):
        gg.AutoFreeze(model, STAGES, optimizer=torch.optim.SGD(model[2].parameters(), lr=0.1))
    # by default only the children that still train are stages
    assert gg.AutoFreeze(
        model, optimizer=torch.optim.SGD(gg.trainable_parameters(model), lr=0.1)
    ).stages.names == ["2", "4", "6"]
    with pytest.raises(
        gg.InvalidArgumentError,
        match=r"optimizer does not hold the trainable parameters 4.weight, 4.bias, 6.weight",
    ):
        gg.AutoFreeze(model, optimizer=torch.optim.SGD(model[2].parameters(), lr=0.1))


def test_step_without_gradients_says_when_to_call_it() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    af = gg.AutoFreeze(model, optimizer=opt)
    _train_step(model, opt, 0)
    opt.zero_grad()
    with pytest.raises(gg.InvalidArgumentError, match=r"after optimizer\.step\(\) and before"):
        af.step()
    assert af.steps == 0


def test_example_moves_the_cache_boundary(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("sklearn")
    example = Path(__file__).parent.parent / "examples" / "autofreeze_cache.py"
    out = runpy.run_path(str(example))["main"](epochs=4, every=5, threshold=0.1)
    printed = capsys.readouterr().out
    assert out["frozen"] and out["cached"] > 0, printed
    assert out["unchanged"] and "bit-identical since they froze: True" in printed
    assert out["accuracy"] > 0.6


# -- the rank rule (issue 26.1) and unusable windows (issue 23.6/23.7) ---------


def _noisy_norms(
    windows: int, every: int, seed: int, trend: Any, cv: float = 0.5
) -> list[list[float]]:
    """Per step, per stage: ``trend(stage, step)`` times log-normal noise of ``cv``."""
    g = torch.Generator().manual_seed(seed)
    sigma = math.sqrt(math.log(1 + cv * cv))
    noise = torch.exp(torch.randn(windows * every, len(STAGES), generator=g) * sigma)
    return [
        [float(noise[s, i]) * trend(i, s) for i in range(len(STAGES))]
        for s in range(windows * every)
    ]


def _feed(norms: list[list[float]], every: int, **kwargs: Any) -> tuple[gg.AutoFreeze, Any]:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    if "threshold" not in kwargs and "rule" not in kwargs:
        kwargs["rule"] = "rank"
    af = gg.AutoFreeze(model, optimizer=opt, every=every, **kwargs)
    for row in norms:
        _set_grads(model, row)
        af.step()
    return af, model


def test_rank_rule_freezes_a_front_that_settles_while_the_rest_keeps_learning() -> None:
    # stage 0's gradients shrink to a fifth; the others keep their size: real noise on all
    def trend(i: int, s: int) -> float:
        return max(0.2, 1.0 - s / 100) if i == 0 else 1.0

    for seed in range(3):
        af, model = _feed(_noisy_norms(20, 8, seed, trend), 8)
        assert af.rule == "rank" and af.patience == 2
        assert af.frozen == ["0"], (seed, [d.decay for d in af.history])
        (freeze,) = [d for d in af.history if d.froze]
        assert freeze.froze == ["0"] and freeze.step >= 4 * 8  # 2 baseline windows + patience 2
        assert freeze.decay[0] is not None and freeze.decay[0] < 0.7 * float(
            torch.tensor([d for d in freeze.decay if d is not None]).median()
        )
        _frozen_prefix_holds(model, af)


@pytest.mark.parametrize(
    "trend",
    [
        lambda i, s: 1.0,  # pure noise: nothing trends
        lambda i, s: math.exp(-s / 150),  # every stage still learning, at the same pace
        lambda i, s: 1.0 + s / 100,  # every stage's gradients growing
    ],
    ids=["pure-noise", "all-decaying", "all-growing"],
)
def test_rank_rule_does_not_freeze_without_a_front_that_settles(trend: Any) -> None:
    for seed in range(5):
        af, model = _feed(_noisy_norms(40, 16, seed, trend), 16)
        assert af.frozen == [], (seed, [d.froze for d in af.history])
        assert all(_flags(model).values())
        assert len(af.history) == 40 and af.history[-1].decay[0] is not None


def test_the_threshold_rule_freezes_on_pure_noise_which_is_why_it_is_not_the_default() -> None:
    # the measurement behind the default, as a test: 0.05 is crossed by chance
    af, _ = _feed(_noisy_norms(40, 16, 0, lambda i, s: 1.0), 16, threshold=0.2)
    assert af.rule == "threshold" and af.frozen


def _nan_then_zero_windows(every: int, **kwargs: Any) -> tuple[gg.AutoFreeze, nn.Sequential]:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    af = gg.AutoFreeze(model, optimizer=opt, every=every, **kwargs)
    for _ in range(every):  # an overflowing window: NaN gradients (a skipped AMP step)
        _set_grads(model, [float("nan")] * 4)
        af.step()
    for _ in range(every):  # zero_grad(set_to_none=False) and a step without gradient
        _set_grads(model, [0.0] * 4)
        af.step()
    return af, model


@pytest.mark.parametrize("kwargs", [{"threshold": 0.05}, {"threshold": 1e9}, {}, {"rule": "rank"}])
def test_nan_and_zero_windows_never_freeze(kwargs: dict[str, Any]) -> None:
    every = 3
    af, model = _nan_then_zero_windows(every, **kwargs)
    assert af.frozen == [] and all(_flags(model).values())
    assert [d.froze for d in af.history] == [[], []]
    assert all(d.skipped and "fewer than half" in d.skipped for d in af.history)
    assert af.history[0].change == [None] * 4 and af.history[1].change == [None] * 4
    # the next usable window is compared with nothing: no freeze on it either
    _set_grads(model, [1.0] * 4)
    for _ in range(every):
        af.step()
    assert af.frozen == [] and af.history[-1].skipped is None
    assert af.history[-1].change == [None] * 4


def test_a_few_bad_steps_do_not_spoil_a_window() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    af = gg.AutoFreeze(model, optimizer=opt, every=4, threshold=0.5)
    for step in range(8):
        _set_grads(model, [float("inf") if step == 5 else 2.0] * 4)
        af.step()
    assert [d.skipped for d in af.history] == [None, None]
    assert af.history[1].grad_norm == pytest.approx([2.0] * 4)  # the inf step left out
    assert af.frozen == ["0", "2", "4"]


def test_rule_arguments_keep_the_old_keywords_working() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    old = gg.AutoFreeze(model, optimizer=opt, every=50, threshold=0.05)
    assert (old.rule, old.threshold, old.patience) == ("threshold", 0.05, 1)
    new = gg.AutoFreeze(model, optimizer=opt)
    assert (new.rule, new.threshold, new.patience, new.every) == ("progress", None, 1, 16)
    rank = gg.AutoFreeze(model, optimizer=opt, rule="rank")
    assert (rank.rule, rank.threshold, rank.patience, rank.ratio) == ("rank", None, 2, 0.7)
    explicit = gg.AutoFreeze(model, optimizer=opt, rule="threshold")
    assert (explicit.rule, explicit.threshold) == ("threshold", 0.05)


BAD_RULES: list[tuple[dict[str, Any], str]] = [
    (
        {"rule": "median"},
        r"rule must be one of \['progress', 'contribution', 'rank', 'threshold'\]; got 'me",
    ),
    ({"rule": "rank", "threshold": 0.1}, r"threshold=0.1 applies to rule='threshold' only"),
    ({"patience": 0}, r"patience must be a whole number >= 1; got 0"),
    ({"ratio": 0.0}, r"ratio must be a number in \(0, 1\].*got 0.0"),
    ({"ratio": float("nan")}, r"ratio must be a number in \(0, 1\].*got nan"),
    ({"pace": -1}, r"pace must be a whole number >= 0; got -1"),
    ({"rule": "rank", "pace": 1}, r"pace=1 applies to the measured rules .* rule='rank'"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_RULES)
def test_bad_rule_arguments_are_refused(kwargs: dict[str, Any], message: str) -> None:
    test_bad_arguments_are_refused_and_change_nothing(kwargs, message)


def _state_after_a_freeze() -> dict[str, Any]:
    _, _, _, af = _run(30, 5)
    assert af.boundary > 0
    state: dict[str, Any] = af.state_dict()
    return state


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"boundary": 4}, r"freezes 4 of the 4 stages, but min_trainable=1 must keep training"),
        ({"boundary": 3, "min_trainable": 2}, r"freezes 3 of the 4 stages, but min_trainable=2"),
        ({"threshold": float("nan")}, r"threshold must be a finite number >= 0 .*got nan"),
        ({"rule": "threshold", "threshold": -1}, r"threshold must be a finite number >= 0"),
        ({"stages": ["0", "2", "4"]}, r"saved for stages \['0', '2', '4'\], but these are"),
        ({"stages": ["a", "b", "c", "d"]}, r"saved for stages \['a', 'b', 'c', 'd'\]"),
        ({"sums": [float("nan")] * 4}, r"sums must hold finite numbers >= 0"),
        ({"previous": [1.0, 2.0]}, r"previous must be a list of 4 numbers"),
        ({"every": 0}, r"every must be a whole number >= 1; got 0"),
        ({"steps": -3}, r"steps must be a whole number >= 0; got -3"),
        ({"rule": "auto"}, r"rule must be one of"),
        ({"pace": 2}, r"pace=2 applies to the measured rules .* rule='threshold'"),
        ({"evidence": [1, -1, 0]}, r"evidence must be a whole number >= 0; got -1"),
        ({"evidence": [1, 0]}, r"evidence must be \[decisions with evidence in a row, learned"),
        ({"evidence": [0, 7, 3]}, r"evidence \[0, 7, 3\] cannot come from AutoFreeze"),
        ({"evidence": [0, 0, 5]}, r"quiet decisions are counted only once the model has learned"),
    ],
)
def test_load_state_dict_refuses_a_bad_state_and_changes_nothing(
    change: dict[str, Any], message: str
) -> None:
    state = dict(_state_after_a_freeze(), **change)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    af = gg.AutoFreeze(model, optimizer=opt, every=5, threshold=0.05)
    before = (gg.fingerprint(model), _flags(model), list(opt.param_groups[0]["params"]))
    with pytest.raises(gg.InvalidArgumentError, match=message):
        af.load_state_dict(state)
    assert (gg.fingerprint(model), _flags(model), opt.param_groups[0]["params"]) == before
    assert (af.boundary, af.steps, af.history, af.threshold, af.every) == (0, 0, [], 0.05, 5)


def _rank_run(total: int, state: dict[str, Any] | None = None) -> tuple[Any, ...]:
    """AdamW + cosine under the rank rule, fed gradients whose front settles in two steps."""

    def trend(i: int, s: int) -> float:
        start = {0: 0, 1: 60}.get(i)  # stage 0 settles first, stage 1 ("2") later
        return 1.0 if start is None else max(0.15, 1.0 - max(0, s - start) / 40)

    norms = _noisy_norms(30, 4, 7, trend)[:total]
    model = _model()
    opt = torch.optim.AdamW(gg.param_groups(model, lr=1e-2, weight_decay=0.1))
    sched = lrs.CosineAnnealingLR(opt, T_max=120, eta_min=1e-4)
    af = gg.AutoFreeze(model, optimizer=opt, scheduler=sched, every=4, rule="rank")
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        af.load_state_dict(state["af"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start = af.steps
    for step in range(start, total):
        x, y = _batch(step)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        scale = norms[step]
        for i, path in enumerate(STAGES):  # the measured norm follows the trend
            for p in model.get_submodule(path).parameters():
                if p.grad is not None:
                    p.grad.mul_(scale[i] / 4)
        opt.step()
        af.step()
        sched.step()
    return model, opt, sched, af


def test_rank_rule_resume_is_bit_identical_across_a_freeze(tmp_path: Path) -> None:
    total = 120
    ref_model, _, _, ref_af = _rank_run(total)
    froze_at = [(d.step, d.froze) for d in ref_af.history if d.froze]
    assert len(froze_at) >= 2, froze_at
    stop = froze_at[0][0] + 6  # after the first freeze, inside a window, before the second
    assert stop < froze_at[1][0] and stop % 4
    model, opt, sched, af = _rank_run(stop)
    path = tmp_path / "ckpt.pt"
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
         "af": af.state_dict()},
        path,
    )  # fmt: skip
    resumed_model, _, _, resumed_af = _rank_run(total, torch.load(path, weights_only=True))
    assert resumed_af.history == ref_af.history and resumed_af.frozen == ref_af.frozen
    for (name, a), b in zip(ref_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name


# -- resume across a moving cache boundary (issue 26) --------------------------


def _cache_run(total: int, state: dict[str, Any] | None = None) -> tuple[Any, ...]:
    """``_rank_run``'s settling trend, read from a FeatureCache that moves with each freeze.

    A resumed run rebuilds the cache at the restored boundary from the raw data
    (docs/adaptive.md, "Resuming"); the moves after it go through ``extend``.
    """

    def trend(i: int, s: int) -> float:
        start = {0: 0, 1: 60}.get(i)
        return 1.0 if start is None else max(0.15, 1.0 - max(0, s - start) / 40)

    norms = _noisy_norms(30, 4, 7, trend)[:total]
    g = torch.Generator().manual_seed(5)
    x_all = torch.randn(256, 8, generator=g)
    data = torch.utils.data.TensorDataset(x_all, (x_all[:, :4] * 2).tanh())
    model = _model()
    opt = torch.optim.AdamW(gg.param_groups(model, lr=1e-2, weight_decay=0.1))
    sched = lrs.CosineAnnealingLR(opt, T_max=120, eta_min=1e-4)
    af = gg.AutoFreeze(model, optimizer=opt, scheduler=sched, every=4, rule="rank")
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        af.load_state_dict(state["af"])  # re-freezes the prefix: before the optimizer's state
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start = af.steps
    head, net = af.split()
    source: Any = gg.FeatureCache(head, data, progress=False) if len(head) else data
    cached, moves = len(head), []
    for step in range(start, total):
        idx = torch.randperm(256, generator=torch.Generator().manual_seed(step))[:32].tolist()
        if isinstance(source, gg.FeatureCache):
            x, y = source.collate_fn(source.__getitems__(idx))
        else:
            x, y = source[idx]
        opt.zero_grad()
        F.mse_loss(net(x), y).backward()
        for i, path in enumerate(STAGES):  # the measured norm follows the trend
            for p in model.get_submodule(path).parameters():
                if p.grad is not None:
                    p.grad.mul_(norms[step][i] / 4)
        opt.step()
        af.step()
        sched.step()
        head, rest = af.split()
        if len(head) > cached:
            if isinstance(source, gg.FeatureCache):
                source = source.extend(head[cached:])  # only the newly frozen stages run
            else:
                source = gg.FeatureCache(head, data, progress=False)
            cached, net = len(head), rest
            moves.append((step + 1, cached))
    return model, opt, sched, af, source, moves


def test_resume_is_bit_identical_across_a_cache_boundary_move(tmp_path: Path) -> None:
    total = 120
    ref_model, _, _, ref_af, ref_cache, ref_moves = _cache_run(total)
    assert len(ref_moves) >= 2, ref_moves  # a first cache, then a move through extend
    stop = ref_moves[0][0] + 6  # after the first move, inside a window, before the next
    assert stop < ref_moves[1][0] and stop % 4
    model, opt, sched, af, _, moves = _cache_run(stop)
    assert moves == ref_moves[:1]
    path = tmp_path / "ckpt.pt"
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
         "af": af.state_dict()},
        path,
    )  # fmt: skip
    resumed = _cache_run(total, torch.load(path, weights_only=True))
    resumed_model, _, _, resumed_af, resumed_cache, resumed_moves = resumed
    assert resumed_moves == ref_moves[1:]
    assert resumed_af.history == ref_af.history and resumed_af.frozen == ref_af.frozen
    assert isinstance(ref_cache, gg.FeatureCache) and isinstance(resumed_cache, gg.FeatureCache)
    assert torch.equal(resumed_cache.features(), ref_cache.features())
    assert torch.equal(resumed_cache[7][1], ref_cache[7][1])  # the labels came along
    for (name, a), b in zip(ref_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name
    assert gg.fingerprint(resumed_model) == gg.fingerprint(ref_model)


# -- GradScaler (AMP): the norms AutoFreeze reads --------------------------------


def _amp_run(scaler: torch.amp.GradScaler | None, before_step: bool = False) -> gg.AutoFreeze:
    """A real training run in which step 9 overflows (an inf in the loss) and is skipped.

    With ``scaler`` the loss scale doubles every step (halving at the overflow)
    and the scaler skips step 9; without, the loop skips it by hand.
    """
    model = _model()
    opt = torch.optim.AdamW(gg.param_groups(model, lr=1e-2))
    af = gg.AutoFreeze(model, optimizer=opt, every=4)
    for step in range(24):
        x, y = _batch(step)
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        if step == 9:
            loss = loss * float("inf")  # an overflowing step
        if scaler is None:
            loss.backward()
            if step != 9:
                opt.step()
            af.step()
            continue
        scaler.scale(loss).backward()
        if before_step:
            af.step()  # the gradients are still multiplied by the loss scale here
        scaler.step(opt)  # unscales the gradients in place, skips the step on inf
        scaler.update()
        if not before_step:
            af.step()
    return af


def test_after_scaler_step_the_norms_are_the_unscaled_ones() -> None:
    plain = _amp_run(None)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1)
    amp = _amp_run(scaler)
    assert scaler.get_scale() != 2.0**8  # the scale moved during the run
    # every window reads exactly the unscaled run's norms (power-of-two scaling is
    # exact); the overflowing step's window (steps 9-12) is used, its inf step left out
    assert [d.grad_norm for d in amp.history] == [d.grad_norm for d in plain.history]
    assert amp.history[2].skipped is None and amp.history[2].grad_norm[0] is not None
    assert amp.history == plain.history


def test_before_scaler_step_the_norms_carry_the_loss_scale() -> None:
    # the documented misuse, as a test of what happens: the recorded norms are the
    # scaled ones (2**8 and more times larger), and they jump as the scale grows
    plain = _amp_run(None)
    scaled = _amp_run(torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1), True)
    first_plain, first_scaled = plain.history[0].grad_norm, scaled.history[0].grad_norm
    assert first_plain[0] is not None and first_scaled[0] is not None
    assert first_scaled[0] > 2.0**8 * first_plain[0] * 0.99


# -- the contribution rule (issue 26.1) ----------------------------------------


def _contribution_run(
    steps: int,
    signal: Any,
    seed: int = 0,
    every: int = 8,
    state: dict[str, Any] | None = None,
    start: int = 0,
    rule: str = "contribution",
    **kwargs: Any,
) -> tuple[gg.AutoFreeze, nn.Sequential, torch.optim.Optimizer]:
    """SGD fed gradients ``signal(stage, step) * G_stage + noise`` (noise of norm ~2.5x G).

    The contribution ``-g_t . (w_{t-1} - w_{t-2}) = lr g_t . g_{t-1}`` has mean
    ``lr signal^2 |G|^2``, the progress ``-g_t . (w_{t-1} - anchor)`` (``k`` steps back)
    ``k lr signal^2 |G|^2``: zero where a stage's signal has gone, as for pure noise.
    """
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    af = gg.AutoFreeze(model, optimizer=opt, every=every, rule=rule, **kwargs)
    if state is not None:
        model.load_state_dict(state["model"])
        af.load_state_dict(state["af"])
        opt.load_state_dict(state["opt"])
    g = torch.Generator().manual_seed(seed)
    shapes = {s: [p.shape for p in model.get_submodule(s).parameters()] for s in STAGES}
    direction = {s: [torch.randn(sh, generator=g) * 0.4 for sh in shapes[s]] for s in STAGES}
    for step in range(steps):
        noise = {s: [torch.randn(sh, generator=g) for sh in shapes[s]] for s in STAGES}
        if step < start:
            continue  # the same random stream as an uninterrupted run
        for i, s in enumerate(STAGES):
            for p, d, z in zip(model.get_submodule(s).parameters(), direction[s], noise[s]):
                p.grad = d * signal(i, step) + z if p.requires_grad else None
        opt.step()
        af.step()
    return af, model, opt


MEASURED = ["contribution", "progress"]


@pytest.mark.parametrize("rule", MEASURED)
def test_measured_rules_freeze_a_front_that_stops_learning_while_the_rest_learns(
    rule: str,
) -> None:
    for seed in range(3):
        af, model, _ = _contribution_run(
            200, lambda i, s: 0.0 if i == 0 and s >= 60 else 1.0, seed, rule=rule
        )
        assert (af.rule, af.patience) == (rule, 1)
        assert af.frozen == ["0"], (seed, [d.contribution for d in af.history])
        (freeze,) = [d for d in af.history if d.froze]
        assert 60 + 2 * 8 <= freeze.step <= 60 + 10 * 8  # once the pooled windows show it
        t, bound = freeze.contribution, freeze.bound
        assert max(v for v in t if v is not None) >= 5.0  # the model measurably learns ...
        assert bound[0] is not None and bound[0] < 0.1  # ... and stage 0 is shown to matter little
        assert all(b is not None and b >= 0.1 for b in bound[1:])
        _frozen_prefix_holds(model, af)
        # its weight copies are dropped; the trainable stages' are kept
        copies = (af._last, af._update) if rule == "contribution" else (af._anchor, af._start)
        assert copies[0][0] is None and copies[1][0] is None and copies[0][1] is not None


@pytest.mark.parametrize(
    "signal",
    [
        lambda i, s: 0.0,  # pure noise: no stage learns
        lambda i, s: 1.0,  # every stage keeps learning
        lambda i, s: 1.0 + s / 100,  # every stage's gradients growing
    ],
    ids=["pure-noise", "all-learning", "all-growing"],
)
@pytest.mark.parametrize("rule", MEASURED)
def test_measured_rules_do_not_freeze_a_stage_that_learns_or_on_noise(
    signal: Any, rule: str
) -> None:
    for seed in range(4):
        af, model, _ = _contribution_run(320, signal, seed, rule=rule)
        assert af.frozen == [], (seed, [d.contribution for d in af.history if d.contribution])
        assert all(_flags(model).values())
        assert af.history[-1].contribution[0] is not None  # it did measure


@pytest.mark.parametrize("rule", MEASURED)
def test_measured_rules_tell_noise_apart(rule: str) -> None:
    # pure noise on the real AdamW update: the rank rule's signal-free sibling, the threshold
    # rule, freezes on it; the measured rules do not (their guard needs t >= 5 somewhere)
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    af = gg.AutoFreeze(model, optimizer=opt, every=8, rule=rule)
    g = torch.Generator().manual_seed(3)
    for _ in range(400):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        af.step()
    assert af.frozen == []
    ts = [v for d in af.history for v in d.contribution if v is not None]
    assert ts and max(ts) < 5.0


@pytest.mark.parametrize("rule", MEASURED)
def test_measured_rules_resume_bit_identical_across_a_freeze(tmp_path: Path, rule: str) -> None:
    def signal(i: int, s: int) -> float:
        return 0.0 if (i == 0 and s >= 40) or (i == 1 and s >= 120) else 1.0

    total = 220
    ref_af, ref_model, _ = _contribution_run(total, signal, 1, rule=rule)
    froze_at = [(d.step, d.froze) for d in ref_af.history if d.froze]
    assert [f for _, f in froze_at] == [["0"], ["2"]], froze_at
    stop = froze_at[0][0] + 5  # inside a window, between the two freezes
    af, model, opt = _contribution_run(stop, signal, 1, rule=rule)
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "af": af.state_dict()}
    keys = ("last", "update") if rule == "contribution" else ("anchor", "start")
    assert state["af"][keys[0]][0] is None
    assert isinstance(state["af"][keys[1]][1][0], torch.Tensor)
    path = tmp_path / "ckpt.pt"
    torch.save(state, path)
    loaded = torch.load(path, weights_only=True)
    resumed_af, resumed_model, _ = _contribution_run(
        total, signal, 1, state=loaded, start=stop, rule=rule
    )
    assert resumed_af.history == ref_af.history and resumed_af.frozen == ref_af.frozen
    for (name, a), b in zip(ref_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name
    # without the weight copies the next measurement is unknown: the record would differ
    lost = dict(loaded["af"], **{k: None for k in keys})
    partial, _, _ = _contribution_run(
        total, signal, 1, state=dict(loaded, af=lost), start=stop, rule=rule
    )
    assert partial.history != ref_af.history


@pytest.mark.parametrize("rule", MEASURED)
def test_a_dtype_change_mid_run_keeps_the_state_loadable_and_the_run_resumable(
    rule: str,
) -> None:
    # model.to(float64) mid-run: the weight copies follow it, so a state saved after
    # it loads into the converted model and resumes exactly (it was refused for dtype)
    def run(model: nn.Sequential, af: gg.AutoFreeze, opt: Any, steps: range) -> None:
        for step in steps:
            x, y = _batch(step)
            dtype = next(model.parameters()).dtype
            opt.zero_grad()
            F.mse_loss(model(x.to(dtype)), y.to(dtype)).backward()
            opt.step()
            af.step()

    def fresh() -> tuple[nn.Sequential, gg.AutoFreeze, Any]:
        model = _model()
        # no momentum: torch's own load casts a buffer kept in float32 to float64
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        return model, gg.AutoFreeze(model, optimizer=opt, every=8, rule=rule), opt

    model, af, opt = fresh()
    run(model, af, opt, range(20))
    model.to(torch.float64)
    gg.AutoFreeze(model, optimizer=opt, every=8, rule=rule).load_state_dict(af.state_dict())
    run(model, af, opt, range(20, 44))
    state = af.state_dict()
    kept = [t for key in ("anchor", "start", "last", "update") for ts in state[key] if ts
            for t in ts]  # fmt: skip
    assert kept and all(t.dtype == torch.float64 for t in kept)
    model2, af2, opt2 = fresh()
    model2.to(torch.float64)
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(opt.state_dict())
    af2.load_state_dict(state)
    run(model, af, opt, range(44, 80))
    run(model2, af2, opt2, range(44, 80))
    assert af2.history == af.history
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), name


def test_contribution_state_with_wrong_copies_is_refused_and_changes_nothing() -> None:
    af, _, _ = _contribution_run(30, lambda i, s: 1.0)
    state = af.state_dict()
    bad = dict(state, update=[[torch.zeros(3)], *state["update"][1:]])
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    fresh = gg.AutoFreeze(model, optimizer=opt, every=8, rule="contribution")
    with pytest.raises(
        gg.InvalidArgumentError, match=r"update for stage '0' must be 2 finite dense tensors"
    ):
        fresh.load_state_dict(bad)
    assert fresh.steps == 0 and fresh._update == [None] * 4 and fresh.history == []
    with pytest.raises(gg.InvalidArgumentError, match=r"recent must hold finite numbers"):
        fresh.load_state_dict(dict(state, recent=[[[float("nan")] * 4] * 3]))
    fresh.load_state_dict(state)
    kept, original = fresh._update[2], af._update[2]
    assert fresh.steps == 30 and kept is not None and original is not None
    assert torch.equal(kept[0], original[0]) and kept[0] is not original[0]


@pytest.mark.parametrize("every", [1, 2])
def test_contribution_rule_never_decides_on_too_few_pooled_steps(every: int) -> None:
    # a t of 5 from 2 or 6 samples is luck: pure noise froze 19 of 20 runs at every=1
    # before the rule waited for MIN_SAMPLES pooled steps (adversarial probe)
    for seed in range(5):
        model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        af = gg.AutoFreeze(model, optimizer=opt, every=every)
        g = torch.Generator().manual_seed(seed)
        for _ in range(200):
            for i, p in enumerate(model.parameters()):
                p.grad = torch.randn(p.shape, generator=g) * (1e-3 if i < 2 else 1.0)
            opt.step()
            af.step()
        assert af.frozen == [], (every, seed)
        assert len(af._recent) == max(4, -(-30 // every) + 1)


def test_sparse_gradients_are_measured() -> None:
    model = nn.Sequential(nn.Embedding(50, 4, sparse=True), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    af = gg.AutoFreeze(model, optimizer=opt, every=2)
    for step in range(8):
        opt.zero_grad()
        model(torch.tensor([step, step + 1])).sum().backward()
        assert model[0].weight.grad is not None and model[0].weight.grad.is_sparse
        opt.step()
        af.step()
    assert af.history[-1].grad_norm[0] is not None and af.history[-1].grad_norm[0] > 0
    assert af.rule == "progress" and af._recent[-1][2][0] > 0  # its progress too (the rows)


def test_a_state_dict_is_one_moment_and_refuses_zero_previous_means() -> None:
    af, _, opt = _contribution_run(20, lambda i, s: 1.0)
    state = af.state_dict()
    saved = state["last"][0][0].clone()
    opt.step()  # the gradients of step 20 again: the weights move
    af.step()
    assert torch.equal(state["last"][0][0], saved)  # the state did not follow them
    model = _model()
    fresh = gg.AutoFreeze(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01), every=8)
    with pytest.raises(gg.InvalidArgumentError, match=r"previous must be > 0"):
        fresh.load_state_dict(dict(state, previous=[0.0] * 4))
    with pytest.raises(gg.InvalidArgumentError, match=r"dtypes"):
        fresh.load_state_dict(
            dict(state, last=[[t.double() for t in state["last"][0]], *state["last"][1:]])
        )
    assert fresh.steps == 0 and fresh.history == []


# -- the progress rule: measured in the optimizer's step pre-hook ---------------


def test_progress_is_measured_on_the_weights_before_the_step_moves_them() -> None:
    # SGD with a constant gradient G: w_t = w_0 - t lr G. At step t the gradient was taken
    # at w_{t-1}, so the progress -G . (w_{t-1} - w_0) is (t - 1) lr |G|^2; measured after
    # the step it would be t lr |G|^2. The first step only keeps w_0 as the anchor.
    model = nn.Sequential(nn.Linear(3, 2, bias=False), nn.Linear(2, 1, bias=False))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    af = gg.AutoFreeze(model, optimizer=opt, every=4)
    grads = [torch.full(p.shape, 2.0) for p in model.parameters()]
    for _ in range(4):
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        opt.step()
        af.step()
    total, squares, count = (row[0] for row in af._recent[0])
    unit = 0.5 * float(grads[0].pow(2).sum())
    assert count == 3 and total == pytest.approx((1 + 2 + 3) * unit)
    assert squares == pytest.approx((1 + 4 + 9) * unit**2)


def test_progress_hook_survives_copies_and_pickles_of_the_optimizer() -> None:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    af = gg.AutoFreeze(model, optimizer=opt, every=4)
    pickle.loads(pickle.dumps(opt)).step()  # pickles (as a no-op hook) and steps
    twin = copy.deepcopy(opt)  # shares the hook: its steps are not this AutoFreeze's
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    twin.step()
    twin.step()
    assert af._anchor == [None] * 4 and all(float(v) == 0 for row in af._c for v in row)
    opt.step()  # the AutoFreeze's own optimizer: the first step keeps the anchor
    assert all(a is not None for a in af._anchor)


class _NoHooks:
    """An optimizer wrapper with param_groups but no step pre-hooks."""

    def __init__(self, inner: torch.optim.Optimizer) -> None:
        self.param_groups = inner.param_groups


def test_progress_rule_needs_an_optimizer_that_takes_a_step_pre_hook() -> None:
    model = _model()
    bare = _NoHooks(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(gg.InvalidArgumentError, match=r"_NoHooks does not take; pass a torch"):
        gg.AutoFreeze(model, optimizer=bare)  # type: ignore[arg-type]
    rank = gg.AutoFreeze(model, optimizer=bare, rule="rank")  # type: ignore[arg-type]
    state, _, _ = _contribution_run(20, lambda i, s: 1.0, rule="progress")
    with pytest.raises(gg.InvalidArgumentError, match=r"step pre-hook"):
        rank.load_state_dict(state.state_dict())
    assert (rank.rule, rank.steps, rank.history) == ("rank", 0, [])


def test_progress_state_with_wrong_copies_is_refused_and_changes_nothing() -> None:
    af, _, _ = _contribution_run(30, lambda i, s: 1.0, rule="progress")
    state = af.state_dict()
    assert all(isinstance(ts, list) for ts in state["anchor"] + state["start"])
    model = _model()
    fresh = gg.AutoFreeze(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01), every=8)
    bad = dict(state, anchor=[[torch.zeros(3)], *state["anchor"][1:]])
    with pytest.raises(gg.InvalidArgumentError, match=r"anchor for stage '0' must be 2 finite"):
        fresh.load_state_dict(bad)
    nan = [[torch.full_like(t, float("nan")) for t in state["start"][1]]]
    with pytest.raises(gg.InvalidArgumentError, match=r"start for stage '2' must be"):
        fresh.load_state_dict(dict(state, start=[state["start"][0], *nan, *state["start"][2:]]))
    assert fresh.steps == 0 and fresh._anchor == [None] * 4 and fresh.history == []
    fresh.load_state_dict(state)
    kept, original = fresh._start[1], af._start[1]
    assert kept is not None and original is not None
    assert torch.equal(kept[0], original[0]) and kept[0] is not original[0]


def _progress_history(
    make_opt: Any, steps: int = 48, zero_every_other: str | None = None, scaler: Any = None
) -> gg.AutoFreeze:
    """The 4-stage model trained on ``_batch``; the AutoFreeze is given ``make_opt(model)``
    (which returns what to pass and what to step). ``zero_every_other``: stage 0's
    gradient on odd steps is "none" (absent) or "zero" (zeroed, kept)."""
    model = _model()
    given, stepped = make_opt(model)
    af = gg.AutoFreeze(model, optimizer=given, every=4)
    for step in range(steps):
        x, y = _batch(step % 8)
        stepped.zero_grad()
        loss = F.mse_loss(model(x), y)
        (loss if scaler is None else scaler.scale(loss)).backward()
        if zero_every_other and step % 2:
            for p in model[0].parameters():
                p.grad = None if zero_every_other == "none" else torch.zeros_like(p)
        if scaler is None:
            stepped.step()
        else:
            scaler.step(stepped)
            scaler.update()
        af.step()
    return af


class _Forwarding:
    """A wrapper that exposes the inner optimizer as ``.optimizer`` (as Lightning's
    ``LightningOptimizer`` and accelerate's ``AcceleratedOptimizer`` do) and steps it."""

    def __init__(self, inner: torch.optim.Optimizer) -> None:
        self.optimizer = inner
        self.param_groups = inner.param_groups

    def step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()


class _HalfBuiltOptimizer(torch.optim.Optimizer):
    """An Optimizer subclass that never runs ``Optimizer.__init__`` (accelerate's wrapper):
    it has ``register_step_pre_hook`` but no hook table; the inner one is ``.optimizer``."""

    def __init__(self, inner: torch.optim.Optimizer) -> None:
        self.optimizer = inner
        self.param_groups = inner.param_groups

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad()


def test_progress_through_an_optimizer_wrapper_measures_the_inner_steps() -> None:
    # found by an adversarial probe: the hook compared the stepping optimizer with the
    # wrapper it was given and never measured (nothing froze, silently); accelerate's
    # half-built subclass crashed with an AttributeError
    def plain(model: nn.Module) -> tuple[Any, Any]:
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        return opt, opt

    reference = _progress_history(plain)
    assert reference.history[-1].contribution[0] is not None
    for wrap in (_Forwarding, _HalfBuiltOptimizer):

        def wrapped(model: nn.Module, wrap: Any = wrap) -> tuple[Any, Any]:
            w = wrap(torch.optim.SGD(model.parameters(), lr=0.05))
            return w, w

        assert _progress_history(wrapped).history == reference.history, wrap.__name__


def test_a_copied_or_unpickled_autofreeze_measures_its_own_optimizer() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    af = gg.AutoFreeze(model, optimizer=opt, every=4)
    for twin in (copy.deepcopy(af), pickle.loads(pickle.dumps(af))):
        for p in twin.model.parameters():
            p.grad = torch.ones_like(p)
        twin.optimizer.step()  # the first measured step keeps the anchor
        assert all(a is not None for a in twin._anchor)
        assert af._anchor == [None] * 4  # the original's optimizer did not step


def test_progress_under_a_fused_optimizer_and_grad_scaler_reads_unscaled_slopes() -> None:
    # a fused optimizer takes the loss scale as grad_scale and unscales inside its step,
    # after the pre-hook: the slope is divided by it (power-of-two scales: exactly)
    def fused(model: nn.Module) -> tuple[Any, Any]:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
        return opt, opt

    plain = _progress_history(fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1)
    scaled = _progress_history(fused, scaler=scaler)
    assert scaler.get_scale() > 2.0**8  # the scale moved during the run
    assert [d.contribution for d in scaled.history] == [d.contribution for d in plain.history]
    assert [d.bound for d in scaled.history] == [d.bound for d in plain.history]


def test_a_zeroed_gradient_counts_as_no_gradient_for_the_progress_rule() -> None:
    # found by the probe: a stage without a gradient was left out when its grad was None
    # but counted as a slope of 0 when zeroed; the norms treat both as unusable, and so
    # does the slope now (it is kept only on a step whose norm is usable)
    def sgd(model: nn.Module) -> tuple[Any, Any]:
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        return opt, opt

    absent = _progress_history(sgd, zero_every_other="none")
    zeroed = _progress_history(sgd, zero_every_other="zero")
    assert [d.contribution for d in zeroed.history] == [d.contribution for d in absent.history]
    assert absent._recent[-1][2][0] == 2.0  # 2 of the window's 4 steps measured on stage 0


def test_a_collected_autofreeze_takes_its_hook_off_the_optimizer() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        gg.AutoFreeze(model, optimizer=opt, every=4)  # built and dropped, as in a notebook
    gc.collect()
    assert len(opt._optimizer_step_pre_hooks) == 0
    af = gg.AutoFreeze(model, optimizer=opt, every=4)
    assert len(opt._optimizer_step_pre_hooks) == 1 and af._hooked is opt


# -- pace: freezing on once the model has stopped learning measurably -------------


def _learns_until(stop: int) -> Any:
    return lambda i, s: 1.0 if s < stop else 0.0


@pytest.mark.parametrize("rule", MEASURED)
def test_pace_freezes_front_to_back_once_learning_stops(rule: str) -> None:
    for seed in range(3):
        # the same run without pace freezes nothing: after step 100 it is pure noise
        af, _, _ = _contribution_run(320, _learns_until(100), seed, rule=rule)
        assert af.frozen == [] and af.pace == 0
        af, model, _ = _contribution_run(320, _learns_until(100), seed, rule=rule, pace=1)
        moves = [(d.step, d.froze, d.paced) for d in af.history if d.froze]
        assert [m[1:] for m in moves] == [(["0"], True), (["2"], True), (["4"], True)], moves
        # one stage per decision, after the pooled windows no longer show learning
        steps = [m[0] for m in moves]
        assert steps == list(range(steps[0], steps[0] + 3 * 8, 8)) and steps[0] > 100
        for d in af.history:
            if d.froze:  # each paced decision saw no stage learning measurably
                assert max(v for v in d.contribution if v is not None) < 5.0
        _frozen_prefix_holds(model, af)
        two, model, _ = _contribution_run(
            320, _learns_until(100), seed, rule=rule, pace=2, min_trainable=2
        )
        assert [d.froze for d in two.history if d.froze] == [["0", "2"]]  # 2 keep training
        _frozen_prefix_holds(model, two)


@pytest.mark.parametrize(
    "signal",
    [lambda i, s: 0.0, lambda i, s: 1.0],
    ids=["pure-noise", "all-learning"],
)
def test_pace_never_starts_on_noise_or_while_the_model_learns(signal: Any) -> None:
    for seed in range(4):
        af, model, _ = _contribution_run(320, signal, seed, rule="progress", pace=3)
        assert af.frozen == [] and not any(d.paced for d in af.history)
        assert all(_flags(model).values())


def test_pace_never_starts_on_noise_with_windows_of_one_step() -> None:
    # found by an adversarial probe: at every=1 two decisions share 30 of their 31 pooled
    # steps, so "t >= 5 twice in a row" was one chance event; the evidence must now hold for
    # 30 steps in a row (the probe's seeds 34, 134 and 180 froze 3 stages before)
    for seed in (34, 134, 180):
        af, _, _ = _contribution_run(600, lambda i, s: 0.0, seed, every=1, rule="progress", pace=2)
        assert af.frozen == [], seed
        assert max(v for d in af.history for v in d.contribution if v is not None) >= 5.0


def test_pace_resumes_bit_identical_across_a_paced_freeze(tmp_path: Path) -> None:
    kwargs: dict[str, Any] = {"rule": "progress", "pace": 1}
    total = 320
    ref_af, ref_model, _ = _contribution_run(total, _learns_until(100), 1, **kwargs)
    first = next(d.step for d in ref_af.history if d.froze)
    stop = first + 3  # after the first paced freeze, before the second
    af, model, opt = _contribution_run(stop, _learns_until(100), 1, **kwargs)
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "af": af.state_dict()}
    assert state["af"]["pace"] == 1 and state["af"]["evidence"][1:] == [1, 1]
    torch.save(state, tmp_path / "ckpt.pt")
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed, resumed_model, _ = _contribution_run(
        total, _learns_until(100), 1, state=loaded, start=stop, **kwargs
    )
    assert resumed.history == ref_af.history and resumed.frozen == ["0", "2", "4"]
    for (name, a), b in zip(ref_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name
    # without the counts it would wait for the evidence again: the record would differ
    forgot = dict(loaded, af=dict(loaded["af"], evidence=[0, 0, 0]))
    partial, _, _ = _contribution_run(
        total, _learns_until(100), 1, state=forgot, start=stop, **kwargs
    )
    assert partial.frozen == ["0"]
