"""At a million tensors freeze and undo round-trip exactly (equality, not speed; on ``meta``)."""

from __future__ import annotations

import torch
from torch import nn

import gradgate as gg
from gradgate.tools.bench import SCALE_EXCLUDE, SCALE_SELECTORS, build_scale_model, hand_loop


def _snapshot(model: nn.Module) -> tuple[list[bool], list[bool], list[int], list[int]]:
    """Every flag, mode, instance attribute set and forward pre-hook set, in module order."""
    mods = list(model.modules())
    return (
        [p.requires_grad for p in model.parameters()],
        [m.training for m in mods],
        [len(m.__dict__) for m in mods],
        [len(m._forward_pre_hooks) for m in mods],
    )


def test_a_million_tensors_freeze_and_undo_round_trip_exactly() -> None:
    model = build_scale_model(1_000_000)
    tensors = sum(1 for _ in model.parameters())
    assert tensors >= 999_000
    before = _snapshot(model)
    handle = gg.freeze(model, *SCALE_SELECTORS, exclude=SCALE_EXCLUDE)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert len(frozen) == len(handle.frozen) > tensors // 3
    assert frozen == handle.frozen
    # The same selection written by hand freezes the same tensors and modules.
    reference = build_scale_model(2_000)
    hand_loop(reference)
    small = gg.freeze(build_scale_model(2_000), *SCALE_SELECTORS, exclude=SCALE_EXCLUDE)
    assert small.frozen == [n for n, p in reference.named_parameters() if not p.requires_grad]
    model.train()
    first = model.get_submodule("layers.0.attn")
    assert not first.get_submodule("q").training and first.get_submodule("o").training
    handle.undo()
    assert _snapshot(model) == before
    assert all(p.device == torch.device("meta") for p in model.parameters())
