"""Renamed public names: the new ones are the classes/functions, the old ones still import."""

from __future__ import annotations

import pytest
import torch

import gradgate as gg
from gradgate import errors


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("FrozenTensorChanged", "FrozenTensorChangedError"),
        ("FingerprintMismatch", "FingerprintMismatchError"),
        ("AccelerationError", "InferenceCopyError"),
        ("accelerate", "inference_copy"),
        ("Accelerated", "InferenceCopy"),
    ],
)
def test_old_names_are_the_same_objects_as_the_new_ones(old: str, new: str) -> None:
    assert getattr(gg, old) is getattr(gg, new)
    assert old in gg.__all__ and new in gg.__all__
    from gradgate import inference as module

    home = errors if new.endswith("Error") else module
    assert getattr(home, old) is getattr(home, new)


def test_every_exception_is_named_error() -> None:
    aliases = {"FrozenTensorChanged", "FingerprintMismatch", "AccelerationError"}
    exceptions = [
        name
        for name in gg.__all__
        if isinstance(getattr(gg, name), type) and issubclass(getattr(gg, name), BaseException)
    ]
    assert [n for n in exceptions if not n.endswith("Error") and n not in aliases] == []
    assert all(getattr(gg, n).__name__.endswith("Error") for n in exceptions)


def test_except_with_the_old_name_catches_what_the_guard_raises() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    gg.freeze(net, "0")
    opt = torch.optim.SGD(gg.trainable_parameters(net), lr=0.1)
    weight = next(net.parameters())
    # The old name catches what the guard raises.
    with pytest.raises(gg.FrozenTensorChanged) as info, gg.guard(net, opt, check="exact"):
        weight.data.add_(1.0)
    assert type(info.value) is gg.FrozenTensorChangedError
    assert "frozen parameter '0.weight' changed" in str(info.value)


def test_the_old_inference_copy_name_still_works() -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    gg.freeze(net)
    copy = gg.accelerate(net)
    assert isinstance(copy, gg.InferenceCopy) and copy.folded == [("0", "1")]


def test_the_old_module_name_of_the_example_agent_still_imports() -> None:
    from gradgate.tools import agent, seed

    assert (seed.Agent, seed.FeatureExtractor, seed.PolicyNetwork) == (
        agent.Agent,
        agent.FeatureExtractor,
        agent.PolicyNetwork,
    )
