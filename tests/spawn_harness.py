"""One way to run 2-rank gloo scenarios under ``torch.multiprocessing.spawn``."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.multiprocessing.spawn import spawn


def run_ranks(
    rank: int,
    init: str,
    out: str,
    scenarios: Sequence[str],
    call: Callable[[str, int, Path], Any],
) -> None:
    """Run each scenario on this rank, writing ``OUT/<name>.<rank>.json``, then leave.

    ``call(name, rank, out)`` runs one scenario and returns its JSON-ready result.
    """
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init}", rank=rank, world_size=2,
        timeout=timedelta(seconds=300),
    )  # fmt: skip
    try:
        outp = Path(out)
        for name in scenarios:
            result = call(name, rank, outp)
            (outp / f"{name}.{rank}.json").write_text(json.dumps(result))
            dist.barrier()
    finally:
        dist.destroy_process_group()
    # A finished rank leaves at once: torch's C++ teardown at interpreter exit
    # sometimes aborts ("terminate called without an active exception") after a
    # clean run, which spawn would report as a failed rank.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def read_results(out: Path, scenarios: Sequence[str]) -> dict[str, list[Any]]:
    """What each rank wrote: ``{scenario: [rank 0's result, rank 1's result]}``."""
    return {
        name: [json.loads((out / f"{name}.{rank}.json").read_text()) for rank in (0, 1)]
        for name in scenarios
    }


def spawn_scenarios(
    run: Callable[[int, str, str, list[str]], None], out: Path, scenarios: Sequence[str]
) -> dict[str, list[Any]]:
    """Run ``scenarios`` on 2 spawned gloo ranks (``run(rank, init, out, scenarios)``).

    ``run`` is a worker module's entry point (it calls ``run_ranks``); returns
    ``read_results``. A rank that raises makes ``spawn`` raise here.
    """
    spawn(run, args=(str(out / "init"), str(out), list(scenarios)), nprocs=2, join=True)
    return read_results(out, scenarios)
