from __future__ import annotations

import warnings
from typing import Literal

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradgate as gg
from cases import CASES, Case, TiedLM, state_of
from gradgate.freezing import frozen_modules
from gradgate.tools.agent import Agent


def _backward(model: nn.Module, case: Case) -> None:
    out = model(case.make_input())
    out.float().pow(2).mean().backward()


# -- the seed's three examples, done with gradgate ---------------------------


def test_seed_example_freeze_front_end() -> None:
    agent = Agent()
    gg.freeze(agent, "front_end")
    opt = torch.optim.Adam(gg.trainable_parameters(agent), lr=1e-3)
    before = [p.clone() for p in agent.front_end.parameters()]
    loss = F.cross_entropy(agent(torch.randn(4, 3, 28, 28)), torch.randint(0, 10, (4,)))
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert all(p.grad is None for p in agent.front_end.parameters())
    assert all(p.grad is not None for p in agent.back_end.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, agent.front_end.parameters()))


def test_title_direction_gradients_only_for_front_end() -> None:
    agent = Agent()
    gg.train_only(agent, "front_end")
    x = torch.randn(4, 3, 28, 28, requires_grad=True)
    agent(x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in agent.front_end.parameters())
    assert all(p.grad is None for p in agent.back_end.parameters())
    assert x.grad is not None  # gradients flowed through the frozen back-end


def test_frozen_middle_trainable_ends() -> None:
    first, middle, last = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
    model = nn.Sequential(first, middle, last)
    gg.freeze(model, "1")
    model(torch.randn(3, 4)).sum().backward()
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0
    assert middle.weight.grad is None
    assert last.weight.grad is not None


# -- the shared table of cases ----------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=str)
def test_freeze_then_undo_restores_exactly(case: Case) -> None:
    model = case.factory()
    model.train()
    before = state_of(model)
    handle = gg.freeze(model, *case.selectors)
    sel = gg.select(model, *case.selectors)
    assert all(not p.requires_grad for _, p in sel.named_parameters())
    assert state_of(model) != before
    handle.undo()
    assert state_of(model) == before


@pytest.mark.parametrize("case", CASES, ids=str)
def test_context_manager_restores_on_exception(case: Case) -> None:
    model = case.factory()
    before = state_of(model)
    with pytest.raises(RuntimeError, match="boom"), gg.train_only(model, *case.selectors):
        assert state_of(model) != before
        raise RuntimeError("boom")
    assert state_of(model) == before


@pytest.mark.parametrize("case", CASES, ids=str)
def test_gradients_only_where_trainable(case: Case) -> None:
    model = case.factory()
    gg.freeze(model, *case.selectors)
    _backward(model, case)
    report = gg.grad_report(model)
    assert report.unexpected == []
    for _, p in gg.select(model, *case.selectors).named_parameters():
        assert p.grad is None


@pytest.mark.parametrize("case", CASES, ids=str)
def test_train_only_then_model_train_keeps_frozen_in_eval(case: Case) -> None:
    model = case.factory()
    gg.train_only(model, *case.selectors)
    model.train()
    for name, module in frozen_modules(model):
        assert not module.training, name
    sel = gg.select(model, *case.selectors)
    for name in sel.modules:
        assert dict(model.named_modules())[name].training


# -- sticky inference mode ---------------------------------------------------


def test_batchnorm_statistics_bit_identical_after_training() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(2, 3, 6, 6))
    gg.freeze(model, "0", "1")
    stats = {k: v.clone() for k, v in model[1].state_dict().items()}
    opt = torch.optim.SGD(gg.trainable_parameters(model), lr=0.1, momentum=0.9)
    for _ in range(10):
        model.train()
        assert model[1].training is False
        loss = model(torch.randn(8, 3, 6, 6) * 3 + 1).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for k, v in model[1].state_dict().items():
        assert torch.equal(v, stats[k]), k


def test_mode_keep_lets_batchnorm_statistics_move() -> None:
    bn = nn.BatchNorm1d(3)
    model = nn.Sequential(bn, nn.Linear(3, 1))
    gg.freeze(model, "0", mode="keep")
    model.train()
    assert bn.running_mean is not None
    mean = bn.running_mean.clone()
    model(torch.randn(8, 3) + 5)
    assert bn.training
    assert not torch.equal(mean, bn.running_mean)


def test_dropout_off_in_frozen_part() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2))
    gg.freeze(model, "0", "1")
    model.train()
    x = torch.randn(5, 4)
    assert torch.equal(model[:2](x), model[:2](x))
    assert not model[1].training and model[2].training


def test_unfreeze_releases_sticky_mode() -> None:
    agent = Agent()
    gg.freeze(agent, "front_end")
    agent.train()
    assert not agent.front_end.training
    gg.unfreeze(agent, "front_end")
    assert agent.front_end.training  # follows its parent again
    assert not gg.is_sticky(agent.front_end.relu1)
    agent.eval()
    agent.train()
    assert agent.front_end.conv1.training


def test_param_free_modules_outside_selection_untouched() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    gg.freeze(model, "0")
    assert not gg.is_sticky(model[1])
    assert model[1].training


def test_exclude_keeps_parent_partial_not_sticky() -> None:
    agent = Agent()
    gg.freeze(agent, "front_end", exclude="front_end.conv2")
    agent.train()
    assert agent.front_end.training
    assert not agent.front_end.conv1.training
    assert agent.front_end.conv2.weight.requires_grad


def test_freeze_clears_gradients() -> None:
    agent = Agent()
    agent(torch.randn(2, 3, 28, 28)).sum().backward()
    assert agent.front_end.conv1.weight.grad is not None
    gg.freeze(agent, "front_end")
    assert agent.front_end.conv1.weight.grad is None


def test_non_float_parameters_never_train() -> None:
    model = nn.Linear(2, 2)
    model.steps = nn.Parameter(torch.zeros(1, dtype=torch.long), requires_grad=False)
    gg.freeze(model)
    handle = gg.unfreeze(model)
    assert not model.steps.requires_grad
    assert handle.unfrozen == ["weight", "bias"]


# -- tied weights ------------------------------------------------------------


def test_shared_parameter_across_boundary_raises() -> None:
    model = TiedLM()
    before = state_of(model)
    with pytest.raises(gg.SharedParameterError) as info:
        gg.freeze(model, "embed")
    assert "'embed'" in str(info.value) and "'decoder'" in str(info.value)
    assert state_of(model) == before


@pytest.mark.parametrize(("shared", "trains"), [("freeze", False), ("train", True)])
def test_shared_choice(shared: Literal["freeze", "train"], trains: bool) -> None:
    model = TiedLM()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gg.freeze(model, "embed", shared=shared)
    assert model.embed.weight.requires_grad is trains
    # a freeze whose every parameter was handed to the trainable side says so
    assert [str(w.message)[:40] for w in caught] == (
        ["freeze('embed', shared='train') froze no"] if trains else []
    )
    model2 = TiedLM()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gg.train_only(model2, "decoder", shared=shared)
    assert [str(w.message)[:42] for w in caught] == (
        [] if trains else ["train_only('decoder', shared='freeze') tra"]
    )
    assert model2.decoder.weight.requires_grad is trains
    assert not model2.body[0].weight.requires_grad


def test_shared_inside_selection_is_fine() -> None:
    model = TiedLM()
    gg.freeze(model, "embed", "decoder")
    assert not model.embed.weight.requires_grad


# -- errors leave the model unchanged ----------------------------------------


def test_bad_mode_names_valid_values() -> None:
    agent = Agent()
    before = state_of(agent)
    with pytest.raises(
        gg.InvalidArgumentError, match="mode must be one of 'eval', 'norm', 'keep'; got 'evel'"
    ):
        gg.freeze(agent, "front_end", mode="evel")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shared must be one of"):
        gg.freeze(agent, "front_end", shared="both")  # type: ignore[arg-type]
    assert state_of(agent) == before


def test_failing_call_does_not_half_freeze() -> None:
    agent = Agent()
    before = state_of(agent)
    with pytest.raises(gg.NoMatchError, match="'back'"):
        gg.freeze(agent, "front_end", "back")
    assert state_of(agent) == before


def test_freezing_handle_reports_changes() -> None:
    agent = Agent()
    handle = gg.freeze(agent, "back_end.fc2")
    assert handle.frozen == ["back_end.fc2.weight", "back_end.fc2.bias"]
    assert "2 frozen" in repr(handle)
    again = gg.freeze(agent, "back_end.fc2")
    assert again.frozen == []


def test_trainable_parameter_helpers() -> None:
    agent = Agent()
    gg.freeze(agent, "front_end")
    names = [n for n, _ in gg.named_trainable_parameters(agent)]
    assert names == [n for n, p in agent.named_parameters() if n.startswith("back_end")]
    assert len(list(gg.trainable_parameters(agent))) == 4


def _bn_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), nn.Linear(4, 1)
    )


def _snapshot(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def _restore(model: nn.Module, modes: dict[str, bool]) -> None:
    """What Lightning does after validation: write each saved flag straight back."""
    for name, m in model.named_modules():
        m.training = modes[name]


def test_a_part_unfrozen_during_validation_trains_when_the_loop_trains_again() -> None:
    net = _bn_net()
    gg.freeze(net, "1")
    net.train()
    before_validation = _snapshot(net)  # "1" and its BN: False (sticky eval)
    net.eval()
    gg.unfreeze(net, "1")  # a validation-metric-driven unfreeze, in eval
    net(torch.randn(8, 4))  # the rest of validation runs in eval: so does "1"
    part, bn = net.get_submodule("1"), net.get_submodule("1.1")
    assert not part.training and not bn.training
    _restore(net, before_validation)  # Lightning writes back the pre-validation modes
    stats = bn.get_buffer("running_mean").clone()
    net(torch.randn(8, 4))  # the training loop's next forward
    assert part.training and bn.training  # follows the loop, not the snapshot
    assert not torch.equal(bn.get_buffer("running_mean"), stats)  # BatchNorm updates again
    assert not gg.is_sticky(part) and not gg.is_sticky(bn)


def test_an_explicit_mode_on_a_released_part_holds_and_undo_holds_it_again() -> None:
    net = _bn_net()
    gg.freeze(net, "1")
    net.train()
    handle = gg.unfreeze(net, "1")
    net[1].eval()  # the user's explicit choice settles it
    net(torch.randn(8, 4))
    assert net.training and not net[1].training
    net.train()
    assert net[1].training
    handle.undo()  # frozen again: held in eval whatever the parent does
    net.train()
    net(torch.randn(8, 4))
    assert gg.is_sticky(net[1]) and not net[1].training and not net.get_submodule("1.1").training


def test_a_released_part_that_is_frozen_again_follows_nothing() -> None:
    net = _bn_net()
    gg.freeze(net, "1")
    gg.unfreeze(net, "1")
    gg.freeze(net, "1")
    hooks = {n: [h.__name__ for h in m._forward_pre_hooks.values()] for n, m in net.named_modules()}
    assert hooks == {"": [], "0": [], "1": [], "1.0": [], "1.1": ["hold_eval"], "2": []}
    net.train()
    net(torch.randn(8, 4))
    assert not net[1].training and gg.is_sticky(net[1])
