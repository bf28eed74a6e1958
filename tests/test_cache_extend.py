"""``FeatureCache.extend``: the cache boundary moves past newly frozen stages."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

import gradgate as gg

N = 37


class Items(Dataset[tuple[torch.Tensor, float, str, dict[str, Any]]]):
    """A plain dataset with float64, string and mapping fields; counts its reads."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(N, 6, generator=g)
        self.y = torch.randn(N, dtype=torch.float64, generator=g)
        self.reads = 0

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> tuple[torch.Tensor, float, str, dict[str, Any]]:
        self.reads += 1
        return self.x[i], float(self.y[i]), f"s{i}", {"id": i, "w": self.y[i] * 3}


def _stages() -> tuple[nn.Sequential, nn.Sequential]:
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(6, 5), nn.Tanh())
    b = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU())
    gg.freeze(a)
    gg.freeze(b)
    return a, b


def _weight(stage: nn.Sequential) -> torch.Tensor:
    layer = stage[0]
    assert isinstance(layer, nn.Linear)
    return layer.weight


def _items(cache: gg.FeatureCache) -> list[tuple[Any, ...]]:
    return [cache[i] for i in range(N)]


def _same_item(got: tuple[Any, ...], want: tuple[Any, ...]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        if isinstance(w, torch.Tensor):
            assert g.dtype == w.dtype and torch.equal(g, w)
        elif isinstance(w, dict):
            assert g.keys() == w.keys()
            for k in w:
                assert torch.equal(torch.as_tensor(g[k]), torch.as_tensor(w[k]))
        else:
            assert type(g) is type(w) and g == w


@pytest.mark.parametrize("store", ["memory", "disk"])
def test_moved_cache_equals_a_cache_built_at_the_new_boundary(
    tmp_path: Path, store: Literal["memory", "disk"]
) -> None:
    a, b = _stages()
    data = Items()
    parent = gg.FeatureCache(a, data, store=store, path=tmp_path / "p", batch_size=8)
    reads = data.reads
    moved = parent.extend(b, progress=False)
    assert data.reads == reads  # one pass of b over the cached features, no raw reads
    scratch = gg.FeatureCache(
        nn.Sequential(a, b), Items(), store=store, path=tmp_path / "s", batch_size=8
    )
    assert torch.equal(moved.features(), scratch.features())
    for got, want in zip(_items(moved), _items(scratch), strict=True):
        _same_item(got, want)
    assert moved[3][1].dtype == torch.float64
    assert moved[3][1].item() == data.y[3].item()
    assert moved.store == store


def test_moved_cache_is_read_like_any_cache_labels_included() -> None:
    a, b = _stages()
    moved = gg.FeatureCache(a, Items(), progress=False).extend(b)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    plain = list(torch.utils.data.DataLoader(moved, batch_size=5, shuffle=True, generator=g1))
    fast = list(moved.loader(batch_size=5, shuffle=True, generator=g2))
    assert len(plain) == len(fast) == 8
    for p, f in zip(plain, fast, strict=True):
        assert torch.equal(p[0], f[0]) and torch.equal(p[1], f[1]) and p[2] == f[2]
        assert p[1].dtype == torch.float64


def test_same_call_as_a_cache_over_a_cache() -> None:
    a, b = _stages()
    parent = gg.FeatureCache(a, Items(), progress=False)
    direct = gg.FeatureCache(b, parent, progress=False)
    assert torch.equal(direct.features(), parent.extend(b).features())
    assert direct[4][2] == "s4"


def test_two_moves_chain() -> None:
    a, b = _stages()
    torch.manual_seed(1)
    c = nn.Linear(4, 3)
    gg.freeze(c)
    twice = gg.FeatureCache(a, Items(), progress=False, batch_size=8).extend(b).extend(c)
    scratch = gg.FeatureCache(nn.Sequential(a, b, c), Items(), progress=False, batch_size=8)
    assert torch.equal(twice.features(), scratch.features())
    _same_item(twice[5], scratch[5])


def test_a_changed_new_stage_rebuilds_the_moved_cache() -> None:
    a, b = _stages()
    parent = gg.FeatureCache(a, Items(), progress=False)
    moved = parent.extend(b)
    with torch.no_grad():
        _weight(b).mul_(2)
        want = b(parent.features())
    with pytest.warns(RuntimeWarning, match="front-end changed"):
        got = moved.features()
    assert torch.equal(got, want)


def test_a_changed_parent_rebuilds_both_on_the_next_pass() -> None:
    a, b = _stages()
    data = Items()
    parent = gg.FeatureCache(a, data, progress=False)
    moved = parent.extend(b)
    with torch.no_grad():
        _weight(a).add_(1)  # the parent's front-end, not the moved cache's
        want = b(a(data.x))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        len(moved)  # a pass starts
        got = moved.features()
    assert [str(w.message) for w in caught] == [
        "the front-end changed since its features were cached; rebuilding the cache",
        "the cache this one extends was rebuilt; rebuilding the cache",
    ]
    assert torch.equal(got, want)


def test_key_chains_parent_and_stage() -> None:
    a, b = _stages()
    one = gg.FeatureCache(a, Items(0), progress=False).extend(b)
    other_data = gg.FeatureCache(a, Items(1), progress=False).extend(b)
    same = gg.FeatureCache(a, Items(0), progress=False).extend(b)
    assert one._key == same._key != other_data._key
    torch.manual_seed(5)
    c = nn.Linear(5, 4)
    gg.freeze(c)
    assert gg.FeatureCache(a, Items(0), progress=False).extend(c)._key != one._key


def test_disk_moved_cache_reopens_without_rebuilding(tmp_path: Path) -> None:
    a, b = _stages()
    parent = gg.FeatureCache(a, Items(), store="disk", path=tmp_path, progress=False)
    moved = parent.extend(b)
    assert moved.rebuilt and moved.store == "disk"
    # By default the moved cache lives inside the parent's own folder.
    assert [p.name for p in tmp_path.iterdir()] == ["gradgate-feature-cache"]
    data = Items()
    parent2 = gg.FeatureCache(a, data, store="disk", path=tmp_path, progress=False)
    moved2 = parent2.extend(b)
    assert not parent2.rebuilt and not moved2.rebuilt
    assert torch.equal(moved2.features(), moved.features())
    for i in range(N):
        _same_item(moved2[i], moved[i])


def test_memory_parent_can_move_to_disk(tmp_path: Path) -> None:
    a, b = _stages()
    parent = gg.FeatureCache(a, Items(), progress=False)
    moved = parent.extend(b, store="disk", path=tmp_path)
    again = parent.extend(b, store="disk", path=tmp_path)
    assert moved.rebuilt and not again.rebuilt
    assert torch.equal(again.features(), b(parent.features()))


def test_a_stage_that_still_trains_is_refused() -> None:
    a, _ = _stages()
    parent = gg.FeatureCache(a, Items(), progress=False)
    trains = nn.Linear(5, 2)
    with pytest.raises(gg.InvalidArgumentError, match=r"needs a frozen front-end.*weight"):
        parent.extend(trains)


def test_pickled_moved_cache_reads_in_workers() -> None:
    a, b = _stages()
    moved = gg.FeatureCache(a, Items(), progress=False).extend(b)
    batches = list(moved.loader(batch_size=10, num_workers=2))
    assert torch.equal(torch.cat([x for x, *_ in batches]), moved.features())
    assert torch.cat([y for _, y, *_ in batches]).dtype == torch.float64
