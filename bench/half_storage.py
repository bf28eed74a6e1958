"""Accuracy effect of 16-bit FeatureCache storage on the demo's digits task.

Pre-trains the seed's front-end on digits 0-4 (as ``gradgate demo`` does), then
trains the same back-end on digits 5-9 from caches stored in float32, bfloat16
and float16, and reports held-out accuracy and the cache's memory.

Run: python bench/half_storage.py OUT.json
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.utils.data import TensorDataset

import gradgate as gg
from gradgate.tools.agent import Agent, FeatureExtractor
from gradgate.tools.demo import load_digits_28, split_classes
from gradgate.tools.training import accuracy, train_epochs


def main(out: str) -> None:
    """Write one row per storage dtype."""
    torch.manual_seed(0)
    x, y = load_digits_28()
    pre_data = split_classes(x, y, range(0, 5), 0)
    data = split_classes(x, y, range(5, 10), 0)
    front = FeatureExtractor()
    pre = torch.nn.Sequential(front, torch.nn.Linear(1568, 5))
    opt: torch.optim.Optimizer = torch.optim.Adam(pre.parameters(), lr=1e-3)
    train_epochs(pre, opt, TensorDataset(pre_data.x, pre_data.y), 4, seed=0)
    gg.freeze(front)
    rows = []
    for dtype in (None, torch.bfloat16, torch.float16):
        torch.manual_seed(1)
        agent = Agent(classes=5)
        agent.front_end = front
        cache = gg.FeatureCache(front, TensorDataset(data.x, data.y), dtype=dtype, progress=False)
        opt = torch.optim.Adam(gg.param_groups(agent, lr=1e-3))
        curve = train_epochs(agent.back_end, opt, cache, 8, seed=0)
        rows.append(
            {
                "storage": str(dtype or torch.float32).replace("torch.", ""),
                "cache MB": round(cache.nbytes / 2**20, 2),
                "held-out accuracy": round(accuracy(agent, data.x_test, data.y_test), 4),
                "final train loss": round(curve[-1]["loss"], 4),
            }
        )
    with open(out, "w") as f:
        json.dump({"name": "16-bit cache storage", "rows": rows}, f, indent=2)
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out", nargs="?", default="bench-out/half_storage.json")
    main(parser.parse_args().out)
