"""AutoFreeze's own cost on the image workload of ``gradgate bench autofreeze``.

12 training steps of: full fine-tuning, AutoFreeze before any freeze, AutoFreeze
with the stem frozen, and a hand-frozen stem; 3 interleaved repetitions; process
CPU seconds, 1 thread. Shows what the per-step gradient-norm bookkeeping costs
and what freezing the stem alone saves.

Run: python bench/autofreeze_cost.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

import gradgate as gg
from gradgate.tools import bench_autofreeze as B

KINDS = ("full", "autofreeze, nothing frozen", "autofreeze, stem frozen", "stem frozen by hand")


def steps(w: B.Workload, model: nn.Module, opt: torch.optim.Optimizer, n: int,
          af: gg.AutoFreeze | None) -> float:  # fmt: skip
    """CPU seconds of ``n`` steps of batch 64."""
    g = torch.Generator().manual_seed(0)
    batches = torch.randperm(len(w.train), generator=g)[: n * 64].split(64)
    start = time.process_time()
    for b in batches:
        x, y = B._batch(w.train, b.tolist())
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if af is not None:
            af.step()
    return time.process_time() - start


def main() -> None:
    """Print each kind's CPU seconds per repetition, then a ``result:`` line."""
    torch.set_num_threads(1)
    w = B.image_workload(False, subset=1280, epochs=1)
    res: dict[str, list[float]] = {k: [] for k in KINDS}
    for _ in range(3):
        for kind in KINDS:
            torch.manual_seed(0)
            model = w.make_model()
            model.train()
            opt = torch.optim.AdamW(gg.param_groups(model, lr=1e-3, weight_decay=0.01))
            af = None
            if kind.startswith("autofreeze"):
                af = gg.AutoFreeze(model, optimizer=opt, every=16)
                if kind.endswith("stem frozen"):
                    af._freeze_to(1)
            elif kind == "stem frozen by hand":
                gg.freeze(model, "0")
            steps(w, model, opt, 2, af)  # warm-up
            res[kind].append(steps(w, model, opt, 12, af))
    for kind, secs in res.items():
        print(f"{kind:28s} " + " ".join(f"{s:6.2f}" for s in secs))
    full = sorted(res["full"])[1]
    print("result: median CPU seconds over full's: " + ", ".join(
        f"{k} {sorted(v)[1] / full:.3f}x" for k, v in res.items() if k != "full"))  # fmt: skip


if __name__ == "__main__":
    main()
