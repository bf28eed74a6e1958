"""The ``gradgate`` command: ``demo``, ``summary`` and ``bench``."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence

from torch import nn

__all__ = ["main"]


def _load_factory(spec: str) -> nn.Module:
    """Build a model from ``"package.module:factory"``."""
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise SystemExit(f"gradgate summary: expected MODULE:FACTORY, got {spec!r}")
    try:
        factory = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"gradgate summary: cannot load {spec!r}: {e}") from e
    model = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
    if not isinstance(model, nn.Module):
        raise SystemExit(f"gradgate summary: {spec!r} gave {type(model).__name__}, not a Module")
    return model


def _cmd_summary(args: argparse.Namespace) -> int:
    from .. import freeze, summary, train_only
    from ..errors import GradgateError

    model = _load_factory(args.factory)
    try:
        if args.train_only:
            train_only(model, *args.train_only)
        if args.freeze:
            freeze(model, *args.freeze)
    except GradgateError as e:
        print(f"gradgate summary: {e}", file=sys.stderr)
        return 2
    report = summary(model, depth=args.depth)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    return run_bench(args)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``gradgate`` command.

    Example:
        >>> build_parser().parse_args(["summary", "m:f", "--freeze", "a"]).freeze
        ['a']
    """
    parser = argparse.ArgumentParser(prog="gradgate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="freeze a pre-trained front-end on real data, end to end")
    from .demo import add_demo_arguments

    add_demo_arguments(demo)
    demo.set_defaults(func=_cmd_demo)

    summ = sub.add_parser("summary", help="print what trains and what is frozen in a model")
    summ.add_argument("factory", help="MODULE:FACTORY, a callable returning an nn.Module")
    summ.add_argument("--freeze", nargs="+", default=[], metavar="SEL")
    summ.add_argument("--train-only", nargs="+", default=[], metavar="SEL")
    summ.add_argument("--depth", type=int, default=2)
    summ.add_argument("--json", action="store_true", help="print JSON instead of a table")
    summ.set_defaults(func=_cmd_summary)

    bench = sub.add_parser("bench", help="time freezing strategies (see docs/BENCHMARKS.md)")
    from .bench import add_bench_arguments

    add_bench_arguments(bench)
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradgate`` command.

    Example:
        >>> main(["summary", "gradgate.tools.seed:Agent", "--freeze", "front_end", "--depth", "1"])
        ... # doctest: +ELLIPSIS, +NORMALIZE_WHITESPACE
        module     type            params  trainable  frozen  state    mode
        ...
        0
    """
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
