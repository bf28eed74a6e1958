"""Code that runs inside the 2-rank gloo processes of tests/distributed/test_rows_ddp.py.

Each scenario writes ``<out>/<scenario>.<rank>.json``; the pytest side asserts.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import cases
import gradgate as gg
from gradgate import distributed as ggd
from spawn_harness import run_ranks

VOCAB, DIM = 200, 16
NEW = [198, 199]  # 1% of the rows: the new tokens


class TiedLM(cases.TiedLM):
    """``cases.TiedLM`` (embedding tied to the output layer) at this file's sizes."""

    def __init__(self) -> None:
        super().__init__(VOCAB, DIM)


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(300 + step)
    x = torch.randint(0, VOCAB, (8, 6), generator=g)
    x[:, 0] = torch.tensor(NEW * 4)  # the new tokens appear in every batch
    return x, torch.randint(0, VOCAB, (8, 6), generator=g)


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))


def _gather(value: Any) -> list[Any]:
    out: list[Any] = [None, None]
    dist.all_gather_object(out, value)
    return out


def _setup(body: bool = True) -> tuple[TiedLM, TiedLM, torch.Tensor]:
    torch.manual_seed(0)
    model = TiedLM()
    gg.train_only(
        model, ["body", gg.rows("embed.weight", NEW)] if body else gg.rows("embed.weight", NEW)
    )
    return model, copy.deepcopy(model), model.embed.weight.detach().clone()


def _report(model: TiedLM, reference: TiedLM, start: torch.Tensor) -> dict[str, Any]:
    w = model.embed.weight.detach()
    frozen = [i for i in range(VOCAB) if i not in NEW]
    return {
        "weights_same_on_both_ranks": len(set(_gather(gg.fingerprint(model)))) == 1,
        "full_w_bytes_same_on_both_ranks": len(set(_gather(w.numpy().tobytes().hex()))) == 1,
        "frozen_rows_bit_identical": torch.equal(w[frozen], start[frozen]),
        "trainable_rows_moved": not torch.equal(w[NEW], start[NEW]),
        "max_diff_vs_single_process": max(
            float((a - b).detach().abs().max())
            for a, b in zip(model.parameters(), reference.parameters(), strict=True)
        ),
        "w_grad_none": dict(model.named_parameters())["embed.weight"].grad is None,  # W: frozen
    }


def _train(
    rank: int,
    steps: int,
    local_step: Callable[[Any, torch.Tensor, torch.Tensor], None],
    *,
    body: bool = True,
    clip: float | None = None,
) -> dict[str, Any]:
    """The wrapped model and the single-process reference, trained side by side.

    ``local_step(ddp, x, y)`` runs this rank's forward and backward on its
    share of the global batch ``x, y``; the reference trains on all of it.
    AdamW with weight decay on both; ``clip`` clips both over ``parameters()``.
    """
    model, reference, start = _setup(body)
    ddp = ggd.wrap(model)
    counter = ggd.track_communication(ddp)
    opt = torch.optim.AdamW(gg.param_groups(model, lr=0.05, weight_decay=0.1))
    ref_opt = torch.optim.AdamW(gg.param_groups(reference, lr=0.05, weight_decay=0.1))
    for step in range(steps):
        x, y = _batch(step)
        opt.zero_grad()
        local_step(ddp, x, y)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(ddp.parameters(), clip)  # sees R, as on a plain model
        opt.step()
        ref_opt.zero_grad()
        _loss(reference, x, y).backward()  # single process, the concatenated batch
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(reference.parameters(), clip)
        ref_opt.step()
    trained = len(NEW) * DIM + (sum(p.numel() for p in model.body.parameters()) if body else 0)
    return {
        **_report(model, reference, start),
        "elements_communicated": counter.elements,
        "rows_and_body_times_steps": trained * steps,
    }


def rows_exact(rank: int) -> dict[str, Any]:
    """AdamW with weight decay, 10 steps, each rank its half of the global batch."""

    def local(ddp: Any, x: torch.Tensor, y: torch.Tensor) -> None:
        _loss(ddp, x.chunk(2)[rank], y.chunk(2)[rank]).backward()

    return _train(rank, 10, local)


def rows_no_sync(rank: int) -> dict[str, Any]:
    """Gradient accumulation: a no_sync micro-batch, then a synchronised one, per step."""

    def local(ddp: Any, x: torch.Tensor, y: torch.Tensor) -> None:
        micro = list(zip(x.chunk(4), y.chunk(4), strict=True))[2 * rank : 2 * rank + 2]
        with ddp.no_sync():
            (_loss(ddp, *micro[0]) / 2).backward()
        (_loss(ddp, *micro[1]) / 2).backward()

    return _train(rank, 3, local)


def rows_only(rank: int) -> dict[str, Any]:
    """Nothing but the rows trains: DDP manages R alone (k x d per step), clipped."""

    def local(ddp: Any, x: torch.Tensor, y: torch.Tensor) -> None:
        _loss(ddp, x.chunk(2)[rank], y.chunk(2)[rank]).backward()

    return _train(rank, 4, local, body=False, clip=0.05)


def run(rank: int, init: str, out: str, scenarios: list[str]) -> None:
    """Entry point for ``torch.multiprocessing.spawn``."""
    run_ranks(rank, init, out, scenarios, lambda name, r, _: globals()[name](r))
