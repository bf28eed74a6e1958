"""Two gloo ranks on CPU: AutoFreeze takes the same decisions on every rank (one spawn)."""

from __future__ import annotations

from typing import Any

import pytest

import autofreeze_workers
from spawn_harness import spawn_scenarios


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    return spawn_scenarios(
        autofreeze_workers.run,
        tmp_path_factory.mktemp("autofreeze_ddp"),
        autofreeze_workers.SCENARIOS,
    )


def test_wrapped_ranks_freeze_alike_and_stay_identical(results: dict[str, Any]) -> None:
    r0, r1 = results["wrapped"]
    assert r0["history"] == r1["history"]
    assert r0["frozen"] and r0["frozen"] == r1["frozen"]
    assert r0["fingerprints"] == r1["fingerprints"]  # every step, across each rewrap
    assert r0["rewrapped"] and r1["rewrapped"]
    assert r0["frozen_unchanged"] and r1["frozen_unchanged"]


def test_decisions_come_from_all_reduced_statistics(results: dict[str, Any]) -> None:
    r0, r1 = results["local"]
    # each rank alone would decide differently ...
    assert r0["local_change"] == pytest.approx(0.0)
    assert r1["local_change"] == pytest.approx(0.3)
    # ... but both see the mean and freeze the same stage at the same step
    assert r0["history"] == r1["history"]
    assert r0["history"][1]["change"][0] == pytest.approx(0.15)
    assert r0["frozen"] == r1["frozen"] == ["0", "2"]


def test_rank_rule_ranks_with_different_gradients_freeze_alike(results: dict[str, Any]) -> None:
    # alone (no process group here), each rank would decide differently ...
    alone = [autofreeze_workers.feed_rank_rule(autofreeze_workers.rank_norms(r)) for r in (0, 1)]
    assert [(d.step, d.froze) for d in alone[0].history if d.froze] == [(8, ["0"])]
    assert alone[1].frozen == []
    # ... under gloo both rank the all-reduced decays: the same freeze at the same step
    r0, r1 = results["rank_rule"]
    assert r0["rule"] == r1["rule"] == "rank"
    assert r0["history"] == r1["history"]
    assert [(d["step"], d["froze"]) for d in r0["history"] if d["froze"]] == [(12, ["0"])]
    assert r0["history"][3]["decay"][0] == pytest.approx(0.75)  # not settled: 0.75 > 0.7
    assert r0["history"][5]["decay"][0] == pytest.approx(0.6)
    assert r0["frozen"] == r1["frozen"] == ["0"]


def test_contribution_rule_ranks_measure_and_decide_alike(results: dict[str, Any]) -> None:
    r0, r1 = results["contribution"]
    assert r0["history"] == r1["history"] and r0["frozen"] == r1["frozen"]
    assert r0["fingerprint"] == r1["fingerprint"]
    measured = [d["contribution"] for d in r0["history"] if d["contribution"][-1] is not None]
    assert len(measured) == 20 - 15  # from the 16th window of 2 steps on (30 pooled steps)


def test_progress_rule_ranks_measure_and_decide_alike(results: dict[str, Any]) -> None:
    r0, r1 = results["progress"]
    assert r0["history"] == r1["history"] and r0["frozen"] == r1["frozen"]
    assert r0["fingerprint"] == r1["fingerprint"]
    measured = [d["contribution"] for d in r0["history"] if d["contribution"][-1] is not None]
    # t from the second window on (the first step only keeps the anchor); decisions wait
    # for 30 pooled steps: the first at step 32 (window 16), where both ranks agree
    assert len(measured) == 20 - 1
    assert r0["history"][15]["bound"] == r1["history"][15]["bound"]
