"""One read of the model per public call: the model-state record is built at most once.

Each public call builds one ``ModelIndex`` (the walk under ``_state.ModelState``)
and passes it on; ``counting_builds`` counts the walks. Before the record,
``save_trainable`` walked the model 5 times (10 with rows), ``load_trainable``
5 (11), ``param_groups`` 3 (4), ``guard`` on entry 2 (4).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import gradgate as gg
from cases import TiedLM
from gradgate._index import counting_builds
from gradgate._state import ModelState


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def _builds(call: Callable[[], Any], model: nn.Module | None = None) -> int:
    with counting_builds(model) as counter:
        call()
    return counter.count


@pytest.mark.parametrize("rows", [False, True], ids=["plain", "rows"])
def test_every_public_call_reads_the_model_once(rows: bool, tmp_path: Path) -> None:
    model = _model()
    counts: dict[str, int] = {}

    def count(name: str, call: Callable[[], Any]) -> Any:
        out: list[Any] = []
        counts[name] = _builds(lambda: out.append(call()), model)
        return out[0]

    count("freeze", lambda: gg.freeze(model, "0", "1", exclude="1.bias"))
    if rows:
        handle = count("unfreeze", lambda: gg.unfreeze(model, gg.rows("0.weight", [1, 2])))
    else:
        handle = count("unfreeze", lambda: gg.unfreeze(model, "1"))
    count("undo", handle.undo)
    count(
        "train_only", lambda: gg.train_only(model, "3", gg.rows("0.weight", [3]) if rows else "1")
    )
    count("summary", lambda: gg.summary(model))
    count("select", lambda: gg.select(model, "1"))
    count("frozen_modules", lambda: list(gg.freezing.frozen_modules(model)))
    groups = count("param_groups", lambda: gg.param_groups(model, lr=0.1, weight_decay=0.1))
    opt = torch.optim.AdamW(groups)
    count("sync", lambda: gg.sync(opt, model))
    count("lint", lambda: gg.lint(opt, model))
    count("fingerprint", lambda: gg.fingerprint(model))
    guard = count("guard()", lambda: gg.guard(model, opt))
    count("guard enter", guard.__enter__)
    model(torch.tensor([1, 2])).sum().backward()
    count("guarded step", opt.step)
    count("guard check", guard.check)
    count("guard exit", lambda: guard.__exit__(None, None, None))
    path = tmp_path / "t.safetensors"
    count("save_trainable", lambda: gg.save_trainable(model, path, opt))
    count("load_trainable", lambda: gg.load_trainable(model, path, opt))
    count("grad_report", lambda: gg.grad_report(model))
    assert {k: v for k, v in counts.items() if v > 1} == {}
    assert counts["guarded step"] == 0 and counts["guard()"] == 0


def test_the_counter_counts_and_is_off_outside_its_block() -> None:
    model = TiedLM()
    assert _builds(lambda: [gg.select(model, "body"), gg.select(model, "embed")]) == 2
    with counting_builds() as counter:
        pass
    gg.select(model, "body")
    assert counter.count == 0


def test_the_record_defines_frozen_once_for_every_reader(tmp_path: Path) -> None:
    model = _model()
    gg.freeze(model, "1", "2")
    record = ModelState(model)
    assert [n for n, _ in record.frozen_modules()] == ["1", "2"]
    assert [n for n, _ in gg.freezing.frozen_modules(model)] == ["1", "2"]
    frozen = [e.name for e in record.frozen_entries(buffers=True)]
    assert frozen == [
        "1.weight",
        "1.bias",
        "2.weight",
        "2.bias",
        "2.running_mean",
        "2.running_var",
        "2.num_batches_tracked",
    ]
    assert [n for n, _, _ in gg.integrity.frozen_tensors(model)] == frozen
    trainable = sorted(record.trainable_state())
    assert trainable == ["0.weight", "3.bias", "3.weight"]
    assert sorted(gg.checkpoint.trainable_state(model)) == trainable
    # What a checkpoint stores and fingerprints is exactly this split.
    path = gg.save_trainable(model, tmp_path / "t.safetensors")
    meta = gg.load_trainable(model, path)
    assert sorted(json.loads(meta["gradgate.trainable"])) == trainable
    assert meta["gradgate.frozen_count"] == str(len(frozen))


def test_the_record_sees_partial_tensors_through_subtensor() -> None:
    model = TiedLM()
    gg.train_only(model, gg.rows("embed.weight", [2, 5]))
    record = ModelState(model)
    w = dict(model.named_parameters())["embed.weight"]  # the frozen full tensor
    assert list(record.partials) == [id(w)]
    assert "embed.weight" in [e.name for e in record.frozen_entries(buffers=False)]
    r = record.partials[id(w)].trainable
    assert record.element_counts() == {id(w): (r.numel(), w.numel() - r.numel()), id(r): (0, 0)}
    assert sorted(record.trainable_state()) == [
        "__rows__.embed.weight",
        "embed.weight_rows.index",  # the rows module's buffer (it trains)
        "embed.weight_rows.weight",
    ]
    assert torch.equal(record.trainable_state()["__rows__.embed.weight"], torch.tensor([2, 5]))


def test_a_counter_for_one_model_ignores_walks_of_another() -> None:
    mine, other = TiedLM(), TiedLM()
    with counting_builds(mine) as counter:
        gg.select(other, "body")
        gg.select(mine, "body")
    assert counter.count == 1
