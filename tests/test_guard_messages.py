"""The guard's message says what it knows and blames no optimizer that skipped the tensor."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradgate as gg


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))


def _first(model: nn.Sequential) -> nn.Linear:
    first = model[0]
    assert isinstance(first, nn.Linear)
    return first


def test_users_own_write_to_a_held_tensor_without_gradient_is_not_blamed_on_adamw() -> None:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()  # AdamW has state for every parameter
    for p in model[0].parameters():  # frozen by hand, no sync: AdamW still holds them
        p.requires_grad_(False)
    opt.zero_grad(set_to_none=True)
    with pytest.raises(gg.FrozenTensorChangedError) as info, gg.guard(model, opt):
        model(torch.randn(4, 3)).sum().backward()
        with torch.no_grad():
            _first(model).weight.add_(1.0)  # the user's own write
        opt.step()  # AdamW skips 0.weight: it has no gradient
    msg = str(info.value)
    # Before: "optimizer step ... AdamW ... moves it even with a zero or missing gradient".
    assert "'0.weight'" in msg and "after optimizer step 1" in msg
    assert "AdamW still holds it (state: exp_avg, exp_avg_sq, step; weight_decay=0.5)" in msg
    assert "it has no gradient and AdamW skips a tensor without one" in msg
    assert "the write came from other code" in msg
    assert "moves it" not in msg and "Likely cause: optimizer step" not in msg


def test_a_held_tensor_with_a_zero_gradient_is_still_blamed_on_the_step() -> None:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5)
    model(torch.randn(4, 3)).sum().backward()
    model[0].weight.requires_grad_(False)
    model[0].weight.grad = torch.zeros(3, 3)
    with pytest.raises(gg.FrozenTensorChangedError) as info, gg.guard(model, opt):
        opt.step()
    msg = str(info.value)
    assert "Likely cause: optimizer step" in msg and "with an all-zero gradient" in msg
    assert "AdamW still holds it" in msg


def test_an_on_demand_check_does_not_guess_which_wrote_it() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    model[0].weight.requires_grad_(False)
    with gg.guard(model, opt, on_violation="warn") as g:
        with torch.no_grad():
            _first(model).weight.mul_(2.0)
        with pytest.warns(RuntimeWarning):
            g.check()
    msg = g.violations[0]
    assert "'0.weight'" in msg and "SGD still holds it" in msg
    assert "stale non-zero gradient" in msg and "unknown" in msg
    assert "Likely cause" not in msg


def test_a_tensor_no_optimizer_holds_says_so() -> None:
    model = _model()
    gg.freeze(model, "0")
    opt = torch.optim.SGD(gg.trainable_parameters(model), lr=0.1)
    with pytest.raises(gg.FrozenTensorChangedError) as info, gg.guard(model, opt):
        with torch.no_grad():
            _first(model).bias.add_(1.0)
        opt.step()
    assert "No optimizer under the guard holds it" in str(info.value)
