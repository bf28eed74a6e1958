"""Selector grammar edges: ambiguous number brackets and regexes a future Python reads otherwise."""

from __future__ import annotations

import warnings

import pytest
from torch import nn

import gradgate as gg


def _layers(n: int = 13) -> nn.Module:
    net = nn.Module()
    net.layer = nn.ModuleList(nn.Linear(1, 1) for _ in range(n))
    return net


@pytest.mark.parametrize(
    ("selector", "numbers", "chars"),
    [
        ("layer.[01]", "[1]", "[0,1]"),
        ("layer.[012]", "[12]", "[0,1,2]"),
        ("layer.[00]", "[0]", "[0]"),
    ],
)
def test_leading_zero_bracket_is_refused_showing_both_readings(
    selector: str, numbers: str, chars: str
) -> None:
    # Before: '[01]' silently selected layer 1 only, '[012]' layer 12, '[00]' layer 0.
    net = _layers()
    before = [p.requires_grad for p in net.parameters()]
    with pytest.raises(gg.InvalidArgumentError) as info:
        gg.freeze(net, selector)
    msg = str(info.value)
    assert repr(selector) in msg and "leading zero" in msg
    assert f"read as numbers it means {numbers}" in msg
    assert f"read as a glob character class {chars}" in msg
    assert [p.requires_grad for p in net.parameters()] == before


@pytest.mark.parametrize("selector", ["layer.[0,01]", "layer.[1-012]"])
def test_leading_zero_in_a_set_or_range_is_refused(selector: str) -> None:
    with pytest.raises(gg.InvalidArgumentError, match="leading zero"):
        gg.select(_layers(), selector)


def test_brackets_without_leading_zero_still_select_numbers_and_classes() -> None:
    net = _layers()
    assert gg.select(net, "layer.[0,1]").roots == ["layer.0", "layer.1"]
    assert gg.select(net, "layer.[0]").roots == ["layer.0"]
    assert gg.select(net, "layer.[10]").roots == ["layer.10"]
    assert gg.select(net, "layer.1[01]").roots == ["layer.10", "layer.11"]  # a class inside


@pytest.mark.parametrize("selector", ["re:layer\\.[[0]", "re:layer\\.[0--9]", "re:layer.[0&&1]"])
def test_regex_a_future_python_reads_differently_is_refused_not_warned(selector: str) -> None:
    # Before: the stdlib's FutureWarning ("Possible nested set") escaped from
    # gradgate's selector path (an error under -W error::FutureWarning), and
    # the selector's meaning would change silently on a future Python.
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        with pytest.raises(gg.InvalidArgumentError) as info:
            gg.select(_layers(), selector)
    assert repr(selector) in str(info.value) and "future version" in str(info.value)


def test_selector_paths_emit_no_future_warning() -> None:
    net = _layers(3)
    net.norm = nn.LayerNorm(1)
    selectors: list[gg.Selector] = [
        "layer.[0-1]",
        "**.bias",
        "layer.*",
        "re:layer\\.(0|1)",
        "re:layer\\.[0-2]\\.weight",
        gg.norms,
        nn.Linear,
        ["layer.0", "re:layer\\.2"],
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        for sel in selectors:
            gg.select(net, sel)
            handle = gg.freeze(net, sel)
            gg.summary(net)
            handle.undo()
            gg.train_only(net, sel).undo()
        with pytest.raises(gg.NoMatchError):
            gg.select(net, "re:nothing[a-z]")
    assert all(p.requires_grad for p in net.parameters())
