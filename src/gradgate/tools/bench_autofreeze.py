"""Adaptive freezing: does AutoFreeze reach full fine-tuning's accuracy in less time?

Two real fine-tunes, each written as an ``nn.Sequential`` of stages:

- ``text``: all-MiniLM-L6-v2 (embeddings, 6 transformer layers, mean-pool + MLP
  head) classifying standard-library docstring sentences by package (the
  ``text`` workload's task), with a held-out split;
- ``image``: EfficientNet-Lite0 (stem, 7 block groups, conv head, classifier)
  on scikit-learn digits, with a held-out split.

Strategies, interleaved per seed: ``full`` (everything trains), ``progressive``
(``gg.ProgressiveFreeze``, linear from 10% to 70% of the steps), ``autofreeze``
(``gg.AutoFreeze``) and ``autofreeze_cache`` (the same, plus a
``gg.FeatureCache`` of the frozen prefix that moves with it: each move caches
only the newly frozen stages, reading the previous cache).

Reported per strategy: training wall time (held-out evaluation excluded; cache
building included) until the held-out accuracy first reaches the ``full`` run's
final accuracy of the same seed, the final accuracy, and the freeze decisions.

Run: gradgate bench autofreeze --threads 1 --json docs/bench/autofreeze.json \
     --plot docs/bench/autofreeze.png          (add --tiny while developing)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import gradgate as gg

from .output import machine_info

STRATEGIES = ["full", "progressive", "autofreeze", "autofreeze_cache"]


@dataclass
class Workload:
    """A fine-tune: a factory for a fresh model, data, and its training settings."""

    name: str
    make_model: Callable[[], nn.Sequential]
    train: TensorDataset
    held_out: TensorDataset
    lr: float
    batch: int
    epochs: int
    every: int
    evals_per_epoch: int


# -- text: MiniLM as a Sequential of stages -----------------------------------


class Embed(nn.Module):
    """Token ids + mask ``(B, 2, L)`` -> hidden states with the mask as a last channel."""

    def __init__(self, embeddings: nn.Module) -> None:
        super().__init__()
        self.embeddings = embeddings

    def forward(self, ids_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.embeddings(input_ids=ids_mask[:, 0])
        return torch.cat([hidden, ids_mask[:, 1].unsqueeze(-1).to(hidden.dtype)], dim=-1)


class Layer(nn.Module):
    """One BERT layer on ``(hidden, mask)`` packed in one tensor (so it can be cached)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        hidden, mask = packed[..., :-1], packed[..., -1]
        additive = (1.0 - mask)[:, None, None, :] * torch.finfo(hidden.dtype).min
        out: torch.Tensor = self.layer(hidden, attention_mask=additive)
        return torch.cat([out, mask.unsqueeze(-1)], dim=-1)


class Pool(nn.Module):
    """Masked mean pooling and L2 normalisation, as sentence-transformers does."""

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        hidden, mask = packed[..., :-1], packed[..., -1:]
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return F.normalize(pooled, dim=-1)


def text_workload(tiny: bool) -> Workload:
    """MiniLM on stdlib sentences: 6 topics, a stratified-by-chance held-out split."""
    from gradgate.tools.zoo import minilm, stdlib_sentences, tokenize

    encoder, tokenizer = minilm()
    bert: Any = encoder.encoder
    sentences, labels, _ = stdlib_sentences()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    n_train, n_held = (48, 48) if tiny else (400, 160)
    ids = tokenize(tokenizer, [sentences[i] for i in order.tolist()], length=24)
    y = labels[order]
    train = TensorDataset(ids[:n_train], y[:n_train])
    held = TensorDataset(ids[n_train : n_train + n_held], y[n_train : n_train + n_held])
    template = nn.Sequential(
        Embed(bert.embeddings),
        *[Layer(layer) for layer in bert.encoder.layer],
        Pool(),
        nn.Sequential(nn.Linear(384, 128), nn.ReLU(), nn.Linear(128, 6)),
    )

    def make() -> nn.Sequential:
        model = copy.deepcopy(template)
        head = model[-1]
        assert isinstance(head, nn.Sequential)
        for m in head:
            if isinstance(m, nn.Linear):
                m.reset_parameters()  # the seed decides the head
        return model

    return Workload(
        "text", make, train, held, lr=2e-4, batch=16, epochs=1 if tiny else 2,
        every=2 if tiny else 10, evals_per_epoch=2,
    )  # fmt: skip


# -- image: EfficientNet-Lite0 as a Sequential of stages -----------------------


class Stem(nn.Module):
    """Stem convolution, BatchNorm, ReLU6."""

    def __init__(self, conv: nn.Module, bn: nn.Module) -> None:
        super().__init__()
        self.conv, self.bn = conv, bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(self.bn(self.conv(x)))


class Head(nn.Module):
    """1x1 conv head, BatchNorm, ReLU6, global pooling: the 1280-d features."""

    def __init__(self, conv: nn.Module, bn: nn.Module) -> None:
        super().__init__()
        self.conv, self.bn = conv, bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(F.relu6(self.bn(self.conv(x))), 1), 1)


def image_workload(tiny: bool) -> Workload:
    """EfficientNet-Lite0 on digits at 32x32 (a quarter of the ``bn_cnn`` pixels)."""
    from gradgate.tools import zoo

    net = zoo.efficientnet_lite0()
    x, y = zoo.digits_64()
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    n_train, n_held = (128, 96) if tiny else (1200, 400)
    train = TensorDataset(x[:n_train], y[:n_train])
    held = TensorDataset(x[n_train : n_train + n_held], y[n_train : n_train + n_held])
    by_width: dict[int, list[nn.Module]] = {}
    for block in net._blocks:  # a group of Lite0 blocks is a run of one output width
        assert isinstance(block, zoo.MBConv)
        by_width.setdefault(block._project_conv.out_channels, []).append(block)
    groups = [nn.Sequential(*blocks) for blocks in by_width.values()]
    template = nn.Sequential(
        Stem(net._conv_stem, net._bn0), *groups, Head(net._conv_head, net._bn1), nn.Linear(1280, 10)
    )
    for m in template.modules():
        if isinstance(m, nn.BatchNorm2d):
            # TF's 0.01 would leave the running statistics at ImageNet's for the
            # whole short fine-tune, and held-out accuracy (eval mode) with them
            m.momentum = 0.1

    def make() -> nn.Sequential:
        model = copy.deepcopy(template)
        fc = model[-1]
        assert isinstance(fc, nn.Linear)
        fc.reset_parameters()
        return model

    return Workload(
        "image", make, train, held, lr=2e-3, batch=64, epochs=1 if tiny else 3,
        every=1 if tiny else 10, evals_per_epoch=2,
    )  # fmt: skip


# -- one run -------------------------------------------------------------------


def accuracy(model: nn.Module, data: TensorDataset) -> float:
    """Held-out accuracy in eval mode (frozen stages are in eval mode anyway)."""
    model.eval()
    x, y = data.tensors
    with torch.no_grad():
        pred = torch.cat([model(x[i : i + 128]).argmax(-1) for i in range(0, len(y), 128)])
    model.train()
    return float((pred == y).float().mean())


def run(w: Workload, strategy: str, seed: int, threshold: float) -> dict[str, Any]:
    """Train once; return the accuracy curve against training seconds and the freezes."""
    torch.manual_seed(seed)
    model = w.make_model()
    model.train()
    opt = torch.optim.AdamW(gg.param_groups(model, lr=w.lr, weight_decay=0.01))
    steps_per_epoch = -(-len(w.train) // w.batch)
    total = steps_per_epoch * w.epochs
    eval_at = {
        round(steps_per_epoch * (e + k / w.evals_per_epoch))
        for e in range(w.epochs)
        for k in range(1, w.evals_per_epoch + 1)
    }
    af = pf = None
    if strategy.startswith("autofreeze"):
        af = gg.AutoFreeze(model, optimizer=opt, every=w.every, threshold=threshold)
    elif strategy == "progressive":
        stage_list = gg.stages(
            model, *[n for n, m in model.named_children() if any(True for _ in m.parameters())]
        )
        pf = gg.ProgressiveFreeze(
            model, stage_list, start=total // 10, end=(7 * total) // 10, optimizer=opt
        )
    source: Dataset[Any] = w.train
    net: nn.Module = model
    cached = 0  # leading children of ``model`` that ``source`` already applied
    clock, wall, step = 0.0, 0.0, 0
    curve: list[dict[str, float]] = []
    freezes: list[dict[str, Any]] = []
    for epoch in range(w.epochs):
        g = torch.Generator().manual_seed(seed * 1000 + epoch)
        batches = [b.tolist() for b in torch.randperm(len(w.train), generator=g).split(w.batch)]
        i = 0
        while i < len(batches):
            loader = DataLoader(source, batch_sampler=batches[i:])
            for x, y in loader:
                start, start_cpu = time.perf_counter(), time.process_time()
                loss = F.cross_entropy(net(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
                i += 1
                before = af.boundary if af else pf.boundary if pf else 0
                if af is not None:
                    af.step()
                elif pf is not None:
                    pf.step(step)
                after = af.boundary if af else pf.boundary if pf else 0
                moved = after > before
                if moved and af is not None and strategy == "autofreeze_cache":
                    head, net = af.split()
                    source = gg.FeatureCache(head[cached:], source, progress=False)
                    cached = len(head)
                clock += time.process_time() - start_cpu
                wall += time.perf_counter() - start
                now = {"step": step, "seconds": clock, "wall": wall}
                if moved:
                    freezes.append({**now, "frozen": after})
                if step in eval_at:
                    curve.append({**now, "acc": accuracy(model, w.held_out)})
                if moved and net is not model:
                    break  # read the rest of the epoch from the new cache
    assert step == total
    return {
        "curve": curve,
        "final_acc": curve[-1]["acc"],
        "seconds": clock,
        "wall": wall,
        "freezes": freezes,
        "stages": len(af.stages) if af else len(pf.stages) if pf else 0,
        "decisions": [d.to_dict() for d in af.history] if af else [],
    }


def time_to(curve: list[dict[str, float]], target: float, clock: str) -> float | None:
    """Training seconds at the first evaluation reaching ``target`` (None: never)."""
    for point in curve:
        if point["acc"] >= target - 1e-9:
            return point[clock]
    return None


def _ratios(full: list[float | None], other: list[float | None]) -> list[float | None]:
    return [None if f is None or t is None else f / t for f, t in zip(full, other, strict=True)]


def _mean(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.mean(got) if got else None


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per strategy: time to the full run's final accuracy, speed-ups, accuracies.

    ``seconds`` is process CPU time of the one-thread run (what the training
    costs, hardly moved by other processes on a shared machine); ``wall`` is
    wall-clock time, also reported.
    """
    targets = [r["final_acc"] for r in runs["full"]]
    out: dict[str, Any] = {}
    for s, rs in runs.items():
        accs = [r["final_acc"] for r in rs]
        entry: dict[str, Any] = {
            "final_acc": {"mean": statistics.mean(accs), "min": min(accs), "max": max(accs)},
            "acc_drop_points": 100 * (statistics.mean(targets) - statistics.mean(accs)),
            "reached": sum(
                time_to(r["curve"], t, "seconds") is not None
                for r, t in zip(rs, targets, strict=True)
            ),
            "frozen_at_end": [r["freezes"][-1]["frozen"] if r["freezes"] else 0 for r in rs],
        }
        for clock in ("seconds", "wall"):
            full_to = [time_to(r["curve"], t, clock) for r, t in zip(runs["full"], targets)]
            reach = [time_to(r["curve"], t, clock) for r, t in zip(rs, targets, strict=True)]
            speed = _ratios(full_to, reach)
            entry[clock] = {
                "total_mean": statistics.mean(r[clock] for r in rs),
                "to_target": reach,
                "speedup_to_target": speed,
                "speedup_to_target_mean": _mean(speed),
                "speedup_vs_full_total": _ratios([r[clock] for r in runs["full"]], reach),
            }
        out[s] = entry
    return out


def plot(result: dict[str, Any], path: str) -> None:
    """Accuracy and frozen stages against training seconds, per workload (seed 0 bold)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["workloads"])
    fig, axes = plt.subplots(len(names), 2, figsize=(11, 4 * len(names)), squeeze=False)
    colors = dict(zip(STRATEGIES, ["black", "tab:orange", "tab:blue", "tab:green"], strict=True))
    for row, name in zip(axes, names, strict=True):
        runs = result["workloads"][name]["runs"]
        for s, rs in runs.items():
            for k, r in enumerate(rs):
                kw: dict[str, Any] = {
                    "color": colors[s],
                    "alpha": 1.0 if k == 0 else 0.35,
                    "label": s if k == 0 else None,
                }
                row[0].plot(
                    [p["seconds"] for p in r["curve"]], [p["acc"] for p in r["curve"]], "-o",
                    ms=3, **kw,
                )  # fmt: skip
                xs = [0.0] + [f["seconds"] for f in r["freezes"]] + [r["seconds"]]
                ys = [0] + [f["frozen"] for f in r["freezes"]]
                ys.append(ys[-1])
                row[1].step(xs, ys, where="post", **kw)
        target = statistics.mean(r["final_acc"] for r in runs["full"])
        row[0].axhline(target, color="gray", ls="--", lw=0.8)
        row[0].set(
            title=f"{name}: held-out accuracy (dashed: full's final, mean)",
            xlabel="training CPU seconds (1 thread; evaluation excluded)",
            ylabel="accuracy",
        )
        row[1].set(
            title=f"{name}: frozen leading stages",
            xlabel="training CPU seconds",
            ylabel="stages",
        )
        row[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run every strategy for every seed (interleaved) on ``args.tasks``; or merge ``args.merge``.

    Example:
        >>> measure(argparse.Namespace(merge=None, tasks=[], threads=1, seeds=1,
        ...     threshold=0.05, tiny=True, strategies=STRATEGIES))["workloads"]
        {}
    """
    if args.merge:
        merged = []
        for path in args.merge:
            with open(path) as f:
                merged.append(json.load(f))
        combined: dict[str, Any] = merged[0]
        for other in merged[1:]:
            combined["workloads"].update(other["workloads"])
        combined["wall_seconds"] = max(m["wall_seconds"] for m in merged)
        return combined
    torch.set_num_threads(args.threads)
    builders = {"text": text_workload, "image": image_workload}
    result: dict[str, Any] = {
        "workload": "autofreeze",
        "machine": machine_info(args.threads),
        "config": {"seeds": args.seeds, "threshold": args.threshold, "tiny": args.tiny},
        "workloads": {},
    }
    wall = time.perf_counter()
    for name in args.tasks:
        w = builders[name](args.tiny)
        runs: dict[str, list[dict[str, Any]]] = {s: [] for s in args.strategies}
        for seed in range(args.seeds):
            for s in args.strategies:
                r = run(w, s, seed, args.threshold)
                runs[s].append(r)
                print(
                    f"{name} seed {seed} {s:17s} {r['seconds']:6.1f}s cpu {r['wall']:6.1f}s wall "
                    f"acc {r['final_acc']:.4f} "
                    f"freezes {[(f['step'], f['frozen']) for f in r['freezes']]}",
                    flush=True,
                )
        result["workloads"][name] = {
            "config": {
                "train": len(w.train),
                "held_out": len(w.held_out),
                "batch": w.batch,
                "epochs": w.epochs,
                "lr": w.lr,
                "every": w.every,
            },
            "summary": summarise(runs),
            "runs": runs,
        }
    result["wall_seconds"] = time.perf_counter() - wall
    return result


def to_markdown(result: dict[str, Any], command: str) -> str:
    """The docs/BENCHMARKS.md section: per task and strategy, accuracy and speed-up to target.

    Example:
        >>> r = {"machine": {"cpu": "c", "threads": 1, "torch": "t", "commit": "x"},
        ...      "config": {"seeds": 1}, "workloads": {}}
        >>> to_markdown(r, "gradgate bench autofreeze").splitlines()[0]
        '### `autofreeze`'
    """
    m = result["machine"]
    lines = [
        "### `autofreeze`",
        "",
        f"Command: `{command}`  ",
        f"Machine: {m['cpu']}, {m['threads']} threads, torch {m['torch']}, commit {m['commit']}",
        "",
        "| task | strategy | final acc (mean) | drop, points | reached target "
        "| speed-up to target, CPU s (mean) |",
        "|---|---|---|---|---|---|",
    ]
    seeds = result["config"]["seeds"]
    for task, data in result["workloads"].items():
        for s, v in data["summary"].items():
            speed = v["seconds"]["speedup_to_target_mean"]
            lines.append(
                f"| {task} | {s} | {v['final_acc']['mean']:.4f} | {v['acc_drop_points']:+.2f} | "
                f"{v['reached']}/{seeds} | {'-' if speed is None else f'{speed:.2f}x'} |"
            )
    return "\n".join(lines) + "\n"


def print_summary(result: dict[str, Any]) -> None:
    """Print one line per task and strategy: accuracy, target reached, speed-ups."""
    seeds = result["config"]["seeds"]
    for name, data in result["workloads"].items():
        for s, v in data["summary"].items():
            print(
                f"{name} {s:17s} acc {v['final_acc']['mean']:.4f} "
                f"(drop {v['acc_drop_points']:+.2f} pt) reached {v['reached']}/{seeds} "
                f"speedup to target cpu {v['seconds']['speedup_to_target']} "
                f"wall {v['wall']['speedup_to_target']}",
                flush=True,
            )
