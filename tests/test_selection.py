from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import gradgate as gg
from gradgate.selection import glob_to_regex
from gradgate.tools.agent import Agent


def test_module_name_selects_subtree() -> None:
    sel = gg.select(Agent(), "front_end")
    assert sel.roots == ["front_end"]
    assert sel.parameters == [
        "front_end.conv1.weight",
        "front_end.conv1.bias",
        "front_end.conv2.weight",
        "front_end.conv2.bias",
    ]
    assert "front_end.relu1" in sel.modules
    assert "back_end" not in sel.modules


def test_names_are_anchored_at_root() -> None:
    with pytest.raises(gg.NoMatchError, match=r"\*\*\.fc1"):
        gg.select(Agent(), "fc1")
    assert gg.select(Agent(), "**.fc1").roots == ["back_end.fc1"]


@pytest.mark.parametrize(
    ("pattern", "name", "hit"),
    [
        ("**.bias", "bias", True),
        ("**.bias", "a.b.bias", True),
        ("blocks.*", "blocks.0", True),
        ("blocks.*", "blocks.0.attn", False),
        ("blocks.**", "blocks.0.attn", True),
        ("a.**.b", "a.b", True),
        ("a.**.b", "a.x.y.b", True),
        ("a.**.b", "a.xb", False),
        ("blocks.[0-3]", "blocks.2", True),
        ("blocks.[0-3]", "blocks.4", False),
        ("blocks.[!0-3]", "blocks.4", True),
        ("blocks.[!0-3]x", "blocks..x", False),
        ("blocks.1*", "blocks.12", True),
        ("blocks.?", "blocks.12", False),
    ],
)
def test_glob_grammar(pattern: str, name: str, hit: bool) -> None:
    assert bool(re.fullmatch(glob_to_regex(pattern), name)) is hit


def test_every_selector_form() -> None:
    agent = Agent()
    by_obj = gg.select(agent, agent.front_end.conv1)
    by_param = gg.select(agent, agent.back_end.fc2.bias)
    by_type = gg.select(agent, nn.Conv2d)
    by_pred = gg.select(agent, lambda name, m: name.endswith("fc1"))
    by_regex = gg.select(agent, r"re:front_end\.conv(1|2)")
    by_list = gg.select(agent, ["front_end.conv1", agent.back_end.fc2])
    assert by_obj.parameters == ["front_end.conv1.weight", "front_end.conv1.bias"]
    assert by_param.parameters == ["back_end.fc2.bias"]
    assert by_param.modules == []
    assert by_type.roots == ["front_end.conv1", "front_end.conv2"]
    assert by_pred.roots == ["back_end.fc1"]
    assert by_regex.roots == ["front_end.conv1", "front_end.conv2"]
    assert set(by_list.roots) == {"front_end.conv1", "back_end.fc2"}


def test_exclude_removes_modules_and_parameters() -> None:
    agent = Agent()
    sel = gg.select(agent, "front_end", exclude=["**.conv2", "**.bias"])
    assert sel.parameters == ["front_end.conv1.weight"]
    assert "front_end.conv2" not in sel.modules


def test_whole_model_with_no_selector() -> None:
    agent = Agent()
    sel = gg.select(agent)
    assert sel.roots == [""]
    assert len(sel) == len(list(agent.parameters()))
    assert sel.numel == sum(p.numel() for p in agent.parameters())


def test_tied_weights_count_once() -> None:
    from cases import TiedLM

    model = TiedLM()
    sel = gg.select(model)
    assert sel.parameters.count("embed.weight") == 1
    assert "decoder.weight" not in sel.parameters
    assert sel.numel == sum(p.numel() for p in model.parameters())


def test_no_match_names_closest() -> None:
    with pytest.raises(gg.NoMatchError) as info:
        gg.select(Agent(), "front")
    msg = str(info.value)
    assert "'front'" in msg and "'front_end'" in msg
    assert isinstance(info.value, LookupError)


def test_a_misspelt_pattern_tail_is_suggested_fixed_and_nothing_changes() -> None:
    agent = Agent()
    before = {n: p.requires_grad for n, p in agent.named_parameters()}
    with pytest.raises(gg.NoMatchError) as info:
        gg.freeze(agent, "**.biass")
    msg = str(info.value)
    assert "'**.biass'" in msg and "no name ends in 'biass': did you mean '**.bias'?" in msg
    assert {n: p.requires_grad for n, p in agent.named_parameters()} == before
    # the suggestion selects what it says
    assert len(gg.select(agent, "**.bias")) == sum(
        1 for n, _ in before.items() if n.endswith("bias")
    )


def test_foreign_objects_do_not_match() -> None:
    agent = Agent()
    with pytest.raises(gg.NoMatchError):
        gg.select(agent, nn.Linear(2, 2))
    with pytest.raises(gg.NoMatchError):
        gg.select(agent, nn.Parameter(torch.zeros(1)))
    with pytest.raises(gg.NoMatchError, match="BatchNorm2d"):
        gg.select(agent, nn.BatchNorm2d)
    with pytest.raises(gg.NoMatchError):
        gg.select(agent, "front_end", exclude="nothing_here")


@pytest.mark.parametrize("bad", ["", "re:(", 3, [], int])
def test_invalid_selectors(bad: object) -> None:
    with pytest.raises(gg.InvalidArgumentError):
        gg.select(Agent(), bad)  # type: ignore[arg-type]


def test_selection_str_lists_matches() -> None:
    text = str(gg.select(Agent(), "**.fc2"))
    assert "back_end.fc2" in text and "back_end.fc2.weight" in text


names = st.lists(st.text(alphabet="ab01_", min_size=1, max_size=3), min_size=1, max_size=4).map(
    ".".join
)


@given(name=names)
def test_double_star_matches_every_name(name: str) -> None:
    assert re.fullmatch(glob_to_regex("**"), name)
    last = name.rsplit(".", 1)[-1]
    assert re.fullmatch(glob_to_regex("**." + last), name)
    assert re.fullmatch(glob_to_regex(re.escape(name).replace("\\", "")), name) or "[" in name


@given(name=names)
def test_single_star_stays_in_one_segment(name: str) -> None:
    segments = name.count(".") + 1
    pattern = ".".join(["*"] * segments)
    assert re.fullmatch(glob_to_regex(pattern), name)
    assert not re.fullmatch(glob_to_regex(".".join(["*"] * (segments + 1))), name)
