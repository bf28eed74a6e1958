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
        "__rows__.embed.weight",  # the row numbers, once (not the rows module's index too)
        "embed.weight_rows.weight",
    ]
    assert torch.equal(record.trainable_state()["__rows__.embed.weight"], torch.tensor([2, 5]))


def test_a_counter_for_one_model_ignores_walks_of_another() -> None:
    mine, other = TiedLM(), TiedLM()
    with counting_builds(mine) as counter:
        gg.select(other, "body")
        gg.select(mine, "body")
    assert counter.count == 1


class _Walks:
    """Walks of one model: ``ModelIndex`` builds and torch's own module/parameter iterators."""

    def __init__(self, model: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
        self.model = model
        self.torch = 0
        self.depth = 0
        for name in ("named_modules", "named_parameters", "parameters", "buffers"):
            original = getattr(nn.Module, name)

            def counted(self_: nn.Module, *a: Any, __f: Any = original, **k: Any) -> Any:
                outer = self.depth == 0
                self.depth += 1
                try:
                    if self_ is model and outer:  # parameters() calls named_parameters()
                        self.torch += 1
                    return __f(self_, *a, **k)
                finally:
                    self.depth -= 1

            monkeypatch.setattr(nn.Module, name, counted)

    def __call__(self, call: Callable[[], Any]) -> tuple[int, int]:
        """``(index builds, torch walks)`` of the model while ``call`` runs."""
        self.torch = 0
        with counting_builds(self.model) as counter:
            call()
        return counter.count, self.torch


# Before (main at 857a236; python /tmp/house/counts.py, see the closing note):
# FeatureCache 0 index builds but 15 torch walks of the front-end when it
# builds, 12 when it reads a disk cache; a GradualUnfreeze, ProgressiveFreeze
# or AutoFreeze step that changes the set 2; GatedDDP construction 3,
# rewrap(ddp, opt) 4, gg_refresh after a change 4, a schedule step that
# rebuilds DDP 6.
def test_the_cache_key_derives_from_one_walk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    front = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU())
    gg.freeze(front)
    data = torch.utils.data.TensorDataset(torch.randn(8, 3), torch.arange(8))
    walks = _Walks(front, monkeypatch)
    caches: list[gg.FeatureCache] = []

    def open_cache() -> None:
        caches.append(gg.FeatureCache(front, data, store="disk", path=tmp_path, progress=False))

    # Building reads the front-end once, runs it, and reads it again (a
    # forward that changed the model is refused); reading a built cache once.
    assert walks(open_cache) == (2, 0)
    assert caches[-1].rebuilt
    assert walks(open_cache) == (1, 0)
    assert not caches[-1].rebuilt
    with torch.no_grad():
        front[0].bias.add_(1.0)  # the next read re-keys the front-end: one walk
    with pytest.warns(RuntimeWarning, match="front-end changed"):
        assert walks(lambda: caches[-1][0]) == (2, 0)  # the check, then the rebuild's re-read


def test_each_schedule_step_reads_the_model_once() -> None:
    def net() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(*[nn.Linear(4, 4) for _ in range(3)])

    model = net()
    opt = torch.optim.SGD(gg.param_groups(model, lr=0.1), lr=0.1)
    gu = gg.GradualUnfreeze(model, gg.stages(model), at=[2, 1, 0], optimizer=opt)
    assert _builds(lambda: gu.step(0), model) == 0  # nothing due: no walk
    assert _builds(lambda: gu.step(1), model) == 1
    assert [p.requires_grad for p in model[1].parameters()] == [True, True]
    assert len(opt.param_groups) == 2  # the unfrozen stage joined through sync

    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pf = gg.ProgressiveFreeze(model, gg.stages(model), start=0, end=2, optimizer=opt)
    assert _builds(lambda: pf.step(0), model) == 0
    assert _builds(lambda: pf.step(1), model) == 1
    assert not model[0].weight.requires_grad
    assert all(p is not model[0].weight for g in opt.param_groups for p in g["params"])

    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # nothing moves: every stage settles
    af = gg.AutoFreeze(model, optimizer=opt, every=2, threshold=0.5)
    counts = []
    for _ in range(4):
        model(torch.ones(1, 4)).sum().backward()
        opt.step()
        counts.append(_builds(af.step, model))
        opt.zero_grad()
    assert af.frozen == ["0", "1"] and counts == [0, 0, 0, 1]


def test_a_schedule_step_with_rows_reads_the_model_again_after_reshaping_it() -> None:
    model = TiedLM()
    opt = torch.optim.SGD(gg.param_groups(model, lr=0.1), lr=0.1)
    pf = gg.ProgressiveFreeze(
        model, [gg.rows("embed.weight", [1, 2]), "body"], start=0, end=1, optimizer=opt
    )
    # Freezing rows 1, 2 installs a rows module for the others: sync must see it.
    assert _builds(lambda: pf.step(1), model) == 2
    rows = [p for n, p in model.named_parameters() if n == "embed.weight_rows.weight"]
    assert len(rows) == 1 and rows[0].requires_grad
    assert any(p is rows[0] for g in opt.param_groups for p in g["params"])
    assert not any(p is model.embed.weight for g in opt.param_groups for p in g["params"])


def test_ddp_wrap_and_rewrap_read_the_model_once(one_rank: None) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    gg.freeze(model, "0", "1")
    opt = torch.optim.SGD(gg.param_groups(model, lr=0.1), lr=0.1)
    ddp: list[Any] = []
    assert _builds(lambda: ddp.append(gg.distributed.wrap(model)), model) == 1
    assert _builds(lambda: ddp.append(ddp[-1].gg_refresh()), model) == 0  # nothing changed
    assert ddp[-1] is ddp[0]
    gg.unfreeze(model, "1")
    assert _builds(lambda: ddp.append(gg.distributed.rewrap(ddp[-1], opt)), model) == 1
    assert ddp[-1] is not ddp[0] and ddp[-1].gg_trainable == (
        "1.weight",
        "1.bias",
        "2.weight",
        "2.bias",
    )
    assert any(p is model[1].weight for g in opt.param_groups for p in g["params"])
    gg.unfreeze(model, "0")
    assert _builds(lambda: ddp.append(ddp[-1].gg_refresh()), model) == 1
    assert "0.weight" in ddp[-1].gg_trainable
    # A schedule given the wrapper: unfreeze, sync and the rebuild share one walk.
    gg.freeze(model, "0", "1")
    wrapper = gg.distributed.wrap(model)
    gu = gg.GradualUnfreeze(wrapper, gg.stages(model), at=[2, 1, 0], optimizer=opt)
    assert _builds(lambda: gu.step(1), model) == 1
    rebuilt = gu.wrapped
    assert isinstance(rebuilt, gg.distributed.GatedDDP) and rebuilt is not wrapper
    assert "1.weight" in rebuilt.gg_trainable
    gu.wrapped(torch.ones(2, 4)).sum().backward()  # the rebuilt wrapper runs: not stale
    assert model[1].weight.grad is not None and model[0].weight.grad is None
