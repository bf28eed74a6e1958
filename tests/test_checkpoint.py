from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import gradgate as gg
from cases import CASES, Case
from gradgate.tools.seed import Agent


def _trained(seed: int = 0) -> tuple[Agent, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    agent = Agent()
    gg.freeze(agent, "front_end")
    opt = torch.optim.Adam(gg.trainable_parameters(agent), lr=1e-3)
    for _ in range(2):
        agent(torch.randn(4, 3, 28, 28)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return agent, opt


def test_round_trip_bit_for_bit(tmp_path: Path) -> None:
    agent, opt = _trained()
    path = gg.save_trainable(agent, tmp_path / "policy.safetensors", optimizer=opt)
    fresh = Agent()
    fresh.front_end.load_state_dict(agent.front_end.state_dict())
    gg.freeze(fresh, "front_end")
    opt2 = torch.optim.Adam(gg.trainable_parameters(fresh), lr=1e-3)
    meta = gg.load_trainable(fresh, path, optimizer=opt2)
    assert meta["torch.version"] == torch.__version__
    assert gg.fingerprint(fresh) == gg.fingerprint(agent)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    for k in s1["state"]:
        for key in s1["state"][k]:
            assert torch.equal(s1["state"][k][key], s2["state"][k][key])
    # both continue identically
    x = torch.randn(4, 3, 28, 28)
    for model, o in ((agent, opt), (fresh, opt2)):
        model(x).pow(2).mean().backward()
        o.step()
    assert gg.fingerprint(fresh) == gg.fingerprint(agent)


def test_file_holds_only_the_trainable_part(tmp_path: Path) -> None:
    agent = Agent()
    gg.train_only(agent, "front_end")
    small = gg.save_trainable(agent, tmp_path / "front.safetensors")
    whole = tmp_path / "whole.pt"
    torch.save(agent.state_dict(), whole)
    ratio = os.path.getsize(small) / os.path.getsize(whole)
    trainable = gg.summary(agent).trainable / gg.summary(agent).total
    assert ratio < trainable + 0.05


def test_wrong_base_raises_and_leaves_model(tmp_path: Path) -> None:
    agent, _ = _trained()
    path = gg.save_trainable(agent, tmp_path / "p.safetensors")
    other = Agent()  # a different front-end
    gg.freeze(other, "front_end")
    before = gg.fingerprint(other)
    with pytest.raises(gg.FingerprintMismatch, match=r"front_end\.conv1\.weight"):
        gg.load_trainable(other, path)
    assert gg.fingerprint(other) == before
    gg.load_trainable(other, path, strict=False)
    assert torch.equal(other.back_end.fc1.weight, agent.back_end.fc1.weight)


def test_missing_key_raises(tmp_path: Path) -> None:
    agent, _ = _trained()
    path = gg.save_trainable(agent, tmp_path / "p.safetensors")
    target = Agent()
    target.front_end.load_state_dict(agent.front_end.state_dict())
    target.back_end.extra = torch.nn.Linear(10, 2)  # a head the checkpoint lacks
    gg.freeze(target, "front_end")
    before = gg.fingerprint(target)
    with pytest.raises(gg.CheckpointKeyError) as info:
        gg.load_trainable(target, path)
    assert "back_end.extra.weight" in str(info.value) and "missing" in str(info.value)
    assert isinstance(info.value, KeyError)
    assert gg.fingerprint(target) == before


def test_changed_trainable_set_is_a_different_base(tmp_path: Path) -> None:
    agent, _ = _trained()
    path = gg.save_trainable(agent, tmp_path / "p.safetensors")
    gg.unfreeze(agent, "front_end.conv2")
    with pytest.raises(gg.FingerprintMismatch, match="frozen in the checkpoint's base only"):
        gg.load_trainable(agent, path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing"])
def test_damaged_file_raises_and_leaves_model(tmp_path: Path, damage: str) -> None:
    agent, _ = _trained()
    path = gg.save_trainable(agent, tmp_path / "p.safetensors")
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 8 + data[8:])
    else:
        path.unlink()
    target = Agent()
    target.front_end.load_state_dict(agent.front_end.state_dict())
    gg.freeze(target, "front_end")
    before = gg.fingerprint(target)
    with pytest.raises(gg.CheckpointError, match=r"p\.safetensors"):
        gg.load_trainable(target, path)
    assert gg.fingerprint(target) == before


@pytest.mark.parametrize("case", [c for c in CASES if c.name != "tied"], ids=str)
def test_round_trip_over_cases(tmp_path: Path, case: Case) -> None:
    torch.manual_seed(1)
    model = case.factory()
    gg.freeze(model, *case.selectors)
    path = gg.save_trainable(model, tmp_path / "m.safetensors")
    torch.manual_seed(1)
    copy = case.factory()
    gg.freeze(copy, *case.selectors)
    with torch.no_grad():
        for p in gg.trainable_parameters(copy):
            p.add_(1.0)
    gg.load_trainable(copy, path)
    assert gg.fingerprint(copy) == gg.fingerprint(model)
