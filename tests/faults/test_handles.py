"""Handles under stress: out-of-order undo, two threads, Ctrl-C and user exceptions."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import gradgate as gg
from cases import state_of
from gradgate.tools.agent import Agent


def _flags(model: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def test_undoing_an_older_handle_keeps_later_freezes() -> None:
    agent = Agent()
    first = gg.freeze(agent, "front_end")
    second = gg.freeze(agent, "back_end.fc1")
    first.undo()
    assert all(p.requires_grad for p in agent.front_end.parameters())
    assert not any(p.requires_grad for p in agent.back_end.fc1.parameters())
    assert gg.is_sticky(agent.back_end.fc1) and not gg.is_sticky(agent.front_end)
    second.undo()
    assert all(p.requires_grad for p in agent.parameters())


def test_out_of_order_undo_reverts_only_what_survives() -> None:
    agent = Agent()
    whole = gg.freeze(agent)
    part = gg.unfreeze(agent, "back_end.fc2")
    whole.undo()  # fc2 was changed since: it stays as `part` left it
    assert all(p.requires_grad for p in agent.parameters())
    part.undo()  # fc2 goes back to what it was before `part`: frozen
    assert _flags(agent) == {n: not n.startswith("back_end.fc2") for n in _flags(agent)}
    assert gg.is_sticky(agent.back_end.fc2)


def test_undo_in_reverse_order_restores_exactly() -> None:
    agent = Agent()
    agent.train()
    before = state_of(agent)
    handles = [
        gg.freeze(agent, "front_end"),
        gg.train_only(agent, "back_end.fc2"),
        gg.unfreeze(agent, "front_end.conv1"),
        gg.freeze(agent, mode="norm"),
    ]
    for h in reversed(handles):
        h.undo()
    assert state_of(agent) == before


def test_two_threads_on_disjoint_parts_do_not_clobber() -> None:
    model = nn.ModuleDict(
        {
            "a": nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.1)),
            "b": nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.1)),
        }
    )
    model.train()
    before = state_of(model)
    barrier = threading.Barrier(2)
    errors: list[str] = []

    def worker(part: str, other: str, rounds: int) -> None:
        mine, theirs = model[part], model[other]
        bn = mine.get_submodule("1")
        for i in range(rounds):
            # Not last-in-first-out: the thread that enters first leaves first,
            # while the other is still inside its own block.
            first = (i % 2 == 0) is (part == "a")
            barrier.wait()
            if first:
                with gg.freeze(model, part):
                    barrier.wait()  # inside
                    barrier.wait()  # both inside
                barrier.wait()  # left
            else:
                barrier.wait()
                with gg.freeze(model, part):
                    barrier.wait()
                    barrier.wait()  # the other thread has left its block
                    if any(p.requires_grad for p in mine.parameters()):
                        errors.append(f"{part}: unfrozen by the other thread in round {i}")
                    if not gg.is_sticky(bn) or bn.training:
                        errors.append(f"{part}: released by the other thread in round {i}")
                    if not all(p.requires_grad for p in theirs.parameters()):
                        errors.append(f"{other}: its undo did not land in round {i}")
            barrier.wait()

    threads = [
        threading.Thread(target=worker, args=("a", "b", 60)),
        threading.Thread(target=worker, args=("b", "a", 60)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    assert state_of(model) == before


def test_threads_race_freely_then_end_where_they_began() -> None:
    model = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1)) for _ in range(4))
    model.train()
    before = state_of(model)
    failures: list[str] = []

    def worker(k: int) -> None:
        for _ in range(200):
            with gg.freeze(model, str(k)):
                if any(p.requires_grad for p in model[k].parameters()):
                    failures.append(f"part {k} unfrozen while held")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert failures == []
    assert state_of(model) == before


class Interrupting(nn.Parameter):
    """A parameter whose flag change is interrupted (Ctrl-C arriving mid-freeze)."""

    def requires_grad_(self, requires_grad: bool = True) -> Interrupting:
        raise KeyboardInterrupt


def test_ctrl_c_inside_freeze_rolls_back_and_stays_keyboard_interrupt() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Linear(2, 2))
    model[2].weight = Interrupting(torch.ones(2, 2))
    before = state_of(model)
    with pytest.raises(KeyboardInterrupt):
        gg.freeze(model)
    assert state_of(model) == before
    assert all(len(m._forward_pre_hooks) == 0 for m in model.modules())


def test_predicate_exception_keeps_its_type() -> None:
    class Boom(Exception):
        pass

    def predicate(name: str, module: nn.Module) -> bool:
        raise Boom(name)

    agent = Agent()
    before = state_of(agent)
    with pytest.raises(Boom):
        gg.freeze(agent, predicate)
    with pytest.raises(Boom):
        gg.train_only(agent, "front_end", exclude=predicate)
    assert state_of(agent) == before


def test_listener_exception_rolls_back_and_keeps_its_type() -> None:
    from gradgate._events import subscribe

    def listener(change: object) -> None:
        raise RuntimeError("listener failed")

    agent = Agent()
    before = state_of(agent)
    stop = subscribe(listener)
    try:
        with pytest.raises(RuntimeError, match="listener failed") as info:
            gg.freeze(agent, "front_end")
    finally:
        stop()
    assert not isinstance(info.value, gg.GradgateError)
    assert state_of(agent) == before


def test_own_errors_get_context_and_keep_their_type() -> None:
    agent = Agent()
    with pytest.raises(gg.NoMatchError) as info:
        gg.freeze(agent, "nothing")
    assert isinstance(info.value, LookupError)
    assert "'nothing'" in str(info.value)
