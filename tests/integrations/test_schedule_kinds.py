"""Every gradgate schedule inside both trainer callbacks: the one schedule engine (issue 22.2).

The callbacks' conformance promises, once per schedule kind (GradualUnfreeze,
ProgressiveFreeze, AutoFreeze) in Lightning and in the HF Trainer: the
frozen part is bit-identical, the schedule acts at its granularity (epoch
schedules at an epoch start, AutoFreeze after an optimizer step), and a run
resumed from any checkpoint ends bit-identical to the uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import gradgate as gg

pytest.importorskip("lightning")
pytest.importorskip("transformers")

from gradgate.integrations.lightning import GradgateFinetuning as LightningFinetuning
from gradgate.integrations.transformers import GradgateFinetuning as HFFinetuning
from gradgate.integrations.transformers import GradgateTrainer
from integrations import frameworks as fw


@dataclass(frozen=True)
class Case:
    name: str
    callback: Callable[..., Any]
    fit: Callable[..., fw.Run]
    model: Callable[[], torch.nn.Module]
    frozen: Any  # frozen for the whole fit
    late: str  # the part the schedule acts on
    rest: Any  # the part that always trains


LIGHTNING = Case(
    "lightning", LightningFinetuning, fw.fit_lightning, fw.lightning_net, "backbone", "late", "head"
)
HF = Case(
    "hf",
    HFFinetuning,
    fw.fit_hf,
    fw.hf_model,
    ["bert.embeddings", "bert.encoder.layer.0"],
    "bert.encoder.layer.1",
    ["bert.encoder.layer.2", "bert.pooler", "classifier"],
)


def make(case: Case, kind: str) -> Any:
    """A fresh callback running a ``kind`` schedule on ``case``'s model."""
    frozen = case.frozen if isinstance(case.frozen, list) else [case.frozen]
    if kind == "gradual":  # the late part unfreezes at epoch 1
        return case.callback([*frozen, case.late], schedule=fw.gradual([case.late], at=[1]))
    stages = [case.late, case.rest]
    if kind == "progressive":  # the late part freezes at epoch 2
        return case.callback(frozen, schedule=fw.progressive(stages, start=0, end=2))
    return case.callback(frozen, schedule=fw.autofreeze(stages, every=2))  # at step 4


def late(state: dict[str, torch.Tensor], case: Case) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith(case.late + ".")}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


CASES = [pytest.param(LIGHTNING, id="lightning"), pytest.param(HF, id="hf")]
KINDS = ["gradual", "progressive", "autofreeze"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES)
def test_each_schedule_kind_acts_at_its_granularity_and_resumes_bit_identical(
    case: Case, kind: str, tmp_path: Path
) -> None:
    before = case.model()
    start = late(before.state_dict(), case)
    callback = make(case, kind)
    full = case.fit(tmp_path / "full", callback, save_every_epoch=True)
    epochs = [late(s, case) for s in full.epoch_states]
    assert len(epochs) == 3
    frozen = case.frozen if isinstance(case.frozen, list) else [case.frozen]
    for name in frozen:  # frozen for the whole fit: parameters and statistics, exactly
        assert gg.fingerprint(full.model.get_submodule(name)) == gg.fingerprint(
            before.get_submodule(name)
        )
    if kind == "gradual":
        assert same(epochs[0], start)  # frozen through epoch 0
        assert not same(epochs[2], epochs[0])  # trains from the start of epoch 1
        assert len(full.lrs[4]) > len(full.lrs[3])  # its group joined at the epoch start
    elif kind == "progressive":
        assert not same(epochs[0], start) and not same(epochs[1], epochs[0])  # trains...
        assert same(epochs[2], epochs[1])  # ...until frozen at the start of epoch 2
    else:
        assert callback.schedule.frozen == [case.late]  # frozen after optimizer step 4
        assert not same(epochs[0], start)
        assert same(epochs[1], epochs[0]) and same(epochs[2], epochs[0])
    assert callback.schedule is not None and type(callback.schedule).__name__ in (
        "GradualUnfreeze",
        "ProgressiveFreeze",
        "AutoFreeze",
    )
    # Resume from the end of epoch 0 and of epoch 1: the same run, bit for bit.
    for checkpoint in full.checkpoints[:2]:
        if case is LIGHTNING:
            extra: dict[str, Any] = {"ckpt_path": str(checkpoint)}
        else:
            extra = {"resume": str(checkpoint), "trainer_cls": GradgateTrainer}
        resumed = case.fit(tmp_path / checkpoint.name, make(case, kind), **extra)
        assert gg.fingerprint(resumed.model) == gg.fingerprint(full.model), checkpoint.name
        assert resumed.lrs and resumed.lrs == full.lrs[-len(resumed.lrs) :], checkpoint.name


@pytest.mark.parametrize("rule", ["progress", "contribution"])
@pytest.mark.parametrize("case", CASES)
def test_measured_rule_state_with_tensors_resumes_bit_identical(
    case: Case, rule: str, tmp_path: Path
) -> None:
    # AutoFreeze's measured rules keep weight copies in their state: Lightning's
    # checkpoint holds them as tensors, the HF callback writes them beside its JSON
    frozen = case.frozen if isinstance(case.frozen, list) else [case.frozen]
    stages = [case.late, case.rest]
    copies = "update" if rule == "contribution" else "start"

    def make_cb() -> Any:
        return case.callback(frozen, schedule=fw.measured(stages, every=1, rule=rule))

    callback = make_cb()
    full = case.fit(tmp_path / "full", callback, save_every_epoch=True)
    history = callback.schedule.history
    state = callback.schedule.state_dict()
    assert state["recent"] and state[copies][0] is not None  # it measured and holds copies
    checkpoint = full.checkpoints[0]
    if case is LIGHTNING:
        extra: dict[str, Any] = {"ckpt_path": str(checkpoint)}
    else:
        from gradgate.integrations.transformers import STATE_FILE, TENSORS_FILE

        assert (checkpoint / TENSORS_FILE).exists()
        assert "__gradgate_tensor__" in (checkpoint / STATE_FILE).read_text()
        extra = {"resume": str(checkpoint), "trainer_cls": GradgateTrainer}
    resumed_cb = make_cb()
    resumed = case.fit(tmp_path / "resumed", resumed_cb, **extra)
    assert resumed_cb.schedule.history == history  # the measurements, exactly
    again = resumed_cb.schedule.state_dict()
    assert again["recent"] == state["recent"]  # the pooled contributions, exactly
    for a, b in zip(again[copies], state[copies], strict=True):
        assert (a is None) == (b is None) and (a is None or all(map(torch.equal, a, b)))
    assert gg.fingerprint(resumed.model) == gg.fingerprint(full.model)
    if case is HF:  # a folder that lost the tensor file is refused, naming it
        (checkpoint / TENSORS_FILE).unlink()
        with pytest.raises(gg.CheckpointError, match=TENSORS_FILE):
            HFFinetuning(frozen, schedule=fw.measured(stages, every=1, rule=rule)).restore(
                str(checkpoint)
            )
