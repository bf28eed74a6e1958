"""The ``gradgate`` command: ``demo``, ``summary`` and ``bench``.

Every command reports a problem with its input or environment the same way:
one line ``gradgate COMMAND: what went wrong and what to do`` on stderr and
exit status 2. Exit status 1 means the command ran and a check it makes failed
(``gradgate demo`` missing an accuracy floor).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import GradgateError, InvalidArgumentError
from .output import add_json_argument, write_json

__all__ = ["build_parser", "main"]


def _load_factory(spec: str) -> nn.Module:
    """Build a model from ``"package.module:factory"``."""
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise InvalidArgumentError(
            f"expected MODULE:FACTORY (e.g. gradgate.tools.seed:Agent), got {spec!r}"
        )
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise InvalidArgumentError(
            f"cannot import {mod_name!r} for {spec!r}: {e}; is it installed, with its extras?"
        ) from e
    try:
        factory = getattr(module, attr)
    except AttributeError as e:
        names = ", ".join(n for n in dir(module) if not n.startswith("_"))[:200]
        raise InvalidArgumentError(f"{mod_name!r} has no {attr!r}; it has: {names}") from e
    if isinstance(factory, nn.Module):
        return factory
    if not callable(factory):
        raise InvalidArgumentError(
            f"{spec!r} is a {type(factory).__name__}, not a model or a factory"
        )
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        signature = None
    if signature is not None:
        needed = [
            p.name
            for p in signature.parameters.values()
            if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        if needed:
            raise InvalidArgumentError(
                f"{spec!r} needs arguments ({', '.join(needed)}); point at a function "
                "that builds the model without arguments"
            )
    try:
        model = factory()
    except ImportError as e:
        raise InvalidArgumentError(f"{spec!r} needs a package that is not installed: {e}") from e
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"{spec!r} returned a {type(model).__name__}, not an nn.Module")
    return model


def _module_type(text: str) -> type[nn.Module] | None:
    """``"torch.nn.BatchNorm2d"`` -> the class; None for anything that is not a module type.

    Only a dotted name whose last part is capitalised and whose module imports
    counts, so a path pattern such as ``"back_end.fc1"`` stays a pattern.
    """
    mod_name, _, attr = text.rpartition(".")
    if not mod_name or not attr[:1].isupper():
        return None
    try:
        found = getattr(importlib.import_module(mod_name), attr, None)
    except ImportError:
        return None
    return found if isinstance(found, type) and issubclass(found, nn.Module) else None


class _Step(argparse.Action):
    """Collect ``--freeze``/``--train-only`` in the order they were typed."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        steps = list(getattr(namespace, "steps", None) or [])
        steps.append((self.const, list(values or [])))
        namespace.steps = steps


def _cmd_summary(args: argparse.Namespace) -> int:
    from .. import freeze, summary, train_only

    model = _load_factory(args.factory)
    verbs = {"freeze": freeze, "train-only": train_only}
    for verb, texts in args.steps or []:
        selectors = [_module_type(t) or t for t in texts]
        try:
            verbs[verb](model, *selectors)
        except GradgateError as e:
            raise InvalidArgumentError(f"--{verb} {' '.join(texts)}: {e}") from e
    report = summary(model, depth=args.depth)
    if args.json_path == "-":
        write_json(report.to_dict(), "-")
        return 0
    print(report)
    write_json(report.to_dict(), args.json_path)
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
        >>> build_parser().parse_args(["summary", "m:f", "--freeze", "a"]).steps
        [('freeze', ['a'])]
    """
    parser = argparse.ArgumentParser(
        prog="gradgate",
        description="Decide which parts of a PyTorch model train; prove that frozen parts "
        "never change; make them cheap.",
        epilog="Exit status: 0 success, 1 a check failed (demo), 2 bad input or environment.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="the seed's story on real digits, both directions, with checks",
        description="Pre-train a front-end, then train only the back-end on cached features "
        "and adapt only the front-end to inverted digits; checks accuracy floors and that the "
        "frozen part stays bit-identical. Exits 1 naming the stage when a check fails.",
    )
    from .demo import add_demo_arguments

    add_demo_arguments(demo)
    demo.set_defaults(func=_cmd_demo)

    summ = sub.add_parser(
        "summary",
        help="print what trains and what is frozen in a model",
        description="Build a model from MODULE:FACTORY, apply --freeze/--train-only in the "
        "order given, and print what trains and what is frozen.",
    )
    summ.add_argument(
        "factory", metavar="MODULE:FACTORY", help="a model, or a function building one unaided"
    )
    for verb in ("freeze", "train-only"):
        summ.add_argument(
            f"--{verb}",
            nargs="+",
            action=_Step,
            const=verb,
            dest="steps",
            metavar="SEL",
            help=f"{verb.replace('-', '_')} these selectors: path patterns ('back_end', "
            "'**.bias', 'blocks.[0-3]', 're:...') or module types ('torch.nn.BatchNorm2d'); "
            "repeatable, applied in order",
        )
    summ.add_argument(
        "--depth", type=int, default=2, metavar="N", help="module depth shown (default: 2)"
    )
    add_json_argument(summ, "the summary (instead of the table when it goes to stdout)")
    summ.set_defaults(func=_cmd_summary, steps=[])

    bench = sub.add_parser(
        "bench",
        help="time freezing strategies (see docs/BENCHMARKS.md)",
        description="Time one workload: strategies interleaved, warm-up discarded, medians "
        "and per-repetition ratios.",
    )
    from .bench import add_bench_arguments

    add_bench_arguments(bench)
    bench.set_defaults(func=_cmd_bench)
    return parser


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse an output path in a missing folder before any work is done."""
    for option in ("json_path", "plot_path", "markdown_path"):
        path = getattr(args, option, None)
        if path and path != "-" and not Path(path).resolve().parent.is_dir():
            flag = "--" + option.removesuffix("_path")
            raise InvalidArgumentError(
                f"{flag} {path}: folder {Path(path).parent} does not exist; create it first"
            )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradgate`` command; returns the exit status.

    Example:
        >>> main(["summary", "gradgate.tools.seed:Agent", "--freeze", "front_end", "--depth", "1"])
        ... # doctest: +ELLIPSIS, +NORMALIZE_WHITESPACE
        module     type            params  trainable  frozen  state    mode
        ...
        0
    """
    given = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(given)
    args.argv = given
    try:
        _check_outputs(args)
        code: int = args.func(args)
    except (GradgateError, OSError) as e:
        print(f"gradgate {args.command}: {e}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as e:
        tail = (e.stderr or "").strip().splitlines()[-1:] or ["no output"]
        print(f"gradgate {args.command}: a measuring subprocess failed: {tail[0]}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    raise SystemExit(main())
