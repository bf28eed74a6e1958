"""The seed's scenario with gradgate: freeze the front-end, train the back-end, prove it.

Run: python examples/seed_scenario.py [--steps N]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import gradgate as gg
from gradgate.tools.agent import Agent


def main(steps: int = 20) -> dict[str, bool]:
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
    front_same = gg.fingerprint(agent.front_end) == before
    print("front-end bit-identical:", front_same)

    gg.train_only(agent, "front_end")  # the seed's title: gradients only for the front-end
    opt = torch.optim.Adam(gg.param_groups(agent, lr=1e-3))
    x = torch.randn(16, 3, 28, 28)
    agent(x).sum().backward()
    report = gg.grad_report(agent)
    print(report)
    only_front = report.ok and all(p.grad is None for p in agent.back_end.parameters())
    print(
        f"\nresult: back-end trained {steps} steps with the front-end bit-identical: "
        f"{front_same}; title direction, gradients on the front-end only: {only_front}"
    )
    return {"front_end_unchanged": front_same, "front_end_only_gradients": only_front}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    result = main(parser.parse_args().steps)
    raise SystemExit(0 if all(result.values()) else 1)
