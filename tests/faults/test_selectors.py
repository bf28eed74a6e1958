"""Fuzzed selector strings: a correct result or a gradgate error, never a raw one."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import gradgate as gg
from cases import state_of
from gradgate.selection import glob_to_regex


def _model() -> nn.Module:
    return nn.ModuleDict(
        {
            "encoder": nn.ModuleDict({"layer": nn.ModuleList(nn.Linear(2, 2) for _ in range(12))}),
            "head": nn.Sequential(nn.Linear(2, 2), nn.ReLU()),
            "a_b": nn.Linear(2, 2, bias=False),
        }
    )


MODEL = _model()
MODULES = [n for n, _ in MODEL.named_modules() if n]
PARAMS = [n for n, _ in MODEL.named_parameters()]

pieces = st.sampled_from(
    ["encoder", "layer", "head", "0", "1", "11", "weight", "bias", "a_b", "*", "**", "?",
     "[0-3]", "[6-11]", "[0,2,4-6]", "[!0]", "[", "]", "[11-6]", "[-4:]", "[]", "\\", "(",
     ")", "|", "+", "{2}", "\n", "^", "$", "-", ",", ":", "x"]
)  # fmt: skip
selectors = st.lists(pieces, min_size=1, max_size=6).flatmap(
    lambda parts: st.lists(
        st.sampled_from([".", ""]), min_size=len(parts), max_size=len(parts)
    ).map(
        lambda seps: (
            "".join(p + s for p, s in zip(parts, seps, strict=True)).rstrip(".") or parts[0]
        )
    )
)


def _expected(selector: str) -> set[str] | None:
    """What the per-name path (no joined scan) matches, or None when the grammar refuses."""
    try:
        rx = re.compile(glob_to_regex(selector, scan=False), re.DOTALL)
    except gg.InvalidArgumentError:
        return None
    return {n for n in MODULES + PARAMS if rx.fullmatch(n)}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(selector=selectors)
def test_fuzzed_globs_match_correctly_or_raise_gradgate_errors(selector: str) -> None:
    model = _model()
    before = state_of(model)
    try:
        sel = gg.select(model, selector)
    except gg.GradgateError as e:
        assert isinstance(e, (ValueError, LookupError)), type(e)
        with pytest.raises(type(e)):
            gg.freeze(model, selector)
        assert state_of(model) == before
        return
    expected = _expected(selector)
    assert expected is not None
    assert set(sel.roots) == expected & set(MODULES)
    handle = gg.freeze(model, selector)
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == set(sel.parameters)
    handle.undo()
    assert state_of(model) == before


@settings(max_examples=200, deadline=None)
@given(pattern=st.text(alphabet="()[]{}*+?|\\.^$a0-:,!\n", min_size=1, max_size=20))
def test_fuzzed_regex_selectors_never_leak_raw_errors(pattern: str) -> None:
    try:
        gg.select(MODEL, "re:" + pattern)
    except gg.GradgateError as e:
        assert isinstance(e, (ValueError, LookupError))


def test_deeply_nested_regex_is_an_invalid_argument() -> None:
    with pytest.raises(gg.InvalidArgumentError, match="not a valid regular expression"):
        gg.select(MODEL, "re:" + "(" * 5000 + "x" + ")" * 5000)
    with pytest.raises(gg.InvalidArgumentError, match="not a valid regular expression"):
        gg.select(MODEL, "re:encoder(")


@pytest.mark.parametrize(
    "selector", ["encoder.layer.[-1]", "encoder.layer.[1-]", "encoder.layer.[0-3,]", "**.[,]"]
)
def test_negative_index_or_open_range_is_refused_not_read_as_a_class(selector: str) -> None:
    # as a class of characters, '[-1]' would silently select layer 1
    with pytest.raises(gg.InvalidArgumentError) as info:
        gg.select(MODEL, selector)
    assert repr(selector) in str(info.value)
    assert "negative indices, open ranges and empty items are not supported" in str(info.value)


def test_many_double_stars_do_not_backtrack_forever() -> None:
    with pytest.raises(gg.NoMatchError):
        gg.select(MODEL, ".".join(["**"] * 40 + ["nothing"]))


def test_newline_in_a_selector_does_not_match_across_names() -> None:
    # the joined scan puts a newline between 'encoder.layer.0' and the next name
    with pytest.raises(gg.NoMatchError):
        gg.select(MODEL, "encoder.layer.0\nencoder.layer.1")
    with pytest.raises(gg.NoMatchError):
        gg.select(MODEL, "**.0.weight\nencoder.layer.0.bias")


def test_newline_in_a_module_name_is_matched_exactly() -> None:
    model = nn.ModuleDict({"a\nb": nn.Linear(2, 2), "a": nn.Linear(2, 2), "b": nn.Linear(2, 2)})
    assert gg.select(model, "a\nb").roots == ["a\nb"]
    assert gg.select(model, "a*").roots == ["a", "a\nb"]
    assert gg.select(model, "b").roots == ["b"]
    assert sorted(gg.select(model, "*").roots) == ["a", "a\nb", "b"]
    gg.freeze(model, "a")
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == ["a.weight", "a.bias"]
