"""Lightning's "modules in eval mode" notice is explained by gradgate, once."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest

pytest.importorskip("lightning")

from gradgate.integrations import lightning
from integrations import frameworks as fw


def test_gradgate_explains_lightnings_eval_mode_notice_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lightning._explain_eval_mode, "said", False, raising=False)
    with (
        caplog.at_level(logging.WARNING, logger="gradgate"),
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        for _ in range(2):  # two fits in one process: said once
            fw.fit_lightning(tmp_path, lightning.GradgateFinetuning("backbone"), epochs=1)
    ours = [r.getMessage() for r in caplog.records if "held in eval mode" in r.getMessage()]
    assert len(ours) == 1
    theirs = [str(w.message) for w in caught if "in eval mode" in str(w.message)]
    held = int(ours[0].split("gradgate: ")[1].split(" ")[0])
    assert held > 0 and f"'Found {held} module(s) in eval mode'" in ours[0]
    # the count is the one Lightning reports (where this Lightning reports it)
    assert all(t.startswith(f"Found {held} module(s) in eval mode") for t in theirs)
