"""Which per-stage signal could tell a settled front from a learning one? Measured per window.

Trains one ``gradgate bench autofreeze`` workload with everything trainable
(the ``full`` strategy) and records, for every stage and every window of
``every`` steps, five candidate signals for an adaptive freezing rule:

- ``gnorm``: the mean gradient norm (what AutoFreeze's rules read today);
- ``coh``: gradient coherence ``||sum g|| / sum ||g||`` over the window; for
  gradients that are pure noise (zero mean) it is about ``1/sqrt(every)``
  (0.25 for 16 steps), for a steady gradient it is 1;
- ``adam``: AdamW's own signal-to-noise ``||exp_avg||^2 / sum(exp_avg_sq)``;
- ``cons``: update consistency ``||net move|| / sum ||step||`` of the weights;
- ``move``: relative movement ``||net move|| / ||weights||`` over the window;
- ``lca``: loss change allocation, ``sum g_{t+1} . (w_t - w_{t-1})`` over the
  window: the first-order change of the loss on the *next* batch caused by the
  stage's own update (negative: the stage's steps reduce the loss; for
  zero-mean gradients its expectation is 0). Per step too, in ``lca_steps``;
- per step only, in ``disp_steps``: the slope ``g_t . (w_{t-1} - anchor)`` of the
  loss along the stage's net move since the start of the previous window (the
  first weights during the first two windows): what ``rule="progress"`` reads
  (negative: the stage still goes downhill).

Then it replays the rank rule (freeze the leading stages below ``ratio`` times
the median of the trainable stages in 2 consecutive windows, keep the last
one) on each low-is-settled signal, and the contribution and progress rules
on their per-step values, with how often each fires on pure noise. Findings
are in bench/notes/autofreeze.md.

Run: python bench/autofreeze_signals.py image OUT.json   (or text; --seed N; --replay)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

import gradgate as gg
from gradgate.tools import bench_autofreeze as auto

SIGNALS = ("gnorm", "coh", "adam", "cons", "move", "lca")


def _norm(tensors: Sequence[torch.Tensor]) -> float:
    return float(torch.stack(torch._foreach_norm(list(tensors))).norm())


def _dot(params: Sequence[torch.nn.Parameter], delta: Sequence[torch.Tensor]) -> float:
    """``sum g . d`` over the parameters that have a gradient."""
    return sum(
        float(torch.dot(p.grad.reshape(-1), d.reshape(-1)))
        for p, d in zip(params, delta, strict=True)
        if p.grad is not None
    )


def record(task: str, seed: int) -> dict[str, Any]:
    """Train ``task`` fully once; per window, per stage, every signal in ``SIGNALS``."""
    torch.set_num_threads(1)
    w = (auto.text_workload if task == "text" else auto.image_workload)(False)
    torch.manual_seed(seed)
    model = w.make_model()
    model.train()
    opt = torch.optim.AdamW(gg.param_groups(model, lr=w.lr, weight_decay=0.01))
    stages = [n for n, m in model.named_children() if any(True for _ in m.parameters())]
    params = [[p for p in model.get_submodule(n).parameters() if p.requires_grad] for n in stages]
    every, n = w.every, len(stages)
    grad_sum = [[torch.zeros_like(p) for p in ps] for ps in params]
    norm_sum, path = [0.0] * n, [0.0] * n
    start_of_window = [[p.detach().clone() for p in ps] for ps in params]
    before_step = [[p.detach().clone() for p in ps] for ps in params]
    delta = [[torch.zeros_like(p) for p in ps] for ps in params]
    lca_sum, lca_steps, disp_steps = [0.0] * n, [], []
    window_before = [[p.detach().clone() for p in ps] for ps in params]
    rows: list[dict[str, Any]] = []
    accs: list[tuple[int, float]] = []
    per_epoch = -(-len(w.train) // w.batch)
    step, clock = 0, time.process_time()
    for epoch in range(w.epochs):
        g = torch.Generator().manual_seed(seed * 1000 + epoch)
        for idx in torch.randperm(len(w.train), generator=g).split(w.batch):
            x, y = w.train[idx]
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            for i, ps in enumerate(params):
                grads = [p.grad for p in ps if p.grad is not None]
                norm_sum[i] += _norm(grads)
                torch._foreach_add_(grad_sum[i], grads)
            lca = [_dot(ps, delta[i]) for i, ps in enumerate(params)]
            lca_steps.append(lca)
            # the slope along the net move since the start of the previous window
            disp_steps.append([_dot(ps, [p.detach() - a for p, a in zip(ps, window_before[i])])
                               for i, ps in enumerate(params)])  # fmt: skip
            lca_sum = [a + b for a, b in zip(lca_sum, lca)]
            opt.step()
            step += 1
            for i, ps in enumerate(params):
                now = [p.detach() for p in ps]
                delta[i] = list(torch._foreach_sub(now, before_step[i]))
                path[i] += _norm(delta[i])
                torch._foreach_copy_(before_step[i], now)
            if step % every == 0:
                window_before = [[t.clone() for t in ts] for ts in start_of_window]
                row = _window(step, every, params, opt, grad_sum, norm_sum, path, start_of_window)
                row["lca"] = lca_sum
                rows.append(row)
                norm_sum, path, lca_sum = [0.0] * n, [0.0] * n, [0.0] * n
            if step % (per_epoch // w.evals_per_epoch) == 0:
                accs.append((step, auto.accuracy(model, w.held_out)))
    return {"task": task, "seed": seed, "stages": stages, "every": every, "rows": rows,
            "accs": accs, "lca_steps": lca_steps, "disp_steps": disp_steps,
            "cpu_seconds": time.process_time() - clock}  # fmt: skip


def _window(
    step: int,
    every: int,
    params: list[list[torch.nn.Parameter]],
    opt: torch.optim.Optimizer,
    grad_sum: list[list[torch.Tensor]],
    norm_sum: list[float],
    path: list[float],
    start_of_window: list[list[torch.Tensor]],
) -> dict[str, Any]:
    """The signals of the window that ends at ``step``; resets the window's tensors."""
    row: dict[str, Any] = {"step": step, **{k: [] for k in SIGNALS}}
    for i, ps in enumerate(params):
        now = [p.detach() for p in ps]
        net = _norm(torch._foreach_sub(now, start_of_window[i]))
        m = [opt.state[p]["exp_avg"] for p in ps]
        v = float(sum(float(opt.state[p]["exp_avg_sq"].sum()) for p in ps))
        row["gnorm"].append(norm_sum[i] / every)
        row["coh"].append(_norm(grad_sum[i]) / norm_sum[i])
        row["adam"].append(_norm(m) ** 2 / v)
        row["cons"].append(net / path[i] if path[i] else 0.0)
        row["move"].append(net / _norm(now))
        row["lca"].append(0.0)
        torch._foreach_zero_(grad_sum[i])
        torch._foreach_copy_(start_of_window[i], now)
    return row


def replay(values: list[list[float]], ratio: float, patience: int = 2, keep: int = 1) -> list[Any]:
    """Rank rule on a low-is-settled signal: the ``(window, frozen stages)`` moves."""
    boundary, streak, moves = 0, [0] * len(values[0]), []
    for t, v in enumerate(values, start=1):
        bar = ratio * statistics.median(v[boundary:])
        k = _advance(streak, [x < bar for x in v], boundary, keep, patience)
        if k > boundary:
            moves.append((t, k))
            boundary = k
    return moves


def _advance(streak: list[int], settled: list[bool], boundary: int, keep: int,
             patience: int) -> int:  # fmt: skip
    """Count each trainable stage's settled streak (in ``streak``); the new boundary: the
    longest prefix settled ``patience`` times in a row, keeping the last ``keep`` stages."""
    n = len(streak)
    for i in range(boundary, n):
        streak[i] = streak[i] + 1 if settled[i] else 0
    k = boundary
    while k < n - keep and streak[k] >= patience:
        k += 1
    return k


def replay_contribution(
    steps: list[list[float]], every: int, low: float, evidence: float, patience: int = 1,
    windows: int = 4, keep: int = 1, bound: float | None = None, early: bool = False,
    peak: bool = False, own: float | None = None, limit: int | None = None, pace: int = 0,
) -> list[Any]:  # fmt: skip
    """AutoFreeze's contribution rule on per-step contributions ``g_t . update_{t-1}``
    (negative: the update reduced the loss): the ``(step, frozen stages)`` moves.

    Settled: t below ``low`` (the first version), or with ``bound`` (what
    ``gg.AutoFreeze`` runs: ``bound=0.1``) mean + 2 standard errors below
    ``bound`` times the top trainable stage's mean. With ``early`` (the progress
    rule on its per-step slopes ``g_t . (w_{t-1} - anchor)``) it decides as soon as
    30 steps are pooled (step 32 at 16-step windows; the first step has no slope)
    instead of after ``windows`` windows. With ``peak`` (tried, not kept) the bound is
    measured against the largest top mean seen while some stage had t >= ``evidence``,
    and decisions go on after the evidence is gone. With ``own`` (tried, not kept) a
    stage is also settled when its upper bound is below ``own`` times the largest
    mean it showed itself while its own t was >= ``evidence``; with ``limit`` (tried,
    not kept) at most ``limit`` more stages freeze per decision. With ``pace`` (what
    ``gg.AutoFreeze(pace=...)`` does) ``pace`` more stages freeze per decision once some
    stage had t >= ``evidence`` in 2 decisions in a row spanning >= 30 steps and then none has
    in ``patience``."""
    n, boundary, streak, moves = len(steps[0]), 0, [0] * len(steps[0]), []
    best: float | None = None
    mine: list[float | None] = [None] * n
    run = quiet = 0
    learned = False
    for end in range((2 if early else windows) * every, len(steps) + 1, every):
        seg = torch.tensor(steps[max(1 if early else 0, end - windows * every) : end],
                           dtype=torch.float64).neg()  # fmt: skip
        if len(seg) < 30:
            continue
        mean, se = seg.mean(0), seg.std(0) / len(seg) ** 0.5
        t = (mean / se).nan_to_num(0.0).tolist()
        top = float(mean[boundary:].max())
        if max(t[boundary:]) >= evidence:
            best = top if best is None else max(best, top)
        for i in range(n):
            if t[i] >= evidence:
                mine[i] = max(float(mean[i]), mine[i] or float(mean[i]))
        upper = (mean + 2 * se).tolist()
        live = max(t[boundary:]) >= evidence
        run, quiet = (run + 1, 0) if live else (0, quiet + 1 if learned else 0)
        learned = learned or (run >= 2 and run * every >= 30)
        if not live and not (peak and best is not None) and own is None:
            streak = [0] * n
            if pace and learned and quiet >= patience and boundary < n - keep:
                boundary = min(boundary + pace, n - keep)
                moves.append((end, boundary))
            continue
        if peak and best is not None:
            top = best
        settled = [
            ((live or peak) and (t[i] < low if bound is None else upper[i] < bound * top))
            or (own is not None and (m := mine[i]) is not None and upper[i] < own * m)
            for i in range(n)
        ]
        k = _advance(streak, settled, boundary, keep, patience)
        if limit is not None:
            k = min(k, boundary + limit)
        if k > boundary:
            moves.append((end, k))
            boundary = k
    return moves


def noise_rate(
    stages: int, evidence: float, low: float, patience: int, runs: int = 200,
    bound: float | None = None, early: bool = False, peak: bool = False, **more: Any,
) -> int:  # fmt: skip
    """In how many of ``runs`` synthetic runs of pure noise (640 steps) the rule freezes."""
    g = torch.Generator().manual_seed(0)
    fired = 0
    for _ in range(runs):
        steps = torch.randn(640, stages, generator=g).tolist()
        fired += bool(replay_contribution(steps, 16, low, evidence, patience, bound=bound,
                                          early=early, peak=peak, **more))  # fmt: skip
    return fired


def replays(trace: dict[str, Any]) -> dict[str, Any]:
    """Per signal (not ``gnorm``, whose rules autofreeze_trace.py replays) and ratio, the moves;
    and the contribution rule at a few settings, with its rate of firing on pure noise."""
    out: dict[str, Any] = {}
    for key in ("coh", "adam", "move"):
        values = [r[key] for r in trace["rows"]]
        for ratio in (0.5, 0.7):
            out[f"{key}, ratio {ratio}"] = replay(values, ratio)
    for evidence, low, patience in ((5.0, 2.0, 1), (4.0, 2.0, 1), (4.0, 2.0, 2), (3.0, 2.0, 1)):
        moves = replay_contribution(trace["lca_steps"], trace["every"], low, evidence, patience)
        rate = noise_rate(len(trace["stages"]), evidence, low, patience)
        name = f"contribution, evidence {evidence}, settled {low}, patience {patience}"
        out[name] = {"moves": moves, "noise_runs_fired_of_200": rate}
    moves = replay_contribution(trace["lca_steps"], trace["every"], 0.0, 5.0, bound=0.1)
    rate = noise_rate(len(trace["stages"]), 5.0, 0.0, 1, bound=0.1)
    name = "contribution as gg.AutoFreeze runs it: evidence 5.0, bound 0.1"
    out[name] = {"moves": moves, "noise_runs_fired_of_200": rate}
    if "disp_steps" in trace:  # traces recorded before the progress rule lack its slopes
        for label, peak in (("as gg.AutoFreeze runs it", False), ("against the peak", True)):
            moves = replay_contribution(
                trace["disp_steps"], trace["every"], 0.0, 5.0, bound=0.1, early=True, peak=peak
            )
            rate = noise_rate(len(trace["stages"]), 5.0, 0.0, 1, bound=0.1, early=True, peak=peak)
            name = f"progress {label}: evidence 5.0, bound 0.1"
            out[name] = {"moves": moves, "noise_runs_fired_of_200": rate}
        for limit in (None, 1):  # tried, not kept
            moves = replay_contribution(trace["disp_steps"], trace["every"], 0.0, 5.0,
                                        bound=0.1, early=True, own=0.2, limit=limit)  # fmt: skip
            rate = noise_rate(len(trace["stages"]), 5.0, 0.0, 1, bound=0.1, early=True,
                              own=0.2, limit=limit)  # fmt: skip
            name = "progress, also below 0.2 of the stage's own peak" + (
                ", at most one more stage per decision" if limit else ""
            )
            out[name] = {"moves": moves, "noise_runs_fired_of_200": rate}
        for pace in (1, 2):
            moves = replay_contribution(trace["disp_steps"], trace["every"], 0.0, 5.0,
                                        bound=0.1, early=True, pace=pace)  # fmt: skip
            rate = noise_rate(len(trace["stages"]), 5.0, 0.0, 1, bound=0.1, early=True, pace=pace)
            out[f"progress with pace={pace} (gg.AutoFreeze(pace={pace}))"] = {
                "moves": moves,
                "noise_runs_fired_of_200": rate,
            }
    return out


def main() -> None:
    """Record one trace (or read a recorded one with ``--replay``), print the replays."""
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
    for name, moves in trace["replays"].items():
        print(f"{name}: {moves}")
    print("result: windows of", trace["every"], "steps; medians per stage of coh:",
          [round(statistics.median(r["coh"][i] for r in trace["rows"][2:]), 3)
           for i in range(len(trace["stages"]))])  # fmt: skip


if __name__ == "__main__":
    main()
