"""Partial tensors: train 1% of a tied 50k x 256 embedding with AdamW, four ways.

Strategies (same model, data and seed):

- ``full``: AdamW over the whole matrix (the cost reference; every row moves).
- ``mask_hook``: the hand-written recipe, a gradient hook zeroing the frozen
  rows' gradient, AdamW over the whole matrix.
- ``peft_tokens``: PEFT's Trainable Tokens on the embedding, tied to the output
  layer (``peft`` is in the ``bench`` extra; without it this strategy is
  reported as skipped, with the reason).
- ``gg_rows``: ``gg.train_only(model, gg.rows("embed.weight", ids))``.

Strategies run interleaved (A B C D A B C D ...) after two warm-up steps each;
each repetition times ``--steps`` optimizer steps. Reported per strategy:
median, min and max seconds per step, optimizer-state bytes, and whether the
frozen rows of the effective matrix stayed bit-identical.

Run: gradgate bench rows --repeats 5 --steps 5 --json docs/bench/rows.json
     (add --tiny while developing: a 2000 x 32 matrix, one repetition of two steps)
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

import gradgate as gg

from .._format import render_table
from ..errors import InvalidArgumentError
from .output import RATIO_NOTE, machine_info

WARMUP_STEPS = 2  # the first steps allocate optimizer state; not what is compared
TINY = {"vocab": 2000, "dim": 32, "fraction": 0.05, "reps": 1, "steps": 2}


class _TiedConfig:
    """The part of a transformers config PEFT reads to tie the output layer's adapter."""

    tie_word_embeddings = True

    def to_dict(self) -> dict[str, Any]:
        return {"tie_word_embeddings": True}


class TiedLM(nn.Module):
    """Embedding, a small body, and an output layer tied to the embedding.

    Example:
        >>> m = TiedLM(10, 4)
        >>> m.decoder.weight is m.embed.weight, tuple(m(torch.tensor([[1, 2]])).shape)
        (True, (1, 2, 10))
    """

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
    times: list[float] = field(default_factory=list)


class Skipped(Exception):
    """A strategy that cannot run here (a missing optional dependency); the reason is reported."""


def _full(model: Any, ids: torch.Tensor, lr: float, wd: float) -> Run:
    opt = torch.optim.AdamW([model.embed.weight], lr=lr, weight_decay=wd)
    gg.train_only(model, model.embed.weight)
    return Run(model, opt, lambda: model.embed.weight.detach())


def _mask_hook(model: Any, ids: torch.Tensor, lr: float, wd: float) -> Run:
    gg.train_only(model, model.embed.weight)
    mask = torch.zeros(model.embed.weight.shape[0], 1)
    mask[ids] = 1.0
    model.embed.weight.register_hook(lambda g: g * mask)
    opt = torch.optim.AdamW([model.embed.weight], lr=lr, weight_decay=wd)
    return Run(model, opt, lambda: model.embed.weight.detach())


def _peft_tokens(model: Any, ids: torch.Tensor, lr: float, wd: float) -> Run:
    try:
        from peft import TrainableTokensConfig, get_peft_model
    except ImportError as e:
        raise Skipped(f"peft is not installed ({e}); pip install 'gradgate[bench]'") from e

    config = TrainableTokensConfig(target_modules=["embed"], token_indices=ids.tolist())
    peft_model: Any = get_peft_model(model, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    layer: Any = peft_model.base_model.model.embed
    tied = peft_model.base_model.model.decoder
    if type(tied).__name__ != "TrainableTokensLayer":  # else PEFT trains only the input use
        raise InvalidArgumentError(
            "bench rows: PEFT did not tie the output layer's adapter to the embedding's, so it "
            "would train the new rows in one use only; this peft version does not read "
            "config.tie_word_embeddings / _tied_weights_keys. Install a peft that does (>=0.15)."
        )

    def matrix() -> torch.Tensor:
        with torch.no_grad():
            merged: torch.Tensor = layer.get_merged_weights(layer.active_adapters)
            return merged.detach().clone()

    return Run(peft_model, opt, matrix)


def _gg_rows(model: Any, ids: torch.Tensor, lr: float, wd: float) -> Run:
    gg.train_only(model, gg.rows("embed.weight", ids))
    opt = torch.optim.AdamW(gg.param_groups(model, lr=lr, weight_decay=wd))
    return Run(model, opt, lambda: model.embed.weight.detach())


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


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of an optimizer's per-element state (scalars such as ``step`` not counted).

    Example:
        >>> p = nn.Parameter(torch.zeros(3, 2)); opt = torch.optim.Adam([p])
        >>> p.grad = torch.ones(3, 2); opt.step(); state_bytes(opt)
        48
    """
    return sum(
        t.numel() * t.element_size()
        for state in opt.state.values()
        for t in state.values()
        if isinstance(t, torch.Tensor) and t.dim() > 0
    )


def config_of(args: argparse.Namespace) -> dict[str, Any]:
    """The workload's settings from the ``gradgate bench`` options (``--tiny`` shrinks them).

    Example:
        >>> ns = argparse.Namespace(vocab=50_000, dim=256, fraction=0.01, sequences=8,
        ...     seq_len=32, repeats=5, steps=10, threads=2, lr=1e-3, weight_decay=0.01,
        ...     tiny=True)
        >>> c = config_of(ns); c["vocab"], c["reps"], c["trainable_rows"]
        (2000, 1, 100)
    """
    config: dict[str, Any] = {
        "vocab": args.vocab,
        "dim": args.dim,
        "fraction": args.fraction,
        "batch": args.sequences,
        "seq": args.seq_len,
        "reps": args.repeats,
        "steps": args.steps,
        "threads": args.threads,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "tiny": args.tiny,
    }
    if args.tiny:
        config.update(TINY)
    k = int(config["vocab"] * config["fraction"])
    if not 0 < k < config["vocab"]:
        raise InvalidArgumentError(
            f"bench rows: --fraction {config['fraction']} of --vocab {config['vocab']} gives "
            f"{k} trainable rows; give a fraction that leaves at least one row on each side"
        )
    config["trainable_rows"] = k
    return config


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run every strategy interleaved; the result in the ``docs/bench/rows.json`` format.

    Example:
        >>> ns = argparse.Namespace(vocab=64, dim=4, fraction=0.25, sequences=2, seq_len=4,
        ...     repeats=1, steps=1, threads=1, lr=1e-3, weight_decay=0.01, tiny=False)
        >>> r = measure(ns)
        >>> r["strategies"]["gg_rows"]["frozen_rows_bit_identical"]
        True
    """
    config = config_of(args)
    torch.set_num_threads(config["threads"])
    vocab, k, steps = config["vocab"], config["trainable_rows"], config["steps"]
    ids = torch.arange(vocab - k, vocab)  # new tokens sit at the end
    gen = torch.Generator().manual_seed(0)
    # Batches mix old tokens with the new ones so both kinds of row get gradients.
    shape = (config["reps"] * steps + WARMUP_STEPS, config["batch"], config["seq"])
    data = torch.randint(0, vocab, shape, generator=gen)
    data[..., ::4] = ids[torch.randint(0, k, data[..., ::4].shape, generator=gen)]

    runs: dict[str, Run] = {}
    skipped: dict[str, str] = {}
    initial: dict[str, torch.Tensor] = {}
    for name, make in STRATEGIES.items():
        torch.manual_seed(0)
        try:
            runs[name] = make(
                TiedLM(vocab, config["dim"]), ids, config["lr"], config["weight_decay"]
            )
        except Skipped as e:
            skipped[name] = str(e)
            continue
        initial[name] = runs[name].matrix().clone()
    for run in runs.values():
        for i in range(WARMUP_STEPS):
            _step(run, data[i])
    for rep in range(config["reps"]):
        for run in runs.values():
            start = time.perf_counter()
            for i in range(steps):
                _step(run, data[WARMUP_STEPS + rep * steps + i])
            run.times.append((time.perf_counter() - start) / steps)

    frozen = torch.ones(vocab, dtype=torch.bool)
    frozen[ids] = False
    rows_bytes = k * config["dim"] * 4
    result: dict[str, Any] = {
        "workload": "rows",
        "machine": machine_info(config["threads"]),
        "config": config,
        "strategies": {},
        "ratios": {},
        "ratio_ranges": {},  # min, median and max of the per-repetition ratios
    }
    reference = runs["gg_rows"].matrix()
    for name in STRATEGIES:
        if name in skipped:
            result["strategies"][name] = {"skipped": skipped[name]}
            continue
        run = runs[name]
        now = run.matrix()
        result["strategies"][name] = {
            "max_abs_diff_vs_gg_rows": float((now - reference).abs().max()),
            "seconds": {
                "median": statistics.median(run.times),
                "min": min(run.times),
                "max": max(run.times),
                "per_repetition": list(run.times),
            },
            "optimizer_state_bytes": state_bytes(run.opt),
            "state_vs_trainable_rows_adamw": state_bytes(run.opt) / (2 * rows_bytes),
            "frozen_rows_bit_identical": bool(torch.equal(now[frozen], initial[name][frozen])),
            "trainable_rows_moved": not torch.equal(now[~frozen], initial[name][~frozen]),
        }
    for other in ("full", "mask_hook", "peft_tokens"):
        if other in runs:
            per_rep = [a / b for a, b in zip(runs["gg_rows"].times, runs[other].times, strict=True)]
            result["ratios"][f"gg_rows/{other}"] = statistics.median(per_rep)
            result["ratio_ranges"][f"gg_rows/{other}"] = {
                "min": min(per_rep),
                "median": statistics.median(per_rep),
                "max": max(per_rep),
            }
    return result


def _cells(name: str, row: dict[str, Any]) -> list[str]:
    if "skipped" in row:
        return [name, f"skipped: {row['skipped']}", "-", "-", "-", "-"]
    s = row["seconds"]
    diff = row["max_abs_diff_vs_gg_rows"]
    return [
        name,
        f"{s['median']:.3f} ({s['min']:.3f}-{s['max']:.3f})",
        f"{row['optimizer_state_bytes'] / 2**20:.2f}",
        f"{row['state_vs_trainable_rows_adamw']:.1f}x",
        "yes" if row["frozen_rows_bit_identical"] else "**no**",
        "0" if diff == 0 else f"{diff:.1e}",
    ]


HEADERS = [
    "strategy",
    "median s/step (min-max)",
    "optimizer state MiB",
    "state / AdamW state of the trainable rows",
    "frozen rows bit-identical",
    "max abs diff to gg_rows",
]


def table(result: dict[str, Any]) -> str:
    """The terminal table of a result, and its ratios.

    Example:
        >>> r = {"strategies": {"peft_tokens": {"skipped": "no peft"}}, "ratios": {}}
        >>> "skipped: no peft" in table(r)
        True
    """
    rows = [_cells(n, row) for n, row in result["strategies"].items()]
    lines = [render_table(HEADERS, rows, right={2, 3})]
    ranges = result.get("ratio_ranges", {})
    for k, v in result["ratios"].items():
        span = _span(ranges.get(k))
        lines.append(f"{k}: {v:.3f}" + (f" (per repetition {span})" if span != "-" else ""))
    return "\n".join(lines)


def _span(spread: dict[str, float] | None) -> str:
    """``"min-max"`` of per-repetition ratios, ``"-"`` for a result written without them."""
    return "-" if not spread else f"{spread['min']:.3f}-{spread['max']:.3f}"


def to_markdown(result: dict[str, Any], command: str) -> str:
    """The docs/BENCHMARKS.md section: step time, optimizer state and exactness per strategy.

    Example:
        >>> r = {"machine": {"cpu": "c", "threads": 1, "torch": "t", "commit": "x"},
        ...      "config": {"vocab": 10, "dim": 2, "trainable_rows": 1, "batch": 1, "seq": 1,
        ...      "reps": 1, "steps": 1, "lr": 1e-3, "weight_decay": 0.01},
        ...      "strategies": {"peft_tokens": {"skipped": "no peft"}}, "ratios": {}}
        >>> to_markdown(r, "gradgate bench rows").splitlines()[0]
        '### `rows`'
    """
    m, c = result["machine"], result["config"]
    lines = [
        "### `rows`",
        "",
        f"Command: `{command}`  ",
        f"Machine: {m['cpu']}, {m['threads']} threads, torch {m['torch']}, commit {m['commit']}",
        "",
        f"A {c['vocab']:,} x {c['dim']} embedding tied to the output layer, "
        f"{c['trainable_rows']:,} rows trainable, AdamW (lr {c['lr']:g}, weight decay "
        f"{c['weight_decay']:g}), batches of {c['batch']} x {c['seq']} tokens; "
        f"{c['reps']} repetitions of {c['steps']} steps, strategies interleaved.",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "---|" * len(HEADERS),
    ]
    for name, row in result["strategies"].items():
        lines.append("| " + " | ".join(_cells(name, row)) + " |")
    if result["ratios"]:
        ranges = result.get("ratio_ranges", {})
        lines += [
            "",
            "| step-time ratio | median of per-repetition ratios | min-max |",
            "|---|---|---|",
        ]
        lines += [
            f"| {k} | {v:.3f} | {_span(ranges.get(k))} |" for k, v in result["ratios"].items()
        ]
        lines += ["", RATIO_NOTE]
    return "\n".join(lines) + "\n"
