"""The promises of ``GradgateFinetuning``, held the same way in Lightning and the HF Trainer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import gradgate as gg

pytest.importorskip("lightning")
pytest.importorskip("transformers")

from gradgate.integrations.lightning import GradgateFinetuning as LightningFinetuning
from gradgate.integrations.transformers import GradgateFinetuning as HFFinetuning
from gradgate.integrations.transformers import GradgateTrainer
from integrations import frameworks as fw


@dataclass(frozen=True)
class Case:
    """A framework with the names of its frozen, late-unfrozen and trainable parts."""

    name: str
    callback: Callable[..., Any]
    fit: Callable[..., fw.Run]
    model: Callable[[], nn.Module]
    frozen: str
    late: str
    head: str
    steps_per_epoch: int = 4

    def make(self, **kwargs: Any) -> Any:
        return self.callback([self.frozen, self.late], **kwargs)


LIGHTNING = Case(
    "lightning",
    LightningFinetuning,
    fw.fit_lightning,
    fw.lightning_net,
    frozen="backbone",
    late="late",
    head="head",
)
HF = Case(
    "hf",
    HFFinetuning,
    fw.fit_hf,
    fw.hf_model,
    frozen="bert.encoder.layer.0",
    late="bert.encoder.layer.1",
    head="classifier",
)
CASES = [pytest.param(LIGHTNING, id="lightning"), pytest.param(HF, id="hf")]


def part(model: nn.Module, name: str) -> str:
    return gg.fingerprint(model.get_submodule(name))


@pytest.mark.parametrize("case", CASES)
def test_frozen_part_bit_identical_and_in_inference_mode(case: Case, tmp_path: Path) -> None:
    before = case.model()
    run = case.fit(tmp_path, case.make(unfreeze=[(1, case.late)]))
    # Parameters and BatchNorm statistics of the frozen part, exactly.
    assert part(run.model, case.frozen) == part(before, case.frozen)
    assert part(run.model, case.head) != part(before, case.head)
    # Every forward of the frozen part ran in inference mode (Dropout off, BN on running stats),
    # also after Lightning's validation loop wrote module.training back to True.
    assert run.frozen_training_flags == {False}


@pytest.mark.parametrize("case", CASES)
def test_unfreeze_trains_that_part_from_its_epoch_at_lr_mult(case: Case, tmp_path: Path) -> None:
    before = case.model()
    one_epoch = case.fit(tmp_path / "a", case.make(unfreeze=[(1, case.late)]), epochs=1)
    assert part(one_epoch.model, case.late) == part(before, case.late)
    run = case.fit(tmp_path / "b", case.make(unfreeze=[(1, case.late)], lr_mult=0.1))
    assert part(run.model, case.late) != part(before, case.late)
    n = case.steps_per_epoch
    groups_before = {len(lrs) for lrs in run.lrs[:n]}
    assert len({len(lrs) for lrs in run.lrs[n:]}) == 1
    # Two new groups: the trainer's weight decay, and 0 for biases, norms and other
    # 1-D tensors (gg.param_groups' rule).
    k = groups_before.pop()
    assert len(run.lrs[n]) == k + 2
    for lrs in run.lrs[n:]:
        for lr in lrs[k:]:
            assert lr == pytest.approx(0.1 * lrs[0], rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("scheduler", ["step", "cosine", "cosine_floor", "onecycle"])
def test_lightning_new_group_follows_every_scheduler(scheduler: str, tmp_path: Path) -> None:
    run = fw.fit_lightning(
        tmp_path, LIGHTNING.make(unfreeze=[(1, "late")], lr_mult=0.25), scheduler=scheduler
    )
    tail = run.lrs[4:]
    assert len({lrs[0] for lrs in tail}) > 1  # the schedule moves the lr
    for lrs in tail:
        # Two new groups (decayed, and biases/norms at weight decay 0), one lr.
        assert len(lrs) == 3
        for lr in lrs[1:]:
            assert lr == pytest.approx(0.25 * lrs[0], rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("case", CASES)
def test_resume_before_and_after_an_unfreeze_is_bit_identical(case: Case, tmp_path: Path) -> None:
    full = case.fit(tmp_path / "full", case.make(unfreeze=[(1, case.late)]), save_every_epoch=True)
    # End of epoch 0 (the unfreeze is still to come) and of epoch 1 (the late part trains).
    for checkpoint in full.checkpoints[:2]:
        if case is LIGHTNING:
            extra: dict[str, Any] = {"ckpt_path": str(checkpoint)}
        else:
            # The plain Trainer wrote the checkpoints; GradgateTrainer is needed to resume them.
            extra = {"resume": str(checkpoint), "trainer_cls": GradgateTrainer}
        resumed = case.fit(
            tmp_path / checkpoint.name, case.make(unfreeze=[(1, case.late)]), **extra
        )
        assert gg.fingerprint(resumed.model) == gg.fingerprint(full.model), checkpoint.name
        # Same groups and learning rates, step for step (the new group at lr_mult x the others).
        assert resumed.lrs and resumed.lrs == full.lrs[-len(resumed.lrs) :], checkpoint.name


def write_into_frozen(case: Case) -> fw.Poke:
    def poke(model: nn.Module) -> None:
        with torch.no_grad():
            next(model.get_submodule(case.frozen).parameters()).add_(1.0)

    return poke


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("check", ["fast", "exact"])
def test_guard_raises_on_a_write_into_a_frozen_weight(
    case: Case, check: str, tmp_path: Path
) -> None:
    with pytest.raises(gg.FrozenTensorChangedError, match=r"frozen parameter '.*' changed after"):
        case.fit(tmp_path, case.make(guard=check), poke=write_into_frozen(case))


@pytest.mark.parametrize("case", CASES)
def test_no_guard_lets_the_write_through(case: Case, tmp_path: Path) -> None:
    before = case.model()
    run = case.fit(tmp_path, case.make(guard=None), poke=write_into_frozen(case))
    assert part(run.model, case.frozen) != part(before, case.frozen)


def zero_grads_on_frozen(model: nn.Module) -> None:
    """What ``zero_grad(set_to_none=False)`` habits leave: a zero gradient on frozen weights."""
    for p in model.parameters():
        if not p.requires_grad:
            p.grad = torch.zeros_like(p)


def all_parameter_adamw(model: nn.Module) -> tuple[torch.optim.Optimizer, None]:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), None


@pytest.mark.parametrize("case", CASES)
def test_all_parameter_adamw_with_weight_decay_moves_nothing_frozen(
    case: Case, tmp_path: Path
) -> None:
    before = case.model()
    # Lightning's own configure_optimizers is already all-parameter AdamW(weight_decay=0.1).
    if case is HF:
        extra: dict[str, Any] = {"optimizers": all_parameter_adamw, "poke": zero_grads_on_frozen}
    else:
        extra = {"after_backward": zero_grads_on_frozen}
    run = case.fit(tmp_path, case.make(guard=None), **extra)
    assert part(run.model, case.frozen) == part(before, case.frozen)
    assert part(run.model, case.head) != part(before, case.head)
