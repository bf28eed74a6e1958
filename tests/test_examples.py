from __future__ import annotations

import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_seed_scenario_runs(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.argv", ["seed_scenario.py", "--steps", "3"])
    runpy.run_path(str(EXAMPLES / "seed_scenario.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "front-end bit-identical: True" in out
    assert "unexpected gradients (frozen, has grad): none" in out
