"""How much each stage's representation changes per window (issue 26's image workload).

The SVCCA "freeze training" signal (Raghu et al. 2017): a stage whose output no
longer changes can be frozen. One ``full`` fine-tune of the ``gradgate bench
autofreeze`` workload; every 16 steps each stage's output on the first 256
held-out samples (eval mode) is compared with the previous window's by linear
CKA (Kornblith et al. 2019), and ``1 - CKA`` is recorded: 0 is the same
representation up to rotation and scale.

Run: python bench/autofreeze_cka.py image|text SEED OUT.json
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch
import torch.nn.functional as F

import gradgate as gg
from gradgate.tools import bench_autofreeze as B


def _centred_gram(x: torch.Tensor) -> torch.Tensor:
    k = x @ x.T
    h = torch.eye(len(k), dtype=k.dtype) - 1.0 / len(k)
    return h @ k @ h


def _change(a: torch.Tensor, b: torch.Tensor) -> float:
    """``1 - linear CKA`` of two centred Gram matrices."""
    return 1.0 - float((a * b).sum() / (a.norm() * b.norm()))


def record(task: str, seed: int) -> list[dict[str, Any]]:
    """Train ``full`` once; per window the change of every stage and, every 2nd, accuracy."""
    torch.set_num_threads(1)
    w = B.image_workload(False) if task == "image" else B.text_workload(False)
    torch.manual_seed(seed)
    model = w.make_model()
    model.train()
    opt = torch.optim.AdamW(gg.param_groups(model, lr=w.lr, weight_decay=0.01))
    probe = w.held_out.tensors[0][:256]

    def grams() -> list[torch.Tensor]:
        model.eval()
        out, h = [], probe
        with torch.no_grad():
            for stage in model:
                h = stage(h)
                out.append(_centred_gram(h.reshape(len(h), -1).double()))
        model.train()
        return out

    last, step = grams(), 0
    rows: list[dict[str, Any]] = []
    for epoch in range(w.epochs):
        g = torch.Generator().manual_seed(seed * 1000 + epoch)
        for idx in torch.randperm(len(w.train), generator=g).split(w.batch):
            x, y = B._batch(w.train, idx.tolist())
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step % w.every == 0:
                now = grams()
                acc = B.accuracy(model, w.held_out) if step % (2 * w.every) == 0 else None
                rows.append({"step": step, "change": [_change(a, b) for a, b in zip(last, now)],
                             "acc": acc})  # fmt: skip
                last = now
                print(step, " ".join(f"{c:.4f}" for c in rows[-1]["change"]), acc, flush=True)
    return rows


def main() -> None:
    """Record, write OUT, print the per-stage range after the first two windows."""
    task, seed, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    rows = record(task, seed)
    with open(out, "w") as f:
        json.dump({"task": task, "seed": seed, "rows": rows}, f)
    later = [r["change"] for r in rows[2:]]
    ranges = [f"{min(c[i] for c in later):.4f}-{max(c[i] for c in later):.4f}"
              for i in range(len(later[0]))]  # fmt: skip
    print(f"result: {task} seed {seed}, 1 - CKA per window from step {rows[2]['step']}, "
          f"per stage: {', '.join(ranges)}")  # fmt: skip


if __name__ == "__main__":
    main()
