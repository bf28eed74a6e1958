"""``gg.param_groups``' no-decay set and ``gg.norms`` are one definition (issue 23.10)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradgate as gg


def _decay(groups: list[dict[str, object]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for g in groups:
        names = g["param_names"]
        assert isinstance(names, list)
        for n in names:
            out[n] = float(g["weight_decay"])  # type: ignore[arg-type]
    return out


class Block(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.input_layernorm = norm


def test_hf_rms_norms_get_no_decay_and_are_norms() -> None:
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    model = nn.Sequential(Block(llama.LlamaRMSNorm(4)), Block(t5.T5LayerNorm(4)))
    decay = _decay(gg.param_groups(model, lr=0.1, weight_decay=0.05))
    # Before: both RMSNorm weights were decayed although gg.norms selected them.
    assert decay["0.input_layernorm.weight"] == 0.0
    assert decay["1.input_layernorm.weight"] == 0.0
    assert decay["0.proj.weight"] == 0.05
    assert gg.select(model, gg.norms).roots == ["0.input_layernorm", "1.input_layernorm"]


class Scale(nn.Module):
    """A norm-like module with a 2-D parameter (so only its name can tell)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def test_no_decay_is_exactly_bias_names_and_gg_norms() -> None:
    model = nn.Module()
    model.fc = nn.Linear(4, 4)
    model.q_norm = Scale()  # HF's '_norm' pattern
    model.norm = Scale()  # HF's 'norm' segment
    model.scale = Scale()  # not a norm by any rule
    model.relative_attention_bias = nn.Embedding(3, 4)  # HF: 'bias' anywhere in the name
    decay = _decay(gg.param_groups(model, lr=0.1, weight_decay=0.05))
    off = {n for n, wd in decay.items() if wd == 0.0}
    by_norms = set(gg.select(model, gg.norms).parameters)
    assert by_norms == {"q_norm.weight", "norm.weight"}
    assert off == by_norms | {"fc.bias", "relative_attention_bias.weight"}
    assert decay["scale.weight"] == 0.05


class LayerScale(nn.Module):
    """ConvNeXt's per-channel ``gamma``: 1-D, not a norm."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4, bias=False)
        self.gamma = nn.Parameter(torch.full((4,), 1e-6))


def test_other_1d_parameters_get_no_decay_unless_asked() -> None:
    model = LayerScale()
    assert _decay(gg.param_groups(model, lr=0.1, weight_decay=0.05)) == {
        "fc.weight": 0.05,
        "gamma": 0.0,
    }
    assert _decay(gg.param_groups(model, lr=0.1, weight_decay=0.05, decay_1d=True)) == {
        "fc.weight": 0.05,
        "gamma": 0.05,
    }
