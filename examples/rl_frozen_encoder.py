"""Hierarchical RL with a frozen, pre-trained observation encoder (the seed's scenario).

1. Pre-train an encoder on random CartPole rollouts (predict the next observation).
2. Freeze it; train a DQN policy online on its features (double DQN, a target
   network, a replay buffer). The buffer stores encoder *features*, not
   observations: the frozen encoder runs once per environment step, through
   ``gg.accelerate`` (an inference copy, no autograd), and ``gg.guard`` proves
   that no optimizer step moved it.
3. Judge the greedy policy on fresh episodes against the baseline it must
   beat: the untrained policy on the same features (CartPole's random-action
   return is about 22; the cap is 500).

Run: python examples/rl_frozen_encoder.py [--steps N] [--seed S]
"""

from __future__ import annotations

import argparse
import copy
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


def evaluate(env: Any, encode: Any, policy: nn.Module, episodes: int, seed: int) -> float:
    """Mean return of the greedy policy over ``episodes`` fresh episodes."""
    total = 0.0
    for k in range(episodes):
        obs, _ = env.reset(seed=seed + k)
        done = False
        while not done:
            with torch.no_grad():
                action = int(policy(encode(obs)).argmax())
            obs, reward, term, trunc, _ = env.step(action)
            total += float(reward)
            done = term or trunc
    return total / episodes


def main(steps: int = 12_000, pretrain_steps: int = 2000, seed: int = 0) -> dict[str, float]:
    """Train the policy online on frozen features; return summary numbers."""
    random.seed(seed)
    torch.manual_seed(seed)
    env = gym.make("CartPole-v1")
    env.action_space.seed(seed)
    judge = gym.make("CartPole-v1")  # greedy evaluations run on their own environment
    encoder = pretrain_encoder(env, pretrain_steps)
    gg.freeze(encoder)
    fast = gg.inference_copy(encoder)  # an inference copy: no autograd, no BN/Dropout
    before = gg.fingerprint(encoder)

    def encode(obs: Any) -> torch.Tensor:
        out: torch.Tensor = fast(torch.as_tensor(obs, dtype=torch.float32).unsqueeze(0))[0]
        return out

    policy = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 2))
    target = copy.deepcopy(policy)
    gg.freeze(target)
    untrained = evaluate(judge, encode, policy, 10, seed=10_000)
    opt = torch.optim.Adam(policy.parameters(), lr=1e-3)
    buffer: list[tuple[torch.Tensor, int, float, torch.Tensor, bool]] = []
    best, best_policy = -1.0, copy.deepcopy(policy)
    episode, total = 0, 0.0
    obs, _ = env.reset(seed=seed)
    feat = encode(obs)
    with gg.guard(encoder, opt):
        for step in range(1, steps + 1):
            eps = max(0.02, 1.0 - step / 2500)
            if random.random() < eps:
                action = int(env.action_space.sample())
            else:
                with torch.no_grad():
                    action = int(policy(feat).argmax())
            obs, reward, term, trunc, _ = env.step(action)
            nxt = encode(obs)
            buffer.append((feat, action, float(reward), nxt, bool(term)))
            if len(buffer) > 20_000:
                buffer.pop(0)
            feat, total = nxt, total + float(reward)
            if term or trunc:
                episode += 1
                obs, _ = env.reset(seed=seed + episode)
                feat, total = encode(obs), 0.0
            if len(buffer) >= 500:
                batch = random.sample(buffer, 64)
                f = torch.stack([b[0] for b in batch])
                a = torch.tensor([b[1] for b in batch])
                r = torch.tensor([b[2] for b in batch])
                n = torch.stack([b[3] for b in batch])
                d = torch.tensor([b[4] for b in batch], dtype=torch.float32)
                with torch.no_grad():  # double DQN: the policy picks, the target values
                    pick = policy(n).argmax(1, keepdim=True)
                    goal = r + 0.99 * (1 - d) * target(n).gather(1, pick).squeeze(1)
                q = policy(f).gather(1, a.unsqueeze(1)).squeeze(1)
                loss = F.smooth_l1_loss(q, goal)
                opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(policy.parameters(), 10.0)
                opt.step()
            if step % 200 == 0:
                target.load_state_dict(policy.state_dict())
            if step % 2000 == 0:  # keep the best greedy policy seen (on its own episodes)
                score = evaluate(judge, encode, policy, 3, seed=20_000 + step)
                print(f"step {step}: {episode} episodes, greedy return {score:.1f}")
                if score >= best:
                    best, best_policy = score, copy.deepcopy(policy)
    same = gg.fingerprint(encoder) == before
    final = evaluate(judge, encode, best_policy, 10, seed=30_000)  # fresh episodes
    print(f"encoder bit-identical after {steps} environment steps: {same}")
    print(
        f"\nresult: greedy return {final:.1f} on 10 fresh episodes vs {untrained:.1f} for the "
        f"untrained policy (CartPole caps at 500); frozen encoder bit-identical: {same}"
    )
    return {"return": final, "untrained_return": untrained, "encoder_unchanged": float(same)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12_000)
    parser.add_argument("--pretrain-steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.steps, args.pretrain_steps, args.seed)
