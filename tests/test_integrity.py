from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradgate as gg
from cases import CASES, Case
from gradgate.tools.seed import Agent


def _step(agent: nn.Module, opt: torch.optim.Optimizer, set_to_none: bool = True) -> None:
    loss = F.cross_entropy(agent(torch.randn(8, 3, 28, 28)), torch.randint(0, 10, (8,)))
    opt.zero_grad(set_to_none=set_to_none)
    loss.backward()
    opt.step()


def test_fingerprint_is_exact_and_device_independent() -> None:
    agent = Agent()
    fp = gg.fingerprint(agent)
    assert fp == gg.fingerprint(Agent().load_state_dict(agent.state_dict()) and agent)
    assert gg.fingerprint(agent.state_dict()) != ""
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
    with pytest.raises(gg.FrozenTensorChanged) as info, gg.guard(agent, opt):
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
    with pytest.raises(gg.FrozenTensorChanged, match=r"weight_decay=0\.5"), gg.guard(agent, opt):
        agent(torch.randn(2, 3, 28, 28)).sum().backward()
        opt.step()


def test_guard_catches_batchnorm_under_mode_keep() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 1))
    gg.freeze(model, "0", "1", mode="keep")
    opt = torch.optim.SGD(gg.trainable_parameters(model), lr=0.1)
    model.train()
    with pytest.raises(gg.FrozenTensorChanged) as info, gg.guard(model, opt):
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
        pytest.raises(gg.FrozenTensorChanged, match=r"\.data"),
        gg.guard(agent, opt, check="exact"),
    ):
        agent.front_end.conv1.weight.data.add_(1.0)
        _step(agent, opt)


def test_guard_catches_load_state_dict_overwrite() -> None:
    agent = Agent()
    gg.freeze(agent, "front_end")
    other = Agent()
    with pytest.raises(gg.FrozenTensorChanged, match=r"front_end\.conv1\.weight"), gg.guard(agent):
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
        gg.guard(agent, check="slow")
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
