"""Two gloo ranks on CPU: DDP and FSDP2 with frozen parts (one spawn for all scenarios)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from torch.multiprocessing.spawn import ProcessRaisedException, spawn

import ddp_workers
from spawn_harness import spawn_scenarios

SCENARIOS = ["frozen_before_wrap", "gradual_unfreeze", "fsdp2", "cache"]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    return spawn_scenarios(ddp_workers.run, tmp_path_factory.mktemp("ddp"), SCENARIOS)


def test_frozen_before_wrap_matches_single_process(results: dict[str, Any]) -> None:
    for r in results["frozen_before_wrap"]:
        assert r["max_diff_vs_single_process"] < 1e-6
        assert r["frozen_fp_unchanged"] and r["frozen_grads_none"]
        assert r["frozen_fp_all_ranks"][0] == r["frozen_fp_all_ranks"][1]
        # only trainable parameters were ever all-reduced
        assert r["elements_communicated"] == r["trainable_elements_times_steps"]


def test_gradual_unfreeze_and_rewrap_keep_ranks_identical(results: dict[str, Any]) -> None:
    for r in results["gradual_unfreeze"]:
        assert r["same_after_every_step"] == [True] * 6
        assert r["stale_raised"] and r["freeze_after_wrap_refused"]
        assert r["front_trained_after_unfreeze"]
        assert r["announced_stale"]  # heard through gradgate._events, before any forward
        assert r["same_after_rewrap"] and r["hand_change_refused"]


def test_fsdp2_mixed_frozen_and_trainable(results: dict[str, Any]) -> None:
    for r in results["fsdp2"]:
        assert r["removed"] == ["front.0.weight", "front.0.bias", "front.2.weight", "front.2.bias"]
        assert r["frozen_grads_never_reduced"] and r["frozen_local_shards_kept"]
        assert r["added_back"] == r["removed"] and r["front_trains_again"]
    saved = results["fsdp2"][0]["saved"]
    assert saved and Path(saved).stat().st_size > 0


def test_feature_cache_built_once_across_ranks(results: dict[str, Any]) -> None:
    built = [r["rebuilt"] for r in results["cache"]]
    assert sorted(built) == [False, True]  # one rank built, the other read
    assert all(r["exact"] for r in results["cache"])


def test_a_failing_rank_does_not_hang(tmp_path: Path) -> None:
    # whichever rank reports first: the one that raised, or its peer seeing it crash
    reported = r"boom on rank 1|remote worker|Connection (closed|reset)"
    with pytest.raises(ProcessRaisedException, match=reported):
        spawn(
            ddp_workers.run,
            args=(str(tmp_path / "init"), str(tmp_path), ["fail"]),
            nprocs=2,
            join=True,
        )
