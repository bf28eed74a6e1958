"""What every command writes: one ``--json [PATH]`` option and one way to write it."""

from __future__ import annotations

import argparse
import json
from typing import Any


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
