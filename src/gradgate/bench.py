"""``gradgate bench``: measured workloads (see docs/BENCHMARKS.md)."""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from typing import Any

import torch
from torch import nn

from ._util import progress

__all__ = ["add_bench_arguments", "build_scale_model", "machine_info", "run_bench"]

WORKLOADS = ("scale",)


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the bench options on ``parser``.

    Example:
        >>> p = argparse.ArgumentParser(); add_bench_arguments(p)
        >>> p.parse_args(["scale"]).workload
        'scale'
    """
    parser.add_argument("workload", choices=WORKLOADS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", dest="json_path", default=None)
    parser.add_argument("--plot", dest="plot_path", default=None)
    parser.add_argument("--no-progress", action="store_true")


def machine_info(threads: int) -> dict[str, Any]:
    """Torch version, CPU model, thread count and git commit, for the JSON.

    Example:
        >>> sorted(machine_info(1))[:2]
        ['commit', 'cpu']
    """
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "torch": torch.__version__,
        "cpu": cpu,
        "threads": threads,
        "commit": commit or "unknown",
        "python": platform.python_version(),
    }


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
    with torch.device("meta"):
        layers = nn.ModuleList(_Block(width, experts) for _ in range(blocks))
        return nn.ModuleDict({"embed": nn.Embedding(100, width), "layers": layers})


def _scale(args: argparse.Namespace) -> dict[str, Any]:
    import gradgate as gg

    results: dict[str, Any] = {}
    for size in args.sizes:
        model = build_scale_model(size)
        n = len(list(model.parameters()))
        times: list[float] = []
        reps = progress(
            range(args.repeats), enabled=not args.no_progress, desc=f"scale {n:,} tensors"
        )
        for _ in reps:
            start = time.perf_counter()
            handle = gg.freeze(model, "layers.*.attn", "**.experts.[0-1]", exclude="**.o")
            gg.summary(model, depth=2)
            times.append(time.perf_counter() - start)
            handle.undo()
        times.sort()
        med = times[len(times) // 2]
        results[str(n)] = {
            "tensors": n,
            "seconds": {"median": med, "min": times[0], "max": times[-1]},
            "us_per_tensor": 1e6 * med / n,
        }
        print(
            f"{n:>9,} tensors: select+freeze+summary median {med:.3f} s "
            f"({1e6 * med / n:.2f} us/tensor)"
        )
    return {"workload": "scale", "sizes": results}


def run_bench(args: argparse.Namespace) -> int:
    """Run one workload and write its JSON (and plot).

    Example:
        >>> ns = argparse.Namespace(workload="scale", repeats=1, sizes=[100], threads=1,
        ...                         json_path=None, plot_path=None, no_progress=True)
        >>> import contextlib, io
        >>> with contextlib.redirect_stdout(io.StringIO()):
        ...     code = run_bench(ns)
        >>> code
        0
    """
    torch.set_num_threads(args.threads)
    out = _scale(args)
    out["machine"] = machine_info(args.threads)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(out, f, indent=2)
    return 0
