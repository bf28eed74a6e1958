"""The bench harness records what it was asked, fails loudly, and leaves the docs whole."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from gradgate.errors import InvalidArgumentError
from gradgate.tools import bench, bench_rows
from gradgate.tools.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]


def test_records_the_argv_it_was_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["pytest", "something", "else"])
    out = tmp_path / "scale.json"
    argv = ["bench", "scale", "--sizes", "50", "--repeats", "1", "--json", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["argv"] == argv
    load = result["machine"]["load_average"]
    assert sorted(load) == ["end", "start"] and min(load.values()) >= 0
    (size,) = result["sizes"].values()
    for name, timing in size["strategies"].items():  # wall clock and CPU time, each stats
        assert sorted(timing) == ["cpu_seconds", "seconds"], name
        assert all(sorted(t) == ["max", "median", "min"] for t in timing.values())
    assert sorted(size["ratios"]) == sorted(
        f"{r} / hand_loop{c}" for r in ("freeze", "freeze+summary") for c in ("", " (CPU)")
    )
    md = tmp_path / "scale.md"
    assert main([*argv[:-2], "--markdown", str(md)]) == 0
    text = md.read_text()
    assert "Command: `gradgate bench scale --sizes 50 --repeats 1 --markdown" in text
    assert "; load average (1 min) " in text and "| strategy (CPU time) |" in text


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


def test_benchmarks_page_has_the_fine_tune_sections_with_real_commands() -> None:
    page = (ROOT / "docs" / "BENCHMARKS.md").read_text()
    for workload in ("autofreeze", "integrations"):
        assert f"### `{workload}`" in page
        assert f"Command: `gradgate bench {workload} " in page
    assert "| lightning GradgateFinetuning | 1.202 |" in page


def test_rows_parses_its_own_options() -> None:
    argv = ["bench", "rows", "--repeats", "2", "--steps", "3", "--fraction", "0.05"]
    argv += ["--vocab", "1000", "--dim", "8", "--sequences", "4", "--seq-len", "16"]
    args = build_parser().parse_args([*argv, "--lr", "0.01", "--weight-decay", "0.1"])
    config = bench_rows.config_of(args)
    assert config == {
        "vocab": 1000,
        "dim": 8,
        "fraction": 0.05,
        "batch": 4,
        "seq": 16,
        "reps": 2,
        "steps": 3,
        "threads": bench.DEFAULT_THREADS,
        "lr": 0.01,
        "weight_decay": 0.1,
        "tiny": False,
        "trainable_rows": 50,
    }
    defaults = bench_rows.config_of(build_parser().parse_args(["bench", "rows"]))
    assert (defaults["vocab"], defaults["dim"], defaults["trainable_rows"]) == (50_000, 256, 500)
    assert (defaults["batch"], defaults["seq"], defaults["reps"]) == (8, 32, 5)


def test_rows_refuses_a_fraction_that_leaves_no_row_on_one_side() -> None:
    for fraction in ("0", "1"):
        args = build_parser().parse_args(["bench", "rows", "--fraction", fraction])
        with pytest.raises(InvalidArgumentError, match=r"gives \d+ trainable rows; give a"):
            bench_rows.config_of(args)


def test_rows_tiny_run_shows_who_is_exact(tmp_path: Path) -> None:
    out, md = tmp_path / "rows.json", tmp_path / "rows.md"
    argv = ["bench", "rows", "--tiny", "--threads", "1", "--json", str(out)]
    assert main([*argv, "--markdown", str(md)]) == 0
    result = json.loads(out.read_text())
    assert result["argv"] == [*argv, "--markdown", str(md)]
    strategies = result["strategies"]
    assert list(strategies) == ["full", "mask_hook", "peft_tokens", "gg_rows"]
    exact = {name: row["frozen_rows_bit_identical"] for name, row in strategies.items()}
    assert exact == {"full": False, "mask_hook": False, "peft_tokens": True, "gg_rows": True}
    assert all(row["trainable_rows_moved"] for row in strategies.values())
    # Same update up to float rounding: gg.rows sums R's output-layer gradient in a k-row
    # matmul, PEFT in the full-size one (the embedding's gradient is bit-identical).
    assert strategies["peft_tokens"]["max_abs_diff_vs_gg_rows"] <= 1e-6
    c = result["config"]
    adam_rows = 2 * c["trainable_rows"] * c["dim"] * 4  # exp_avg and exp_avg_sq, float32
    assert strategies["gg_rows"]["optimizer_state_bytes"] == adam_rows
    assert strategies["mask_hook"]["optimizer_state_bytes"] == 2 * c["vocab"] * c["dim"] * 4
    assert set(result["ratios"]) == {"gg_rows/full", "gg_rows/mask_hook", "gg_rows/peft_tokens"}
    for key, spread in result["ratio_ranges"].items():
        assert spread["min"] <= result["ratios"][key] == spread["median"] <= spread["max"]
    page = md.read_text()
    assert page.startswith("### `rows`\n\nCommand: `gradgate bench rows --tiny --threads 1")
    assert "| mask_hook |" in page and "| **no** |" in page


def test_rows_without_peft_reports_it_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "peft", None)  # makes `import peft` raise ImportError
    args = build_parser().parse_args(["bench", "rows", "--vocab", "64", "--dim", "4"])
    args.fraction, args.repeats, args.steps, args.threads = 0.25, 1, 1, 1
    result = bench_rows.measure(args)
    assert "peft is not installed" in result["strategies"]["peft_tokens"]["skipped"]
    assert "gradgate[bench]" in result["strategies"]["peft_tokens"]["skipped"]
    assert result["strategies"]["gg_rows"]["frozen_rows_bit_identical"] is True
    assert "gg_rows/peft_tokens" not in result["ratios"]
    assert "| peft_tokens | skipped: peft is not installed" in bench_rows.to_markdown(result, "c")


def test_benchmarks_page_has_the_rows_section_from_its_json() -> None:
    page = (ROOT / "docs" / "BENCHMARKS.md").read_text()
    command = "gradgate bench rows --repeats 5 --steps 5 --json docs/bench/rows.json"
    assert f"Command: `{command}`" in page
    result = json.loads((ROOT / "docs" / "bench" / "rows.json").read_text())
    row = bench_rows._cells("gg_rows", result["strategies"]["gg_rows"])
    assert "| " + " | ".join(row) + " |" in page  # the page shows the JSON's figures
    spread = result["ratio_ranges"]["gg_rows/peft_tokens"]
    assert f"| gg_rows/peft_tokens | {spread['median']:.3f} | {spread['min']:.3f}-" in page
    assert "python bench/rows.py" not in (ROOT / "docs" / "rows.md").read_text()


def test_bench_cache_reports_every_reading_path_against_the_floor(tmp_path: Path) -> None:
    out, md = tmp_path / "cache.json", tmp_path / "cache.md"
    argv = ["bench", "cache", "--repeats", "2", "--warmup", "0", "--samples", "64"]
    argv += ["--epochs", "1", "--no-progress", "--json", str(out), "--markdown", str(md)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    paths = ["loader", "dataloader", "disk_loader", "disk_dataloader"]
    paths += ["workers2_floor", "workers2_loader", "workers2_dataloader"]
    assert list(result["strategies"]) == ["floor", *paths]
    # the cache's worker paths are also set against the 2-worker TensorDataset floor
    against = [f"{name}/floor" for name in paths]
    against += ["workers2_loader/workers2_floor", "workers2_dataloader/workers2_floor"]
    assert list(result["ratio_ranges"]) == against
    assert list(result["ratios"]) == against
    for key in against:
        ratio = result["ratio_ranges"][key]
        assert ratio["min"] <= ratio["median"] <= ratio["max"]
        assert result["ratios"][key] == ratio["median"]
    for name in paths:
        assert len(result["strategies"][name]["seconds"]) == 3
    text = md.read_text()
    assert "| loader/floor |" in text and "| workers2_floor |" in text
    assert "| workers2_loader/workers2_floor |" in text


def test_benchmarks_page_has_the_cache_section_with_the_two_worker_floor() -> None:
    page = (ROOT / "docs" / "BENCHMARKS.md").read_text()
    result = json.loads((ROOT / "docs" / "bench" / "cache.json").read_text())
    for key in ("workers2_loader/workers2_floor", "workers2_dataloader/workers2_floor"):
        spread = result["ratio_ranges"][key]
        row = f"| {key} | {spread['median']:.3f} | {spread['min']:.3f} | {spread['max']:.3f} |"
        assert row in page  # the page shows the JSON's figures
    # a result recorded before the 2-worker floor existed still renders
    old = json.loads(json.dumps(result))
    del old["strategies"]["workers2_floor"]
    old["ratio_ranges"] = {
        k: v for k, v in old["ratio_ranges"].items() if "workers2_floor" not in k
    }
    text = bench.to_markdown(old, "gradgate bench cache")
    assert "workers2_floor" not in text and "| workers2_loader/floor |" in text
