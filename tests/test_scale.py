"""At a million tensors freeze and undo round-trip exactly (equality, not speed; on ``meta``)."""

from __future__ import annotations

import gc
from collections.abc import Callable

import pytest
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


@pytest.mark.slow  # ~70 s of CPU: building and walking a million tensors twice
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


def _collections(call: Callable[[], object]) -> list[int]:
    """The generations the cyclic garbage collector scanned while ``call`` ran."""
    seen: list[int] = []

    def note(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            seen.append(info["generation"])

    gc.collect()
    gc.callbacks.append(note)
    try:
        call()
    finally:
        gc.callbacks.remove(note)
    return seen


def test_bulk_calls_on_a_large_model_run_without_repeated_collections() -> None:
    # Each call allocates ~10 containers per tensor: with the collector running,
    # 10k tensors meant dozens of scans (and at 10^5 a full one over the whole
    # heap, which made sync superlinear). Paused, at most the one scan of the
    # young objects when it resumes.
    model = build_scale_model(10_000)
    handle = gg.freeze(model, *SCALE_SELECTORS, exclude=SCALE_EXCLUDE)
    groups: list[dict[str, object]] = []
    opt: list[torch.optim.Optimizer] = []
    calls: dict[str, Callable[[], object]] = {
        "unfreeze": lambda: gg.unfreeze(model, "layers.*.attn").undo(),
        "param_groups": lambda: groups.extend(gg.param_groups(model, lr=1e-3)),
        "summary": lambda: gg.summary(model, depth=2),
        "trainable_state": lambda: gg.checkpoint.trainable_state(model),
        "frozen_tensors": lambda: gg.integrity.frozen_tensors(model),
        "undo": handle.undo,
        "sync": lambda: gg.sync(opt[0], model),
        "freeze": lambda: gg.freeze(model, *SCALE_SELECTORS, exclude=SCALE_EXCLUDE),
    }
    scans = {}
    for name, call in calls.items():
        if name == "sync":
            opt.append(torch.optim.SGD(groups[:1], lr=1e-3))  # sync adds the rest
        scans[name] = _collections(call)
    assert all(len(s) <= 1 for s in scans.values()), scans
    assert gc.isenabled()
    assert len(opt[0].param_groups) > 1
