"""The seed's scenario with gradgate: freeze the front-end, train the back-end, prove it.

Run: python examples/seed_scenario.py [--steps N]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import gradgate as gg
from gradgate.tools.seed import Agent


def main(steps: int = 20) -> None:
    """Freeze the front-end, train the back-end under a guard, then the reverse."""
    torch.manual_seed(0)
    agent = Agent()

    gg.freeze(agent, "front_end")  # the seed's body
    print(gg.summary(agent, depth=1))
    opt = torch.optim.Adam(gg.param_groups(agent, lr=1e-3))
    before = gg.fingerprint(agent.front_end)
    with gg.guard(agent, opt):
        for _ in range(steps):
            x, y = torch.randn(16, 3, 28, 28), torch.randint(0, 10, (16,))
            loss = F.cross_entropy(agent(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    print("front-end bit-identical:", gg.fingerprint(agent.front_end) == before)

    gg.train_only(agent, "front_end")  # the seed's title: gradients only for the front-end
    opt = torch.optim.Adam(gg.param_groups(agent, lr=1e-3))
    x = torch.randn(16, 3, 28, 28)
    agent(x).sum().backward()
    report = gg.grad_report(agent)
    print(report)
    assert report.ok and all(p.grad is None for p in agent.back_end.parameters())


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    main(parser.parse_args().steps)
