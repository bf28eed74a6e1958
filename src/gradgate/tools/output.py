"""What every command writes: one ``--json [PATH]`` option, one way to write it, the machine."""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
from typing import Any

import torch

# How every ratio in a bench table reads, printed once under each ratio table.
RATIO_NOTE = "A/B is A's seconds over B's: above 1.00, A is slower than B."


def add_json_argument(parser: argparse.ArgumentParser | Any, what: str) -> None:
    """Add ``--json [PATH]``: write ``what`` as JSON to PATH, or to stdout with ``-`` or no PATH.

    Example:
        >>> p = argparse.ArgumentParser()
        >>> add_json_argument(p, "the result")
        >>> p.parse_args(["--json"]).json_path, p.parse_args(["--json", "o.json"]).json_path
        ('-', 'o.json')
    """
    parser.add_argument(
        "--json",
        dest="json_path",
        nargs="?",
        const="-",
        default=None,
        metavar="PATH",
        help=f"write {what} as JSON to PATH ('-' or no PATH: stdout)",
    )


def write_json(data: Any, path: str | None) -> None:
    """Write ``data`` as indented JSON to ``path``; ``-`` is stdout, ``None`` writes nothing.

    Example:
        >>> write_json({"a": 1}, "-")
        {
          "a": 1
        }
    """
    if path == "-":
        print(json.dumps(data, indent=2))
    elif path:
        with open(path, "w") as f:
            json.dump(data, f, indent=2)


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
