from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradgate as gg
from cases import CASES, Case
from gradgate.tools.agent import Agent


def _step(agent: nn.Module, opt: torch.optim.Optimizer, set_to_none: bool = True) -> None:
    loss = F.cross_entropy(agent(torch.randn(8, 3, 28, 28)), torch.randint(0, 10, (8,)))
    opt.zero_grad(set_to_none=set_to_none)
    loss.backward()
    opt.step()


def test_fingerprint_is_exact_and_device_independent() -> None:
    agent = Agent()
    fp = gg.fingerprint(agent)
    copy = Agent()
    assert gg.fingerprint(copy) != fp  # a fresh init differs, so the next equality means something
    copy.load_state_dict(agent.state_dict())
    assert gg.fingerprint(copy) == fp  # another object with the same values: the same digest
    assert gg.fingerprint(agent.state_dict()) == gg.fingerprint(copy.state_dict())
    with torch.no_grad():
        w = agent.front_end.conv1.weight
        bits = w.view(torch.int32)
        bits[0, 0, 0, 0] ^= 1  # one flipped bit
    assert gg.fingerprint(agent) != fp
    named = [("a", torch.ones(2)), ("b", torch.zeros(3))]
    assert gg.fingerprint(named) != gg.fingerprint([("a", torch.ones(2)), ("c", torch.zeros(3))])
    assert gg.fingerprint(named) != gg.fingerprint([("a", torch.ones(2, dtype=torch.float64))])
    assert gg.fingerprint({"x": torch.ones(2, 2)}) != gg.fingerprint({"x": torch.ones(4)})
    assert gg.fingerprint({"x": torch.ones(2, dtype=torch.bfloat16)})


def test_guard_silent_for_a_correct_run() -> None:
    agent = Agent()
    gg.freeze(agent, "front_end")
    opt = torch.optim.AdamW(gg.trainable_parameters(agent), lr=1e-3, weight_decay=0.1)
    before = gg.fingerprint(agent.front_end)
    with gg.guard(agent, opt, check="both") as g:
        for _ in range(50):
            agent.train()
            _step(agent, opt)
    assert g.steps == 50 and g.violations == []
    assert gg.fingerprint(agent.front_end) == before


def test_guard_catches_stale_adam_state() -> None:
    agent = Agent()
    opt = torch.optim.Adam(agent.parameters(), lr=1e-2)
    _step(agent, opt, set_to_none=False)
    for p in agent.front_end.parameters():  # frozen by hand mid-run, no sync
        p.requires_grad_(False)
    with pytest.raises(gg.FrozenTensorChangedError) as info, gg.guard(agent, opt):
        _step(agent, opt, set_to_none=False)  # zero-tensor grads: Adam moves them
    msg = str(info.value)
    assert "front_end.conv1.weight" in msg and "parameter" in msg
    assert "step 1" in msg and "Adam still holds it" in msg and "exp_avg" in msg


def test_guard_catches_weight_decay_on_zero_gradient() -> None:
    agent = Agent()
    gg.freeze(agent, "front_end")
    opt = torch.optim.AdamW(agent.parameters(), lr=1e-2, weight_decay=0.5)
    for p in agent.front_end.parameters():
        p.grad = torch.zeros_like(p)
    with (
        pytest.raises(gg.FrozenTensorChangedError, match=r"weight_decay=0\.5"),
        gg.guard(agent, opt),
    ):
        agent(torch.randn(2, 3, 28, 28)).sum().backward()
        opt.step()


def test_guard_catches_batchnorm_under_mode_keep() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 1))
    gg.freeze(model, "0", "1", mode="keep")
    opt = torch.optim.SGD(gg.trainable_parameters(model), lr=0.1)
    model.train()
    with pytest.raises(gg.FrozenTensorChangedError) as info, gg.guard(model, opt):
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
    assert "buffer '1." in str(info.value) and "BatchNorm1d" in str(info.value)
    assert "training mode" in str(info.value)


def test_data_write_caught_by_exact_only() -> None:
    agent = Agent()
    gg.freeze(agent, "front_end")
    opt = torch.optim.SGD(gg.trainable_parameters(agent), lr=0.1)
    with gg.guard(agent, opt, check="fast"):  # documented blind spot of "fast"
        agent.front_end.conv1.weight.data.add_(1.0)
        _step(agent, opt)
    with (
        pytest.raises(gg.FrozenTensorChangedError, match=r"\.data"),
        gg.guard(agent, opt, check="exact"),
    ):
        agent.front_end.conv1.weight.data.add_(1.0)
        _step(agent, opt)


def test_guard_catches_load_state_dict_overwrite() -> None:
    agent = Agent()
    gg.freeze(agent, "front_end")
    other = Agent()
    with (
        pytest.raises(gg.FrozenTensorChangedError, match=r"front_end\.conv1\.weight"),
        gg.guard(agent),
    ):
        agent.load_state_dict(other.state_dict())


def test_guard_warn_mode_and_every() -> None:
    agent = Agent()
    gg.freeze(agent, "front_end")
    opt = torch.optim.SGD(gg.trainable_parameters(agent), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gg.guard(agent, opt, check="exact", every=3, on_violation="warn") as g:
            agent.front_end.conv2.weight.data.zero_()
            _step(agent, opt)
            assert g.violations == []  # exact check only every 3 steps
            _step(agent, opt)
            _step(agent, opt)
            assert len(g.violations) == 1
    assert any("front_end.conv2.weight" in str(w.message) for w in caught)


def test_guard_with_grad_scaler_and_accumulation() -> None:
    agent = Agent()
    gg.freeze(agent, "front_end")
    opt = torch.optim.Adam(gg.trainable_parameters(agent), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    with gg.guard(agent, opt) as g:
        for i in range(4):
            x = torch.randn(4, 3, 28, 28)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = agent(x).float().pow(2).mean()
            scaler.scale(loss).backward()
            if i % 2 == 1:
                scaler.step(opt)
                scaler.update()
                opt.zero_grad()
    assert g.steps == 2


def test_guard_with_compiled_model_and_two_optimizers() -> None:
    agent = Agent()
    gg.freeze(agent, "front_end")
    compiled = torch.compile(agent, backend="aot_eager")
    opt1 = torch.optim.SGD(agent.back_end.fc1.parameters(), lr=0.1)
    opt2 = torch.optim.Adam(agent.back_end.fc2.parameters(), lr=0.1)
    with gg.guard(compiled, [opt1, opt2], check="both") as g:  # type: ignore[arg-type]
        compiled(torch.randn(2, 3, 28, 28)).sum().backward()
        opt1.step()
        opt2.step()
    assert g.steps == 2


def test_guard_argument_validation() -> None:
    agent = Agent()
    with pytest.raises(gg.InvalidArgumentError, match="check must be one of"):
        gg.guard(agent, check="slow")  # type: ignore[arg-type]
    with pytest.raises(gg.InvalidArgumentError, match="every"):
        gg.guard(agent, every=0)
    with pytest.raises(gg.InvalidArgumentError, match="optimizer"):
        gg.guard(agent, [object()])  # type: ignore[list-item]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_guard_over_cases(case: Case) -> None:
    model = case.factory()
    gg.freeze(model, *case.selectors)
    opt = torch.optim.AdamW(gg.trainable_parameters(model), lr=1e-2, weight_decay=0.1)
    frozen = gg.fingerprint([(n, p) for n, p in model.named_parameters() if not p.requires_grad])
    with gg.guard(model, opt, check="both"):
        for _ in range(3):
            model.train()
            model(case.make_input()).float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    assert frozen == gg.fingerprint(
        [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    )


def test_fingerprint_agrees_with_torch_iterators_over_cases() -> None:
    # The iterative walk must give the digest torch's own (recursive) iterators give.
    for case in CASES:
        model = case.factory()
        seen: set[int] = set()
        pairs = []
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if id(t) not in seen:
                seen.add(id(t))
                pairs.append((name, t))
        assert gg.fingerprint(model) == gg.fingerprint(pairs), case.name


def _frozen_head() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 1))
    gg.freeze(model, "0", "1")
    return model


def test_guard_catches_load_state_dict_assign() -> None:
    model = _frozen_head()
    same_values = {k: v.clone() for k, v in model.state_dict().items()}
    with (
        pytest.raises(gg.FrozenTensorChangedError, match=r"'0\.weight' .*replaced.*assign=True"),
        gg.guard(model, check="both"),
    ):
        model.load_state_dict(same_values, assign=True)  # no version bump, equal values


@pytest.mark.parametrize("what", ["parameter", "buffer", "module", "delete"])
def test_guard_catches_a_new_tensor_under_a_frozen_name(what: str) -> None:
    model = _frozen_head()
    guard = gg.guard(model)
    guard.__enter__()
    if what == "parameter":
        model[0].weight = nn.Parameter(
            model.get_parameter("0.weight").detach(), requires_grad=False
        )
        pattern = r"frozen parameter '0\.weight' .*replaced by another tensor"
    elif what == "buffer":
        model[1].running_mean = torch.ones(3)
        pattern = r"frozen buffer '1\.running_mean' .*replaced by another tensor"
    elif what == "module":
        model[0] = nn.Linear(3, 3).requires_grad_(False)
        pattern = r"frozen parameter '0\.weight' .*replaced by another tensor"
    else:
        del model[0].bias
        pattern = r"frozen parameter '0\.bias' .*was removed"
    with pytest.raises(gg.FrozenTensorChangedError, match=pattern):
        guard.__exit__(None, None, None)


def test_guard_warn_mode_reports_a_replacement_once_then_watches_the_new_tensor() -> None:
    model = _frozen_head()
    with pytest.warns(RuntimeWarning) as caught, gg.guard(model, on_violation="warn") as g:
        model[0].weight = nn.Parameter(torch.zeros(3, 3), requires_grad=False)
        g.check()
        g.check()  # the same replacement is not reported twice
        assert len(g.violations) == 1
        with torch.no_grad():
            model[0].weight.add_(1)  # the new tensor is watched now
        g.check()
    assert len(g.violations) == 2 and "written in place" in g.violations[1]
    assert [str(w.message) for w in caught] == g.violations
    assert "replaced by another tensor" in g.violations[0]


def test_exact_check_blames_weight_decay_on_the_optimizer_step() -> None:
    model = _frozen_head()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5)
    model(torch.randn(4, 3)).sum().backward()
    model[0].weight.grad = torch.zeros(3, 3)  # the zero-gradient trap
    with pytest.raises(gg.FrozenTensorChangedError) as info, gg.guard(model, opt, check="exact"):
        opt.step()
    msg = str(info.value)
    assert "'0.weight'" in msg and "after optimizer step 1" in msg
    assert "written in place" in msg and ".data" not in msg
    assert "optimizer step (weight decay/momentum with a zero or stale gradient)" in msg
    assert "AdamW still holds it" in msg and "weight_decay=0.5" in msg


def test_exact_check_blames_a_data_write_on_data() -> None:
    model = _frozen_head()
    opt = torch.optim.SGD(gg.trainable_parameters(model), lr=0.1)
    with (
        pytest.raises(
            gg.FrozenTensorChangedError, match=r"without an in-place version bump.*\.data"
        ),
        gg.guard(model, opt, check="exact"),
    ):
        model.get_parameter("0.weight").data.mul_(2)
        opt.step()


def test_a_buffer_rewritten_with_the_same_values_is_not_a_violation_in_any_mode() -> None:
    """DDP (torch 2.8) rewrites every buffer in place at each forward with the same values."""
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    gg.freeze(model, "0", "1")
    opt = torch.optim.SGD(gg.trainable_parameters(model), lr=0.1)
    mean = model.get_buffer("1.running_mean")
    for check in ("fast", "exact"):
        with gg.guard(model, opt, check=check) as g, torch.no_grad():
            for _ in range(3):
                mean.copy_(mean.clone())  # what DDP's buffer broadcast does
                opt.step()
        assert g.violations == [], check
    with (
        pytest.raises(gg.FrozenTensorChangedError, match=r"'1\.running_mean'.*written in place"),
        gg.guard(model, opt),
        torch.no_grad(),
    ):
        mean.copy_(mean.clone())
        opt.step()  # the same values: accepted
        mean.add_(1.0)  # other values: reported
        opt.step()


def test_exact_check_ignores_a_version_bump_that_keeps_the_values() -> None:
    model = _frozen_head()
    weight = model.get_parameter("0.weight")
    with gg.guard(model, check="exact") as g, torch.no_grad():
        weight.copy_(weight.clone())
    assert g.violations == []
    with (
        pytest.raises(gg.FrozenTensorChangedError, match="written in place"),
        gg.guard(model),
        torch.no_grad(),
    ):
        weight.copy_(weight.clone())


def accelerated(opt: torch.optim.Optimizer) -> Any:
    """accelerate's AcceleratedOptimizer (what the HF Trainer hands out), and how it steps."""
    from accelerate import Accelerator  # type: ignore[import-untyped]

    wrapped = Accelerator(cpu=True).prepare_optimizer(opt)
    return wrapped, wrapped.step


def lightning(opt: torch.optim.Optimizer) -> Any:
    """Lightning's LightningOptimizer; its strategy steps the optimizer it wraps."""
    from lightning.pytorch.core.optimizer import LightningOptimizer

    return LightningOptimizer(opt), opt.step


@pytest.mark.parametrize("wrap", [accelerated, lightning], ids=["accelerate", "lightning"])
def test_guard_through_optimizer_wrappers(wrap: Any) -> None:
    model = _frozen_head()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.1)
    wrapped, step = wrap(opt)
    assert wrapped is not opt
    model(torch.randn(4, 3)).sum().backward()
    model[0].weight.grad = torch.zeros(3, 3)
    with (
        pytest.raises(
            gg.FrozenTensorChangedError, match=r"after optimizer step 1.*SGD still holds"
        ),
        gg.guard(model, wrapped) as g,
    ):
        step()
    assert g.steps == 1  # the hook sits on the real optimizer, so the wrapper's step is seen


def test_guard_rejects_what_is_no_optimizer_even_behind_dot_optimizer() -> None:
    class Box:
        optimizer = "adam"

    with pytest.raises(gg.InvalidArgumentError, match="got Box"):
        gg.guard(nn.Linear(1, 1), Box())  # type: ignore[arg-type]


def _two_stage() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)
    )


def test_one_guard_spans_a_gradual_unfreeze_run() -> None:
    model = _two_stage()
    stages = [["0", "1"], ["2", "3"], ["4"]]
    gg.freeze(model, "0", "1", "2", "3")
    opt = torch.optim.AdamW(gg.param_groups(model, lr=1e-2, weight_decay=0.1))
    sched = gg.GradualUnfreeze(model, stages, at=[2, 1, 0], optimizer=opt)
    first = gg.fingerprint([(n, p) for n, p in model.named_parameters() if n.startswith("0.")])
    with gg.guard(model, opt, check="both") as g:
        for epoch in range(3):
            sched.step(epoch)
            model.train()
            for _ in range(2):
                model(torch.randn(8, 4)).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
            if epoch < 2:  # stage 0 still frozen: bit-identical
                assert first == gg.fingerprint(
                    [(n, p) for n, p in model.named_parameters() if n.startswith("0.")]
                )
    assert g.steps == 6 and g.violations == []
    assert first != gg.fingerprint(
        [(n, p) for n, p in model.named_parameters() if n.startswith("0.")]
    )  # stage 0 trained in the last epoch, under the same guard


def test_guard_watches_what_is_frozen_while_it_runs_by_model_names() -> None:
    model = _two_stage()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(8, 4)).pow(2).mean().backward()
    opt.step()  # momentum buffers exist for every parameter
    with gg.guard(model, opt) as g:
        gg.freeze(model[2], "weight")  # announced for a submodule: mapped to '2.weight'
        model[2].weight.grad = torch.zeros(4, 4)  # a stale zero gradient, as zero_grad leaves
        with pytest.raises(gg.FrozenTensorChangedError) as info:
            opt.step()  # momentum keeps moving the just-frozen weight (no sync)
        assert "'2.weight'" in str(info.value) and "SGD still holds it" in str(info.value)
        assert "momentum_buffer" in str(info.value)
    assert g.steps == 1


def test_a_freeze_inside_the_guard_takes_its_baseline_at_the_freeze() -> None:
    model = _two_stage()
    weight = model.get_parameter("0.weight")
    with gg.guard(model, check="both") as g:
        with torch.no_grad():
            weight.add_(1)  # trainable at this point: allowed
        gg.freeze(model, "0")
        g.check()
        with torch.no_grad():
            weight.add_(1)  # frozen now: a violation
        with pytest.raises(gg.FrozenTensorChangedError, match=r"'0\.weight'"):
            g.check()
        gg.unfreeze(model, "0")  # through gradgate: leaves the watch at once


def test_a_parameter_unfrozen_behind_gradgates_back_stays_watched() -> None:
    model = _frozen_head()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(gg.FrozenTensorChangedError) as info, gg.guard(model, opt):
        model[0].weight.requires_grad_(True)  # not through gg.unfreeze
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
    assert "'0.weight'" in str(info.value) and "outside gradgate" in str(info.value)


def test_unfreeze_and_undo_through_gradgate_release_parameters_and_buffers() -> None:
    model = _frozen_head()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gg.guard(model, opt) as g:
        with gg.unfreeze(model, "0", "1"):
            model.train()
            model(torch.randn(4, 3)).sum().backward()
            opt.step()  # BatchNorm statistics and weights move: they train now
            opt.zero_grad()
        # undo froze them again, with a new baseline
        model.train()
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
    assert g.steps == 2 and g.violations == []


def test_guard_is_not_subscribed_after_exit() -> None:
    from gradgate import _events

    model = _frozen_head()
    listeners = len(_events._listeners)
    with gg.guard(model):
        assert len(_events._listeners) == listeners + 1
    assert len(_events._listeners) == listeners


def test_fast_guard_sees_a_replacement_at_the_next_step_and_leaves_no_global_hook() -> None:
    import torch.nn.modules.module as torch_module

    hooks = len(torch_module._global_parameter_registration_hooks)
    model = _frozen_head()
    opt = torch.optim.SGD(gg.trainable_parameters(model), lr=0.1)
    with gg.guard(model, opt) as g:
        opt.step()
        model[0].weight = nn.Parameter(torch.zeros(3, 3), requires_grad=False)
        with pytest.raises(
            gg.FrozenTensorChangedError, match=r"'0\.weight' changed after optimizer step 2"
        ):
            opt.step()
        opt.step()  # reported once; the new tensor is the baseline now
    assert g.steps == 3
    assert len(torch_module._global_parameter_registration_hooks) == hooks


def test_a_guard_never_entered_warns_at_the_first_step_and_watches_nothing() -> None:
    model = _frozen_head()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.1)
    g = gg.guard(model, opt)  # the mistake: no ``with``
    model(torch.ones(2, 3)).sum().backward()
    model[0].weight.grad = torch.zeros(3, 3)
    with pytest.warns(RuntimeWarning, match=r"an optimizer step ran but gg\.guard\(Sequential"):
        opt.step()
    assert g.steps == 0 and g.violations == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # warned once; the hook is gone
        del g


def test_a_guard_dropped_without_being_entered_warns() -> None:
    model = _frozen_head()
    with pytest.warns(RuntimeWarning, match="the guard was dropped but gg.guard"):
        gg.guard(model)


@pytest.mark.parametrize("how", ["with", "enter"])
def test_an_entered_guard_never_warns_that_it_was_not_entered(how: str) -> None:
    model = _frozen_head()
    opt = torch.optim.SGD(gg.trainable_parameters(model), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = gg.guard(model, opt)
        if how == "with":
            with g:
                opt.step()
        else:
            g.__enter__()
            opt.step()
            g.__exit__(None, None, None)
        opt.step()
        assert g.steps == 1
        del g
