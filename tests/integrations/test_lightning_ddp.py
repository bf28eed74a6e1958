"""Lightning DDP (2 CPU ranks, gloo) with an unfreeze mid-run: the ranks stay bit-identical."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import gradgate as gg

pytest.importorskip("lightning")

import lightning.pytorch as pl

from gradgate.integrations.lightning import GradgateFinetuning
from integrations import frameworks as fw


class DestroyProcessGroup(pl.Callback):
    """Each rank leaves its gloo group before the spawned process exits.

    A rank that exits with the group alive can abort in gloo's C++ teardown
    ("terminate called without an active exception") after a finished fit.
    """

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


class EpochFingerprints(pl.Callback):
    """Each rank writes the fingerprint of every part after every epoch."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        prints = {
            name: gg.fingerprint(pl_module.get_submodule(name))
            for name in ("backbone", "late", "head")
        }
        path = Path(self.folder) / f"rank{trainer.global_rank}-epoch{trainer.current_epoch}.json"
        path.write_text(json.dumps(prints))


@pytest.mark.timeout(480)  # two spawned ranks import torch and Lightning: slow under load
def test_ddp_ranks_identical_after_every_epoch_across_an_unfreeze(tmp_path: Path) -> None:
    before = fw.lightning_net()
    start = {n: gg.fingerprint(before.get_submodule(n)) for n in ("backbone", "late", "head")}
    trainer = fw.lightning_trainer(
        tmp_path,
        epochs=3,
        strategy="ddp_spawn",
        devices=2,
        callbacks=[
            GradgateFinetuning(["backbone", "late"], unfreeze=[(1, "late")], guard="both"),
            EpochFingerprints(str(tmp_path)),
            DestroyProcessGroup(),
        ],
    )
    data = fw.image_data()
    trainer.fit(
        fw.lightning_net(),
        fw.DataLoader(data, batch_size=4),
        fw.DataLoader(data, batch_size=8),
    )
    epochs = []
    for epoch in range(3):
        ranks = [json.loads((tmp_path / f"rank{r}-epoch{epoch}.json").read_text()) for r in (0, 1)]
        assert ranks[0] == ranks[1], f"ranks differ after epoch {epoch}"
        epochs.append(ranks[0])
    assert all(e["backbone"] == start["backbone"] for e in epochs)
    assert epochs[0]["late"] == start["late"]  # frozen during epoch 0
    assert epochs[2]["late"] != epochs[0]["late"]  # trains after the unfreeze
    assert epochs[2]["head"] != start["head"]
