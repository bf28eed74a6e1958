"""What freezing EfficientNet's whole backbone at one step costs (issue 26's image workload).

Runs the ``gradgate bench autofreeze`` image workload's ``progressive``
strategy with its schedule squeezed into one step: the first 9 of the 10
stages freeze together after step ``AT`` (``ProgressiveFreeze(start=AT,
end=AT + 1)``), everything else as in the benchmark. This is what an
AutoFreeze rule that compares each stage with the largest progress seen so
far (instead of the current top stage's) would do: replayed on the recorded
traces it freezes 9 stages at step 96 (seed 0) and 112 (seed 1).

Run: python bench/autofreeze_fixed.py AT SEEDS [N]     (e.g. 96 0,1,2)

With ``N`` only the first ``N`` stages freeze (default 9): ``48 0,1,2 3`` is what a
threshold of 0.01 on the representation change (``bench/autofreeze_cka.py``) would do.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

import gradgate as gg
from gradgate.tools import bench_autofreeze as B


def main() -> None:
    """Per seed: final accuracy, mean of the last 4 evaluations, CPU seconds; a result line."""
    at, seeds = int(sys.argv[1]), [int(s) for s in sys.argv[2].split(",")]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 9
    torch.set_num_threads(1)
    original = gg.ProgressiveFreeze

    def at_once(model: Any, stages: Any, start: int, end: int, optimizer: Any) -> Any:
        # ProgressiveFreeze keeps the last stage it is given training
        return original(model, stages[: n + 1], start=at, end=at + 1, optimizer=optimizer)

    gg.ProgressiveFreeze = at_once  # type: ignore[assignment,misc]
    w = B.image_workload(False)
    finals = []
    for seed in seeds:
        r = B.run(w, "progressive", seed)
        accs = [c["acc"] for c in r["curve"]]
        finals.append(accs[-1])
        print(f"seed {seed}: froze {[(f['step'], f['frozen']) for f in r['freezes']]}, final "
              f"{accs[-1]:.3f}, last 4 evaluations {sum(accs[-4:]) / 4:.3f}, "
              f"{r['seconds']:.1f} CPU s")  # fmt: skip
    print(f"result: {n} stages frozen after step {at}: mean final accuracy "
          f"{sum(finals) / len(finals):.4f} over seeds {seeds}")  # fmt: skip


if __name__ == "__main__":
    main()
