from __future__ import annotations

import json
from pathlib import Path

import pytest

from gradgate.tools.cli import main


def test_summary_command_table_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["summary", "gradgate.tools.seed:Agent", "--train-only", "front_end", "--depth", "1"])
        == 0
    )
    table = capsys.readouterr().out
    assert "back_end   PolicyNetwork" in table and "eval (sticky)" in table
    assert main(["summary", "gradgate.tools.seed:Agent", "--freeze", "front_end", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["frozen"] == 5088 and data["total"] == data["trainable"] + data["frozen"]


def test_summary_command_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["summary", "gradgate.tools.seed:Agent", "--freeze", "front"]) == 2
    assert "'front_end'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="MODULE:FACTORY"):
        main(["summary", "gradgate.tools.seed"])
    with pytest.raises(SystemExit, match="cannot load"):
        main(["summary", "gradgate.tools.seed:Nope"])


def test_demo_end_to_end(tmp_path: Path) -> None:
    out, png = tmp_path / "demo.json", tmp_path / "demo.png"
    code = main(
        [
            "demo",
            "--pretrain-epochs", "2",
            "--epochs", "2",
            "--adapt-epochs", "6",
            "--json", str(out),
            "--plot", str(png),
            "--no-progress",
        ]
    )  # fmt: skip
    assert code == 0
    data = json.loads(out.read_text())
    fp = data["front_end_fingerprint"]
    assert data["front_end_unchanged"] and fp["before"] == fp["after"]
    assert data["back_end_unchanged"]
    assert data["backend"][-1]["accuracy"] > 0.5  # 5 classes: chance is 0.2
    assert data["adapt"][-1]["accuracy"] > max(0.3, data["shifted_accuracy_before"])
    assert png.stat().st_size > 1000


def test_bench_tiny_run_writes_json_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    code = main(
        ["bench", "seed", "--samples", "128", "--epochs", "1", "--repeats", "1", "--warmup", "0",
         "--no-rss", "--no-progress", "--json", str(out), "--plot", str(tmp_path / "b.png"),
         "--markdown", str(tmp_path / "b.md")]
    )  # fmt: skip
    assert code == 0
    data = json.loads(out.read_text())
    assert set(data["strategies"]) == {
        "lr0",
        "requires_grad",
        "gradgate",
        "gradgate_cache",
        "limit",
    }
    assert {"median", "min", "max"} <= set(data["strategies"]["limit"]["seconds"])
    assert "gradgate_cache/limit" in data["ratios"]
    assert data["machine"]["torch"]
    assert "| gradgate_cache |" in (tmp_path / "b.md").read_text()
