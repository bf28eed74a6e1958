"""Per-step gradient norms of each stage in one full fine-tune, and the rules replayed on them.

Trains one ``gradgate bench autofreeze`` workload with everything trainable
(the ``full`` strategy), records every stage's gradient norm at every step and
the held-out accuracy four times per epoch, then replays AutoFreeze's decision
rules on the recorded norms: the step at which each rule would first freeze,
and how far. The replay ignores what a freeze changes afterwards, so it says
*when* a rule fires, not what the run would then do.

Run: python bench/autofreeze_trace.py image OUT.json   (or text; add --seed N)
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import gradgate as gg
from gradgate.tools import bench_autofreeze as auto


def record(task: str, seed: int) -> dict[str, Any]:
    """Train ``task`` fully once; per step, per stage, the gradient norm."""
    torch.set_num_threads(1)
    w = (auto.text_workload if task == "text" else auto.image_workload)(False)
    torch.manual_seed(seed)
    model = w.make_model()
    model.train()
    opt = torch.optim.AdamW(gg.param_groups(model, lr=w.lr, weight_decay=0.01))
    stages = [n for n, m in model.named_children() if any(True for _ in m.parameters())]
    params = [list(model.get_submodule(n).parameters()) for n in stages]
    norms: list[list[float]] = []
    accs: list[tuple[int, float]] = []
    per_epoch = -(-len(w.train) // w.batch)
    step, start = 0, time.process_time()
    for epoch in range(w.epochs):
        g = torch.Generator().manual_seed(seed * 1000 + epoch)
        for idx in torch.randperm(len(w.train), generator=g).split(w.batch):
            x, y = w.train[idx]
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            norms.append([_norm(ps) for ps in params])
            if step % (per_epoch // w.evals_per_epoch) == 0:
                accs.append((step, auto.accuracy(model, w.held_out)))
    return {"task": task, "seed": seed, "stages": stages, "every": w.every, "norms": norms,
            "accs": accs, "cpu_seconds": time.process_time() - start}  # fmt: skip


def _norm(params: list[torch.nn.Parameter]) -> float:
    grads = [p.grad for p in params if p.grad is not None]
    return float(torch.stack(torch._foreach_norm(grads)).norm())


def windows(norms: list[list[float]], every: int) -> list[list[float]]:
    """Mean norm per stage over consecutive windows of ``every`` steps."""
    n = len(norms) // every
    return [[statistics.mean(r[i] for r in norms[k * every : (k + 1) * every])
             for i in range(len(norms[0]))] for k in range(n)]  # fmt: skip


def replay_rank(wins: list[list[float]], ratio: float, patience: int, keep: int) -> list[Any]:
    """The rank rule (decay from a 2-window baseline, ranked): ``(window, boundary)`` moves."""
    n, b, streak, moves = len(wins[0]), 0, [0] * len(wins[0]), []
    base = [statistics.mean(w[i] for w in wins[:2]) for i in range(n)]
    for t, g in enumerate(wins[2:], start=3):
        decay = [g[i] / base[i] for i in range(n)]
        bar = ratio * statistics.median(decay[b:])
        for i in range(b, n):
            streak[i] = streak[i] + 1 if decay[i] < bar else 0
        k = b
        while k < n - keep and streak[k] >= patience:
            k += 1
        if k > b:
            moves.append((t, k))
            b = k
    return moves


def replay_change_rank(wins: list[list[float]], patience: int, keep: int) -> list[Any]:
    """The issue's reference: window-to-window change below the live median, ``patience`` times."""
    n, b, streak, moves = len(wins[0]), 0, [0] * len(wins[0]), []
    for t in range(1, len(wins)):
        c = [abs(wins[t - 1][i] - wins[t][i]) / wins[t - 1][i] for i in range(n)]
        med = statistics.median(c[b:])
        for i in range(b, n):
            streak[i] = streak[i] + 1 if c[i] < med else 0
        k = b
        while k < n - keep and streak[k] >= patience:
            k += 1
        if k > b:
            moves.append((t + 1, k))
            b = k
    return moves


def noise(stages: int, steps: int, cv: float, seed: int) -> list[list[float]]:
    """Stationary log-normal per-step norms: nothing to learn, nothing settles."""
    r = random.Random(seed)
    sigma = math.sqrt(math.log(1 + cv * cv))
    return [[math.exp(r.gauss(0, sigma)) for _ in range(stages)] for _ in range(steps)]


def replays(trace: dict[str, Any]) -> dict[str, Any]:
    """When each rule fires on the trace, and how often on pure noise of the same shape."""
    every, n = trace["every"], len(trace["stages"])
    wins = windows(trace["norms"], every)
    out: dict[str, Any] = {}
    rules: dict[str, Callable[[list[list[float]]], list[Any]]] = {
        "rank_decay(ratio=0.7, patience=2)": lambda w: replay_rank(w, 0.7, 2, 1),
        "rank_decay(ratio=0.8, patience=2)": lambda w: replay_rank(w, 0.8, 2, 1),
        "rank_change(patience=1), keep 3": lambda w: replay_change_rank(w, 1, 3),
        "rank_change(patience=2), keep 3": lambda w: replay_change_rank(w, 2, 3),
    }
    for name, fn in rules.items():
        fired = [bool(fn(windows(noise(n, every * 40, 0.5, s), every))) for s in range(100)]
        out[name] = {"moves (window, frozen)": fn(wins), "pure noise fired / 100": sum(fired)}
    return out


def main() -> None:
    """Record one trace (or replay a recorded one with ``--replay``) and print the replays."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=["image", "text"])
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--replay", action="store_true", help="read OUT instead of training")
    args = parser.parse_args()
    if args.replay:
        with open(args.out) as f:
            trace = json.load(f)
    else:
        trace = record(args.task, args.seed)
    trace["replays"] = replays(trace)
    with open(args.out, "w") as f:
        json.dump(trace, f)
    print(json.dumps(trace["replays"], indent=1))


if __name__ == "__main__":
    main()
