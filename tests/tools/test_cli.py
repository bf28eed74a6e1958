from __future__ import annotations

import json
from pathlib import Path

import pytest

from gradgate.tools.cli import build_parser, main


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


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err
    return lines[0]


def test_summary_command_errors(capsys: pytest.CaptureFixture[str]) -> None:
    err = _one_line_error(capsys, ["summary", "gradgate.tools.seed:Agent", "--freeze", "front"])
    assert err.startswith("gradgate summary: --freeze front: ") and "'front_end'" in err
    err = _one_line_error(capsys, ["summary", "gradgate.tools.seed"])
    assert "expected MODULE:FACTORY" in err
    err = _one_line_error(capsys, ["summary", "gradgate.tools.seed:Nope"])
    assert "has no 'Nope'" in err and "Agent" in err


def test_summary_factory_needing_arguments_is_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    err = _one_line_error(capsys, ["summary", "gradgate.tools.seed:PolicyNetwork"])
    assert err == (
        "gradgate summary: 'gradgate.tools.seed:PolicyNetwork' needs arguments (input_size, "
        "hidden_size, output_size); point at a function that builds the model without arguments"
    )


def test_summary_missing_dependency_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "needs_absent.py").write_text("import absent_package_for_gradgate_tests\n")
    (tmp_path / "lazy_absent.py").write_text(
        "def build():\n    import absent_package_for_gradgate_tests\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    err = _one_line_error(capsys, ["summary", "needs_absent:build"])
    assert "cannot import 'needs_absent'" in err
    assert "No module named 'absent_package_for_gradgate_tests'" in err
    err = _one_line_error(capsys, ["summary", "lazy_absent:build"])
    assert "needs a package that is not installed" in err


def test_summary_applies_steps_in_the_order_typed(capsys: pytest.CaptureFixture[str]) -> None:
    agent = "gradgate.tools.seed:Agent"
    assert main(["summary", agent, "--train-only", "back_end", "--freeze", "**.fc2", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(["summary", agent, "--freeze", "**.fc2", "--train-only", "back_end", "--json"]) == 0
    second = json.loads(capsys.readouterr().out)
    # freeze last: fc2 ends frozen; train_only last: the whole back-end trains
    assert first["trainable"] == 128 * 1568 + 128
    assert second["trainable"] == 128 * 1568 + 128 + 10 * 128 + 10


def test_summary_accepts_module_types(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["summary", "gradgate.tools.seed:Agent", "--freeze", "torch.nn.Linear", "--json"]) == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert data["trainable"] == 5088  # only the convolutions still train
    err = _one_line_error(
        capsys, ["summary", "gradgate.tools.seed:Agent", "--freeze", "torch.nn.GRU"]
    )
    assert "--freeze torch.nn.GRU" in err  # a type the model lacks is an error, not a no-op


def test_json_path_is_the_same_option_everywhere(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "s.json"
    assert main(["summary", "gradgate.tools.seed:Agent", "--json", str(out)]) == 0
    assert "module" in capsys.readouterr().out  # the table still goes to stdout
    assert json.loads(out.read_text())["total"] == 207_210
    assert main(["summary", "gradgate.tools.seed:Agent", "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["total"] == 207_210


def test_help_has_text_for_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("demo", "summary", "bench"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert "``" not in text and ":func:" not in text  # no raw RST
        parser = build_parser()
        sub = next(a for a in parser._actions if a.dest == "command")
        for action in sub.choices[command]._actions:  # type: ignore[index]
            assert action.help, f"gradgate {command} {action.option_strings} has no help"


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


def test_an_output_in_a_missing_folder_is_refused_before_any_work(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = tmp_path / "absent" / "out.json"
    for argv in (["demo"], ["bench", "seed"], ["summary", "gradgate.tools.seed:Agent"]):
        err = _one_line_error(capsys, [*argv, "--json", str(missing)])
        assert err == (
            f"gradgate {argv[0]}: --json {missing}: folder {missing.parent} does not exist; "
            "create it first"
        )
