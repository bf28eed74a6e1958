"""Code that runs inside the 2-rank gloo processes of tests/distributed.

Each scenario writes ``<out>/<scenario>.<rank>.json``; the pytest side reads
and asserts, so a failing check shows up as a readable test failure.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import gradgate as gg
from gradgate import distributed as ggd
from spawn_harness import run_ranks


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.front = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16))
        self.back = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.back(self.front(x))
        return out


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 8, generator=g), torch.randn(16, 4, generator=g)


def _half(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t.chunk(2)[rank]


def _gather(value: Any) -> list[Any]:
    out: list[Any] = [None, None]
    dist.all_gather_object(out, value)
    return out


def frozen_before_wrap(rank: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = Net()
    gg.freeze(model, "front")
    reference = copy.deepcopy(model)
    frozen_fp = gg.fingerprint(model.front)
    ddp = ggd.wrap(model)
    counter = ggd.track_communication(ddp)
    opt = torch.optim.SGD(gg.param_groups(model, lr=0.1), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(gg.param_groups(reference, lr=0.1), lr=0.1, momentum=0.9)
    steps = 5
    for step in range(steps):
        x, y = _batch(step)
        loss = F.mse_loss(ddp(_half(x, rank)), _half(y, rank))
        opt.zero_grad()
        loss.backward()
        opt.step()
        ref_loss = F.mse_loss(reference(x), y)  # single process, the global batch
        ref_opt.zero_grad()
        ref_loss.backward()
        ref_opt.step()
    max_diff = max(
        float((a - b).abs().max())
        for a, b in zip(model.parameters(), reference.parameters(), strict=True)
    )
    trainable = sum(p.numel() for p in gg.trainable_parameters(model))
    return {
        "max_diff_vs_single_process": max_diff,
        "frozen_fp_unchanged": gg.fingerprint(model.front) == frozen_fp,
        "frozen_fp_all_ranks": _gather(gg.fingerprint(model.front)),
        "elements_communicated": counter.elements,
        "trainable_elements_times_steps": trainable * steps,
        "frozen_grads_none": all(p.grad is None for p in model.front.parameters()),
    }


def gradual_unfreeze(rank: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.Adam(gg.param_groups(model, lr=0.01))
    ddp = ggd.wrap(model)
    sch = gg.GradualUnfreeze(ddp, ["front", "back"], at=[3, 0], optimizer=opt)
    same_after_step: list[bool] = []
    stale_raised = False
    for step in range(6):
        if step == 3:
            old = sch.wrapped
            sch.step(step)
            try:
                old(torch.randn(2, 8))
            except gg.StaleWrapperError:
                stale_raised = True
        else:
            sch.step(step)
        x, y = _batch(step)
        loss = F.mse_loss(sch.wrapped(_half(x, rank)), _half(y, rank))
        opt.zero_grad()
        loss.backward()
        opt.step()
        fps = _gather(gg.fingerprint(model))
        same_after_step.append(fps[0] == fps[1])
    front_trained = any(p.grad is not None for p in model.front.parameters())
    # freezing after wrap without rewrap is refused, not a stall; the
    # announcement marks the wrapper stale before any forward
    wrapped = sch.wrapped
    assert isinstance(wrapped, ggd.GatedDDP)
    gg.freeze(model, "back")
    announced_stale = wrapped.gg_stale
    try:
        wrapped(torch.randn(2, 8))
        refused = False
    except gg.StaleWrapperError as e:
        refused = "rewrap" in str(e)
    ddp = ggd.rewrap(wrapped, opt)
    x, y = _batch(6)
    loss = F.mse_loss(ddp(_half(x, rank)), _half(y, rank))
    opt.zero_grad()
    loss.backward()
    opt.step()
    fps = _gather(gg.fingerprint(model))
    # a change by hand is not announced: the flags still tell at the next forward
    model.back[2].weight.requires_grad_(True)
    try:
        ddp(torch.randn(2, 8))
        hand_refused = False
    except gg.StaleWrapperError:
        hand_refused = True
    return {
        "same_after_every_step": same_after_step,
        "stale_raised": stale_raised,
        "front_trained_after_unfreeze": front_trained,
        "freeze_after_wrap_refused": refused,
        "announced_stale": announced_stale,
        "same_after_rewrap": fps[0] == fps[1],
        "hand_change_refused": hand_refused,
    }


def fsdp2(rank: int, out: Path) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = Net()
    fully_shard(model.front)
    fully_shard(model.back)
    fully_shard(model)
    opt = torch.optim.Adam(gg.param_groups(model, lr=0.01))
    for step in range(2):
        x, y = _batch(step)
        F.mse_loss(model(_half(x, rank)), _half(y, rank)).backward()
        opt.step()
        opt.zero_grad()
    gg.freeze(model, "front")
    report = gg.sync(opt, model)
    local_before = gg.fingerprint(model.front)
    with gg.guard(model, opt, check="both"):
        for step in range(2, 5):
            x, y = _batch(step)
            F.mse_loss(model(_half(x, rank)), _half(y, rank)).backward()
            grads_none = all(p.grad is None for p in model.front.parameters())
            opt.step()
            opt.zero_grad()
    frozen_kept = gg.fingerprint(model.front) == local_before
    path = gg.save_trainable(model, out / "fsdp.safetensors")
    gg.unfreeze(model, "front")
    added = gg.sync(opt, model)["added"]
    before = [p.detach().to_local().clone() for p in model.front.parameters()]  # type: ignore[attr-defined]
    for step in range(5, 7):
        x, y = _batch(step)
        F.mse_loss(model(_half(x, rank)), _half(y, rank)).backward()
        opt.step()
        opt.zero_grad()
    moved = any(
        not torch.equal(b, p.detach().to_local())  # type: ignore[attr-defined]
        for b, p in zip(before, model.front.parameters(), strict=True)
    )
    return {
        "removed": report["removed"],
        "frozen_grads_never_reduced": grads_none,
        "frozen_local_shards_kept": frozen_kept,
        "saved": str(path) if rank == 0 else None,
        "added_back": added,
        "front_trains_again": moved,
    }


def cache(rank: int, out: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    model = Net()
    gg.freeze(model, "front")
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 8, generator=g), torch.arange(64))
    c = gg.FeatureCache(model.front, data, store="disk", path=out / "cache", progress=False)
    with torch.no_grad():
        exact = torch.equal(c.features(), model.front(data.tensors[0]))
    return {"rebuilt": c.rebuilt, "exact": exact}


def _scenario(name: str, rank: int, out: Path) -> Any:
    if name == "fail":
        if rank == 1:
            raise RuntimeError("boom on rank 1")
        dist.barrier()  # rank 0 waits for a peer that died
        return None
    fn: Any = globals()[name]
    return fn(rank, out) if name in ("fsdp2", "cache") else fn(rank)


def run(rank: int, init: str, out: str, scenarios: list[str]) -> None:
    """Entry point for ``torch.multiprocessing.spawn``."""
    run_ranks(rank, init, out, scenarios, _scenario)
