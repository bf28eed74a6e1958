"""Code that runs inside the 2 gloo ranks of the HF Trainer DDP test (test_hf_ddp.py).

Each rank sets the environment ``torchrun`` would, so the Trainer (through
accelerate) builds its own process group and its own DDP wrapper; the
callback must rebuild that wrapper after each schedule change. Each scenario
writes ``<out>/<scenario>.<rank>.json``: the fingerprint of every part after
every epoch, or the error the rank met.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

PARTS = ("bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1", "classifier")


def _scenario(name: str, rank: int, out: Path) -> Any:
    from transformers import Trainer, TrainerCallback

    import gradgate as gg
    from gradgate.integrations.transformers import GradgateFinetuning, GradgateTrainer
    from integrations import frameworks as fw

    prints: list[dict[str, str]] = []

    class EpochPrints(TrainerCallback):
        def on_epoch_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            model = kw["model"]
            prints.append({p: gg.fingerprint(model.get_submodule(p)) for p in PARTS})

    frozen = ["bert.embeddings", "bert.encoder.layer.0"]
    stages = ["bert.encoder.layer.1", ["bert.encoder.layer.2", "bert.pooler", "classifier"]]
    if name == "autofreeze":
        callback = GradgateFinetuning(frozen, schedule=fw.autofreeze(stages, every=2))
    elif name == "progressive":  # layer 1 trains in epochs 0 and 1, frozen from epoch 2
        callback = GradgateFinetuning(frozen, schedule=fw.progressive(stages, start=0, end=2))
    else:
        callback = GradgateFinetuning(
            [*frozen, "bert.encoder.layer.1"], unfreeze=[(1, "bert.encoder.layer.1")]
        )
    args = fw.hf_args(
        out / f"{name}-{rank}",
        num_train_epochs=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        ddp_backend="gloo",
        save_strategy="no",
        logging_strategy="no",
        seed=rank,  # the ranks start apart: DDP's broadcast must make them one
        dataloader_num_workers=0,
    )
    trainer_cls = Trainer if name == "plain_trainer" else GradgateTrainer
    trainer = trainer_cls(
        model=fw.hf_model(),
        args=args,
        train_dataset=fw.TokenData(),
        callbacks=[callback, EpochPrints()],
    )
    try:
        trainer.train()
    except gg.InvalidArgumentError as e:
        return {"error": str(e)}
    return {
        "prints": prints,
        "frozen": getattr(callback.schedule, "frozen", None),
        "ddp": type(trainer.model_wrapped).__name__,
    }


def run(rank: int, out: str, port: int, scenarios: list[str]) -> None:
    """Entry point for ``torch.multiprocessing.spawn``."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        TOKENIZERS_PARALLELISM="false",
    )
    torch.set_num_threads(1)
    import torch.distributed as dist

    outp = Path(out)
    for name in scenarios:
        result = _scenario(name, rank, outp)
        (outp / f"{name}.{rank}.json").write_text(json.dumps(result))
        if dist.is_initialized():
            dist.barrier()
    if dist.is_initialized():
        dist.destroy_process_group()
    # As tests/spawn_harness.py: leave at once (gloo's C++ teardown can abort a clean rank).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
