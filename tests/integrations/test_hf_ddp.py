"""HF Trainer DDP (2 CPU ranks, gloo) with schedule changes mid-run: the ranks stay identical.

DDP registers only the parameters that train when it is built; the
``GradgateFinetuning`` callback rebuilds the Trainer's wrapper (in place,
through ``GradgateTrainer``) after an unfreeze, a ProgressiveFreeze freeze
and an AutoFreeze freeze. Without it, the unfrozen layer is never
all-reduced (the ranks drift apart) and the frozen one stalls DDP's reducer.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest

pytest.importorskip("transformers")

from torch.multiprocessing.spawn import spawn

from integrations import hf_ddp_worker

SCENARIOS = ["gradual", "progressive", "autofreeze", "plain_trainer"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Any]]:
    out = tmp_path_factory.mktemp("hf_ddp")
    spawn(hf_ddp_worker.run, args=(str(out), _free_port(), SCENARIOS), nprocs=2, join=True)
    return {
        name: [json.loads((out / f"{name}.{rank}.json").read_text()) for rank in (0, 1)]
        for name in SCENARIOS
    }


@pytest.mark.timeout(600)  # two spawned ranks import torch and transformers: slow under load
@pytest.mark.parametrize("scenario", ["gradual", "progressive", "autofreeze"])
def test_hf_ddp_ranks_identical_after_every_epoch_across_a_schedule_change(
    results: dict[str, list[Any]], scenario: str
) -> None:
    ranks = results[scenario]
    assert all("error" not in r for r in ranks), ranks
    assert ranks[0]["ddp"] == "DistributedDataParallel"
    prints = [r["prints"] for r in ranks]
    assert len(prints[0]) == 3
    for epoch in range(3):
        assert prints[0][epoch] == prints[1][epoch], f"ranks differ after epoch {epoch}"
    epochs = prints[0]
    layer1 = [e["bert.encoder.layer.1"] for e in epochs]
    if scenario == "gradual":  # frozen in epoch 0, unfrozen at the start of epoch 1
        assert layer1[2] != layer1[0]
    elif scenario == "progressive":  # trains in epochs 0 and 1, frozen at the start of epoch 2
        assert layer1[1] != layer1[0] and layer1[2] == layer1[1]
    else:  # trains, then AutoFreeze freezes it after optimizer step 4 (mid-epoch 0)
        assert ranks[0]["frozen"] == ["bert.encoder.layer.1"]
        assert layer1[0] == layer1[1] == layer1[2]
    assert epochs[0]["classifier"] != epochs[2]["classifier"]
    assert len({e["bert.encoder.layer.0"] for e in epochs}) == 1


@pytest.mark.timeout(600)
def test_a_plain_trainer_under_ddp_refuses_a_schedule_it_cannot_keep_in_step(
    results: dict[str, list[Any]],
) -> None:
    for rank in results["plain_trainer"]:
        assert "use gradgate.integrations.transformers.GradgateTrainer" in rank["error"]
