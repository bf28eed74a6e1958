"""Property tests: random module trees, random selectors, exact round trips."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gradgate as gg
from cases import state_of

LEAVES: list[Callable[[], nn.Module]] = [
    lambda: nn.Linear(3, 3),
    lambda: nn.BatchNorm1d(3),
    lambda: nn.Dropout(0.2),
    lambda: nn.ReLU(),
    lambda: nn.LayerNorm(3),
]


@st.composite
def trees(draw: st.DrawFn, depth: int = 0) -> nn.Module:
    if depth >= 3 or (draw(st.booleans()) and depth > 0):
        return LEAVES[draw(st.integers(0, len(LEAVES) - 1))]()
    n = draw(st.integers(1, 3))
    return nn.Sequential(*[draw(trees(depth + 1)) for _ in range(n)])


@st.composite
def tree_and_selectors(draw: st.DrawFn) -> tuple[nn.Module, list[str], bool]:
    model = draw(trees())
    if draw(st.booleans()):
        model.eval()
    names = [n for n, _ in model.named_modules() if n] + [n for n, _ in model.named_parameters()]
    if not names:
        return model, [], draw(st.booleans())
    chosen = draw(st.lists(st.sampled_from(names), min_size=0, max_size=3, unique=True))
    return model, chosen, draw(st.booleans())


@settings(max_examples=60, deadline=None)
@given(data=tree_and_selectors(), action=st.sampled_from(["freeze", "train_only", "unfreeze"]))
def test_any_change_then_undo_restores_exact_state(
    data: tuple[nn.Module, list[str], bool], action: str
) -> None:
    model, selectors, prefreeze = data
    if prefreeze:
        gg.freeze(model)
    before = state_of(model)
    getattr(gg, action)(model, *selectors).undo()
    assert state_of(model) == before
    # Undo reverts the call, not the trainer's model.train() made meanwhile:
    # the model ends as if the call had never happened.
    reference = copy.deepcopy(model)
    handle = getattr(gg, action)(model, *selectors)
    model.train()
    reference.train()
    handle.undo()
    assert state_of(model) == state_of(reference)


@settings(max_examples=60, deadline=None)
@given(data=tree_and_selectors())
def test_summary_totals_add_up(data: tuple[nn.Module, list[str], bool]) -> None:
    model, selectors, _ = data
    gg.freeze(model, *selectors)
    s = gg.summary(model, depth=5)
    unique = {id(p): p for p in model.parameters()}
    assert s.total == sum(p.numel() for p in unique.values())
    assert s.trainable == sum(p.numel() for p in unique.values() if p.requires_grad)
    assert s.total == s.trainable + s.frozen
    root = s.rows[0]
    assert (root.params, root.trainable, root.frozen) == (s.total, s.trainable, s.frozen)
    for row in s.rows:
        assert row.params == row.trainable + row.frozen


@settings(max_examples=40, deadline=None)
@given(data=tree_and_selectors())
def test_context_manager_restores_on_exception(data: tuple[nn.Module, list[str], bool]) -> None:
    model, selectors, _ = data
    before = state_of(model)
    with pytest.raises(KeyError), gg.freeze(model, *selectors):
        raise KeyError("x")
    assert state_of(model) == before


@settings(max_examples=40, deadline=None)
@given(data=tree_and_selectors())
def test_frozen_selection_gets_no_gradient(data: tuple[nn.Module, list[str], bool]) -> None:
    model, selectors, _ = data
    wrapped = nn.Sequential(nn.Linear(3, 3), model)
    gg.freeze(model, *selectors)
    wrapped.train()
    wrapped(torch.randn(4, 3)).sum().backward()
    for _, p in gg.select(model, *selectors).named_parameters():
        assert p.grad is None
    assert gg.grad_report(wrapped).unexpected == []
