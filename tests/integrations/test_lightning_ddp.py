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


def _ddp_trainer(tmp_path: Path, *callbacks: Any) -> Any:
    """3 epochs under ddp_spawn on 2 CPU ranks, each leaving its group at teardown."""
    return fw.lightning_trainer(
        tmp_path,
        epochs=3,
        strategy="ddp_spawn",
        devices=2,
        callbacks=[*callbacks, DestroyProcessGroup()],
    )


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
    trainer = _ddp_trainer(
        tmp_path,
        GradgateFinetuning(["backbone", "late"], unfreeze=[(1, "late")], guard="both"),
        EpochFingerprints(str(tmp_path)),
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


PARTS = ("backbone", "late", "head")


class Witness(pl.Callback):
    """Each rank records, per epoch, what is frozen and the fingerprint of each part
    (its parameters, and its parameters with buffers); across the fit, which DDP
    reducers ran and whether a frozen parameter reached an optimizer step with a
    gradient."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.epochs: list[dict[str, Any]] = []
        self.reducers: list[Any] = []  # kept alive, so ids cannot be reused
        self.frozen_with_grad: list[str] = []
        self.steps_after_change = 0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        reducer = trainer.strategy.model.reducer
        if not any(r is reducer for r in self.reducers):
            self.reducers.append(reducer)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        frozen = [(n, p) for n, p in pl_module.named_parameters() if not p.requires_grad]
        self.frozen_with_grad += [n for n, p in frozen if p.grad is not None]
        if any(n.startswith("late.") for n, _ in frozen):
            self.steps_after_change += 1

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        parts = {n: pl_module.get_submodule(n) for n in PARTS}
        self.epochs.append(
            {
                "frozen": [n for n, p in pl_module.named_parameters() if not p.requires_grad],
                "params": {n: gg.fingerprint(m.named_parameters()) for n, m in parts.items()},
                "whole": {n: gg.fingerprint(m) for n, m in parts.items()},
            }
        )

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        record = {
            "epochs": self.epochs,
            "reducers": len(self.reducers),
            "frozen_with_grad": sorted(set(self.frozen_with_grad)),
            "steps_after_change": self.steps_after_change,
            "wrapper": type(trainer.strategy.model).__name__,
        }
        (Path(self.folder) / f"witness{trainer.global_rank}.json").write_text(json.dumps(record))


@pytest.mark.timeout(480)
@pytest.mark.parametrize("kind", ["ProgressiveFreeze", "AutoFreeze"])
def test_ddp_ranks_agree_and_ddp_is_rebuilt_across_a_schedule_freeze(
    tmp_path: Path, kind: str
) -> None:
    """``schedule=`` under ddp_spawn (2 gloo ranks): ``late`` freezes mid-run.

    ProgressiveFreeze freezes it at the start of epoch 1; AutoFreeze (every
    optimizer step a window, every window settled) after optimizer step 2 of
    epoch 0, mid-epoch. Lightning builds DDP with ``find_unused_parameters=
    False``: had the callback not rebuilt it, the next backward would stall
    the reducer on ``late``'s missing gradients. While ``late`` trains, its
    BatchNorm's running statistics are each rank's own (DDP broadcasts rank
    0's at the next forward), so ranks are compared on parameters always and
    on buffers once ``late`` is frozen.
    """
    stages = ["late", "head"]
    schedule = (
        fw.progressive(stages, start=0, end=1)
        if kind == "ProgressiveFreeze"
        else fw.autofreeze(stages, every=1)
    )
    before = fw.lightning_net()
    start = {n: gg.fingerprint(before.get_submodule(n)) for n in PARTS}
    trainer = _ddp_trainer(
        tmp_path,
        GradgateFinetuning("backbone", schedule=schedule, guard="both"),
        Witness(str(tmp_path)),
    )
    trainer.fit(fw.lightning_net(), fw.DataLoader(fw.image_data(), batch_size=4))
    ranks = [json.loads((tmp_path / f"witness{r}.json").read_text()) for r in (0, 1)]
    epochs = [[r["epochs"][e] for r in ranks] for e in range(3)]
    late = [n for n, _ in before.late.named_parameters(prefix="late")]
    backbone = [n for n, _ in before.backbone.named_parameters(prefix="backbone")]
    frozen_from = 1 if kind == "ProgressiveFreeze" else 0  # the first epoch ending frozen
    for e, (r0, r1) in enumerate(epochs):
        assert r0["frozen"] == r1["frozen"] == backbone + (late if e >= frozen_from else [])
        assert r0["params"] == r1["params"], f"ranks' parameters differ after epoch {e}"
        if e >= frozen_from:
            assert r0["whole"] == r1["whole"], f"ranks differ after epoch {e}"
    rank0 = [r0 for r0, _ in epochs]
    # Frozen tensors never move: the backbone from the start, late from its freeze.
    assert all(e["whole"]["backbone"] == start["backbone"] for e in rank0)
    assert rank0[0]["params"]["late"] != gg.fingerprint(before.late.named_parameters())
    assert len({e["params"]["late"] for e in rank0}) == 1
    assert len({e["whole"]["late"] for e in rank0[frozen_from:]}) == 1
    # DDP was rebuilt once, for the change; training went on without late's grads.
    assert ranks[0]["wrapper"] == "DistributedDataParallel"
    assert ranks[0]["reducers"] == ranks[1]["reducers"] == 2
    assert ranks[0]["frozen_with_grad"] == ranks[1]["frozen_with_grad"] == []
    assert ranks[0]["steps_after_change"] >= 8
    heads = [start["head"], *(e["whole"]["head"] for e in rank0)]
    assert len(set(heads)) == 4  # the head trained in every epoch
