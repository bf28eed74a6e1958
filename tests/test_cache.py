from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, default_collate

import gradgate as gg
from gradgate.tools.agent import Agent


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
def test_features_equal_live_output(tmp_path: Path, store: Literal["memory", "disk"]) -> None:
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
def test_half_storage_within_tolerance(
    tmp_path: Path, store: Literal["memory", "disk"], dtype: torch.dtype
) -> None:
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
    feat = tmp_path / "gradgate-feature-cache" / "features.npy"
    raw = bytearray(feat.read_bytes())
    if damage == "truncate":
        feat.write_bytes(bytes(raw[: len(raw) // 2]))
    elif damage == "flip":
        raw[-5] ^= 0xFF
        feat.write_bytes(bytes(raw))
    else:
        (tmp_path / "gradgate-feature-cache" / "meta.json").unlink()
    cache = gg.FeatureCache(agent.front_end, data, store="disk", path=tmp_path, progress=False)
    assert cache.rebuilt
    with torch.no_grad():
        assert torch.equal(cache.features(), agent.front_end(data.tensors[0]))


@pytest.mark.parametrize("store", ["memory", "disk"])
def test_dataloader_with_workers(tmp_path: Path, store: Literal["memory", "disk"]) -> None:
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
        gg.FeatureCache(nn.Identity(), [(torch.randn(4),)], store="ram")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("dtype", torch.int8, "torch.int8"),
        ("dtype", torch.uint8, "torch.uint8"),
        ("dtype", torch.bool, "torch.bool"),
        ("dtype", torch.complex64, "torch.complex64"),
        ("dtype", "float16", "'float16'"),
        ("batch_size", 2.5, "batch_size must be a positive int; got 2.5"),
        ("batch_size", 0, "batch_size must be a positive int; got 0"),
        ("batch_size", True, "batch_size must be a positive int; got True"),
    ],
)
def test_storage_dtype_and_batch_size_are_checked(
    tmp_path: Path, option: str, value: Any, message: str
) -> None:
    # an int8 or bool store would truncate every feature without a word
    front = nn.Linear(2, 3)
    gg.freeze(front)
    data = TensorDataset(torch.randn(4, 2) * 3)
    with pytest.raises(gg.InvalidArgumentError) as info:
        gg.FeatureCache(front, data, store="disk", path=tmp_path, progress=False, **{option: value})
    assert message in str(info.value)
    if option == "dtype":
        assert "torch.float16, torch.bfloat16, torch.float32, torch.float64" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_input_fn_and_plain_lists() -> None:
    items = [{"img": torch.full((2,), float(i)), "label": i} for i in range(5)]
    cache = gg.FeatureCache(nn.Identity(), items, input_fn=lambda d: d["img"], progress=False)
    assert torch.equal(cache[3][0], torch.full((2,), 3.0))


@pytest.mark.parametrize("store", ["memory", "disk"])
def test_mapping_items_pass_through_whole_so_the_label_is_kept(
    tmp_path: Path, store: Literal["memory", "disk"]
) -> None:
    items = [{"img": torch.full((2,), float(i)), "label": i} for i in range(5)]
    path = tmp_path if store == "disk" else None
    cache = gg.FeatureCache(
        nn.Identity(), items, store=store, path=path, input_fn=lambda d: d["img"], progress=False
    )
    feats, item = cache[3]
    assert torch.equal(feats, torch.full((2,), 3.0))
    assert item["label"] == 3 and torch.equal(item["img"], feats)
    fast = list(cache.loader(batch_size=2))
    plain = list(DataLoader(cache, batch_size=2))
    assert [b[1]["label"].tolist() for b in fast] == [[0, 1], [2, 3], [4]]
    assert [b[1]["label"].tolist() for b in plain] == [[0, 1], [2, 3], [4]]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(fast, plain, strict=True))


def test_tuple_items_pass_their_tail_whatever_input_fn_reads() -> None:
    items = [(i, torch.full((2,), float(i))) for i in range(3)]  # (label, image)
    cache = gg.FeatureCache(nn.Identity(), items, input_fn=lambda it: it[1], progress=False)
    feats, passed = cache[2]
    assert torch.equal(feats, torch.full((2,), 2.0)) and torch.equal(passed, feats)


def test_item_without_an_obvious_input_asks_for_input_fn() -> None:
    with pytest.raises(gg.InvalidArgumentError, match=r"item of type str.*pass input_fn="):
        gg.FeatureCache(nn.Identity(), ["ab", "cd"], progress=False)


@pytest.mark.parametrize("store", ["memory", "disk"])
def test_collate_fn_gives_the_same_batches_as_default_collation(
    tmp_path: Path, store: Literal["memory", "disk"]
) -> None:
    agent, data = _frozen_agent(), _data(50)
    cache = gg.FeatureCache(agent.front_end, data, store=store, path=tmp_path, progress=False)
    plain = list(DataLoader(cache, batch_size=16, shuffle=True, generator=torch.Generator()))
    fast = list(cache.loader(batch_size=16, shuffle=True, generator=torch.Generator()))
    assert len(plain) == len(fast) == 4
    for (xa, ya), (xb, yb) in zip(plain, fast, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # rows that are not one whole batch in order still collate correctly
    rows = cache.__getitems__([5, 6, 7])
    x, y = cache.collate_fn([rows[2], rows[0]])
    assert (
        torch.equal(x, cache.features()[[7, 5]]) and y.tolist() == data.tensors[1][[7, 5]].tolist()
    )


def test_import_registers_nothing_in_torch() -> None:
    code = (
        "from torch.utils.data._utils.collate import default_collate_fn_map as m\n"
        "before = dict(m)\n"
        "import gradgate\n"
        "assert dict(m) == before, set(m) - set(before)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


class _Counted(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
    def __init__(self, x: torch.Tensor) -> None:
        self.x = x
        self.reads = 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        self.reads += 1
        return self.x[i], i


def test_verify_sample_reads_fewer_items_and_sees_only_sampled_changes(tmp_path: Path) -> None:
    agent, x = _frozen_agent(), _data(100).tensors[0].clone()
    data = _Counted(x)
    first = gg.FeatureCache(
        agent.front_end, data, store="disk", path=tmp_path, progress=False, verify="sample"
    )
    assert first.rebuilt and data.reads == 16 + 100
    data.reads = 0
    x[1] += 1  # not one of the 16 sampled items (0, 7, 13, ...): documented as unseen
    again = gg.FeatureCache(
        agent.front_end, data, store="disk", path=tmp_path, progress=False, verify="sample"
    )
    assert not again.rebuilt and data.reads == 16
    x[99] += 1  # the last item is always sampled
    seen = gg.FeatureCache(
        agent.front_end, data, store="disk", path=tmp_path, progress=False, verify="sample"
    )
    assert seen.rebuilt
    with torch.no_grad():
        assert torch.equal(seen.features(), agent.front_end(x))
    with pytest.raises(gg.InvalidArgumentError, match="verify must be one of 'all', 'sample'"):
        gg.FeatureCache(agent.front_end, data, verify="some")  # type: ignore[arg-type]


def test_full_verify_reads_twice_to_build_once_to_reopen(tmp_path: Path) -> None:
    agent, x = _frozen_agent(), _data(40).tensors[0]
    data = _Counted(x)
    gg.FeatureCache(agent.front_end, data, store="disk", path=tmp_path, progress=False)
    assert data.reads == 80
    data.reads = 0
    gg.FeatureCache(agent.front_end, data, store="disk", path=tmp_path, progress=False)
    assert data.reads == 40


def test_dataset_key_replaces_reading_the_samples(tmp_path: Path) -> None:
    agent, x = _frozen_agent(), _data(30).tensors[0]
    data = _Counted(x)
    gg.FeatureCache(
        agent.front_end, data, store="disk", path=tmp_path, progress=False, dataset_key="v1"
    )
    assert data.reads == 30
    again = gg.FeatureCache(
        agent.front_end, data, store="disk", path=tmp_path, progress=False, dataset_key="v1"
    )
    assert not again.rebuilt and data.reads == 30
    bumped = gg.FeatureCache(
        agent.front_end, data, store="disk", path=tmp_path, progress=False, dataset_key="v2"
    )
    assert bumped.rebuilt


@pytest.mark.parametrize("store", ["memory", "disk"])
def test_pickled_cache_reads_the_same(tmp_path: Path, store: Literal["memory", "disk"]) -> None:
    import pickle

    agent, data = _frozen_agent(), _data(20)
    cache = gg.FeatureCache(agent.front_end, data, store=store, path=tmp_path, progress=False)
    copy = pickle.loads(pickle.dumps(cache))
    assert torch.equal(copy[4][0], cache[4][0])
    assert copy.nbytes == cache.nbytes == 20 * 1568 * 4


class _Fields(torch.utils.data.Dataset[tuple[Any, ...]]):
    """Items whose non-feature fields have every dtype a label may have."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.y = torch.randn(12, dtype=torch.float64, generator=g) * 1e3 + 1 / 3

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        y = self.y[i]
        return (
            torch.full((2,), float(i)),
            float(y),  # a Python float: a double
            y,  # a float64 tensor
            np.float64(y),
            np.float32(y),
            torch.tensor(i, dtype=torch.int16),
            i * 10**12,
            bool(i % 2),
        )


@pytest.mark.parametrize("store", ["memory", "disk"])
def test_every_item_field_comes_back_at_its_own_dtype(
    tmp_path: Path, store: Literal["memory", "disk"]
) -> None:
    data = _Fields()
    cache = gg.FeatureCache(nn.Identity(), data, store=store, path=tmp_path, progress=False)
    for i in range(len(data)):
        _, py, t64, np64, np32, i16, big, flag = cache[i]
        want = data[i]
        assert float(py) == want[1] and py.dtype == torch.float64
        assert t64.dtype == torch.float64 and torch.equal(t64, want[2])
        assert float(np64) == float(want[3]) and np64.dtype == torch.float64
        assert float(np32) == float(want[4]) and np32.dtype == torch.float32
        assert i16.dtype == torch.int16 and int(i16) == i
        assert int(big) == want[6] and bool(flag) == want[7]
    # Batches agree with torch's own collation of the raw items, dtypes included.
    for got, want in zip(cache.loader(batch_size=5), DataLoader(data, batch_size=5), strict=True):
        for g, w in zip(got[1:], want[1:], strict=True):
            assert g.dtype == w.dtype and torch.equal(g, w)


def test_float64_regression_targets_train_the_same_from_the_cache() -> None:
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    y = [float(v) + 1e-9 for v in torch.randn(16, dtype=torch.float64).tolist()]
    cache = gg.FeatureCache(nn.Identity(), list(zip(x, y, strict=True)), progress=False)
    assert [float(cache[i][1]) for i in range(16)] == y


@pytest.mark.parametrize("store", ["memory", "disk"])
def test_float16_storage_that_would_overflow_is_refused_with_the_count(
    tmp_path: Path, store: Literal["memory", "disk"]
) -> None:
    x = torch.ones(10, 4)
    x[3, 1] = 7e4  # above float16's 65504
    x[8, :2] = -1e5
    x[9, 0] = float("inf")  # inf already: not an overflow of the storage
    data = TensorDataset(x, torch.arange(10))
    with pytest.raises(
        gg.InvalidArgumentError,
        match=r"as torch.float16: 3 of the 40 values of items 0..9 overflow it to inf "
        r"\(largest magnitude 1e\+05, torch.float16 holds at most 6.55e\+04\)",
    ):
        gg.FeatureCache(nn.Identity(), data, store=store, path=tmp_path, dtype=torch.float16)
    assert not list(tmp_path.rglob("*.npy*"))
    fits = gg.FeatureCache(
        nn.Identity(), data, store=store, path=tmp_path, dtype=torch.bfloat16, progress=False
    )
    assert torch.isfinite(fits.features()[:9]).all()


class _Mixed(torch.utils.data.Dataset[tuple[Any, ...]]):
    """Items with a tensor label, a float, a string and a mapping."""

    def __len__(self) -> int:
        return 50

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        return torch.full((3,), float(i)), i % 7, i / 3, f"s{i}", {"id": i, "w": [i, -i]}


def _same_batches(a: list[Any], b: list[Any]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert type(x) is type(y)
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y)
        elif isinstance(x, (list, tuple)):
            _same_batches(list(x), list(y))
        elif isinstance(x, dict):
            assert x.keys() == y.keys()
            _same_batches(list(x.values()), list(y.values()))
        else:
            assert x == y


@pytest.mark.parametrize("store", ["memory", "disk"])
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("data", ["tensor_dataset", "mixed"])
def test_a_plain_dataloader_returns_exactly_the_batches_of_cache_loader(
    tmp_path: Path, store: Literal["memory", "disk"], num_workers: int, data: str
) -> None:
    source: Any = _data(50) if data == "tensor_dataset" else _Mixed()
    front: nn.Module = _frozen_agent().front_end if data == "tensor_dataset" else nn.Identity()
    cache = gg.FeatureCache(front, source, store=store, path=tmp_path, progress=False)
    kw: dict[str, Any] = {"batch_size": 8, "shuffle": True, "num_workers": num_workers}
    for drop_last in (False, True):
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        plain = list(DataLoader(cache, generator=g1, drop_last=drop_last, **kw))
        fast = list(cache.loader(generator=g2, drop_last=drop_last, **kw))
        assert len(plain) == (6 if drop_last else 7)
        _same_batches(plain, fast)
    # and both are what torch's own collation of the rows gives
    rows = [cache[i] for i in range(8)]
    _same_batches(next(iter(cache.loader(batch_size=8))), default_collate(rows))


@pytest.mark.parametrize("store", ["memory", "disk"])
@pytest.mark.parametrize("table", [True, False])
def test_plain_dataloader_rows_are_the_same_from_the_table_of_row_views_or_without(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, table: bool, store: Literal["memory", "disk"]
) -> None:
    from gradgate.cache import feature_cache

    if not table:  # too many rows for a table: rows are views of the batch read per column
        monkeypatch.setattr(feature_cache, "_TABLE_VIEWS", 0)
    cache = gg.FeatureCache(nn.Identity(), _Mixed(), store=store, path=tmp_path, progress=False)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    plain = list(DataLoader(cache, batch_size=8, shuffle=True, generator=g1))
    assert (cache._reader._table is not None) is table
    _same_batches(plain, list(cache.loader(batch_size=8, shuffle=True, generator=g2)))
    rows = cache.__getitems__([9, 2])
    _same_batches(default_collate(list(rows)), default_collate([cache[9], cache[2]]))
    if store == "memory":  # from the table, rows are views of the stored rows themselves
        assert (rows[0][0].data_ptr() == cache.features()[9].data_ptr()) is table
    else:  # a write to a row read from a disk table stays in this process, off the file
        rows[0][0].fill_(-1.0)
        again = gg.FeatureCache(nn.Identity(), _Mixed(), store=store, path=tmp_path)
        assert not again.rebuilt and torch.equal(again[9][0], torch.full((3,), 9.0))


@pytest.mark.parametrize("store", ["memory", "disk"])
def test_a_worker_gathers_the_batch_straight_into_shared_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store: Literal["memory", "disk"]
) -> None:
    from gradgate.cache import feature_cache

    cache = gg.FeatureCache(nn.Identity(), _Mixed(), store=store, path=tmp_path, progress=False)
    here = cache.collate_fn(cache.__getitems__([4, 1, 30]))
    assert not any(isinstance(c, torch.Tensor) and c.is_shared() for c in here)
    monkeypatch.setattr(feature_cache, "get_worker_info", lambda: "a worker")
    there = cache.collate_fn(cache.__getitems__([4, 1, 30]))
    _same_batches(there, here)
    tensors = [c for c in there if isinstance(c, torch.Tensor)]
    assert len(tensors) == 3 and all(c.is_shared() for c in tensors)  # features, int, float
