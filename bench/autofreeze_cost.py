"""AutoFreeze's own cost on the image workload of ``gradgate bench autofreeze``.

12 training steps of: full fine-tuning, AutoFreeze before any freeze, AutoFreeze
with the stem frozen, and a hand-frozen stem; 3 interleaved repetitions; process
CPU seconds, 1 thread. Shows what the per-step gradient-norm bookkeeping costs
and what freezing the stem alone saves.

With ``--overhead``: each rule's bookkeeping, on both workloads' models with
random gradients (milliseconds per step over an AdamW step alone, medians of
15): what it costs per step before anything freezes.

Run: python bench/autofreeze_cost.py [--overhead]
"""

from __future__ import annotations

import sys
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


def overhead() -> None:
    """Milliseconds per step of each rule's bookkeeping (``af.step()`` and, under the progress
    rule, its measurement inside ``opt.step()``) per workload model, then a ``result:`` line.

    Each rule's ``opt.step(); af.step()`` is timed against ``opt.step()`` alone (AdamW at
    lr 0, the same gradients); the difference is the rule's cost."""
    torch.set_num_threads(1)
    out = []
    for name, build in (("text", B.text_workload), ("image", B.image_workload)):
        model = build(False).make_model()
        n = sum(p.numel() for p in model.parameters()) / 1e6
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        base = None
        for rule in (None, "rank", "contribution", "progress"):
            opt = torch.optim.AdamW(model.parameters(), lr=0.0)
            af = (
                None
                if rule is None
                else gg.AutoFreeze(model, optimizer=opt, every=10**6, rule=rule)
            )
            times = []
            for _ in range(15):
                start = time.process_time()
                opt.step()
                if af is not None:
                    af.step()
                times.append(time.process_time() - start)
            ms = sorted(times)[7] * 1e3
            if base is None:
                base = ms
                print(f"{name:5s} ({n:.1f}M parameters) AdamW step alone {ms:6.1f} ms")
                continue
            print(f"{name:5s} ({n:.1f}M parameters) {rule:12s} {ms - base:6.1f} ms per step")
            out.append(f"{name} {rule} {ms - base:.1f} ms")
    print("result: AutoFreeze bookkeeping per step, 1 thread: " + ", ".join(out))


if __name__ == "__main__":
    overhead() if "--overhead" in sys.argv else main()
