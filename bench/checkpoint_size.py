"""Size of a trainable-only checkpoint against the whole state_dict (seed and text workloads).

Run: python bench/checkpoint_size.py OUT.json
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

import gradgate as gg
from gradgate.tools.agent import Agent


def _row(name: str, model: nn.Module, folder: Path) -> dict[str, object]:
    small = gg.save_trainable(model, folder / f"{name}.safetensors")
    whole = folder / f"{name}.pt"
    torch.save(model.state_dict(), whole)
    s = gg.summary(model)
    return {
        "workload": name,
        "trainable share of parameters": f"{s.trainable / s.total:.4f}",
        "trainable-only file, bytes": os.path.getsize(small),
        "whole state_dict, bytes": os.path.getsize(whole),
        "file ratio": f"{os.path.getsize(small) / os.path.getsize(whole):.4f}",
    }


def main(out: str) -> None:
    """Write the table as JSON for bench/make_docs.py."""
    from gradgate.tools.zoo import minilm

    folder = Path(tempfile.mkdtemp())
    seed = Agent()
    gg.freeze(seed, "front_end")
    encoder, _ = minilm()
    text = nn.Sequential(encoder, nn.Linear(384, 128), nn.ReLU(), nn.Linear(128, 6))
    gg.freeze(text, "0")
    rows = [_row("seed", seed, folder), _row("text", text, folder)]
    Path(out).write_text(json.dumps({"name": "checkpoint size", "rows": rows}, indent=2))
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench-out/checkpoint.json")
