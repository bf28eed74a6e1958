from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from gradgate.tools.cli import build_parser, main


def test_summary_command_table_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["summary", "gradgate.tools.agent:Agent", "--train-only", "front_end", "--depth", "1"])
        == 0
    )
    table = capsys.readouterr().out
    assert "back_end   PolicyNetwork" in table and "eval (sticky)" in table
    assert main(["summary", "gradgate.tools.agent:Agent", "--freeze", "front_end", "--json"]) == 0
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
    err = _one_line_error(capsys, ["summary", "gradgate.tools.agent:Agent", "--freeze", "front"])
    assert err.startswith("gradgate summary: --freeze front: ") and "'front_end'" in err
    err = _one_line_error(capsys, ["summary", "gradgate.tools.agent"])
    assert "expected MODULE:FACTORY" in err
    err = _one_line_error(capsys, ["summary", "gradgate.tools.agent:Nope"])
    assert "has no 'Nope'" in err
    # only what could build a model is listed, not the module's imports
    assert err.endswith("its models and factories: Agent, FeatureExtractor, PolicyNetwork")


def test_summary_factory_needing_arguments_is_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    err = _one_line_error(capsys, ["summary", "gradgate.tools.agent:PolicyNetwork"])
    assert err == (
        "gradgate summary: 'gradgate.tools.agent:PolicyNetwork' needs arguments (input_size, "
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
    agent = "gradgate.tools.agent:Agent"
    assert main(["summary", agent, "--train-only", "back_end", "--freeze", "**.fc2", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(["summary", agent, "--freeze", "**.fc2", "--train-only", "back_end", "--json"]) == 0
    second = json.loads(capsys.readouterr().out)
    # freeze last: fc2 ends frozen; train_only last: the whole back-end trains
    assert first["trainable"] == 128 * 1568 + 128
    assert second["trainable"] == 128 * 1568 + 128 + 10 * 128 + 10


def test_summary_accepts_module_types(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["summary", "gradgate.tools.agent:Agent", "--freeze", "torch.nn.Linear", "--json"])
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert data["trainable"] == 5088  # only the convolutions still train
    err = _one_line_error(
        capsys, ["summary", "gradgate.tools.agent:Agent", "--freeze", "torch.nn.GRU"]
    )
    assert "--freeze torch.nn.GRU" in err  # a type the model lacks is an error, not a no-op


def test_json_path_is_the_same_option_everywhere(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "s.json"
    assert main(["summary", "gradgate.tools.agent:Agent", "--json", str(out)]) == 0
    assert "module" in capsys.readouterr().out  # the table still goes to stdout
    assert json.loads(out.read_text())["total"] == 207_210
    assert main(["summary", "gradgate.tools.agent:Agent", "--json", "-"]) == 0
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
    for argv in (["demo"], ["bench", "seed"], ["summary", "gradgate.tools.agent:Agent"]):
        err = _one_line_error(capsys, [*argv, "--json", str(missing)])
        assert err == (
            f"gradgate {argv[0]}: --json {missing}: folder {missing.parent} does not exist; "
            "create it first or give a path in an existing folder"
        )


@pytest.fixture
def nothing_runs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace what every command runs with a recorder: an error must come before it."""
    ran: list[str] = []
    from gradgate.tools import bench, demo

    def recorder(name: str) -> Callable[[object], int]:
        def run(args: object) -> int:
            ran.append(name)
            return 0

        return run

    monkeypatch.setattr(bench, "run_bench", recorder("bench"))
    monkeypatch.setattr(demo, "run_demo", recorder("demo"))
    return ran


def test_an_unknown_workload_is_one_line_naming_the_valid_ones(
    capsys: pytest.CaptureFixture[str], nothing_runs: list[str]
) -> None:
    from gradgate.tools.bench import WORKLOADS

    err = _one_line_error_exit(capsys, ["bench", "nosuch"])
    assert err.startswith("gradgate bench: argument workload: invalid choice: 'nosuch'")
    assert f"(choose from {', '.join(WORKLOADS)})" in err
    assert nothing_runs == []


def _one_line_error_exit(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Like _one_line_error, for errors argparse raises as SystemExit(2)."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code  # type: ignore[assignment]
    assert code == 2, argv
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and "usage:" not in captured.err, captured.err
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], "gradgate: the following arguments are required: COMMAND (one of demo, summary, "
         "bench; gradgate --help describes them)"),
        (["nosuch"], "gradgate: argument COMMAND: invalid choice: 'nosuch' (choose from demo, "
         "summary, bench)"),
        (["summary"], "gradgate summary: the following arguments are required: MODULE:FACTORY; "
         "gradgate summary --help describes them"),
        (["bench", "seed", "--bogus"], "gradgate bench: unrecognized arguments: --bogus; "
         "gradgate bench --help lists the valid ones"),
        (["demo", "--epochs", "x"], "gradgate demo: argument --epochs: invalid int value: 'x'"),
        (["bench", "seed", "--repeats", "0"], "gradgate bench: --repeats 0: must be at least 1"),
        (["bench", "scale", "--sizes", "10", "-5"], "gradgate bench: --sizes -5: must be at "
         "least 1"),
        (["demo", "--adapt-floor", "1.5"], "gradgate demo: --adapt-floor 1.5: must lie in [0, 1]"),
        (["bench", "rows", "--fraction", "0"], "gradgate bench: --fraction 0: must lie in (0, 1)"),
        (["bench", "autofreeze", "--merge", "/nonexistent/a.json"], "gradgate bench: --merge "
         "/nonexistent/a.json: no such file; give earlier runs' JSON"),
    ],
)  # fmt: skip
def test_every_argument_error_is_one_line_exit_2_before_any_work(
    capsys: pytest.CaptureFixture[str], nothing_runs: list[str], argv: list[str], expected: str
) -> None:
    assert _one_line_error_exit(capsys, argv) == expected
    assert nothing_runs == []


def test_an_unwritable_output_is_refused_before_any_work(
    capsys: pytest.CaptureFixture[str],
    nothing_runs: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a folder where a file should go
    err = _one_line_error(capsys, ["bench", "seed", "--json", str(tmp_path)])
    assert err == (
        f"gradgate bench: --json {tmp_path}: is a folder; give a file path such as "
        f"{tmp_path / 'result.json'}"
    )
    # a file where a folder should be
    (tmp_path / "file").write_text("")
    err = _one_line_error(capsys, ["demo", "--plot", str(tmp_path / "file" / "p.png")])
    assert err == (
        f"gradgate demo: --plot {tmp_path / 'file' / 'p.png'}: folder {tmp_path / 'file'} is "
        "not a folder; create it first or give a path in an existing folder"
    )
    # a folder or file without write permission (simulated: the tests may run as root)
    import os

    monkeypatch.setattr(os, "access", lambda path, mode: False)
    err = _one_line_error(capsys, ["bench", "seed", "--markdown", str(tmp_path / "new.md")])
    assert err == (
        f"gradgate bench: --markdown {tmp_path / 'new.md'}: folder {tmp_path} is not writable; "
        "give a writable path"
    )
    err = _one_line_error(capsys, ["bench", "seed", "--json", str(tmp_path / "file")])
    assert err == f"gradgate bench: --json {tmp_path / 'file'}: file exists and is not writable"
    assert nothing_runs == []


def test_a_missing_optional_package_is_refused_before_any_work(
    capsys: pytest.CaptureFixture[str], nothing_runs: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "sklearn" else real(name)
    )
    err = _one_line_error(capsys, ["demo"])
    assert err == (
        "gradgate demo: needs the package 'sklearn', which is not installed; "
        "pip install 'gradgate[demo]'"
    )
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "matplotlib" else real(name)
    )
    err = _one_line_error(capsys, ["bench", "seed", "--plot", "b.png"])
    assert "needs the package 'matplotlib'" in err and "gradgate[plot]" in err
    assert nothing_runs == []


def test_the_old_module_name_of_the_example_agent_still_imports() -> None:
    from gradgate.tools import agent, seed

    assert (seed.Agent, seed.FeatureExtractor, seed.PolicyNetwork) == (
        agent.Agent,
        agent.FeatureExtractor,
        agent.PolicyNetwork,
    )
