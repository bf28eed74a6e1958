"""``gradgate demo``: the seed's story on real data (scikit-learn's digits), both directions.

1. Pre-train the seed's FeatureExtractor (with a temporary head) on digits 0-4.
2. The back-end direction: freeze the front-end, train a fresh PolicyNetwork on
   digits 5-9 from a FeatureCache under ``gg.guard``; the front-end stays
   bit-identical.
3. The title direction: keep that back-end fixed and adapt only the front-end
   to inverted digits; the back-end stays bit-identical.

Each direction has an accuracy floor; the demo exits 1 naming the stage whose
floor or fingerprint check failed.

Images are standardised per image (zero mean, unit variance), so an inverted
digit is the negated clean one: a shift the front-end can undo by learning,
whereas raw inverted pixels (background 1.0) give a first-batch loss near 10 and
Adam at lr 3e-3 silences the front-end's ReLUs within an epoch on some seeds.
The demo warns when a trainable part goes dead like that (:func:`dead_parts`).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from .._deps import optional_import
from .._format import render_table
from .agent import Agent, FeatureExtractor, PolicyNetwork
from .output import add_json_argument, write_json
from .training import accuracy, train_epochs

__all__ = [
    "CHANCE",
    "Split",
    "add_demo_arguments",
    "dead_parts",
    "load_digits_28",
    "run_demo",
    "split_classes",
]

CHANCE = 0.2  # five classes per direction


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the demo's options on ``parser``.

    Example:
        >>> p = argparse.ArgumentParser(); add_demo_arguments(p)
        >>> p.parse_args(["--epochs", "2"]).epochs
        2
    """
    parser.add_argument(
        "--pretrain-epochs",
        type=int,
        default=4,
        metavar="N",
        help="epochs pre-training the front-end on digits 0-4 (default: %(default)s)",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=8,
        metavar="N",
        help="epochs of the back-end direction, on cached features (default: %(default)s)",
    )
    parser.add_argument(
        "--adapt-epochs",
        type=int,
        default=8,
        metavar="N",
        help="epochs of the front-end direction, on inverted digits (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seeds data split, init and shuffling (default: 0)"
    )
    parser.add_argument(
        "--backend-floor",
        type=float,
        default=0.93,
        metavar="ACC",
        help="held-out accuracy the back-end direction must reach (default: %(default)s)",
    )
    parser.add_argument(
        "--adapt-floor",
        type=float,
        default=0.90,
        metavar="ACC",
        help="held-out accuracy the front-end direction must reach (default: %(default)s)",
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="also time three hand-written ways of freezing (a requires_grad loop, "
        "module.apply, an lr-0 optimizer group) against gradgate",
    )
    parser.add_argument(
        "--plot", dest="plot_path", default=None, metavar="PNG", help="write the curves as a PNG"
    )
    add_json_argument(parser, "every number, floor and check")
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars (they are drawn only on a terminal anyway)",
    )


def load_digits_28(
    invert: bool = False, standardize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits, upsampled to the seed's 3x28x28 input.

    Pixels are in [0, 1] (``invert`` maps p to 1 - p); ``standardize`` then
    shifts and scales each image to zero mean and unit variance, which makes
    an inverted image exactly the negated clean one.

    Example:
        >>> x, y = load_digits_28()
        >>> tuple(x.shape[1:]), int(y.max())
        ((3, 28, 28), 9)
        >>> bool(torch.allclose(load_digits_28(invert=True)[0], -x, atol=1e-5))
        True
    """
    datasets = optional_import("sklearn.datasets", "demo")
    digits = datasets.load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    if invert:
        x = 1.0 - x
    if standardize:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) / x.std(dim=(1, 2, 3), keepdim=True)
    return x, torch.tensor(digits.target, dtype=torch.long)


class Split(NamedTuple):
    """Training and held-out tensors of one class range."""

    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def split_classes(x: torch.Tensor, y: torch.Tensor, classes: range, seed: int) -> Split:
    """Keep ``classes`` (relabelled from 0), shuffle with ``seed``, hold out 20%.

    Example:
        >>> s = split_classes(torch.zeros(10, 1), torch.arange(10), range(5, 10), 0)
        >>> len(s.y), len(s.y_test), sorted(torch.cat([s.y, s.y_test]).tolist())
        (4, 1, [0, 1, 2, 3, 4])
    """
    keep = (y >= classes.start) & (y < classes.stop)
    x, y = x[keep], y[keep] - classes.start
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    cut = int(0.8 * len(y))
    return Split(x[:cut], y[:cut], x[cut:], y[cut:])


def dead_parts(agent: Agent, x: torch.Tensor, y: torch.Tensor) -> list[str]:
    """Warnings for a trainable part of ``agent`` that can no longer learn.

    A front-end whose features are all zero on ``x`` (every ReLU silenced)
    hands the back-end a constant; a trainable part whose gradients on
    ``(x, y)`` are all zero will never move again. Nothing is changed: no
    ``.grad`` is written and train/eval modes are restored.

    Example:
        >>> agent = Agent(classes=5)
        >>> with torch.no_grad():
        ...     _ = agent.front_end.conv2.bias.fill_(-1e3)
        >>> dead_parts(agent, torch.randn(4, 3, 28, 28), torch.zeros(4, dtype=torch.long))[0]
        'front-end features are all zero on held-out images: the back-end sees a constant'
    """
    found: list[str] = []
    was = agent.training
    agent.eval()
    try:
        with torch.enable_grad():
            features = agent.front_end(x)
            if not bool(features.detach().any()):
                found.append(
                    "front-end features are all zero on held-out images: "
                    "the back-end sees a constant"
                )
            named = [(n, p) for n, p in agent.named_parameters() if p.requires_grad]
            if not named:
                return found
            loss = F.cross_entropy(agent.back_end(features), y)
            grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    finally:
        agent.train(was)
    for part, shown in (("front_end.", "front-end"), ("back_end.", "back-end")):
        mine = [g for (n, _), g in zip(named, grads, strict=True) if n.startswith(part)]
        if mine and all(g is None or not bool(g.any()) for g in mine):
            found.append(f"{shown} trains but all its gradients are zero: it cannot learn")
    return found


class _Stage:
    """What one direction measured and whether its checks held."""

    def __init__(self, name: str, floor: float) -> None:
        self.name = name
        self.floor = floor
        self.checks: list[dict[str, Any]] = []
        self.warnings: list[str] = []

    def check(self, what: str, value: Any, held: bool, floor: float | None = None) -> None:
        self.checks.append(
            {"stage": self.name, "check": what, "value": value, "floor": floor, "held": held}
        )

    def evaluator(self, agent: Agent, x: torch.Tensor, y: torch.Tensor) -> Callable[[], float]:
        def evaluate() -> float:
            for warning in dead_parts(agent, x, y):
                if warning not in self.warnings:
                    self.warnings.append(warning)
                    print(f"  warning: {warning}")
            return accuracy(agent, x, y)

        return evaluate

    def final_accuracy(self, curve: list[dict[str, Any]], before: float) -> None:
        final = float(curve[-1]["accuracy"]) if curve else before
        self.check("held-out accuracy", final, final >= self.floor, self.floor)


def _train_guarded(
    stage: _Stage,
    agent: Agent,
    watched: str,
    run: Callable[[torch.optim.Optimizer], list[Any]],
    opt: torch.optim.Optimizer,
) -> list[Any]:
    """Run one direction under ``gg.guard``; record the fingerprint check of ``watched``."""
    import gradgate as gg

    part = agent.get_submodule(watched)
    what = f"{watched.replace('_', '-')} bit-identical"
    before = gg.fingerprint(part)
    curve: list[Any] = []
    try:
        with gg.guard(agent, opt, check="both"):
            curve = run(opt)
    except gg.FrozenTensorChangedError as e:
        stage.check(what, False, False)
        stage.warnings.append(str(e))
        return curve
    same = gg.fingerprint(part) == before
    stage.check(what, same, same)
    return curve


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo; return 0 when every floor and bit-identity check held, else 1.

    Example:
        >>> p = argparse.ArgumentParser(); add_demo_arguments(p)
        >>> ns = p.parse_args(["--pretrain-epochs", "1", "--epochs", "1", "--adapt-epochs", "1",
        ...     "--backend-floor", "0", "--adapt-floor", "0", "--no-progress"])
        >>> import contextlib, io
        >>> with contextlib.redirect_stdout(io.StringIO()):
        ...     code = run_demo(ns)
        >>> code
        0
    """
    import gradgate as gg

    torch.manual_seed(args.seed)
    show = not args.no_progress
    x, y = load_digits_28()
    pre_data = split_classes(x, y, range(0, 5), args.seed)
    back_data = split_classes(x, y, range(5, 10), args.seed)
    out: dict[str, Any] = {
        "seed": args.seed,
        "data": {
            "pretrain": len(pre_data.y),
            "backend": len(back_data.y),
            "test": len(back_data.y_test),
        },
        "floors": {"back-end": args.backend_floor, "front-end": args.adapt_floor},
        "chance": CHANCE,
    }

    print(f"1) pre-train the seed's FeatureExtractor on digits 0-4 ({len(pre_data.y)} images)")
    front = FeatureExtractor()
    pre = nn.Sequential(front, nn.Linear(1568, 5))
    opt: torch.optim.Optimizer = torch.optim.Adam(pre.parameters(), lr=1e-3)
    out["pretrain"] = train_epochs(
        pre,
        opt,
        TensorDataset(pre_data.x, pre_data.y),
        args.pretrain_epochs,
        seed=args.seed,
        evaluate=lambda: accuracy(pre, pre_data.x_test, pre_data.y_test),
        label="pre-train",
        log=print,
        show_progress=show,
    )

    print("\n2) back-end direction: freeze the front-end, train a fresh PolicyNetwork on 5-9")
    backend = _Stage("back-end", args.backend_floor)
    agent = Agent(classes=5)
    agent.front_end = front
    gg.freeze(agent, "front_end")
    print(gg.summary(agent))
    front_fp = gg.fingerprint(agent.front_end)
    start = time.perf_counter()
    cache = gg.FeatureCache(agent.front_end, TensorDataset(back_data.x, back_data.y), progress=show)
    out["cache_seconds"] = time.perf_counter() - start
    print(f"  front-end ran once over {len(cache)} images in {out['cache_seconds'] * 1000:.0f} ms")
    evaluate = backend.evaluator(agent, back_data.x_test, back_data.y_test)
    out["backend_before"] = accuracy(agent, back_data.x_test, back_data.y_test)
    out["backend"] = _train_guarded(
        backend,
        agent,
        "front_end",
        lambda o: train_epochs(
            agent.back_end,
            o,
            cache,
            args.epochs,
            seed=args.seed,
            evaluate=evaluate,
            label="back-end",
            log=print,
            show_progress=show,
        ),
        torch.optim.Adam(gg.param_groups(agent, lr=1e-3)),
    )
    backend.final_accuracy(out["backend"], out["backend_before"])
    out["front_end_fingerprint"] = {"before": front_fp, "after": gg.fingerprint(agent.front_end)}
    out["front_end_unchanged"] = front_fp == out["front_end_fingerprint"]["after"]
    print(f"  front-end fingerprint {front_fp[:16]}... bit-identical: {out['front_end_unchanged']}")

    print("\n3) the title direction: adapt only the front-end to inverted digits, back-end fixed")
    adapt = _Stage("front-end", args.adapt_floor)
    xi, _ = load_digits_28(invert=True)
    inv = split_classes(xi, y, range(5, 10), args.seed)
    out["shifted_accuracy_before"] = accuracy(agent, inv.x_test, inv.y_test)
    print(f"  accuracy on inverted digits before adapting: {out['shifted_accuracy_before']:.3f}")
    gg.train_only(agent, "front_end")
    back_fp = gg.fingerprint(agent.back_end)
    evaluate = adapt.evaluator(agent, inv.x_test, inv.y_test)
    out["adapt"] = _train_guarded(
        adapt,
        agent,
        "back_end",
        lambda o: train_epochs(
            agent,
            o,
            TensorDataset(inv.x, inv.y),
            args.adapt_epochs,
            seed=args.seed,
            evaluate=evaluate,
            label="front-end",
            log=print,
            show_progress=show,
        ),
        torch.optim.Adam(gg.param_groups(agent, lr=3e-3)),
    )
    adapt.final_accuracy(out["adapt"], out["shifted_accuracy_before"])
    out["back_end_unchanged"] = gg.fingerprint(agent.back_end) == back_fp
    print(f"  back-end fingerprint {back_fp[:16]}... bit-identical: {out['back_end_unchanged']}")

    if args.compare:
        print(
            "\n4) three hand-written ways of freezing (requires_grad loop, module.apply, "
            "lr-0 group) vs gradgate, same back-end task"
        )
        out["compare"] = _compare(front, back_data, args.epochs)

    checks = backend.checks + adapt.checks
    out["checks"] = checks
    out["warnings"] = backend.warnings + adapt.warnings
    out["passed"] = all(c["held"] for c in checks)
    print("\nchecks")
    print(_checks_table(checks))
    write_json(out, args.json_path)
    if args.plot_path:
        _plot(out, args.plot_path)
        print(f"wrote {args.plot_path}")
    for c in checks:
        if not c["held"]:
            print(f"gradgate demo: {c['stage']} stage failed: {_describe(c)}", file=sys.stderr)
    print(_result_line(checks))
    return 0 if out["passed"] else 1


def _result_line(checks: list[dict[str, Any]]) -> str:
    """One line a reader can judge: how many checks held, and each stage's accuracy and floor."""
    held = sum(c["held"] for c in checks)
    accuracy = [
        f"{c['stage']} {c['value']:.3f} {'>=' if c['held'] else '<'} {c['floor']:.2f}"
        for c in checks
        if c["floor"] is not None
    ]
    frozen = [c for c in checks if c["floor"] is None]
    identical = sum(c["held"] for c in frozen)
    return (
        f"result: {held} of {len(checks)} checks held; held-out accuracy "
        f"{', '.join(accuracy)} (floors); frozen half bit-identical in {identical} of "
        f"{len(frozen)} directions"
    )


def _describe(check: dict[str, Any]) -> str:
    if check["floor"] is None:
        return f"{check['check']}: {check['value']}"
    sign = ">=" if check["held"] else "<"
    return f"{check['check']} {check['value']:.3f} {sign} floor {check['floor']:.2f}"


def _checks_table(checks: list[dict[str, Any]]) -> str:
    rows = [[c["stage"], _describe(c), "held" if c["held"] else "FAILED"] for c in checks]
    return render_table(["stage", "check", "result"], rows, right=set())


def _example2_freeze(module: nn.Module) -> None:
    """The seed's Example 2, applied through ``module.apply``."""
    for p in module.parameters():
        p.requires_grad = False


def _compare(front: nn.Module, data: Split, epochs: int) -> list[dict[str, Any]]:
    """Time the seed's three hand-written ways and gradgate on the back-end task."""
    import gradgate as gg

    rows: list[dict[str, Any]] = []
    train = TensorDataset(data.x, data.y)
    for way in (
        "Example 1: requires_grad loop",
        "Example 2: module.apply",
        "Example 3: lr-0 group",
        "gradgate: freeze + FeatureCache",
    ):
        torch.manual_seed(0)
        fe = copy.deepcopy(front)
        for p in fe.parameters():
            p.requires_grad_(True)
        back = PolicyNetwork(1568, 128, 5)
        model = nn.Sequential(fe, back)
        start = time.perf_counter()
        source: Any = train
        net: nn.Module = model
        if way.startswith("Example 1"):
            for p in fe.parameters():
                p.requires_grad = False
            opt = torch.optim.Adam(back.parameters(), lr=1e-3)
        elif way.startswith("Example 2"):
            fe.apply(_example2_freeze)
            opt = torch.optim.Adam(back.parameters(), lr=1e-3)
        elif way.startswith("Example 3"):
            opt = torch.optim.Adam(
                [{"params": back.parameters(), "lr": 1e-3}, {"params": fe.parameters(), "lr": 0.0}]
            )
        else:
            gg.freeze(model, "0")
            opt = torch.optim.Adam(gg.param_groups(model, lr=1e-3))
            source, net = gg.FeatureCache(fe, train, progress=False), back
        before = gg.fingerprint(fe)
        train_epochs(net, opt, source, epochs, seed=1)
        seconds = time.perf_counter() - start
        rows.append(
            {
                "way": way,
                "seconds": seconds,
                "held_out_accuracy": accuracy(model, data.x_test, data.y_test),
                "front_end_unchanged": gg.fingerprint(fe) == before,
            }
        )
    base = rows[0]["seconds"]
    print(
        render_table(
            ["way", "seconds", "time / Example 1", "accuracy", "front-end unchanged"],
            [
                [
                    r["way"],
                    f"{r['seconds']:.2f}",
                    f"{r['seconds'] / base:.2f}x",
                    f"{r['held_out_accuracy']:.3f}",
                    str(r["front_end_unchanged"]),
                ]
                for r in rows
            ],
            right={1, 2, 3},
        )
    )
    print("time / Example 1: each way's seconds over Example 1's; below 1.00x is faster")
    return rows


def _plot(out: dict[str, Any], path: str) -> None:
    mpl = optional_import("matplotlib", "plot")
    mpl.use("Agg")
    plt = optional_import("matplotlib.pyplot", "plot")
    compare = out.get("compare")
    fig, axes = plt.subplots(
        1, 2 if compare else 1, figsize=(11 if compare else 6.5, 4.2), squeeze=False
    )
    ax = axes[0][0]
    directions = (
        ("backend", "back-end", "back-end learns on cached features", "#1f77b4", "backend_before"),
        (
            "adapt",
            "front-end",
            "front-end adapts to inverted digits",
            "#d62728",
            "shifted_accuracy_before",
        ),
    )
    for key, floor_key, label, color, before_key in directions:
        before = out[before_key]
        curve = out[key]
        epochs = [0] + [c["epoch"] for c in curve]
        acc = [before] + [c["accuracy"] for c in curve]
        ax.plot(epochs, acc, "o-", color=color, label=label)
        floor = out["floors"][floor_key]
        ax.axhline(
            floor, color=color, linestyle="--", linewidth=1, label=f"{floor_key} floor {floor:.2f}"
        )
    ax.axhline(
        out["chance"], color="grey", linestyle=":", linewidth=1, label=f"chance {out['chance']:.1f}"
    )
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("epoch (0 = before training)")
    ax.set_ylabel("held-out accuracy")
    verdict = "every check held" if out["passed"] else "a check FAILED"
    ax.set_title(f"both directions, seed {out['seed']}: {verdict}", fontsize=10)
    ax.legend(loc="center right", fontsize=8)
    if compare:
        bx = axes[0][1]
        names = [r["way"] for r in compare]
        secs = [r["seconds"] for r in compare]
        colors = ["#999999"] * (len(compare) - 1) + ["#2ca02c"]
        bx.barh(names, secs, color=colors)
        bx.invert_yaxis()
        for i, s in enumerate(secs):
            ratio = secs[0] / s
            speed = (
                f"{ratio:.2f}x as fast"
                if 0.95 <= ratio < 1.05
                else (f"{ratio:.1f}x faster" if ratio >= 1 else f"{1 / ratio:.1f}x slower")
            )
            bx.annotate(
                f"{s:.2f} s" + ("" if i == 0 else f", {speed}"),
                (s, i),
                textcoords="offset points",
                xytext=(3, -3),
                fontsize=8,
            )
        bx.set_xlim(0, max(secs) * 1.45)
        bx.set_xlabel("seconds to train the back-end (same epochs)")
        bx.set_title("the seed's three ways vs gradgate", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
