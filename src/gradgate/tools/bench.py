"""``gradgate bench``: measured workloads (see docs/BENCHMARKS.md)."""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from .._progress import progress
from .output import RATIO_NOTE, add_json_argument, machine_info, write_json
from .training import train_epochs

__all__ = [
    "DEFAULT_THREADS",
    "add_bench_arguments",
    "build_scale_model",
    "machine_info",
    "peak_rss_mb",
    "per_step_cost_ms",
    "run_bench",
]

DEFAULT_THREADS = 2  # the CI machine's budget; a fixed default keeps runs comparable

WORKLOADS = (
    "scale",
    "seed",
    "reverse",
    "guard",
    "cache",
    "progressive",
    "bn_cnn",
    "bn_cnn_pass",
    "text",
    "autofreeze",
    "integrations",
    "rows",
)


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the bench options on ``parser``.

    Example:
        >>> p = argparse.ArgumentParser(); add_bench_arguments(p)
        >>> p.parse_args(["scale"]).workload
        'scale'
    """
    parser.add_argument(
        "workload",
        choices=WORKLOADS,
        help="what to measure; docs/BENCHMARKS.md describes each and the command behind it",
    )
    parser.add_argument(
        "--repeats", type=int, default=5, metavar="N", help="measured rounds (default: 5)"
    )
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[10_000, 100_000, 1_000_000],
        metavar="N",
        help="scale: parameter-tensor counts of the generated models",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=DEFAULT_THREADS,
        metavar="N",
        help="torch threads; fixed so runs compare across machines "
        f"(default: {DEFAULT_THREADS}, not this machine's core count)",
    )
    add_json_argument(parser, "the result")
    parser.add_argument(
        "--plot", dest="plot_path", default=None, metavar="PNG", help="write a bar chart"
    )
    parser.add_argument(
        "--markdown",
        dest="markdown_path",
        default=None,
        metavar="PATH",
        help="write the docs/BENCHMARKS.md section",
    )
    parser.add_argument(
        "--samples", type=int, default=4096, metavar="N", help="training samples (default: 4096)"
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        metavar="N",
        help="epochs per run (default: 5; autofreeze: each task's own, 4)",
    )
    parser.add_argument(
        "--warmup", type=int, default=1, metavar="N", help="discarded rounds first (default: 1)"
    )
    parser.add_argument(
        "--no-rss",
        dest="rss",
        action="store_false",
        help="skip the peak-RSS runs (each strategy once more, alone in a fresh process)",
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars (they are drawn only on a terminal anyway)",
    )
    auto = parser.add_argument_group("autofreeze (AutoFreeze against full fine-tuning)")
    auto.add_argument(
        "--tasks",
        nargs="+",
        choices=["text", "image"],
        default=["text", "image"],
        help="MiniLM on BBC headlines, EfficientNet-Lite0 on MNIST (default: both)",
    )
    auto.add_argument("--seeds", type=int, default=3, metavar="N", help="seeds (default: 3)")
    auto.add_argument(
        "--first-seed", type=int, default=0, metavar="N", help="the first seed (default: 0)"
    )
    auto.add_argument(
        "--subset",
        type=int,
        default=None,
        metavar="N",
        help="train on the first N training samples only (default: all)",
    )
    auto.add_argument(
        "--every", type=int, default=None, metavar="N", help="AutoFreeze window (default: 16)"
    )
    auto.add_argument(
        "--rule",
        choices=["progress", "contribution", "rank", "threshold"],
        default=None,
        help="AutoFreeze rule (default: progress; threshold when --threshold is given)",
    )
    auto.add_argument(
        "--threshold", type=float, default=None, help="AutoFreeze threshold (threshold rule)"
    )
    auto.add_argument(
        "--pace",
        type=int,
        default=None,
        metavar="N",
        help="AutoFreeze pace: stages frozen per decision once learning stops (default: 0)",
    )
    auto.add_argument(
        "--partial",
        default=None,
        metavar="JSON",
        help="write the result so far after every run (read a long run before it ends)",
    )
    auto.add_argument(
        "--strategies",
        nargs="+",
        choices=["full", "progressive", "autofreeze", "autofreeze_cache"],
        default=["full", "progressive", "autofreeze", "autofreeze_cache"],
        help="strategies run per seed, interleaved (default: all)",
    )
    auto.add_argument(
        "--merge", nargs="+", default=None, metavar="JSON", help="combine earlier runs' JSON"
    )
    auto.add_argument(
        "--tiny", action="store_true", help="autofreeze, rows: a few steps, to check the wiring"
    )
    integ = parser.add_argument_group("integrations (the trainers' freezing against gradgate's)")
    integ.add_argument(
        "--frameworks",
        nargs="+",
        choices=["lightning", "hf"],
        default=["lightning", "hf"],
        help="which trainers (default: both)",
    )
    integ.add_argument(
        "--images", type=int, default=128, metavar="N", help="Lightning: digits per epoch"
    )
    integ.add_argument(
        "--per-class", type=int, default=24, metavar="N", help="HF: sentences per class (x6)"
    )
    integ.add_argument("--batch", type=int, default=32, metavar="N", help="batch (default: 32)")
    rows = parser.add_argument_group(
        "rows (train some rows of a tied embedding: full, mask hook, PEFT, gg.rows)"
    )
    rows.add_argument("--vocab", type=int, default=50_000, help="rows (default: 50000)")
    rows.add_argument("--dim", type=int, default=256, help="columns (default: 256)")
    rows.add_argument(
        "--fraction", type=float, default=0.01, help="share of rows trainable (default: 0.01)"
    )
    rows.add_argument(
        "--sequences", type=int, default=8, metavar="N", help="sequences per batch (default: 8)"
    )
    rows.add_argument(
        "--seq-len", type=int, default=32, metavar="N", help="tokens per sequence (default: 32)"
    )
    rows.add_argument(
        "--steps", type=int, default=10, metavar="N", help="steps per repetition (default: 10)"
    )
    rows.add_argument("--lr", type=float, default=1e-3, help="AdamW lr (default: 0.001)")
    rows.add_argument(
        "--weight-decay", type=float, default=0.01, help="AdamW weight decay (default: 0.01)"
    )


class _Block(nn.Module):
    def __init__(self, width: int, experts: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = nn.ModuleDict({k: nn.Linear(width, width) for k in ("q", "k", "v", "o")})
        self.ln2 = nn.LayerNorm(width)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
            for _ in range(experts)
        )


def build_scale_model(tensors: int, experts: int = 4, width: int = 64) -> nn.Module:
    """An LLM/MoE-shaped module tree with about ``tensors`` parameter tensors, on ``meta``.

    Example:
        >>> m = build_scale_model(200)
        >>> 150 <= len(list(m.parameters())) <= 250
        True
    """
    per_block = 12 + 4 * experts
    blocks = max(1, round(tensors / per_block))
    with torch.device("meta"), _no_init():
        layers = nn.ModuleList(_Block(width, experts) for _ in range(blocks))
        return nn.ModuleDict({"embed": nn.Embedding(100, width), "layers": layers})


@contextlib.contextmanager
def _no_init() -> Iterator[None]:
    """Skip the weight initialisation of the classes ``_Block`` uses while building on meta.

    A meta tensor holds no values, so initialising it computes nothing, yet
    dispatching the init ops cost 2/3 of building a million-tensor model.
    """
    classes: list[type[nn.Module]] = [nn.Linear, nn.LayerNorm, nn.Embedding]
    saved = [cls.__dict__["reset_parameters"] for cls in classes]
    try:
        for cls in classes:
            setattr(cls, "reset_parameters", _skip)  # noqa: B010 (a method on a torch class)
        yield
    finally:
        for owner, method in zip(classes, saved, strict=True):
            setattr(owner, "reset_parameters", method)  # noqa: B010


def _skip(self: nn.Module) -> None:
    return None


# The selection every scale strategy makes: two globs and an exclude.
SCALE_SELECTORS = ("layers.*.attn", "**.experts.[0-1]")
SCALE_EXCLUDE = "**.o"
# The same selection written by hand, as a user would: a regex over parameter
# names (flip the flags) and one over module names (eval the frozen modules).
_HAND_PARAMS = re.compile(r"layers\.[^.]+\.(?:attn\.(?!o\.)|experts\.[01]\.)")
_HAND_MODULES = re.compile(r"layers\.[^.]+\.(?:attn\.(?!o$)[^.]+|experts\.[01])")


def hand_loop(model: nn.Module) -> None:
    """The bare hand-written freeze ``gg.freeze`` is measured against (no plan, no undo).

    Example:
        >>> m = build_scale_model(200)
        >>> hand_loop(m)
        >>> sorted({n.split(".", 2)[2].split(".")[0] for n, p in m.named_parameters()
        ...         if n.startswith("layers.") and not p.requires_grad})
        ['attn', 'experts']
    """
    for name, p in model.named_parameters():
        if _HAND_PARAMS.match(name):
            p.requires_grad_(False)
    for name, m in model.named_modules():
        if _HAND_MODULES.fullmatch(name):
            m.eval()


def _scale_round(model: nn.Module) -> dict[str, dict[str, float]]:
    """One interleaved round: every strategy once on ``model``, each left as it found it.

    Each is timed twice: ``wall`` (``time.perf_counter``) and ``cpu`` (this
    process's CPU time, ``time.process_time``): on a loaded machine the wall
    clock also counts the time other processes held the core.
    """
    import gradgate as gg

    wall: dict[str, float] = {}
    cpu: dict[str, float] = {}

    def timed(name: str, call: Callable[[], Any]) -> Any:
        w, c = time.perf_counter(), time.process_time()
        result = call()
        wall[name], cpu[name] = time.perf_counter() - w, time.process_time() - c
        return result

    def freeze() -> Any:
        return gg.freeze(model, *SCALE_SELECTORS, exclude=SCALE_EXCLUDE)

    timed("hand_loop", lambda: hand_loop(model))
    model.requires_grad_(True).train()
    handle = timed("freeze", freeze)
    timed("summary", lambda: gg.summary(model, depth=2))
    for clock in (wall, cpu):
        clock["freeze+summary"] = clock["freeze"] + clock["summary"]
    later = timed("unfreeze", lambda: gg.unfreeze(model, "layers.*.attn"))
    later.undo()
    groups = timed("param_groups", lambda: gg.param_groups(model, lr=1e-3, weight_decay=0.01))
    timed("undo", handle.undo)
    opt = torch.optim.SGD(groups[:1], lr=1e-3)  # holds only part: sync adds the rest
    timed("sync", functools.partial(gg.sync, opt, model))
    handle = freeze()
    # save_trainable's inventory: what is stored and what is fingerprinted (meta has no bytes).
    timed(
        "inventory",
        lambda: (gg.checkpoint.trainable_state(model), gg.integrity.frozen_tensors(model)),
    )
    handle.undo()
    # sync keeps a registry of live optimizers (a parameter held by two is refused):
    # drop this round's before the next, or each round would check all earlier ones.
    del opt, groups
    gc.collect()
    return {"wall": wall, "cpu": cpu}


def _scale(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for size in args.sizes:
        model = build_scale_model(size)
        n = len(list(model.parameters()))
        for _ in range(getattr(args, "warmup", 1)):
            _scale_round(model)
        rounds: list[dict[str, dict[str, float]]] = []
        reps = progress(
            range(args.repeats), enabled=not args.no_progress, desc=f"scale {n:,} tensors"
        )
        for _ in reps:
            rounds.append(_scale_round(model))
        walls, cpus = [r["wall"] for r in rounds], [r["cpu"] for r in rounds]
        strategies = {
            k: {
                "seconds": _stats([r[k] for r in walls]),
                "cpu_seconds": _stats([r[k] for r in cpus]),
            }
            for k in walls[0]
        }
        ratios = {}
        for suffix, per in (("", walls), (" (CPU)", cpus)):
            ratios[f"freeze / hand_loop{suffix}"] = _stats(
                [r["freeze"] / r["hand_loop"] for r in per]
            )
            ratios[f"freeze+summary / hand_loop{suffix}"] = _stats(
                [r["freeze+summary"] / r["hand_loop"] for r in per]
            )
        both = strategies["freeze+summary"]["seconds"]
        results[str(n)] = {
            "tensors": n,
            "seconds": both,
            "cpu_seconds": strategies["freeze+summary"]["cpu_seconds"],
            "us_per_tensor": 1e6 * both["median"] / n,
            "strategies": strategies,
            "ratios": ratios,
        }
        ratio, cpu_ratio = ratios["freeze / hand_loop"], ratios["freeze / hand_loop (CPU)"]
        both_cpu = strategies["freeze+summary"]["cpu_seconds"]
        print(
            f"{n:>9,} tensors: select+freeze+summary median {both['median']:.3f} s wall, "
            f"{both_cpu['median']:.3f} s CPU; freeze / hand loop {ratio['median']:.2f}x wall "
            f"(min {ratio['min']:.2f}, max {ratio['max']:.2f}), {cpu_ratio['median']:.2f}x CPU "
            f"(min {cpu_ratio['min']:.2f}, max {cpu_ratio['max']:.2f})"
        )
        for name, data in strategies.items():
            sec, c = data["seconds"], data["cpu_seconds"]
            print(
                f"{'':>11}{name:<16} median {sec['median']:.4f} s "
                f"(min {sec['min']:.4f}, max {sec['max']:.4f}); CPU {c['median']:.4f} s "
                f"({1e6 * c['median'] / n:.2f} us/tensor)"
            )
    return {"workload": "scale", "sizes": results}


# -- training workloads -----------------------------------------------------

BATCH = 64


def _seed_data(n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 28, 28, generator=g)
    return TensorDataset(x, torch.randint(0, 10, (n,), generator=g))


def _loop(
    model: Callable[[torch.Tensor], torch.Tensor],
    opt: torch.optim.Optimizer,
    source: Any,
    epochs: int,
) -> None:
    train_epochs(model, opt, source, epochs, seed=1, batch_size=BATCH)


def _front_pass(front: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([front(x[i : i + 128]) for i in range(0, len(x), 128)])


def _limit_loop(
    back: nn.Module, opt: torch.optim.Optimizer, feats: torch.Tensor, y: torch.Tensor, epochs: int
) -> None:
    g = torch.Generator().manual_seed(1)
    n = len(y)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, BATCH):
            idx = perm[i : i + BATCH]
            loss = F.cross_entropy(back(feats[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()


def _hand_or_gradgate(
    name: str,
    agent: nn.Module,
    train: nn.Module,
    frozen: nn.Module,
    frozen_name: str,
    data: TensorDataset,
    epochs: int,
) -> None:
    """The seed's baselines (lr-0 group, requires_grad loop) and plain gradgate."""
    import gradgate as gg

    if name == "lr0":
        groups = [
            {"params": train.parameters(), "lr": 1e-3},
            {"params": frozen.parameters(), "lr": 0.0},
        ]
        opt = torch.optim.Adam(groups, lr=1e-3)
    elif name == "requires_grad":
        for p in frozen.parameters():
            p.requires_grad = False
        opt = torch.optim.Adam(train.parameters(), lr=1e-3)
    else:
        gg.freeze(agent, frozen_name)
        opt = torch.optim.Adam(gg.param_groups(agent, lr=1e-3))
    _loop(agent, opt, data, epochs)


class _Pair(nn.Module):
    """A front-end followed by a back-end, the shape of every workload here."""

    def __init__(self, front_end: nn.Module, back_end: nn.Module) -> None:
        super().__init__()
        self.front_end = front_end
        self.back_end = back_end

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.back_end(self.front_end(x))
        return out


def strategy_frozen_front(
    name: str, pair: nn.Module, data: TensorDataset, epochs: int, accelerate: bool = False
) -> None:
    """Train ``pair.back_end`` on a frozen ``pair.front_end`` the way ``name`` does it."""
    import gradgate as gg

    x, y = data.tensors
    front, back = pair.front_end, pair.back_end
    assert isinstance(front, nn.Module) and isinstance(back, nn.Module)
    if name in ("lr0", "requires_grad", "gradgate"):
        _hand_or_gradgate(name, pair, back, front, "front_end", data, epochs)
    elif name == "gradgate_cache":
        gg.freeze(pair, "front_end")
        opt = torch.optim.Adam(gg.param_groups(pair, lr=1e-3))
        source = gg.inference_copy(front, x[:8]) if accelerate else front
        cache = gg.FeatureCache(source, data, progress=False)
        _loop(back, opt, cache, epochs)
    elif name == "limit":
        front.eval()
        for p in front.parameters():
            p.requires_grad = False
        opt = torch.optim.Adam(back.parameters(), lr=1e-3)
        feats = _front_pass(front, x)
        _limit_loop(back, opt, feats, y, epochs)
    else:
        raise ValueError(f"unknown strategy {name!r}")


def strategy_seed(name: str, data: TensorDataset, epochs: int) -> None:
    """Train the seed's back-end on a frozen front-end the way ``name`` does it."""
    from .agent import Agent

    torch.manual_seed(0)
    strategy_frozen_front(name, Agent(), data, epochs)


def _bn_cnn_data(n: int) -> TensorDataset:
    from .zoo import digits_64

    x, y = digits_64()
    return TensorDataset(x[:n], y[:n])


def strategy_bn_cnn(name: str, data: TensorDataset, epochs: int) -> None:
    """A frozen, pretrained EfficientNet-Lite0 with a linear head on digits."""
    from .zoo import Features, efficientnet_lite0

    torch.manual_seed(0)
    pair = _Pair(Features(efficientnet_lite0()), nn.Linear(1280, 10))
    pair.train()
    strategy_frozen_front(name, pair, data, epochs, accelerate=True)


def _text_data(n: int) -> TensorDataset:
    from .zoo import minilm, stdlib_sentences, tokenize

    sentences, labels, _ = stdlib_sentences()
    _, tokenizer = minilm()
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(labels), generator=g)[:n]
    ids = tokenize(tokenizer, [sentences[i] for i in order.tolist()])
    return TensorDataset(ids, labels[order])


def strategy_text(name: str, data: TensorDataset, epochs: int) -> None:
    """A frozen, pretrained all-MiniLM-L6-v2 with an MLP head on real sentences."""
    from .zoo import minilm

    torch.manual_seed(0)
    encoder, _ = minilm()
    head = nn.Sequential(nn.Linear(384, 128), nn.ReLU(), nn.Linear(128, 6))
    pair = _Pair(encoder, head)
    pair.train()
    strategy_frozen_front(name, pair, data, epochs)


def strategy_bn_cnn_pass(name: str, data: TensorDataset, epochs: int) -> None:
    """One front-end pass over the data: plain no_grad eval vs ``gg.inference_copy``."""
    import gradgate as gg

    from .zoo import Features, efficientnet_lite0

    front = Features(efficientnet_lite0())
    gg.freeze(front)
    x = data.tensors[0]
    run = gg.inference_copy(front, x[:8]) if name == "accelerate_pass" else front
    for _ in range(epochs):
        _front_pass(run, x)


def strategy_reverse(name: str, data: TensorDataset, epochs: int) -> None:
    """Train only the front-end through a frozen back-end (the seed's title)."""

    from .agent import Agent

    torch.manual_seed(0)
    agent = Agent()
    if name in ("lr0", "requires_grad", "gradgate"):
        _hand_or_gradgate(name, agent, agent.front_end, agent.back_end, "back_end", data, epochs)
    elif name == "limit":
        # The floor: the back-end as plain constant tensors, so autograd can
        # only ever compute input gradients through it.
        consts = {k: v.detach() for k, v in agent.back_end.state_dict().items()}
        front = agent.front_end
        opt = torch.optim.Adam(front.parameters(), lr=1e-3)

        def model(x: torch.Tensor) -> torch.Tensor:
            h = F.linear(front(x), consts["fc1.weight"], consts["fc1.bias"])
            return F.linear(F.relu(h), consts["fc2.weight"], consts["fc2.bias"])

        _loop(model, opt, data, epochs)
    else:
        raise ValueError(f"unknown strategy {name!r}")


def strategy_guard(name: str, data: TensorDataset, epochs: int) -> None:
    """The seed's gradgate loop with and without ``gg.guard``."""
    import gradgate as gg

    from .agent import Agent

    torch.manual_seed(0)
    agent = Agent()
    gg.freeze(agent, "front_end")
    opt = torch.optim.Adam(gg.param_groups(agent, lr=1e-3))
    if name == "gradgate":
        _loop(agent, opt, data, epochs)
        return
    checks: dict[str, Literal["fast", "exact"]] = {"guard_fast": "fast", "guard_exact": "exact"}
    with gg.guard(agent, opt, check=checks[name]):
        _loop(agent, opt, data, epochs)


def _sequential_seed() -> nn.Sequential:
    from .agent import Agent

    agent = Agent()
    fe, be = agent.front_end, agent.back_end
    return nn.Sequential(
        fe.conv1, fe.relu1, fe.pool1, fe.conv2, fe.relu2, fe.pool2, nn.Flatten(),
        be.fc1, be.relu, be.fc2,
    )  # fmt: skip


def strategy_progressive(name: str, data: TensorDataset, epochs: int) -> None:
    """FreezeOut-style progressive freezing of the seed model, with and without a cache."""
    import gradgate as gg

    torch.manual_seed(0)
    model = _sequential_seed()
    opt = torch.optim.Adam(gg.param_groups(model, lr=1e-3))
    if name == "plain":
        _loop(model, opt, data, epochs)
        return
    pf = gg.ProgressiveFreeze(
        model, ["0", "3", "7", "9"], start=1, end=max(2, epochs - 2), optimizer=opt
    )
    source: Any = data
    net: nn.Module = model
    for epoch in range(epochs):
        if pf.step(epoch) and name == "progressive_cache":
            head, net = pf.split(model)
            source = gg.FeatureCache(head, data, progress=False)
        _loop(net, opt, source, 1)


Strategy = Callable[[str, TensorDataset, int], None]
_FIVE = ["lr0", "requires_grad", "gradgate", "gradgate_cache", "limit"]

TRAINING: dict[str, tuple[Strategy, list[str], str, Callable[[int], TensorDataset]]] = {
    "bn_cnn": (strategy_bn_cnn, _FIVE, "limit", _bn_cnn_data),
    "bn_cnn_pass": (
        strategy_bn_cnn_pass,
        ["eval_pass", "accelerate_pass"],
        "eval_pass",
        _bn_cnn_data,
    ),
    "text": (strategy_text, _FIVE, "limit", _text_data),
    "progressive": (
        strategy_progressive,
        ["plain", "progressive", "progressive_cache"],
        "plain",
        _seed_data,
    ),
    "seed": (strategy_seed, _FIVE, "limit", _seed_data),
    "reverse": (
        strategy_reverse,
        ["lr0", "requires_grad", "gradgate", "limit"],
        "limit",
        _seed_data,
    ),
    "guard": (strategy_guard, ["gradgate", "guard_fast", "guard_exact"], "gradgate", _seed_data),
}


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


def peak_rss_mb(workload: str, strategy: str, samples: int, epochs: int) -> float:
    """Peak RSS of one strategy run alone in a fresh process.

    Raises:
        subprocess.CalledProcessError: the run failed; its stderr is attached.
    """
    code = (
        "import resource, sys, torch\n"
        "from gradgate.tools import bench\n"
        f"torch.set_num_threads({torch.get_num_threads()})\n"
        f"fn, _, _, make_data = bench.TRAINING[{workload!r}]\n"
        f"fn({strategy!r}, make_data({samples}), {epochs})\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=1800
    )
    return int(done.stdout.strip().splitlines()[-1]) / 1024.0


def run_training(args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved repetitions of every strategy of a training workload."""
    fn, strategies, baseline, make_data = TRAINING[args.workload]
    data = make_data(args.samples)
    times: dict[str, list[float]] = {s: [] for s in strategies}
    rounds = args.warmup + args.repeats
    order = progress(
        [(r, s) for r in range(rounds) for s in strategies],
        enabled=not args.no_progress,
        desc=f"bench {args.workload}",
    )
    for r, s in order:
        start = time.perf_counter()
        fn(s, data, args.epochs)
        if r >= args.warmup:
            times[s].append(time.perf_counter() - start)
    result: dict[str, Any] = {
        "workload": args.workload,
        "config": {
            "samples": args.samples,
            "epochs": args.epochs,
            "batch_size": BATCH,
            "repeats": args.repeats,
            "warmup": args.warmup,
        },
        "strategies": {},
        "ratios": {},
    }
    for s in strategies:
        rss = peak_rss_mb(args.workload, s, args.samples, args.epochs) if args.rss else None
        result["strategies"][s] = {"seconds": _stats(times[s]), "peak_rss_mb": rss}
    for s in strategies:
        if s != baseline:
            per_rep = [a / b for a, b in zip(times[s], times[baseline], strict=True)]
            result["ratios"][f"{s}/{baseline}"] = statistics.median(per_rep)
    if "gradgate_cache" in times:
        for other in ("requires_grad", "lr0"):
            per_rep = [a / b for a, b in zip(times[other], times["gradgate_cache"], strict=True)]
            result["ratios"][f"{other}/gradgate_cache"] = statistics.median(per_rep)
    if args.workload == "guard":
        result["fingerprint_gb_per_s"] = _fingerprint_speed()
        steps = args.epochs * math.ceil(args.samples / BATCH)
        cost, below_noise = per_step_cost_ms(times["guard_exact"], times["gradgate"], steps)
        result["exact_ms_per_step"] = cost
        result["exact_cost_below_noise"] = below_noise
    return result


def per_step_cost_ms(with_it: list[float], without: list[float], steps: int) -> tuple[float, bool]:
    """Median extra milliseconds per step, and whether it was lost in the noise.

    A cost smaller than the run-to-run noise can come out negative; it is
    reported as 0.0 with the flag set, never as a time below zero.

    Example:
        >>> per_step_cost_ms([1.2, 1.3], [1.0, 1.0], 100)
        (2.5, False)
        >>> per_step_cost_ms([0.9, 1.0], [1.0, 1.1], 100)
        (0.0, True)
    """
    extra = statistics.median(a - b for a, b in zip(with_it, without, strict=True))
    return max(0.0, 1000.0 * extra / steps), extra <= 0


def run_cache_reads(args: argparse.Namespace) -> dict[str, Any]:
    """The seed scenario trained from a FeatureCache read every natural way, against the floor.

    ``floor``: the back-end trained on precomputed features held in one
    tensor, batches by ``randperm`` (no DataLoader). The other strategies
    train the same back-end for the same epochs from a cache built
    beforehand: ``loader`` is ``cache.loader(batch_size=64, shuffle=True)``,
    ``dataloader`` a plain ``DataLoader(cache, batch_size=64, shuffle=True)``;
    ``disk_`` the same on a disk store; ``workers2_`` the memory store with
    ``num_workers=2`` (persistent workers, one DataLoader for all epochs).
    ``workers2_floor`` is the like-for-like floor for those: the same
    precomputed tensors served by ``DataLoader(TensorDataset(features,
    labels), batch_size=64, shuffle=True, num_workers=2,
    persistent_workers=True)``, so every batch crosses from a worker the way
    the cache's do. All interleaved in one process; ratios are
    per-repetition ratios to ``floor``, median with min and max, and the
    cache's worker paths also to ``workers2_floor``.
    """
    import copy
    import tempfile

    import gradgate as gg

    from .agent import Agent

    torch.manual_seed(0)
    agent = Agent()
    gg.freeze(agent, "front_end")
    data = _seed_data(args.samples)
    tmp = tempfile.mkdtemp(prefix="gradgate-bench-")
    mem = gg.FeatureCache(agent.front_end, data, progress=False)
    disk = gg.FeatureCache(agent.front_end, data, store="disk", path=tmp, progress=False)
    feats, labels = mem.features(), data.tensors[1]
    back0 = copy.deepcopy(agent.back_end)
    epochs = args.epochs

    def train(batches: Callable[[], Any]) -> None:
        back = copy.deepcopy(back0)
        opt = torch.optim.Adam(back.parameters(), lr=1e-3)
        for _ in range(epochs):
            for x, y in batches():
                loss = F.cross_entropy(back(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()

    def floor() -> None:
        back = copy.deepcopy(back0)
        opt = torch.optim.Adam(back.parameters(), lr=1e-3)
        _limit_loop(back, opt, feats, labels, epochs)

    def loaders(cache: Any, workers: int) -> dict[str, Callable[[], None]]:
        kw: dict[str, Any] = {"batch_size": BATCH, "shuffle": True}
        if workers:
            kw |= {"num_workers": workers, "persistent_workers": True}
            fast, plain = cache.loader(**kw), torch.utils.data.DataLoader(cache, **kw)
            return {
                "loader": lambda: train(lambda: fast),
                "dataloader": lambda: train(lambda: plain),
            }
        return {
            "loader": lambda: train(lambda: cache.loader(**kw)),
            "dataloader": lambda: train(lambda: torch.utils.data.DataLoader(cache, **kw)),
        }

    runs: dict[str, Callable[[], None]] = {"floor": floor}
    runs |= loaders(mem, 0)
    runs |= {f"disk_{k}": v for k, v in loaders(disk, 0).items()}
    tensors = torch.utils.data.DataLoader(
        TensorDataset(feats, labels),
        batch_size=BATCH,
        shuffle=True,
        num_workers=2,
        persistent_workers=True,
    )
    runs["workers2_floor"] = lambda: train(lambda: tensors)
    runs |= {f"workers2_{k}": v for k, v in loaders(mem, 2).items()}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in progress(range(args.warmup + args.repeats), enabled=not args.no_progress):
        for k, fn in runs.items():
            start = time.perf_counter()
            fn()
            if r >= args.warmup:
                times[k].append(time.perf_counter() - start)
    ranges = {
        f"{k}/floor": _stats([a / b for a, b in zip(v, times["floor"], strict=True)])
        for k, v in times.items()
        if k != "floor"
    }
    ranges |= {
        f"{k}/workers2_floor": _stats(
            [a / b for a, b in zip(times[k], times["workers2_floor"], strict=True)]
        )
        for k in ("workers2_loader", "workers2_dataloader")
    }
    return {
        "workload": "cache",
        "config": {
            "samples": args.samples,
            "epochs": epochs,
            "batch_size": BATCH,
            "repeats": args.repeats,
        },
        "strategies": {k: {"seconds": _stats(v), "peak_rss_mb": None} for k, v in times.items()},
        "ratios": {k: v["median"] for k, v in ranges.items()},
        "ratio_ranges": ranges,
    }


def _fingerprint_speed() -> float:
    from ..hashing import tensor_digest

    t = torch.randn(64 * 1024 * 1024)  # 256 MB
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        tensor_digest(t)
        best = min(best, time.perf_counter() - start)
    return t.numel() * 4 / best / 1e9


def _print_table(result: dict[str, Any]) -> None:
    from .._format import render_table

    rows = []
    for name, data in result["strategies"].items():
        sec = data["seconds"]
        rss = data.get("peak_rss_mb")
        rows.append(
            [
                name,
                f"{sec['median']:.3f}",
                f"{sec['min']:.3f}-{sec['max']:.3f}",
                "-" if rss is None else f"{rss:.0f}",
            ]
        )
    print(render_table(["strategy", "median s", "min-max s", "peak RSS MB"], rows, right={1, 2, 3}))
    for k, v in result.get("ratios", {}).items():
        print(f"{_ratio_name(k)}: {v:.3f}")
    if result.get("ratios"):
        print(RATIO_NOTE)
    for k in ("fingerprint_gb_per_s", "exact_ms_per_step"):
        if k in result:
            print(f"{k}: {result[k]:.3f}")


def _ratio_name(key: str) -> str:
    """A ratio's name as A/B (seconds of A over seconds of B), whatever the JSON called it.

    Results recorded before the ratios were made to read one way named the
    inverse ratio a speed-up; its value was already the other strategy's
    seconds over the cache's.

    Example:
        >>> _ratio_name("speedup gradgate_cache vs lr0"), _ratio_name("lr0/limit")
        ('lr0/gradgate_cache', 'lr0/limit')
    """
    found = re.fullmatch(r"speedup (\w+) vs (\w+)", key)
    return f"{found[2]}/{found[1]}" if found else key


def to_markdown(result: dict[str, Any], command: str) -> str:
    """Render a bench result as a Markdown section (used for docs/BENCHMARKS.md).

    Example:
        >>> r = {"workload": "w", "machine": {"cpu": "c", "threads": 1, "torch": "t",
        ...      "commit": "x"}, "strategies": {"a": {"seconds": {"median": 1.0,
        ...      "min": 1.0, "max": 1.0}, "peak_rss_mb": None}}, "ratios": {}}
        >>> "| a | 1.000 |" in to_markdown(r, "gradgate bench w")
        True
    """
    m = result["machine"]
    lines = [
        f"### `{result['workload']}`",
        "",
        f"Command: `{command}`  ",
        f"Machine: {m['cpu']}, {m['threads']} threads, torch {m['torch']}, commit {m['commit']}"
        + _load_text(m),
        "",
    ]
    if "strategies" in result:
        lines += ["| strategy | median s | min s | max s | peak RSS MB |", "|---|---|---|---|---|"]
        for name, data in result["strategies"].items():
            sec, rss = data["seconds"], data.get("peak_rss_mb")
            lines.append(
                f"| {name} | {sec['median']:.3f} | {sec['min']:.3f} | {sec['max']:.3f} | "
                f"{'-' if rss is None else f'{rss:.0f}'} |"
            )
        if result.get("ratio_ranges"):
            lines += ["", "| ratio (per repetition) | median | min | max |", "|---|---|---|---|"]
            lines += [
                f"| {k} | {v['median']:.3f} | {v['min']:.3f} | {v['max']:.3f} |"
                for k, v in result["ratio_ranges"].items()
            ]
        elif result.get("ratios"):
            lines += ["", "| ratio (median of per-repetition ratios) | value |", "|---|---|"]
            lines += [f"| {_ratio_name(k)} | {v:.3f} |" for k, v in result["ratios"].items()]
        if result.get("ratio_ranges") or result.get("ratios"):
            lines += ["", RATIO_NOTE]
    if "sizes" in result:
        lines += ["| tensors | median s | min s | max s | us/tensor |", "|---|---|---|---|---|"]
        for data in result["sizes"].values():
            sec = data["seconds"]
            lines.append(
                f"| {data['tensors']:,} | {sec['median']:.3f} | {sec['min']:.3f} | "
                f"{sec['max']:.3f} | {data['us_per_tensor']:.2f} |"
            )
        lines += _scale_markdown(result["sizes"])
    for k in ("fingerprint_gb_per_s", "exact_ms_per_step"):
        if k in result:
            lines.append(f"\n{k}: {result[k]:.3f}")
    return "\n".join(lines) + "\n"


def _load_text(machine: dict[str, Any]) -> str:
    """The machine's 1-minute load average at the start and end of the run, if recorded.

    Example:
        >>> _load_text({"load_average": {"start": 1.5, "end": 2.25}})
        '; load average (1 min) 1.50 at start, 2.25 at end'
        >>> _load_text({})
        ''
    """
    load = machine.get("load_average")
    if not load:
        return ""
    return f"; load average (1 min) {load['start']:.2f} at start, {load['end']:.2f} at end"


def _scale_markdown(sizes: dict[str, Any]) -> list[str]:
    """Per strategy and size: median seconds (min-max) and us per tensor; then the ratios."""
    measured = [d for d in sizes.values() if "strategies" in d]
    if not measured:
        return []
    names = list(measured[0]["strategies"])
    head = " | ".join(f"{d['tensors']:,} tensors: median s (min-max), us/tensor" for d in measured)
    lines: list[str] = []
    for key, clock in (("seconds", "wall clock"), ("cpu_seconds", "CPU time")):
        if not all(key in d["strategies"][names[0]] for d in measured):
            continue
        lines += ["", f"| strategy ({clock}) | {head} |", "|---|" + "---|" * len(measured)]
        for name in names:
            cells = []
            for d in measured:
                sec = d["strategies"][name][key]
                cells.append(
                    f"{sec['median']:.4f} ({sec['min']:.4f}-{sec['max']:.4f}), "
                    f"{1e6 * sec['median'] / d['tensors']:.2f}"
                )
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| ratio (median of per-repetition ratios, min-max) | "
        + " | ".join(f"{d['tensors']:,}" for d in measured)
        + " |",
        "|---|" + "---|" * len(measured),
    ]
    for key in measured[0]["ratios"]:
        cells = [
            f"{d['ratios'][key]['median']:.2f}x ({d['ratios'][key]['min']:.2f}-"
            f"{d['ratios'][key]['max']:.2f})"
            for d in measured
        ]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return [*lines, "", RATIO_NOTE]


def _plot(result: dict[str, Any], path: str) -> None:
    from .._deps import optional_import

    mpl = optional_import("matplotlib", "plot")
    mpl.use("Agg")
    plt = optional_import("matplotlib.pyplot", "plot")
    fig, ax = plt.subplots(figsize=(7, 3.5))
    if "strategies" in result:
        names = list(result["strategies"])
        med = [result["strategies"][n]["seconds"]["median"] for n in names]
        lo = [
            m - result["strategies"][n]["seconds"]["min"] for n, m in zip(names, med, strict=True)
        ]
        hi = [
            result["strategies"][n]["seconds"]["max"] - m for n, m in zip(names, med, strict=True)
        ]
        ax.bar(names, med, yerr=[lo, hi], capsize=4, color="#4c72b0")
        ax.set_ylabel("seconds (median, min-max)")
        if len(names) > 5:  # long names side by side would overlap
            plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    else:
        sizes = [d["tensors"] for d in result["sizes"].values()]
        med = [d["seconds"]["median"] for d in result["sizes"].values()]
        ax.loglog(sizes, med, "o-")
        ax.set_xlabel("parameter tensors")
        ax.set_ylabel("select + freeze + summary, s")
    ax.set_title(f"gradgate bench {result['workload']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_bench(args: argparse.Namespace) -> int:
    """Run one workload; print a table, write JSON, Markdown and a plot on request.

    Example:
        >>> import contextlib, io
        >>> ns = argparse.Namespace(workload="scale", repeats=1, sizes=[100], threads=1,
        ...     json_path=None, plot_path=None, markdown_path=None, no_progress=True)
        >>> with contextlib.redirect_stdout(io.StringIO()):
        ...     code = run_bench(ns)
        >>> code
        0
    """
    if args.workload in ("autofreeze", "integrations", "rows"):
        return _run_fine_tune(args)
    if getattr(args, "epochs", None) is None:
        args.epochs = 5
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    if args.workload == "scale":
        result = _scale(args)
    elif args.workload == "cache":
        result = run_cache_reads(args)
    else:
        result = run_training(args)
    result["machine"] = machine_info(args.threads)
    result["machine"]["load_average"] = {"start": load_start, "end": os.getloadavg()[0]}
    if args.workload != "scale":
        _print_table(result)
    argv = getattr(args, "argv", None) or ["bench", args.workload]
    result["argv"] = list(argv)
    command = "gradgate " + " ".join(argv)
    write_json(result, args.json_path)
    if getattr(args, "markdown_path", None):
        with open(args.markdown_path, "w") as f:
            f.write(to_markdown(result, command))
    if args.plot_path:
        _plot(result, args.plot_path)
    return 0


def _run_fine_tune(args: argparse.Namespace) -> int:
    """The workloads with a JSON format and a section of their own (each in its module)."""
    argv = getattr(args, "argv", None) or ["bench", args.workload]
    command = "gradgate " + " ".join(argv)
    if args.workload == "autofreeze":
        from . import bench_autofreeze as auto

        result = auto.measure(args)
        auto.print_summary(result)
        markdown = auto.to_markdown(result, command)
    elif args.workload == "rows":
        from . import bench_rows

        result = bench_rows.measure(args)
        print(bench_rows.table(result))
        markdown = bench_rows.to_markdown(result, command)
    else:
        from . import bench_integrations as integ

        integ.quiet_frameworks()
        result = integ.run(args)
        print(integ.table(result))
        markdown = integ.to_markdown(result, command)
    result["argv"] = list(argv)
    write_json(result, args.json_path)
    if getattr(args, "markdown_path", None):
        with open(args.markdown_path, "w") as f:
            f.write(markdown)
    if args.plot_path:
        if args.workload == "autofreeze":
            auto.plot(result, args.plot_path)
        else:
            measured = {n: r for n, r in result["strategies"].items() if "seconds" in r}
            _plot({**result, "strategies": measured}, args.plot_path)
    return 0
