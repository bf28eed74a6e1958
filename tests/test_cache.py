from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradgate as gg
from gradgate.tools.seed import Agent


def _data(n: int = 100, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(
        torch.randn(n, 3, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)
    )


def _frozen_agent() -> Agent:
    torch.manual_seed(0)
    agent = Agent()
    gg.freeze(agent, "front_end")
    return agent


@pytest.mark.parametrize("store", ["memory", "disk"])
def test_features_equal_live_output(tmp_path: Path, store: str) -> None:
    agent, data = _frozen_agent(), _data()
    cache = gg.FeatureCache(agent.front_end, data, store=store, path=tmp_path, batch_size=32)
    with torch.no_grad():
        live = agent.front_end(data.tensors[0])
    assert torch.equal(cache.features(), live)
    feats, label = cache[7]
    assert torch.equal(feats, live[7]) and int(label) == int(data.tensors[1][7])
    batch = cache.__getitems__([3, 1, 4])
    assert torch.equal(torch.stack([b[0] for b in batch]), live[[3, 1, 4]])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("store", ["memory", "disk"])
def test_half_storage_within_tolerance(tmp_path: Path, store: str, dtype: torch.dtype) -> None:
    agent, data = _frozen_agent(), _data()
    cache = gg.FeatureCache(agent.front_end, data, store=store, path=tmp_path, dtype=dtype)
    with torch.no_grad():
        live = agent.front_end(data.tensors[0])
    got = cache.features()
    assert got.dtype == torch.float32
    assert torch.allclose(got, live, rtol=1e-2, atol=1e-2)
    assert not torch.equal(got, live)


def test_training_on_cache_matches_training_live() -> None:
    data = _data(128)
    losses = []
    for cached in (False, True):
        agent = _frozen_agent()
        source = gg.FeatureCache(agent.front_end, data, progress=False) if cached else data
        opt = torch.optim.Adam(gg.trainable_parameters(agent), lr=1e-3)
        g = torch.Generator().manual_seed(1)
        run = []
        for _ in range(2):
            for x, y in DataLoader(source, batch_size=32, shuffle=True, generator=g):
                out = agent.back_end(x) if cached else agent(x)
                loss = F.cross_entropy(out, y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                run.append(loss.item())
        losses.append(run)
    assert losses[0] == losses[1]


def test_changed_weight_rebuilds_memory_cache() -> None:
    agent, data = _frozen_agent(), _data(20)
    cache = gg.FeatureCache(agent.front_end, data, progress=False)
    with torch.no_grad():
        agent.front_end.conv1.weight.mul_(2)
        live = agent.front_end(data.tensors[0])
    with pytest.warns(RuntimeWarning, match="rebuilding"):
        got = cache.features()
    assert torch.equal(got, live)


def test_disk_cache_reused_then_rebuilt_on_any_change(tmp_path: Path) -> None:
    agent, data = _frozen_agent(), _data(20)
    first = gg.FeatureCache(agent.front_end, data, store="disk", path=tmp_path, progress=False)
    assert first.rebuilt
    again = gg.FeatureCache(agent.front_end, data, store="disk", path=tmp_path, progress=False)
    assert not again.rebuilt
    other_data = _data(20, seed=5)
    changed = gg.FeatureCache(
        agent.front_end, other_data, store="disk", path=tmp_path, progress=False
    )
    assert changed.rebuilt
    with torch.no_grad():
        assert torch.equal(changed.features(), agent.front_end(other_data.tensors[0]))
        agent.front_end.conv2.weight.add_(1)
    fresh = gg.FeatureCache(
        agent.front_end, other_data, store="disk", path=tmp_path, progress=False
    )
    assert fresh.rebuilt
    with torch.no_grad():
        assert torch.equal(fresh.features(), agent.front_end(other_data.tensors[0]))


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_marker"])
def test_damaged_disk_cache_is_rebuilt(tmp_path: Path, damage: str) -> None:
    agent, data = _frozen_agent(), _data(20)
    gg.FeatureCache(agent.front_end, data, store="disk", path=tmp_path, progress=False)
    feat = tmp_path / "features.npy"
    raw = bytearray(feat.read_bytes())
    if damage == "truncate":
        feat.write_bytes(bytes(raw[: len(raw) // 2]))
    elif damage == "flip":
        raw[-5] ^= 0xFF
        feat.write_bytes(bytes(raw))
    else:
        (tmp_path / "meta.json").unlink()
    cache = gg.FeatureCache(agent.front_end, data, store="disk", path=tmp_path, progress=False)
    assert cache.rebuilt
    with torch.no_grad():
        assert torch.equal(cache.features(), agent.front_end(data.tensors[0]))


@pytest.mark.parametrize("store", ["memory", "disk"])
def test_dataloader_with_workers(tmp_path: Path, store: str) -> None:
    agent, data = _frozen_agent(), _data(64)
    cache = gg.FeatureCache(agent.front_end, data, store=store, path=tmp_path, progress=False)
    seen = []
    for x, y in DataLoader(cache, batch_size=16, shuffle=True, num_workers=2):
        assert x.shape == (len(y), 1568)
        seen.extend(y.tolist())
    assert sorted(seen) == sorted(data.tensors[1].tolist())


def test_refuses_trainable_or_nondeterministic_front_end() -> None:
    agent = Agent()
    with pytest.raises(gg.GradgateError, match=r"still trains conv1\.weight"):
        gg.FeatureCache(agent.front_end, _data(4))
    net = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    net.requires_grad_(False)
    with pytest.raises(gg.GradgateError, match="training mode"):
        gg.FeatureCache(net, [(torch.randn(4),)])
    with pytest.raises(gg.InvalidArgumentError, match="path"):
        gg.FeatureCache(nn.Identity(), [(torch.randn(4),)], store="disk")
    with pytest.raises(gg.InvalidArgumentError, match="store must be one of"):
        gg.FeatureCache(nn.Identity(), [(torch.randn(4),)], store="ram")


def test_input_fn_and_plain_lists() -> None:
    items = [{"img": torch.full((2,), float(i)), "label": i} for i in range(5)]
    cache = gg.FeatureCache(nn.Identity(), items, input_fn=lambda d: d["img"], progress=False)
    assert torch.equal(cache[3][0], torch.full((2,), 3.0))


_BUILD = """
import sys, torch, gradgate as gg
from torch.utils.data import TensorDataset
from gradgate.tools.seed import Agent
torch.manual_seed(0)
agent = Agent()
gg.freeze(agent, "front_end")
g = torch.Generator().manual_seed(0)
x = torch.randn(200, 3, 28, 28, generator=g)
data = TensorDataset(x, torch.randint(0, 10, (200,), generator=g))
gg.FeatureCache(agent.front_end, data, store="disk", path=sys.argv[1], progress=False)
"""


def test_two_processes_share_one_path(tmp_path: Path) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", _BUILD, str(tmp_path)]) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0
    agent = _frozen_agent()
    cache = gg.FeatureCache(
        agent.front_end, _data(200), store="disk", path=tmp_path, progress=False
    )
    assert not cache.rebuilt
    assert not list(tmp_path.glob("*.tmp*"))
