"""Bad input to the public verbs: a gradgate error naming the argument, never a raw one.

Each call below used to escape as a bare ``TypeError``/``ValueError``/
``IsADirectoryError`` from deep inside; the promise is the error's type (a
``GradgateError`` that is also the builtin a user catches), a message that
names what was passed, and nothing changed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import gradgate as gg
from cases import state_of


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))


def _sgd(m: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(m.parameters(), lr=0.1)


Call = Callable[[nn.Sequential, Path], Any]
CASES: dict[str, tuple[Call, type[gg.GradgateError], str]] = {
    "fingerprint(int)": (
        lambda m, d: gg.fingerprint(3),  # type: ignore[arg-type]
        gg.InvalidArgumentError,
        "obj=3",
    ),
    "fingerprint(list with None)": (
        lambda m, d: gg.fingerprint([("w", torch.ones(1)), None]),  # type: ignore[list-item]
        gg.InvalidArgumentError,
        "entry 1 of obj is None",
    ),
    "fingerprint(bare tensors)": (
        lambda m, d: gg.fingerprint([torch.ones(1)]),  # type: ignore[list-item]
        gg.InvalidArgumentError,
        "entry 0 of obj",
    ),
    "save_trainable(directory)": (
        lambda m, d: gg.save_trainable(m, d),
        gg.CheckpointError,
        "path=",
    ),
    "param_groups(lr=str)": (
        lambda m, d: gg.param_groups(m, lr="x"),  # type: ignore[arg-type]
        gg.InvalidArgumentError,
        "lr=",
    ),
    "param_groups(weight_decay=None)": (
        lambda m, d: gg.param_groups(m, lr=0.1, weight_decay=None),  # type: ignore[arg-type]
        gg.InvalidArgumentError,
        "weight_decay=",
    ),
    "param_groups(layer_decay str decay)": (
        lambda m, d: gg.param_groups(m, lr=0.1, layer_decay=("0", ["0"])),  # type: ignore[arg-type]
        gg.InvalidArgumentError,
        "layer_decay=",
    ),
    "param_groups(layer_decay str stages)": (
        lambda m, d: gg.param_groups(m, lr=0.1, layer_decay=(0.5, "01")),
        gg.InvalidArgumentError,
        "layer_decay=",
    ),
    "param_groups(layer_decay 3-tuple)": (
        lambda m, d: gg.param_groups(m, lr=0.1, layer_decay=(0.5, ["0"], 1)),  # type: ignore[arg-type]
        gg.InvalidArgumentError,
        "layer_decay=",
    ),
    "GradualUnfreeze(at with str)": (
        lambda m, d: gg.GradualUnfreeze(m, ["0", "1"], at=["a", 0], optimizer=_sgd(m)),  # type: ignore[list-item]
        gg.InvalidArgumentError,
        "at=",
    ),
    "GradualUnfreeze(at=str)": (
        lambda m, d: gg.GradualUnfreeze(m, ["0", "1"], at="10", optimizer=_sgd(m)),  # type: ignore[arg-type]
        gg.InvalidArgumentError,
        "at=",
    ),
    "ProgressiveFreeze(start=str)": (
        lambda m, d: gg.ProgressiveFreeze(m, ["0", "1"], start="0", end=2),  # type: ignore[arg-type]
        gg.InvalidArgumentError,
        "start=",
    ),
    "inference_copy(str)": (
        lambda m, d: gg.inference_copy("m"),  # type: ignore[arg-type]
        gg.InvalidArgumentError,
        "module=",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_argument_is_a_gradgate_error_naming_it(tmp_path: Path, case: str) -> None:
    call, error, names = CASES[case]
    model = _model()
    before, values = state_of(model), gg.fingerprint(model)
    with pytest.raises(error) as info:
        call(model, tmp_path)
    assert isinstance(info.value, ValueError)  # what a user already catches
    assert names in str(info.value)
    assert state_of(model) == before and gg.fingerprint(model) == values
    assert list(tmp_path.iterdir()) == []  # no temp file, no partial write
