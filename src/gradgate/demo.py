"""``gradgate demo``: the seed's scenario, end to end."""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from ._seed import Agent
from ._util import progress

__all__ = ["add_demo_arguments", "run_demo"]


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the demo's options on ``parser``.

    Example:
        >>> p = argparse.ArgumentParser(); add_demo_arguments(p)
        >>> p.parse_args(["--epochs", "2"]).epochs
        2
    """
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")


def run_demo(args: argparse.Namespace) -> int:
    """Freeze the seed's front-end and train its back-end on random data.

    Example:
        >>> ns = argparse.Namespace(epochs=1, samples=64, seed=0, no_progress=True)
        >>> run_demo(ns)  # doctest: +ELLIPSIS
        module ...
        0
    """
    import gradgate as gg

    torch.manual_seed(args.seed)
    agent = Agent()
    x = torch.randn(args.samples, 3, 28, 28)
    y = torch.randint(0, 10, (args.samples,))
    gg.freeze(agent, "front_end")
    print(gg.summary(agent))
    before = [p.detach().clone() for p in agent.front_end.parameters()]
    opt = torch.optim.Adam(gg.trainable_parameters(agent), lr=1e-3)
    for epoch in range(args.epochs):
        start = time.perf_counter()
        perm = torch.randperm(args.samples)
        total = 0.0
        batches = range(0, args.samples, 64)
        for i in progress(batches, enabled=not args.no_progress, desc=f"epoch {epoch + 1}"):
            idx = perm[i : i + 64]
            loss = F.cross_entropy(agent(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        print(
            f"epoch {epoch + 1}: loss {total / args.samples:.4f} "
            f"({time.perf_counter() - start:.2f} s)"
        )
    same = all(torch.equal(a, b) for a, b in zip(before, agent.front_end.parameters()))
    print(f"front-end bit-identical after training: {same}")
    return 0 if same else 1
