"""Two gloo ranks on CPU: row-frozen tensors (gg.rows) under gg.distributed.wrap."""

from __future__ import annotations

from typing import Any

import pytest

import rows_ddp_workers
from spawn_harness import spawn_scenarios

SCENARIOS = ["rows_exact", "rows_no_sync", "rows_only"]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    return spawn_scenarios(rows_ddp_workers.run, tmp_path_factory.mktemp("rows_ddp"), SCENARIOS)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_ranks_identical_frozen_rows_fixed_and_equal_to_one_process(
    results: dict[str, Any], scenario: str
) -> None:
    for r in results[scenario]:
        assert r["weights_same_on_both_ranks"] and r["full_w_bytes_same_on_both_ranks"]
        assert r["frozen_rows_bit_identical"] and r["trainable_rows_moved"]
        assert r["max_diff_vs_single_process"] < 1e-5
        assert r["w_grad_none"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_only_the_trainable_rows_are_communicated(results: dict[str, Any], scenario: str) -> None:
    # the body whole plus k x d rows of W, once per optimizer step (no_sync sends nothing)
    for r in results[scenario]:
        assert r["elements_communicated"] == r["rows_and_body_times_steps"]
