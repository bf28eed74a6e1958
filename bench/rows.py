"""Benchmark ``rows``: train 1% of a tied 50k x 256 embedding with AdamW, four ways.

Strategies (same model, data and seed):
- ``full``: AdamW over the whole matrix (the cost reference; every row moves).
- ``mask_hook``: the hand-written recipe, a gradient hook zeroing the frozen
  rows' gradient, AdamW over the whole matrix.
- ``peft_tokens``: PEFT's Trainable Tokens on the embedding, tied to the output layer.
- ``gg_rows``: ``gg.train_only(model, gg.rows("embed.weight", ids))``.

Strategies run interleaved (A B C D A B C D ...) after a warm-up; each
repetition times ``--steps`` optimizer steps. Reported per strategy: median,
min and max seconds per step, optimizer-state bytes, and whether the frozen
rows of the effective matrix stayed bit-identical.

Run: python bench/rows.py OUT.json [--reps 5 --steps 10 --threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

import gradgate as gg
from gradgate.tools.bench import machine_info


class _TiedConfig:
    """The part of a transformers config PEFT reads to tie the output layer's adapter."""

    tie_word_embeddings = True

    def to_dict(self) -> dict[str, Any]:
        return {"tie_word_embeddings": True}


class TiedLM(nn.Module):
    """Embedding, a small body, and an output layer tied to the embedding."""

    _tied_weights_keys: ClassVar[list[str]] = [
        "decoder.weight"
    ]  # what PEFT reads on a non-HF model

    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.config = _TiedConfig()
        self.embed = nn.Embedding(vocab, dim)
        self.body = nn.Sequential(nn.Linear(dim, dim), nn.Tanh())
        self.decoder = nn.Linear(dim, vocab, bias=False)
        self.decoder.weight = self.embed.weight

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.decoder(self.body(self.embed(x)))
        return out


@dataclass
class Run:
    """One strategy: its model, optimizer, and how to read its effective matrix."""

    model: nn.Module
    opt: torch.optim.Optimizer
    matrix: Callable[[], torch.Tensor]
    times: list[float]


def _full(model: Any, ids: torch.Tensor, lr: float, wd: float) -> Run:
    opt = torch.optim.AdamW([model.embed.weight], lr=lr, weight_decay=wd)
    gg.train_only(model, model.embed.weight)
    return Run(model, opt, lambda: model.embed.weight.detach(), [])


def _mask_hook(model: Any, ids: torch.Tensor, lr: float, wd: float) -> Run:
    gg.train_only(model, model.embed.weight)
    mask = torch.zeros(model.embed.weight.shape[0], 1)
    mask[ids] = 1.0
    model.embed.weight.register_hook(lambda g: g * mask)
    opt = torch.optim.AdamW([model.embed.weight], lr=lr, weight_decay=wd)
    return Run(model, opt, lambda: model.embed.weight.detach(), [])


def _peft_tokens(model: Any, ids: torch.Tensor, lr: float, wd: float) -> Run:
    from peft import TrainableTokensConfig, get_peft_model

    config = TrainableTokensConfig(target_modules=["embed"], token_indices=ids.tolist())
    peft_model: Any = get_peft_model(model, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    layer: Any = peft_model.base_model.model.embed
    tied = peft_model.base_model.model.decoder
    if type(tied).__name__ != "TrainableTokensLayer":  # else PEFT trains only the input use
        raise RuntimeError("PEFT did not tie the output layer's adapter to the embedding's")

    def matrix() -> torch.Tensor:
        with torch.no_grad():
            merged: torch.Tensor = layer.get_merged_weights(layer.active_adapters)
            return merged.detach().clone()

    return Run(peft_model, opt, matrix, [])


def _gg_rows(model: Any, ids: torch.Tensor, lr: float, wd: float) -> Run:
    gg.train_only(model, gg.rows("embed.weight", ids))
    opt = torch.optim.AdamW(gg.param_groups(model, lr=lr, weight_decay=wd))
    return Run(model, opt, lambda: model.embed.weight.detach(), [])


STRATEGIES: dict[str, Callable[[Any, torch.Tensor, float, float], Run]] = {
    "full": _full,
    "mask_hook": _mask_hook,
    "peft_tokens": _peft_tokens,
    "gg_rows": _gg_rows,
}


def _step(run: Run, x: torch.Tensor) -> None:
    run.opt.zero_grad(set_to_none=True)
    logits = run.model(x)
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x.reshape(-1)).backward()
    run.opt.step()


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        t.numel() * t.element_size()
        for state in opt.state.values()
        for t in state.values()
        if isinstance(t, torch.Tensor) and t.dim() > 0
    )


def main() -> None:
    """Run every strategy interleaved and write the JSON."""
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--vocab", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--fraction", type=float, default=0.01)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    k = int(args.vocab * args.fraction)
    ids = torch.arange(args.vocab - k, args.vocab)  # new tokens sit at the end
    gen = torch.Generator().manual_seed(0)
    # Batches mix old tokens with the new ones so both kinds of row get gradients.
    data = torch.randint(
        0, args.vocab, (args.reps * args.steps + 2, args.batch, args.seq), generator=gen
    )
    data[..., ::4] = ids[torch.randint(0, k, data[..., ::4].shape, generator=gen)]

    runs: dict[str, Run] = {}
    initial: dict[str, torch.Tensor] = {}
    for name, make in STRATEGIES.items():
        torch.manual_seed(0)
        model = TiedLM(args.vocab, args.dim)
        runs[name] = make(model, ids, args.lr, args.weight_decay)
        initial[name] = runs[name].matrix().clone()
    for run in runs.values():  # warm-up
        for i in range(2):
            _step(run, data[i])
    for rep in range(args.reps):
        for run in runs.values():
            start = time.perf_counter()
            for i in range(args.steps):
                _step(run, data[2 + rep * args.steps + i])
            run.times.append((time.perf_counter() - start) / args.steps)

    frozen = torch.ones(args.vocab, dtype=torch.bool)
    frozen[ids] = False
    rows_bytes = k * args.dim * 4
    result: dict[str, Any] = {
        "workload": "rows",
        "machine": machine_info(args.threads),
        "config": {**vars(args), "trainable_rows": k},
        "strategies": {},
        "ratios": {},
    }
    reference = runs["gg_rows"].matrix()
    for name, run in runs.items():
        now = run.matrix()
        result["strategies"][name] = {
            "max_abs_diff_vs_gg_rows": float((now - reference).abs().max()),
            "seconds": {
                "median": statistics.median(run.times),
                "min": min(run.times),
                "max": max(run.times),
            },
            "optimizer_state_bytes": _state_bytes(run.opt),
            "state_vs_trainable_rows_adamw": _state_bytes(run.opt) / (2 * rows_bytes),
            "frozen_rows_bit_identical": bool(torch.equal(now[frozen], initial[name][frozen])),
            "trainable_rows_moved": not torch.equal(now[~frozen], initial[name][~frozen]),
        }
    times = {n: r.times for n, r in runs.items()}
    for other in ("full", "mask_hook", "peft_tokens"):
        per_rep = [a / b for a, b in zip(times["gg_rows"], times[other], strict=True)]
        result["ratios"][f"gg_rows/{other}"] = statistics.median(per_rep)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"{'strategy':12} {'ms/step':>8} {'min':>7} {'max':>7} {'state MB':>9} {'exact':>6}")
    for name, row in result["strategies"].items():
        s = row["seconds"]
        print(
            f"{name:12} {1e3 * s['median']:8.1f} {1e3 * s['min']:7.1f} {1e3 * s['max']:7.1f} "
            f"{row['optimizer_state_bytes'] / 2**20:9.2f} {row['frozen_rows_bit_identical']!s:>6}"
        )
    print(json.dumps(result["ratios"], indent=2))


if __name__ == "__main__":
    main()
