"""Hierarchical RL with a frozen, pre-trained observation encoder (the seed's scenario).

1. Pre-train an encoder on random CartPole rollouts (predict the next observation).
2. Freeze it; train a DQN policy online on its features. The replay buffer stores
   encoder *features*, not observations: the frozen encoder runs once per step.

Run: python examples/rl_frozen_encoder.py [--episodes N]
"""

from __future__ import annotations

import argparse
import random
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gradgate as gg


def pretrain_encoder(env: Any, steps: int) -> nn.Module:
    """Self-supervised pre-training: predict the next observation from (features, action)."""
    encoder = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 32), nn.Tanh())
    head = nn.Linear(32 + 2, 4)
    obs, _ = env.reset(seed=0)
    xs: list[Any] = []
    acts: list[int] = []
    nexts: list[Any] = []
    for _ in range(steps):
        act = int(env.action_space.sample())
        nxt, _, term, trunc, _ = env.step(act)
        xs.append(obs)
        acts.append(act)
        nexts.append(nxt)
        obs = env.reset()[0] if term or trunc else nxt
    x = torch.as_tensor(np.array(xs), dtype=torch.float32)
    a = F.one_hot(torch.tensor(acts), 2).float()
    y = torch.as_tensor(np.array(nexts), dtype=torch.float32)
    opt = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=3e-3)
    for _ in range(300):
        loss = F.mse_loss(head(torch.cat([encoder(x), a], 1)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"encoder pre-trained: next-observation MSE {loss.item():.4f}")
    return encoder


def main(episodes: int = 150, pretrain_steps: int = 2000, seed: int = 0) -> dict[str, float]:
    """Train the policy online on frozen features; return summary numbers."""
    random.seed(seed)
    torch.manual_seed(seed)
    env = gym.make("CartPole-v1")
    env.action_space.seed(seed)
    encoder = pretrain_encoder(env, pretrain_steps)
    gg.freeze(encoder)
    fast = gg.inference_copy(encoder)  # an inference copy: no autograd, no BN/Dropout
    before = gg.fingerprint(encoder)

    policy = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 2))
    target = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 2))
    target.load_state_dict(policy.state_dict())
    gg.freeze(target)
    opt = torch.optim.Adam(policy.parameters(), lr=1e-3)
    buffer: list[tuple[torch.Tensor, int, float, torch.Tensor, bool]] = []
    returns: list[float] = []
    step = 0
    with gg.guard(encoder, opt):
        for episode in range(episodes):
            obs, _ = env.reset(seed=seed + episode)
            feat = fast(torch.tensor(obs).float().unsqueeze(0))[0]
            total, done = 0.0, False
            while not done:
                eps = max(0.05, 1.0 - step / 3000)
                if random.random() < eps:
                    action = int(env.action_space.sample())
                else:
                    with torch.no_grad():
                        action = int(policy(feat).argmax())
                obs, reward, term, trunc, _ = env.step(action)
                nxt = fast(torch.tensor(obs).float().unsqueeze(0))[0]
                buffer.append((feat, action, float(reward), nxt, bool(term)))
                buffer = buffer[-20000:]
                feat, total, done, step = nxt, total + float(reward), term or trunc, step + 1
                if len(buffer) >= 256:
                    batch = random.sample(buffer, 64)
                    f = torch.stack([b[0] for b in batch])
                    a = torch.tensor([b[1] for b in batch])
                    r = torch.tensor([b[2] for b in batch])
                    n = torch.stack([b[3] for b in batch])
                    d = torch.tensor([b[4] for b in batch], dtype=torch.float32)
                    with torch.no_grad():
                        goal = r + 0.99 * (1 - d) * target(n).max(1).values
                    q = policy(f).gather(1, a.unsqueeze(1)).squeeze(1)
                    loss = F.smooth_l1_loss(q, goal)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                if step % 500 == 0:
                    target.load_state_dict(policy.state_dict())
            returns.append(total)
            if (episode + 1) % 25 == 0:
                print(f"episode {episode + 1}: mean return (last 25) {sum(returns[-25:]) / 25:.1f}")
    same = gg.fingerprint(encoder) == before
    print(f"encoder bit-identical after {step} environment steps: {same}")
    first = sum(returns[:10]) / min(10, len(returns))
    last = sum(returns[-10:]) / min(10, len(returns))
    print(
        f"\nresult: mean return of the first 10 episodes {first:.1f}, of the last 10 {last:.1f} "
        f"(CartPole's cap is 500); frozen encoder bit-identical: {same}"
    )
    return {"first_returns": first, "last_returns": last, "encoder_unchanged": float(same)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--episodes", type=int, default=150)
    parser.add_argument("--pretrain-steps", type=int, default=2000)
    args = parser.parse_args()
    main(args.episodes, args.pretrain_steps)
