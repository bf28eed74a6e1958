"""Code that runs inside the 2-rank gloo processes of tests/distributed/test_autofreeze_ddp.py.

Each scenario writes ``<out>/<scenario>.<rank>.json``; the pytest side compares
the ranks, so a disagreement shows up as a readable test failure.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import gradgate as gg
from spawn_harness import run_ranks

SCENARIOS = ["wrapped", "local", "rank_rule", "contribution", "progress"]


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)
    )  # fmt: skip


def _ddp_step(af: gg.AutoFreeze, opt: torch.optim.Optimizer, rank: int, step: int) -> list[str]:
    """One DDP step on this rank's half of batch ``step``, then ``af.step()``."""
    g = torch.Generator().manual_seed(step)
    x = torch.randn(32, 8, generator=g)
    y = (x[:, :4] * 2).tanh()
    loss = F.mse_loss(af.wrapped(x.chunk(2)[rank]), y.chunk(2)[rank])
    opt.zero_grad()
    loss.backward()
    opt.step()
    return af.step()


def wrapped(rank: int) -> dict[str, Any]:
    """DDP through gg.distributed.wrap: each rank sees its own half of every batch."""
    model = _model()
    opt = torch.optim.AdamW(gg.param_groups(model, lr=2e-2, weight_decay=0.1))
    af = gg.AutoFreeze(gg.distributed.wrap(model), optimizer=opt, every=4, threshold=0.15)
    first_wrapper = af.wrapped
    prints: list[str] = []
    frozen_prints: dict[str, str] = {}
    frozen_unchanged = True
    for step in range(40):
        for name in _ddp_step(af, opt, rank, step):
            frozen_prints[name] = gg.fingerprint(model.get_submodule(name))
        frozen_unchanged &= all(
            gg.fingerprint(model.get_submodule(n)) == fp for n, fp in frozen_prints.items()
        )
        prints.append(gg.fingerprint(model))
    return {
        "history": [d.to_dict() for d in af.history],
        "frozen": af.frozen,
        "fingerprints": prints,
        "rewrapped": af.wrapped is not first_wrapper,
        "frozen_unchanged": frozen_unchanged,
    }


def local(rank: int) -> dict[str, Any]:
    """No DDP: rank 1's first stage changes by 30%, rank 0's not at all.

    Alone, rank 0 would freeze stage 0 (change 0 < 0.2) and rank 1 would not
    (0.3); the all-reduced means change by 0.15, so both must freeze it (and the
    unchanging stage 1 behind it).
    """
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    af = gg.AutoFreeze(model, optimizer=opt, every=2, threshold=0.2)
    local_sums = [0.0, 0.0]
    for step in range(4):
        window = step // 2
        norms = [1.0 + (0.3 if rank == 1 and window == 1 else 0.0), 1.0, 1.0]
        local_sums[window] += norms[0]
        for path, norm in zip(["0", "2", "4"], norms, strict=True):
            params = list(model.get_submodule(path).parameters())
            total = sum(p.numel() for p in params)
            for p in params:
                p.grad = torch.full_like(p, norm / math.sqrt(total))
        af.step()
    return {
        "history": [d.to_dict() for d in af.history],
        "frozen": af.frozen,
        "local_change": abs(local_sums[0] - local_sums[1]) / local_sums[0],
    }


def rank_norms(rank: int) -> list[list[float]]:
    """Per step, per stage: the gradient norms rank ``rank`` sees (rank rule scenario).

    Windows of 2 steps. Windows 0-1 are the baseline (all 1.0). In windows 2-3
    rank 0's first stage decays to 0.5, in windows 4-5 to 0.2; rank 1's never
    does. Alone, rank 0 would freeze stage 0 at step 8 (decay 0.5 < 0.7 x the
    median 1.0, twice) and rank 1 never; the all-reduced decay is 0.75 (not
    settled) and then 0.6 (settled), so both ranks freeze it at step 12.
    """
    front = [1.0, 1.0, 0.5, 0.5, 0.2, 0.2]
    return [[front[step // 2] if rank == 0 else 1.0, 1.0, 1.0] for step in range(2 * len(front))]


def feed_rank_rule(norms: list[list[float]]) -> gg.AutoFreeze:
    """AutoFreeze (rank rule, windows of 2) fed exactly these per-stage gradient norms."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    af = gg.AutoFreeze(model, optimizer=opt, every=2, rule="rank")
    for row in norms:
        for path, norm in zip(["0", "2", "4"], row, strict=True):
            params = [p for p in model.get_submodule(path).parameters() if p.requires_grad]
            total = sum(p.numel() for p in params)
            for p in params:
                p.grad = torch.full_like(p, norm / math.sqrt(total))
        af.step()
    return af


def rank_rule(rank: int) -> dict[str, Any]:
    """The default rank rule under gloo: ranks with different gradients decide alike."""
    af = feed_rank_rule(rank_norms(rank))
    return {"history": [d.to_dict() for d in af.history], "frozen": af.frozen, "rule": af.rule}


def contribution(rank: int, rule: str = "contribution") -> dict[str, Any]:
    """The contribution rule under DDP: each rank its half of every batch, 16 pooled windows."""
    model = _model()
    opt = torch.optim.AdamW(gg.param_groups(model, lr=2e-2, weight_decay=0.1))
    af = gg.AutoFreeze(gg.distributed.wrap(model), optimizer=opt, every=2, rule=rule)
    for step in range(40):
        _ddp_step(af, opt, rank, step)
    return {
        "history": [d.to_dict() for d in af.history],
        "frozen": af.frozen,
        "fingerprint": gg.fingerprint(model),
    }


def progress(rank: int) -> dict[str, Any]:
    """The progress rule under DDP: measured in the optimizer's pre-hook on each rank."""
    return contribution(rank, "progress")


def run(rank: int, init: str, out: str, scenarios: list[str]) -> None:
    """Entry point for ``torch.multiprocessing.spawn``."""
    run_ranks(rank, init, out, scenarios, lambda name, r, _: globals()[name](r))
