"""torch.compile and unfreezing: a layer made trainable after compiling must train.

torch 2.6-2.11 do not recompile on a ``requires_grad`` flip (pytorch issue
139476); gradgate resets dynamo there. These tests run on every torch in the
matrix (``.ci/matrix``): the same assertions hold on versions that recompile
by themselves.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import torch
from torch import nn

import gradgate as gg
from gradgate import _compile


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def _step(run: Callable[[torch.Tensor], torch.Tensor], net: nn.Sequential) -> None:
    net.zero_grad(set_to_none=True)
    run(torch.randn(16, 4)).pow(2).sum().backward()


@pytest.fixture(autouse=True)
def _fresh_dynamo(monkeypatch: pytest.MonkeyPatch) -> None:
    torch._dynamo.reset()
    monkeypatch.setattr(_compile, "_seen", [_compile.compiled_frames()])


def _compiled(net: nn.Sequential, how: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if how == "torch.compile":
        return torch.compile(net, backend="aot_eager")
    net.compile(backend="aot_eager")  # in place: the module itself is compiled
    return net


@pytest.mark.parametrize("how", ["torch.compile", "module.compile"])
@pytest.mark.parametrize("door", ["unfreeze", "train_only", "undo"])
def test_a_layer_unfrozen_after_compiling_gets_gradients_and_trains(how: str, door: str) -> None:
    net = _net()
    handle = gg.freeze(net, "0")
    run = _compiled(net, how)
    _step(run, net)  # compiled while layer 0 is frozen
    assert net[0].weight.grad is None and net[2].weight.grad is not None
    if door == "unfreeze":
        gg.unfreeze(net, "0")
    elif door == "train_only":
        gg.train_only(net, "0")
    else:
        handle.undo()
    before = net[0].weight.detach().clone()
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    _step(run, net)
    assert net[0].weight.grad is not None, f"torch {torch.__version__}: layer 0 got no gradient"
    opt.step()
    assert not torch.equal(net[0].weight, before)


def _count_resets(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = torch._dynamo.reset

    def counting_reset() -> None:
        calls.append(1)
        real()

    monkeypatch.setattr(torch._dynamo, "reset", counting_reset)
    monkeypatch.setattr(_compile, "AFFECTED", True)
    return calls


def test_reset_only_when_something_was_compiled_and_only_on_a_flip_to_trainable(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_compile, "_told", [False])
    calls = _count_resets(monkeypatch)
    net = _net()
    gg.freeze(net, "0")
    gg.unfreeze(net, "0")  # nothing compiled since the fixture's reset
    assert calls == []
    run = _compiled(net, "torch.compile")
    _step(run, net)
    gg.freeze(net, "0")  # freezing never needs it: the dropped gradient is right
    assert calls == []
    with caplog.at_level(logging.INFO, logger="gradgate"):
        gg.unfreeze(net, "0")
        assert calls == [1]
        gg.freeze(net, "0")
        gg.unfreeze(net, "0")  # nothing recompiled since: no second reset
        assert calls == [1]
        _step(run, net)  # recompiles
        gg.freeze(net, "0")
        gg.unfreeze(net, "0")
        assert calls == [1, 1]
    said = [r.getMessage() for r in caplog.records if "139476" in r.getMessage()]
    assert len(said) == 1 and "unfreeze made parameters trainable after torch.compile" in said[0]


def test_no_reset_on_a_torch_that_recompiles_by_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_resets(monkeypatch)
    monkeypatch.setattr(_compile, "AFFECTED", False)
    net = _net()
    gg.freeze(net, "0")
    _step(_compiled(net, "torch.compile"), net)
    gg.unfreeze(net, "0")
    assert calls == []


def test_the_affected_range_is_right_on_this_torch() -> None:
    """Without gradgate's reset, an affected torch really misses the flip (and only it)."""
    net = _net()
    for p in net[0].parameters():
        p.requires_grad_(False)  # by hand: no gradgate notice, no reset
    run = _compiled(net, "torch.compile")
    _step(run, net)
    for p in net[0].parameters():
        p.requires_grad_(True)
    _step(run, net)
    missed = net[0].weight.grad is None
    assert missed == _compile.AFFECTED, f"torch {torch.__version__}: missed the flip: {missed}"
