"""The bench harness records what it was asked, fails loudly, and leaves the docs whole."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from gradgate.tools import bench
from gradgate.tools.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]


def test_records_the_argv_it_was_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["pytest", "something", "else"])
    out = tmp_path / "scale.json"
    argv = ["bench", "scale", "--sizes", "50", "--repeats", "1", "--json", str(out)]
    assert main(argv) == 0
    assert json.loads(out.read_text())["argv"] == argv
    md = tmp_path / "scale.md"
    assert main([*argv[:-2], "--markdown", str(md)]) == 0
    assert "Command: `gradgate bench scale --sizes 50 --repeats 1 --markdown" in md.read_text()


def test_threads_default_is_fixed_not_the_core_count() -> None:
    args = build_parser().parse_args(["bench", "seed"])
    assert args.threads == bench.DEFAULT_THREADS == 2


def test_a_failed_measuring_subprocess_raises() -> None:
    with pytest.raises(subprocess.CalledProcessError) as info:
        bench.peak_rss_mb("seed", "no_such_strategy", 8, 1)
    assert "unknown strategy 'no_such_strategy'" in info.value.stderr


def test_guard_cost_is_never_negative() -> None:
    assert bench.per_step_cost_ms([0.90, 0.95, 1.00], [1.0, 1.0, 1.0], 10) == (0.0, True)
    cost, noise = bench.per_step_cost_ms([1.1, 1.2, 1.3], [1.0, 1.0, 1.0], 100)
    assert cost == pytest.approx(2.0) and not noise


def test_bench_output_has_no_carriage_return(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "scale", "--sizes", "50", "--repeats", "2"]) == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.out + captured.err
    assert "tensors: select+freeze+summary" in captured.out


def test_make_docs_refuses_a_partial_folder(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("make_docs", ROOT / "bench" / "make_docs.py")
    assert spec is not None and spec.loader is not None
    make_docs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_docs)
    page = ROOT / "docs" / "BENCHMARKS.md"
    before = page.read_bytes()
    (tmp_path / "seed.json").write_text(json.dumps({"workload": "seed"}))
    with pytest.raises(SystemExit, match=r"lacks reverse\.json, guard\.json") as info:
        make_docs.main(tmp_path)
    assert "nothing was written" in str(info.value)
    assert "gradgate bench guard" in str(info.value)  # says how to produce what is missing
    assert page.read_bytes() == before


def test_fine_tune_workloads_parse_with_their_own_options() -> None:
    args = build_parser().parse_args(
        ["bench", "autofreeze", "--tasks", "image", "--seeds", "1", "--tiny"]
    )
    assert (args.workload, args.tasks, args.seeds, args.tiny) == ("autofreeze", ["image"], 1, True)
    args = build_parser().parse_args(["bench", "integrations", "--frameworks", "hf"])
    assert (args.frameworks, args.per_class, args.batch) == (["hf"], 24, 32)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "autofreeze", "--tasks", "audio"])


def test_autofreeze_merge_runs_through_the_cli(tmp_path: Path) -> None:
    recorded = json.loads((ROOT / "docs" / "bench" / "autofreeze.json").read_text())
    text, image = dict(recorded), dict(recorded)
    text["workloads"] = {"text": recorded["workloads"]["text"]}
    image["workloads"] = {"image": recorded["workloads"]["image"]}
    for name, part in (("text", text), ("image", image)):
        (tmp_path / f"{name}.json").write_text(json.dumps(part))
    out, md = tmp_path / "out.json", tmp_path / "out.md"
    argv = ["bench", "autofreeze", "--merge", str(tmp_path / "text.json")]
    argv += [str(tmp_path / "image.json"), "--json", str(out), "--markdown", str(md)]
    assert main(argv) == 0
    merged = json.loads(out.read_text())
    assert merged["workloads"] == recorded["workloads"] and merged["argv"] == argv
    assert "| image | progressive | 0.9358 | -2.83 | 3/3 | 1.51x |" in md.read_text()


def test_benchmarks_page_has_the_fine_tune_sections_with_real_commands() -> None:
    page = (ROOT / "docs" / "BENCHMARKS.md").read_text()
    for workload in ("autofreeze", "integrations"):
        assert f"### `{workload}`" in page
        assert f"Command: `gradgate bench {workload} " in page
    assert "| lightning GradgateFinetuning | 1.202 |" in page
