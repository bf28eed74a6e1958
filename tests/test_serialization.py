"""A frozen model keeps working with deepcopy, torch.save, state_dict, compile and AMP."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import gradgate as gg
from cases import CASES, Case, state_of
from gradgate.tools.agent import Agent


@pytest.mark.parametrize("case", CASES, ids=str)
def test_deepcopy_keeps_freeze_and_sticky_mode(case: Case) -> None:
    model = case.factory()
    gg.freeze(model, *case.selectors)
    clone = copy.deepcopy(model)
    assert state_of(clone) == state_of(model)
    clone.train()
    model.train()
    assert state_of(clone) == state_of(model)
    # the sticky mark points at the clone, not at the original
    for m in clone.modules():
        if gg.is_sticky(m):
            assert m.__dict__["train"].module is m


@pytest.mark.parametrize("case", CASES, ids=str)
def test_torch_save_whole_model(case: Case) -> None:
    model = case.factory()
    gg.freeze(model, *case.selectors)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    loaded.train()
    model.train()
    assert state_of(loaded) == state_of(model)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_state_dict_keys_unchanged(case: Case) -> None:
    model = case.factory()
    keys = list(model.state_dict())
    gg.freeze(model, *case.selectors)
    sd = model.state_dict()
    assert list(sd) == keys
    fresh = case.factory()
    fresh.load_state_dict(sd)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), sd.values()))


def test_torch_compile_gives_eager_gradients() -> None:
    torch.manual_seed(0)
    eager = Agent()
    gg.freeze(eager, "front_end")
    compiled_src = copy.deepcopy(eager)
    compiled = torch.compile(compiled_src, backend="aot_eager")
    x = torch.randn(4, 3, 28, 28)
    eager(x).pow(2).sum().backward()
    compiled(x).pow(2).sum().backward()
    for (name, a), b in zip(eager.named_parameters(), compiled_src.parameters()):
        if a.requires_grad:
            assert b.grad is not None and torch.allclose(a.grad, b.grad, atol=1e-5), name  # type: ignore[arg-type]
        else:
            assert b.grad is None, name


def test_autocast_with_frozen_front_end() -> None:
    agent = Agent()
    gg.freeze(agent, "front_end")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = agent(torch.randn(2, 3, 28, 28))
    out.float().sum().backward()
    assert all(p.grad is None for p in agent.front_end.parameters())
    assert all(p.grad is not None for p in agent.back_end.parameters())
