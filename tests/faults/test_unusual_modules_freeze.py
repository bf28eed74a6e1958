"""freeze/select/summary on unusual modules: lazy, sparse, complex, TorchScript, deep, odd names."""

from __future__ import annotations

from typing import Literal

import pytest
import torch
from torch import nn

import gradgate as gg
from cases import state_of


def test_uninitialised_lazy_module_freezes_and_stays_frozen_after_materialising() -> None:
    model = nn.Sequential(nn.LazyLinear(3), nn.Linear(3, 2))
    sel = gg.select(model, "0")
    assert sel.parameters == ["0.weight", "0.bias"] and sel.numel == 0
    gg.freeze(model, "0")
    s = gg.summary(model)
    assert s.total == s.trainable == 3 * 2 + 2  # the lazy tensors have no elements yet
    model(torch.randn(4, 5))
    assert not model[0].weight.requires_grad and model[0].weight.shape == (3, 5)
    assert model[1].weight.requires_grad
    handle = gg.freeze(nn.Sequential(nn.LazyLinear(2)))
    handle.undo()
    assert all(p.requires_grad for p in handle.model.parameters())


def test_sparse_embedding_freezes_and_gets_no_gradient() -> None:
    model = nn.Sequential(nn.Embedding(10, 3, sparse=True), nn.Linear(3, 2))
    gg.freeze(model, "0")
    model(torch.tensor([1, 2, 3])).sum().backward()
    assert model[0].weight.grad is None and model[1].weight.grad is not None
    s = gg.summary(model)
    assert (s.frozen, s.trainable) == (30, 8)
    assert gg.grad_report(model).ok


def test_complex128_parameters_freeze_and_train_again() -> None:
    model = nn.Linear(2, 2, dtype=torch.complex128)
    handle = gg.freeze(model)
    assert handle.frozen == ["weight", "bias"]
    assert gg.unfreeze(model).unfrozen == ["weight", "bias"]
    assert gg.summary(model).trainable == 6


def test_torchscript_module_is_refused_in_eval_modes_and_left_unchanged() -> None:
    scripted = torch.jit.script(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))
    model = nn.Sequential(nn.Linear(2, 2), scripted)
    model.train()
    before = state_of(model)
    modes: list[Literal["eval", "norm"]] = ["eval", "norm"]
    for mode in modes:
        with pytest.raises(gg.InvalidArgumentError, match=r"TorchScript module '1(\.1)?'") as info:
            gg.freeze(model, "1", mode=mode)
        assert "mode='keep'" in str(info.value) and isinstance(info.value, ValueError)
        assert state_of(model) == before
    with pytest.raises(gg.InvalidArgumentError, match="TorchScript"):
        gg.train_only(model, "0")
    assert state_of(model) == before
    # mode="keep" freezes the flags; summary reports the C++ side's own mode
    gg.freeze(model, "1", mode="keep")
    scripted.eval()
    rows = {r.path: r for r in gg.summary(model).rows}
    assert rows["1"].state == "frozen" and rows["1"].mode == "eval"
    assert not any(p.requires_grad for p in scripted.parameters())
    # the freezable Python part still goes sticky
    gg.freeze(model, "0")
    assert gg.is_sticky(model[0])


def _chain(depth: int) -> nn.Module:
    model: nn.Module = nn.Linear(2, 2)
    for _ in range(depth):
        model = nn.Sequential(model)
    return model


def test_a_3000_deep_chain_freezes_selects_and_summarises() -> None:
    model = _chain(3000)
    assert len(gg.select(model, "**.weight").parameters) == 1
    handle = gg.freeze(model)
    assert len(handle.frozen) == 2
    s = gg.summary(model, depth=3000)
    assert len(s.rows) == 3001 and s.frozen == 6
    assert all(r.mode == "eval (sticky)" for r in s.rows)
    handle.undo()
    assert gg.summary(model, depth=1).trainable == 6
    gg.train_only(model, "**.bias")
    assert [r.mode for r in gg.summary(model, depth=3000).rows].count("eval (sticky)") == 0


def test_module_name_with_a_newline_freezes_exactly_that_module() -> None:
    model = nn.ModuleDict({"x\ny": nn.Linear(2, 2), "x": nn.Linear(2, 2), "y": nn.Linear(2, 2)})
    gg.freeze(model, "y")
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == ["y.weight", "y.bias"]
    rows = {r.path: r for r in gg.summary(model).rows}
    assert rows["x\ny"].state == "trainable" and rows["y"].state == "frozen"
