"""``gradgate demo``: both directions learn, checks fail loudly, bars change nothing."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import gradgate as gg
from gradgate._progress import progress
from gradgate.tools import demo
from gradgate.tools.agent import Agent
from gradgate.tools.cli import main
from gradgate.tools.training import train_epochs

pytest.importorskip("sklearn")

SRC = Path(__file__).resolve().parents[2] / "src"
EPOCH_LINE = re.compile(r"(front-end|back-end) epoch \d+\b[^\n]*?accuracy\s+([0-9.]+)")
SMALL = ["--pretrain-epochs", "2", "--epochs", "2", "--adapt-epochs", "2", "--no-progress"]
TINY = ["--pretrain-epochs", "1", "--epochs", "1", "--adapt-epochs", "1"]
NO_FLOORS = ["--backend-floor", "0", "--adapt-floor", "0"]


class _Terminal(io.StringIO):
    """A stderr that claims to be a terminal, so progress bars are drawn into it."""

    def isatty(self) -> bool:
        return True


def _run(tmp_path: Path, *argv: str) -> tuple[int, dict[str, Any]]:
    out = tmp_path / "demo.json"
    code = main(["demo", *argv, "--json", str(out)])
    return code, json.loads(out.read_text())


@pytest.fixture(scope="module")
def small_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, Any]]:
    runs = {}
    for seed in (0, 1, 2):
        code, data = _run(tmp_path_factory.mktemp(f"s{seed}"), *SMALL, "--seed", str(seed))
        runs[seed] = {"code": code, **data}
    return runs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_both_directions_learn_well_above_chance(
    small_runs: dict[int, dict[str, Any]], seed: int
) -> None:
    run = small_runs[seed]
    # Two epochs are a small setting; the floors (0.93 / 0.90) are for the
    # default one. "Well above chance" here is three times chance.
    assert run["backend"][-1]["accuracy"] >= 3 * demo.CHANCE
    assert run["adapt"][-1]["accuracy"] >= 3 * demo.CHANCE
    # the title direction starts from a broken model: learning is what lifts it
    assert run["shifted_accuracy_before"] < 2 * demo.CHANCE
    assert run["front_end_unchanged"] and run["back_end_unchanged"]
    fp = run["front_end_fingerprint"]
    assert fp["before"] == fp["after"]


def test_json_records_each_floor_and_whether_it_held(
    small_runs: dict[int, dict[str, Any]],
) -> None:
    run = small_runs[0]
    floors = {c["stage"]: c for c in run["checks"] if c["floor"] is not None}
    assert floors["back-end"]["floor"] == 0.93 and floors["front-end"]["floor"] == 0.90
    for stage, key in (("back-end", "backend"), ("front-end", "adapt")):
        assert floors[stage]["value"] == run[key][-1]["accuracy"]
        assert floors[stage]["held"] == (run[key][-1]["accuracy"] >= floors[stage]["floor"])
    assert run["passed"] == all(c["held"] for c in run["checks"])
    assert run["passed"] == (run["code"] == 0)


def test_a_missed_floor_exits_1_naming_the_stage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # no adaptation at all: the title direction stays at its shifted accuracy
    code, data = _run(tmp_path, *TINY, "--adapt-epochs", "0", "--backend-floor", "0")
    captured = capsys.readouterr()
    err = captured.err
    assert code == 1 and not data["passed"]
    assert "gradgate demo: front-end stage failed: held-out accuracy" in err
    assert "< floor 0.90" in err and "back-end stage failed" not in err
    # the last line says so too, with the number that missed
    missed = next(c for c in data["checks"] if c["stage"] == "front-end" and c["floor"])
    assert captured.out.splitlines()[-1] == (
        f"result: 3 of 4 checks held; held-out accuracy back-end "
        f"{data['backend'][-1]['accuracy']:.3f} >= 0.00, front-end {missed['value']:.3f} < 0.90 "
        "(floors); frozen half bit-identical in 2 of 2 directions"
    )


def test_a_changed_frozen_part_exits_1_naming_the_stage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def tampering(model: Any, *args: Any, **kwargs: Any) -> Any:
        records = train_epochs(model, *args, **kwargs)
        if kwargs.get("label") == "front-end":
            with torch.no_grad():  # a write through .data, as a careless loop would
                model.back_end.fc2.bias.data.add_(1.0)
        return records

    monkeypatch.setattr(demo, "train_epochs", tampering)
    code, data = _run(tmp_path, *TINY, *NO_FLOORS)
    err = capsys.readouterr().err
    assert code == 1 and not data["passed"]
    assert "front-end stage failed: back-end bit-identical: False" in err
    assert any("fc2.bias" in w for w in data["warnings"])


def test_progress_bars_do_not_change_the_numbers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, plain = _run(tmp_path, *TINY, *NO_FLOORS, "--no-progress")
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    _, barred = _run(tmp_path, *TINY, *NO_FLOORS)
    assert "\r" in terminal.getvalue()  # the bars really were drawn
    for key in ("pretrain", "backend", "adapt"):
        strip = [{k: v for k, v in r.items() if k != "seconds"} for r in plain[key]]
        assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in barred[key]]
    assert plain["front_end_fingerprint"] == barred["front_end_fingerprint"]


def test_a_bar_iterates_a_shuffling_loader_once(monkeypatch: pytest.MonkeyPatch) -> None:
    data = TensorDataset(torch.arange(40.0))

    def batches(show: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        loader = DataLoader(data, batch_size=8, shuffle=True, generator=g)
        got = [b[0] for b in progress(loader, enabled=show, desc="x")]
        return got, g.get_state()

    plain, state = batches(False)
    monkeypatch.setattr(sys, "stderr", _Terminal())
    barred, barred_state = batches(True)
    assert all(torch.equal(a, b) for a, b in zip(plain, barred, strict=True))
    assert torch.equal(state, barred_state)  # the generator was drawn from equally often


def test_feature_cache_is_the_same_with_a_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    agent = Agent()
    gg.freeze(agent, "front_end")
    data = TensorDataset(torch.randn(20, 3, 28, 28), torch.zeros(20, dtype=torch.long))
    plain = gg.FeatureCache(agent.front_end, data, batch_size=8, progress=False).features()
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    barred = gg.FeatureCache(agent.front_end, data, batch_size=8, progress=True).features()
    assert "\r" in terminal.getvalue()
    assert torch.equal(plain, barred)


def test_piped_output_has_no_carriage_return_and_one_line_per_epoch(tmp_path: Path) -> None:
    out = tmp_path / "demo.json"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    argv = ["demo", *TINY, "--adapt-epochs", "2", *NO_FLOORS, "--json", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "gradgate", *argv],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=600,
    )
    assert "\r" not in done.stdout and "\r" not in done.stderr
    data = json.loads(out.read_text())
    assert done.stdout.splitlines()[-1].startswith("result: 4 of 4 checks held;")
    lines: dict[str, list[float]] = {"back-end": [], "front-end": []}
    for m in EPOCH_LINE.finditer(done.stdout):
        lines[m.group(1)].append(float(m.group(2)))
    assert lines["back-end"] == [round(r["accuracy"], 3) for r in data["backend"]]
    assert lines["front-end"] == [round(r["accuracy"], 3) for r in data["adapt"]]


def test_dead_gradients_are_reported() -> None:
    agent = Agent(classes=5)
    gg.train_only(agent, "front_end")
    with torch.no_grad():
        agent.back_end.fc1.weight.zero_()  # nothing flows back to the front-end
    warnings = demo.dead_parts(agent, torch.randn(4, 3, 28, 28), torch.zeros(4, dtype=torch.long))
    assert warnings == ["front-end trains but all its gradients are zero: it cannot learn"]
    assert all(p.grad is None for p in agent.parameters())  # the check writes no gradient
