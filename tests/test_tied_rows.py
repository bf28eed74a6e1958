"""Different rows of the two names of one tied tensor are refused, not united (issue 23.15)."""

from __future__ import annotations

import pytest
import torch

import gradgate as gg
from cases import TiedLM, state_of


@pytest.mark.parametrize("verb", ["freeze", "unfreeze", "train_only"])
def test_different_rows_through_two_tied_names_raise_and_change_nothing(verb: str) -> None:
    model = TiedLM()
    before = state_of(model)
    weight = model.embed.weight.detach().clone()
    call = getattr(gg, verb)
    with pytest.raises(gg.InvalidArgumentError) as info:
        call(model, gg.rows("embed.weight", [1, 2]), gg.rows("decoder.weight", [3]))
    msg = str(info.value)
    assert "'embed.weight'" in msg and "'decoder.weight'" in msg
    assert "[1, 2]" in msg and "[3]" in msg and "one tied tensor" in msg
    assert state_of(model) == before
    assert torch.equal(model.embed.weight, weight)
    assert model.decoder.weight is model.embed.weight


def _rows_that_move(model: TiedLM) -> list[int]:
    before = model.embed.weight.detach().clone()
    opt = torch.optim.SGD(gg.param_groups(model, lr=0.5), lr=0.5)
    model(torch.arange(11).reshape(1, 11)).pow(2).sum().backward()
    opt.step()
    moved = (model.embed.weight.detach() != before).any(dim=1)
    return [int(i) for i in moved.nonzero().flatten()]


def test_the_same_rows_through_both_names_or_one_name_twice_are_fine() -> None:
    model = TiedLM()
    gg.train_only(model, gg.rows("embed.weight", [1, 2]), gg.rows("decoder.weight", [2, 1]))
    assert _rows_that_move(model) == [1, 2]
    model2 = TiedLM()
    gg.train_only(model2, gg.rows("embed.weight", [1]), gg.rows("embed.weight", [2]))
    assert _rows_that_move(model2) == [1, 2]
