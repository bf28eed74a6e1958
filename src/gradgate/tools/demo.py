"""``gradgate demo``: the seed's story on real data (scikit-learn's digits).

1. Pre-train the seed's FeatureExtractor (with a temporary head) on digits 0-4.
2. Freeze it; train a fresh PolicyNetwork back-end on digits 5-9 through a
   FeatureCache, under ``gg.guard``; prove the front-end is bit-identical.
3. The title direction: keep that back-end fixed and adapt only the
   front-end to inverted images; accuracy recovers, the back-end is unchanged.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .._deps import optional_import
from .._progress import progress
from .seed import Agent, FeatureExtractor, PolicyNetwork

__all__ = ["add_demo_arguments", "load_digits_28", "run_demo"]


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the demo's options on ``parser``.

    Example:
        >>> p = argparse.ArgumentParser(); add_demo_arguments(p)
        >>> p.parse_args(["--epochs", "2"]).epochs
        2
    """
    parser.add_argument("--pretrain-epochs", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=8, help="back-end epochs")
    parser.add_argument("--adapt-epochs", type=int, default=12, help="front-end epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare", action="store_true", help="time the seed's three ways")
    parser.add_argument("--plot", dest="plot_path", default=None, help="write a PNG of the curves")
    parser.add_argument("--json", dest="json_path", default=None, help="write the numbers")
    parser.add_argument("--no-progress", action="store_true")


def load_digits_28(invert: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits, upsampled to the seed's 3x28x28 input in [0, 1].

    Example:
        >>> x, y = load_digits_28()
        >>> tuple(x.shape[1:]), int(y.max())
        ((3, 28, 28), 9)
    """
    datasets = optional_import("sklearn.datasets", "demo")
    digits = datasets.load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    if invert:
        x = 1.0 - x
    return x, torch.tensor(digits.target, dtype=torch.long)


def _split(x: torch.Tensor, y: torch.Tensor, classes: range, seed: int) -> tuple[Any, ...]:
    keep = (y >= classes.start) & (y < classes.stop)
    x, y = x[keep], y[keep] - classes.start
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    cut = int(0.8 * len(y))
    return x[:cut], y[:cut], x[cut:], y[cut:]


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was = model.training
    model.eval()
    acc = float((model(x).argmax(1) == y).float().mean())
    model.train(was)
    return acc


def _epochs(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    data: Any,
    epochs: int,
    evaluate: Any,
    label: str,
    show: bool,
    seed: int,
) -> list[dict[str, float]]:
    curve = []
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        start = time.perf_counter()
        total, count = 0.0, 0
        loader = DataLoader(data, batch_size=64, shuffle=True, generator=g)
        model.train()
        for x, y in progress(loader, enabled=show, desc=f"{label} epoch {epoch + 1}/{epochs}"):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(y)
            count += len(y)
        seconds = time.perf_counter() - start
        acc = evaluate()
        curve.append(
            {"epoch": epoch + 1, "loss": total / count, "accuracy": acc, "seconds": seconds}
        )
        print(
            f"  {label} epoch {epoch + 1}: loss {total / count:.4f}  held-out accuracy "
            f"{acc:.3f}  ({seconds * 1000:.0f} ms)"
        )
    return curve


def _example2_freeze(module: nn.Module) -> None:
    """The seed's Example 2, applied through ``module.apply``."""
    for p in module.parameters():
        p.requires_grad = False


def _compare(
    front: nn.Module, xb: torch.Tensor, yb: torch.Tensor, epochs: int
) -> list[dict[str, Any]]:
    """Time the seed's three hand-written ways and gradgate on the back-end task."""
    import copy

    import gradgate as gg

    from .._format import render_table

    rows: list[dict[str, Any]] = []
    data = TensorDataset(xb, yb)
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
        if way.startswith("Example 1"):
            for p in fe.parameters():
                p.requires_grad = False
            opt = torch.optim.Adam(back.parameters(), lr=1e-3)
            source: Any = data
            net: nn.Module = model
        elif way.startswith("Example 2"):
            fe.apply(_example2_freeze)
            opt = torch.optim.Adam(back.parameters(), lr=1e-3)
            source, net = data, model
        elif way.startswith("Example 3"):
            opt = torch.optim.Adam(
                [{"params": back.parameters(), "lr": 1e-3}, {"params": fe.parameters(), "lr": 0.0}]
            )
            source, net = data, model
        else:
            gg.freeze(model, "0")
            opt = torch.optim.Adam(gg.param_groups(model, lr=1e-3))
            source, net = gg.FeatureCache(fe, data, progress=False), back
        before = gg.fingerprint(fe)
        g = torch.Generator().manual_seed(1)
        for _ in range(epochs):
            for x, y in DataLoader(source, batch_size=64, shuffle=True, generator=g):
                loss = F.cross_entropy(net(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
        seconds = time.perf_counter() - start
        rows.append(
            {"way": way, "seconds": seconds, "front_end_unchanged": gg.fingerprint(fe) == before}
        )
    base = rows[0]["seconds"]
    print(
        render_table(
            ["way", "seconds", "vs Example 1", "front-end unchanged"],
            [
                [
                    r["way"],
                    f"{r['seconds']:.2f}",
                    f"{base / r['seconds']:.2f}x",
                    str(r["front_end_unchanged"]),
                ]
                for r in rows
            ],
            right={1, 2},
        )
    )
    return rows


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo; return 0 when every bit-identity check held.

    Example:
        >>> ns = argparse.Namespace(pretrain_epochs=1, epochs=1, adapt_epochs=1, seed=0,
        ...     compare=False, plot_path=None, json_path=None, no_progress=True)
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
    xa, ya, xa_test, ya_test = _split(x, y, range(0, 5), args.seed)
    xb, yb, xb_test, yb_test = _split(x, y, range(5, 10), args.seed)
    out: dict[str, Any] = {"data": {"pretrain": len(ya), "backend": len(yb), "test": len(yb_test)}}

    print(f"1) pre-train the seed's FeatureExtractor on digits 0-4 ({len(ya)} images)")
    front = FeatureExtractor()
    pre = nn.Sequential(front, nn.Linear(1568, 5))
    opt: torch.optim.Optimizer = torch.optim.Adam(pre.parameters(), lr=1e-3)
    out["pretrain"] = _epochs(
        pre,
        opt,
        TensorDataset(xa, ya),
        args.pretrain_epochs,
        lambda: _accuracy(pre, xa_test, ya_test),
        "pre-train",
        show,
        args.seed,
    )

    print(
        "\n2) freeze the front-end; train a fresh PolicyNetwork on digits 5-9 from cached features"
    )
    agent = Agent(classes=5)
    agent.front_end = front
    gg.freeze(agent, "front_end")
    print(gg.summary(agent))
    front_fp = gg.fingerprint(agent.front_end)
    start = time.perf_counter()
    cache = gg.FeatureCache(agent.front_end, TensorDataset(xb, yb), progress=show)
    out["cache_seconds"] = time.perf_counter() - start
    print(f"  front-end ran once over {len(cache)} images in {out['cache_seconds'] * 1000:.0f} ms")
    opt = torch.optim.Adam(gg.param_groups(agent, lr=1e-3))
    with gg.guard(agent, opt, check="both"):
        out["backend"] = _epochs(
            agent.back_end,
            opt,
            cache,
            args.epochs,
            lambda: _accuracy(agent, xb_test, yb_test),
            "back-end",
            show,
            args.seed,
        )
    same_front = gg.fingerprint(agent.front_end) == front_fp
    out["front_end_fingerprint"] = {"before": front_fp, "after": gg.fingerprint(agent.front_end)}
    out["front_end_unchanged"] = same_front
    print(f"  front-end fingerprint {front_fp[:16]}... bit-identical after training: {same_front}")

    print("\n3) the title direction: adapt only the front-end to inverted images")
    xi, _ = load_digits_28(invert=True)
    xi_b, yi_b, xi_test, yi_test = _split(xi, y, range(5, 10), args.seed)
    shifted = _accuracy(agent, xi_test, yi_test)
    print(f"  accuracy on inverted digits before adapting: {shifted:.3f}")
    gg.train_only(agent, "front_end")
    back_fp = gg.fingerprint(agent.back_end)
    opt = torch.optim.Adam(gg.param_groups(agent, lr=3e-3))
    with gg.guard(agent, opt, check="both"):
        out["adapt"] = _epochs(
            agent,
            opt,
            TensorDataset(xi_b, yi_b),
            args.adapt_epochs,
            lambda: _accuracy(agent, xi_test, yi_test),
            "front-end",
            show,
            args.seed,
        )
    same_back = gg.fingerprint(agent.back_end) == back_fp
    out["shifted_accuracy_before"] = shifted
    out["back_end_unchanged"] = same_back
    print(f"  back-end fingerprint {back_fp[:16]}... bit-identical after adapting: {same_back}")

    if args.compare:
        print("\n4) the seed's three hand-written ways vs gradgate, same back-end task")
        out["compare"] = _compare(front, xb, yb, args.epochs)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(out, f, indent=2)
    if args.plot_path:
        _plot(out, args.plot_path)
        print(f"wrote {args.plot_path}")
    return 0 if same_front and same_back else 1


def _plot(out: dict[str, Any], path: str) -> None:
    mpl = optional_import("matplotlib", "plot")
    mpl.use("Agg")
    plt = optional_import("matplotlib.pyplot", "plot")
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for key, label in (
        ("pretrain", "pre-train (0-4)"),
        ("backend", "back-end (5-9, cached)"),
        ("adapt", "front-end (inverted 5-9)"),
    ):
        curve = out[key]
        epochs = [c["epoch"] for c in curve]
        axes[0].plot(epochs, [c["loss"] for c in curve], "o-", label=label)
        axes[1].plot(epochs, [c["accuracy"] for c in curve], "o-", label=label)
    axes[0].set_title("training loss")
    axes[1].set_title("held-out accuracy")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
