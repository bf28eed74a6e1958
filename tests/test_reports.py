from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch
from torch import nn

import gradgate as gg
from cases import CASES, Case, TiedLM
from gradgate.tools.agent import Agent


def test_summary_golden(golden: Callable[[str, str], None]) -> None:
    agent = Agent()
    gg.freeze(agent, "front_end")
    agent.train()
    golden("summary_seed.txt", str(gg.summary(agent)))


def test_summary_train_only_golden(golden: Callable[[str, str], None]) -> None:
    agent = Agent()
    gg.train_only(agent, "front_end")
    golden("summary_train_only.txt", str(gg.summary(agent, depth=1)))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_summary_totals_add_up(case: Case) -> None:
    model = case.factory()
    gg.freeze(model, *case.selectors)
    s = gg.summary(model, depth=3)
    assert s.total == s.trainable + s.frozen
    assert s.total == sum(p.numel() for p in model.parameters())
    assert s.trainable == sum(p.numel() for p in gg.trainable_parameters(model))
    data = json.loads(json.dumps(s.to_dict()))
    assert data["total"] == s.total and len(data["rows"]) == len(s.rows)


def test_summary_states_and_modes() -> None:
    agent = Agent()
    gg.freeze(agent, "front_end", "back_end.fc2.bias")
    agent.train()
    rows = {r.path: r for r in gg.summary(agent).rows}
    assert rows["front_end"].state == "frozen"
    assert rows["front_end"].mode == "eval (sticky)"
    assert rows["front_end.relu1"].state == "frozen"
    assert rows["back_end.relu"].state == "-"
    assert rows["back_end.fc2"].state == "partial"
    assert rows["back_end.fc1"].mode == "train"


def test_summary_tied_counts_once() -> None:
    s = gg.summary(TiedLM())
    assert s.total == 11 * 8 + 8 * 8 + 8
    assert s.rows[0].params == s.total


def test_summary_depth_validation() -> None:
    with pytest.raises(gg.InvalidArgumentError, match="depth"):
        gg.summary(nn.Linear(2, 2), depth=-1)


def test_grad_report_missing_and_unexpected() -> None:
    net = nn.ModuleDict({"a": nn.Linear(2, 1), "b": nn.Linear(2, 1), "c": nn.Linear(2, 1)})
    net["c"].weight.requires_grad_(False)
    net["c"].weight.grad = torch.zeros(1, 2)  # the seed's trap: a zero-tensor gradient
    net["a"](torch.ones(1, 2)).sum().backward()
    report = gg.grad_report(net)
    assert report.missing == ["b.weight", "b.bias", "c.bias"]
    assert report.unexpected == ["c.weight"]
    assert not report.ok
    text = str(report)
    assert "c.weight" in text and "b.bias" in text
    norms = {m: n for m, n, _ in report.norms}
    assert norms["a"] > 0 and norms["b"] == 0
