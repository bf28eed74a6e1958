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
