"""FeatureCache under faults: every key component, damaged files, killed and concurrent
builders, read-only folders, stale workers, random datasets, broken front-ends.

Each test asserts the promise (fresh features, a named error, no temp file), not how
the cache keeps it.
"""

from __future__ import annotations

import contextlib
import json
import operator
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import gradgate as gg
from gradgate.errors import NondeterministicDatasetError, StaleCacheError

SRC = str(Path(__file__).resolve().parents[2] / "src")
OWN = "gradgate-feature-cache"  # the disk store's own folder inside path=
N = 24


class Items(Dataset[tuple[torch.Tensor, int]]):
    """A plain (not Tensor) dataset: the cache must read and hash every item."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], i % 3


def _data(module: nn.Module, name: str) -> torch.Tensor:
    """The ``.data`` of a tensor: writes through it leave version counters unchanged."""
    t = getattr(module, name)
    assert isinstance(t, torch.Tensor)
    return t.data


def _front() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=1, padding=1),
        nn.BatchNorm2d(4),
        nn.LeakyReLU(0.1),
        nn.Conv2d(4, 4, 1),
        nn.ReLU(),
        nn.Flatten(),
    )
    with torch.no_grad():
        _data(net[1], "running_mean").normal_()
    gg.freeze(net)
    return net


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn(N, 3, 6, 6, generator=torch.Generator().manual_seed(seed))


def _live(front: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = front(x)
    assert isinstance(out, torch.Tensor)
    return out


def _open(front: nn.Module, data: Any, path: Path, **kw: Any) -> gg.FeatureCache:
    kw.setdefault("batch_size", 8)
    return gg.FeatureCache(front, data, store="disk", path=path, progress=False, **kw)


def _tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` by relative name, with its bytes."""
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def _no_temp(path: Path) -> bool:
    return not [p for p in path.rglob("*") if p.name.endswith(".tmp")]


# -- every key component, changed one at a time ----------------------------


_IN_PLACE: dict[str, Callable[[nn.Sequential], object]] = {
    "weight via .data": lambda f: _data(f[0], "weight").mul_(-1),
    "buffer via .data": lambda f: _data(f[1], "running_var").add_(3),
    "relu -> tanh": lambda f: f.__setitem__(4, nn.Tanh()),
    "leaky slope": lambda f: setattr(f[2], "negative_slope", 0.5),
    "conv stride": lambda f: setattr(f[0], "stride", (2, 2)),
}


@pytest.mark.parametrize("change", list(_IN_PLACE))
def test_front_end_change_rebuilds_disk_cache(tmp_path: Path, change: str) -> None:
    front, x = _front(), _x()
    first = _open(front, Items(x), tmp_path)
    before = first.features()
    _IN_PLACE[change](front)
    live = _live(front, x)
    assert not torch.equal(before, live) or before.shape != live.shape
    again = _open(front, Items(x), tmp_path)
    assert again.rebuilt
    assert torch.equal(again.features(), live)


@pytest.mark.parametrize("change", list(_IN_PLACE))
def test_front_end_change_seen_by_open_memory_cache(change: str) -> None:
    front, x = _front(), _x()
    cache = gg.FeatureCache(front, Items(x), progress=False, batch_size=8)
    _IN_PLACE[change](front)
    live = _live(front, x)
    with pytest.warns(RuntimeWarning, match="rebuilding"):
        got = torch.cat([b[0] for b in DataLoader(cache, batch_size=8)])
    assert torch.equal(got, live)


def test_input_fn_code_and_closure_values_are_keyed(tmp_path: Path) -> None:
    front, x = _front(), _x()
    data = [(x[i], -x[i], i) for i in range(N)]
    a = _open(front, data, tmp_path, input_fn=operator.itemgetter(0))
    b = _open(front, data, tmp_path, input_fn=operator.itemgetter(1))
    assert a.rebuilt and b.rebuilt
    assert torch.equal(b.features(), _live(front, -x))
    scale = 1.0

    def scaled(item: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return item[0] * scale

    c = _open(front, data, tmp_path, input_fn=scaled)
    assert torch.equal(c.features(), _live(front, x))
    scale = 3.0
    d = _open(front, data, tmp_path, input_fn=scaled)
    assert d.rebuilt
    assert torch.equal(d.features(), _live(front, x * 3))


def test_storage_dtype_is_keyed(tmp_path: Path) -> None:
    front, x = _front(), _x()
    _open(front, Items(x), tmp_path)
    half = _open(front, Items(x), tmp_path, dtype=torch.float16)
    assert half.rebuilt
    assert torch.equal(half.features(), _live(front, x).half().float())
    full = _open(front, Items(x), tmp_path)
    assert full.rebuilt
    assert torch.equal(full.features(), _live(front, x))


class Helped(nn.Module):
    """A forward that reaches a helper method and a class attribute through ``self``."""

    scale = 2.0

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._act(self.lin(x)) * self.scale


def _tanh(self: Helped, x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x)


_CLASS_CHANGES: dict[str, tuple[str, object]] = {
    "class attribute": ("scale", 3.0),
    "helper method": ("_act", _tanh),
}


@pytest.mark.parametrize("store", ["memory", "disk"])
@pytest.mark.parametrize("change", list(_CLASS_CHANGES))
def test_class_code_and_attributes_reached_through_self_are_keyed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store: Literal["memory", "disk"], change: str
) -> None:
    torch.manual_seed(0)
    front, x = Helped(), torch.randn(N, 3)
    gg.freeze(front)
    path = tmp_path if store == "disk" else None
    cache = gg.FeatureCache(front, Items(x), store=store, path=path, progress=False)
    before = cache.features()
    monkeypatch.setattr(Helped, *_CLASS_CHANGES[change])
    live = _live(front, x)
    assert not torch.equal(before, live)
    if store == "disk":
        again = gg.FeatureCache(front, Items(x), store=store, path=path, progress=False)
        assert again.rebuilt
    else:
        again = cache
        with pytest.warns(RuntimeWarning, match="rebuilding"):
            len(again)
    assert torch.equal(again.features(), live)


_HELPER = """
def scale(t):
    return t * {factor}
"""

_USER_FRONT = """
import torch
import helpers_{tag}
from helpers_{tag} import scale


class Front(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)

    def forward(self, x):
        return {call}(self.lin(x))
"""


@pytest.mark.parametrize("call", ["scale", "helpers.scale"])
def test_a_helper_in_the_users_sibling_module_is_keyed_by_its_body(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    tag = "plain" if call == "scale" else "dotted"
    code = tmp_path / "code"
    code.mkdir()
    monkeypatch.syspath_prepend(str(code))
    front_src = _USER_FRONT.format(tag=tag, call=call.replace("helpers", f"helpers_{tag}"))
    (code / f"front_{tag}.py").write_text(front_src)
    x = torch.randn(N, 3, generator=torch.Generator().manual_seed(0))

    def opened(factor: int) -> tuple[gg.FeatureCache, nn.Module]:
        # A new run of the user's script: their modules imported afresh.
        (code / f"helpers_{tag}.py").write_text(_HELPER.format(factor=factor))
        for name in (f"helpers_{tag}", f"front_{tag}"):
            monkeypatch.delitem(sys.modules, name, raising=False)
        import importlib

        importlib.invalidate_caches()
        torch.manual_seed(0)
        front = importlib.import_module(f"front_{tag}").Front()
        gg.freeze(front)
        return _open(front, Items(x), tmp_path / "cache", batch_size=N), front

    first, front = opened(2)
    assert first.rebuilt and torch.equal(first.features(), _live(front, x))
    same, _ = opened(2)
    assert not same.rebuilt
    edited, front = opened(3)  # the helper's body changed, nothing else
    assert edited.rebuilt
    assert torch.equal(edited.features(), _live(front, x))


def test_a_global_forward_hook_is_keyed() -> None:
    front, x = _front(), _x()
    cache = gg.FeatureCache(front, Items(x), progress=False)

    def doubles(module: nn.Module, args: Any, out: Any) -> Any:
        return out * 2 if module is front else None

    handle = torch.nn.modules.module.register_module_forward_hook(doubles)
    try:
        live = _live(front, x)
        with pytest.warns(RuntimeWarning, match="front-end changed"):
            len(cache)
        assert torch.equal(cache.features(), live)
    finally:
        handle.remove()
    with pytest.warns(RuntimeWarning, match="front-end changed"):
        assert torch.equal(cache.features(), _live(front, x))


class BoundToItself(nn.Module):
    """A front-end whose setting is a bound method of itself (a chosen activation)."""

    def __init__(self, slope: float) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.slope = slope
        self.act = self.leaky

    def leaky(self, t: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(t, self.slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.act(self.lin(x))
        return out


def test_a_bound_method_of_itself_is_keyed_without_recursion() -> None:
    torch.manual_seed(0)
    front, x = BoundToItself(0.1), torch.randn(N, 3)
    gg.freeze(front)
    cache = gg.FeatureCache(front, Items(x), progress=False)
    assert torch.equal(cache.features(), _live(front, x))
    front.slope = 0.3  # read through the bound method's self
    with pytest.warns(RuntimeWarning, match="front-end changed"):
        assert torch.equal(cache.features(), _live(front, x))


def test_an_accelerate_hook_is_keyed_without_recursion() -> None:
    pytest.importorskip("accelerate")
    from accelerate import hooks  # type: ignore[import-untyped]

    class Shift(hooks.ModelHook):  # type: ignore[misc]
        def __init__(self, by: float) -> None:
            super().__init__()
            self.by = by

        def post_forward(self, module: nn.Module, output: Any) -> Any:
            return output + self.by

    front, x = _front(), _x()
    hooks.add_hook_to_module(front, Shift(1.0))
    cache = gg.FeatureCache(front, Items(x), progress=False)
    assert torch.equal(cache.features(), _live(front, x))
    hooks.remove_hook_from_module(front)
    hooks.add_hook_to_module(front, Shift(2.0))
    with pytest.warns(RuntimeWarning, match="front-end changed"):
        assert torch.equal(cache.features(), _live(front, x))


@pytest.mark.parametrize("kind", ["items", "tensor_dataset"])
def test_one_changed_sample_rebuilds(tmp_path: Path, kind: str) -> None:
    front, x = _front(), _x()
    labels = torch.arange(N)
    data: Any = Items(x) if kind == "items" else TensorDataset(x, labels)
    _open(front, data, tmp_path)
    x[N - 2, 1, 3, 3] += 1.0  # one value of one sample, in place
    again = _open(front, data, tmp_path)
    assert again.rebuilt
    assert torch.equal(again.features(), _live(front, x))


def test_unkeyable_input_fn_is_refused() -> None:
    import threading

    lock = threading.Lock()

    def reads_a_lock(item: tuple[torch.Tensor, int]) -> torch.Tensor:
        with lock:
            return item[0]

    with pytest.raises(gg.InvalidArgumentError, match=r"cannot key input_fn=.*_thread\.lock"):
        gg.FeatureCache(_front(), Items(_x()), input_fn=reads_a_lock, progress=False)


# -- damaged files -----------------------------------------------------------


@pytest.mark.parametrize(
    "damage", ["features byte", "features truncated", "rest byte", "meta garbage", "meta key"]
)
def test_damaged_disk_cache_is_rebuilt_never_read(tmp_path: Path, damage: str) -> None:
    front, x = _front(), _x()
    _open(front, Items(x), tmp_path)
    name = {"features": "features.npy", "rest": "rest.pt", "meta": "meta.json"}[damage.split()[0]]
    target = tmp_path / OWN / name
    raw = bytearray(target.read_bytes())
    if damage.endswith("byte"):
        raw[len(raw) - 7] ^= 0x01
        target.write_bytes(bytes(raw))
    elif damage.endswith("truncated"):
        target.write_bytes(bytes(raw[:-100]))
    elif damage == "meta garbage":
        target.write_bytes(bytes(raw[: len(raw) // 2]))
    else:
        meta = json.loads(raw)
        meta["key"] = "0" * 64
        target.write_text(json.dumps(meta))
    again = _open(front, Items(x), tmp_path)
    assert again.rebuilt
    assert torch.equal(again.features(), _live(front, x))
    assert [int(again[i][1]) for i in range(N)] == [i % 3 for i in range(N)]


# -- killed and concurrent builders -----------------------------------------

_CHILD = """
import sys, time, torch, gradgate as gg

class Slow(torch.utils.data.Dataset):
    def __init__(self, n):
        self.x = torch.randn(n, 12, generator=torch.Generator().manual_seed(0))
    def __len__(self): return len(self.x)
    def __getitem__(self, i):
        time.sleep(0.004)
        return self.x[i], i

torch.manual_seed(0)
front = torch.nn.Linear(12, 5)
gg.freeze(front)
data = Slow(int(sys.argv[2]))
print("ready", flush=True)
cache = gg.FeatureCache(front, data, store="disk", path=sys.argv[1], batch_size=4, progress=False)
with torch.no_grad():
    ok = torch.equal(cache.features(), front(data.x))
print("built" if ok else "WRONG", flush=True)
"""


def _child_twin(n: int) -> tuple[nn.Module, torch.Tensor, list[tuple[torch.Tensor, int]]]:
    """The child's front-end and items, built here: the same cache key."""
    torch.manual_seed(0)
    lin = nn.Linear(12, 5)
    gg.freeze(lin)
    x = torch.randn(n, 12, generator=torch.Generator().manual_seed(0))
    return lin, x, [(x[i], i) for i in range(n)]


def _spawn_child(path: Path, n: int) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path), str(n)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_sigkill_at_random_points_leaves_a_readable_folder(tmp_path: Path) -> None:
    n = 200  # two reads of 4 ms per item: kills land while keying, building, committing
    lin, x, items = _child_twin(n)
    rng = random.Random(0)
    kills = 0
    for delay in [rng.uniform(0.0, 2.0) for _ in range(4)]:
        child = _spawn_child(tmp_path, n)
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        try:
            child.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGKILL)
            kills += 1
        child.wait(timeout=60)
        child.stdout.close()
        cache = _open(lin, items, tmp_path, batch_size=4)
        assert torch.equal(cache.features(), _live(lin, x))
        assert _no_temp(tmp_path)
        shutil.rmtree(tmp_path)
        tmp_path.mkdir()
    assert kills >= 1


def test_killed_mid_write_leaves_temp_that_next_open_removes(tmp_path: Path) -> None:
    child = _spawn_child(tmp_path, 400)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    for _ in range(1200):
        if list((tmp_path / OWN).glob("features.*.tmp")) or child.poll() is not None:
            break
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=0.05)
    assert list((tmp_path / OWN).glob("features.*.tmp")), "the child never started writing"
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    child.stdout.close()
    lin, x, items = _child_twin(400)
    cache = _open(lin, items, tmp_path, batch_size=4)
    assert cache.rebuilt
    assert _no_temp(tmp_path)
    assert torch.equal(cache.features(), _live(lin, x))


def test_two_concurrent_builders_each_read_correct_features(tmp_path: Path) -> None:
    children = [_spawn_child(tmp_path, 120) for _ in range(2)]
    for child in children:
        out, _ = child.communicate(timeout=300)
        assert child.returncode == 0
        assert out.split() == ["ready", "built"]
    assert _no_temp(tmp_path)
    lin, x, items = _child_twin(120)
    cache = _open(lin, items, tmp_path, batch_size=4)
    assert not cache.rebuilt
    assert torch.equal(cache.features(), _live(lin, x))


# -- the user's own files in path= ------------------------------------------

# Names a disk store uses or used, and temporary names like its own.
_USER_FILES = {
    "notes.tmp": b"my notes",
    "meta.json": b'{"mine": true}',
    "features.npy": b"not numpy",
    "rest.pt": b"mine too",
    ".lock": b"my lock",
    "features.123.npy.tmp": b"my temp",
    "sub/deep.tmp": b"nested",
    f".{OWN}.abc.tmp": b"a file, not a folder",
}


def _user_files(path: Path) -> dict[str, bytes]:
    for name, raw in _USER_FILES.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(raw)
    return {k: v for k, v in _tree(path).items() if not k.startswith(OWN + os.sep)}


def _users(path: Path) -> dict[str, bytes]:
    return {k: v for k, v in _tree(path).items() if not k.startswith(OWN + os.sep)}


def test_users_files_survive_build_rebuild_and_recovery(tmp_path: Path) -> None:
    mine = _user_files(tmp_path)
    front, x = _front(), _x()
    assert _open(front, Items(x), tmp_path).rebuilt
    assert _users(tmp_path) == mine
    assert not _open(front, Items(x), tmp_path).rebuilt
    other = _front()
    weight = other[0].weight
    assert isinstance(weight, torch.Tensor)
    with torch.no_grad():
        weight.add_(1)
    rebuilt = _open(other, Items(x), tmp_path)  # a different key: rebuilt in place
    assert rebuilt.rebuilt and torch.equal(rebuilt.features(), _live(other, x))
    assert _users(tmp_path) == mine
    with pytest.warns(RuntimeWarning, match="rebuilding"):
        with torch.no_grad():
            weight.add_(1)
        assert torch.equal(rebuilt.features(), _live(other, x))  # rebuilt on the fly
    assert _users(tmp_path) == mine
    target = tmp_path / OWN / "features.npy"
    raw = bytearray(target.read_bytes())
    raw[-3] ^= 0xFF
    target.write_bytes(bytes(raw))
    recovered = _open(other, Items(x), tmp_path)
    assert recovered.rebuilt and torch.equal(recovered.features(), _live(other, x))
    assert _users(tmp_path) == mine
    assert sorted(p.name for p in (tmp_path / OWN).iterdir()) == [
        f".{OWN}",
        ".lock",
        "features.npy",
        "meta.json",
        "rest.pt",
    ]


def test_users_files_survive_a_killed_build(tmp_path: Path) -> None:
    mine = _user_files(tmp_path)
    child = _spawn_child(tmp_path, 400)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    for _ in range(1200):
        if list((tmp_path / OWN).glob("features.*.tmp")) or child.poll() is not None:
            break
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=0.05)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    child.stdout.close()
    lin, x, items = _child_twin(400)
    cache = _open(lin, items, tmp_path, batch_size=4)
    assert torch.equal(cache.features(), _live(lin, x))
    assert not list((tmp_path / OWN).glob("*.tmp"))
    assert _users(tmp_path) == mine


def test_users_files_survive_two_concurrent_builders(tmp_path: Path) -> None:
    mine = _user_files(tmp_path)
    children = [_spawn_child(tmp_path, 120) for _ in range(2)]
    for child in children:
        out, _ = child.communicate(timeout=300)
        assert child.returncode == 0
        assert out.split() == ["ready", "built"]
    assert _users(tmp_path) == mine
    lin, _, items = _child_twin(120)
    assert not _open(lin, items, tmp_path, batch_size=4).rebuilt


_KILLED_CREATOR = """
import os, signal, sys, torch, gradgate as gg
real = os.rename
def rename(src, dst, *a, **k):
    if os.path.basename(str(dst)) == "gradgate-feature-cache":
        os.kill(os.getpid(), signal.SIGKILL)  # killed between mkdtemp and the rename
    return real(src, dst, *a, **k)
os.rename = rename
front = torch.nn.Linear(3, 2)
gg.freeze(front)
gg.FeatureCache(front, torch.utils.data.TensorDataset(torch.randn(4, 3)), store="disk",
                path=sys.argv[1], progress=False)
"""


def test_a_process_killed_while_creating_the_folder_leaves_nothing_after_the_next_open(
    tmp_path: Path,
) -> None:
    mine = _user_files(tmp_path)
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_CREATOR, str(tmp_path)],
        env={**os.environ, "PYTHONPATH": SRC},
        timeout=120,
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL
    left = [p.name for p in tmp_path.glob(f".{OWN}.*.tmp") if p.is_dir()]
    assert len(left) == 1  # the fault happened: its temporary folder, marker inside
    assert (tmp_path / left[0] / f".{OWN}").is_file()
    assert not (tmp_path / OWN).exists()
    # what a kill a moment earlier leaves: an empty folder, a partly written marker
    (tmp_path / f".{OWN}.empty.tmp").mkdir()
    (tmp_path / f".{OWN}.torn.tmp").mkdir()
    (tmp_path / f".{OWN}.torn.tmp" / f".{OWN}").write_text("gradgate Feat")
    # folders of that name holding anything else are the user's
    theirs = {
        f".{OWN}.more.tmp/.{OWN}": (tmp_path / left[0] / f".{OWN}").read_bytes(),
        f".{OWN}.more.tmp/notes.txt": b"mine",
        f".{OWN}.other.tmp/.{OWN}": b"not gradgate's marker",
        f".{OWN}.long.tmp/.{OWN}": (tmp_path / left[0] / f".{OWN}").read_bytes() + b"x" * 10**6,
        f".{OWN}.named.tmp/data.bin": b"mine too",
    }
    for name, raw in theirs.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(raw)
    front, x = _front(), _x()
    assert torch.equal(_open(front, Items(x), tmp_path).features(), _live(front, x))
    assert not [
        p
        for p in tmp_path.glob(f".{OWN}.*.tmp")
        if p.is_dir() and p.name in (left[0], f".{OWN}.empty.tmp", f".{OWN}.torn.tmp")
    ]
    assert _users(tmp_path) == {**mine, **{k.replace("/", os.sep): v for k, v in theirs.items()}}


def test_a_folder_of_the_stores_name_that_gradgate_did_not_make_is_refused(
    tmp_path: Path,
) -> None:
    (tmp_path / OWN).mkdir()
    (tmp_path / OWN / "meta.json").write_text("theirs")
    (tmp_path / OWN / "x.tmp").write_text("theirs")
    before = _tree(tmp_path)
    with pytest.raises(gg.CacheError, match=rf"holds {OWN}/, which gradgate did not create"):
        _open(_front(), Items(_x()), tmp_path)
    assert _tree(tmp_path) == before


# -- read-only folder ------------------------------------------------------

_READ_ONLY = """
import sys, torch, gradgate as gg
from gradgate.errors import CacheError
torch.manual_seed(0)
front = torch.nn.Linear(3, 2); gg.freeze(front)
data = torch.utils.data.TensorDataset(torch.ones(4, 3) * float(sys.argv[2]))
try:
    c = gg.FeatureCache(front, data, store="disk", path=sys.argv[1], progress=False)
    print("served", c.rebuilt)
except CacheError as e:
    print("CacheError", isinstance(e, OSError), e)
"""


def _as_unprivileged(args: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return args
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: root ignores folder permissions")
    return [
        setpriv,
        "--inh-caps=-all",
        "--bounding-set=-dac_override,-dac_read_search",
        "--",
        *args,
    ]


def test_read_only_folder_reads_a_valid_cache_and_refuses_to_build(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    env = {**os.environ, "PYTHONPATH": SRC}
    run = [sys.executable, "-c", _READ_ONLY, str(folder)]
    built = subprocess.run([*run, "1"], capture_output=True, text=True, env=env, check=True)
    assert built.stdout.split() == ["served", "True"]
    before = {p.name: p.read_bytes() for p in (folder / OWN).iterdir()}
    folder.chmod(0o555)
    (folder / OWN).chmod(0o555)
    try:
        same = subprocess.run(
            _as_unprivileged([*run, "1"]), capture_output=True, text=True, env=env
        )
        other = subprocess.run(
            _as_unprivileged([*run, "2"]), capture_output=True, text=True, env=env
        )
    finally:
        (folder / OWN).chmod(0o755)
        folder.chmod(0o755)
    assert same.stdout.split() == ["served", "False"], same.stderr
    assert other.stdout.startswith("CacheError True cannot build a disk FeatureCache in"), (
        other.stderr
    )
    assert "not writable" in other.stdout
    assert {p.name: p.read_bytes() for p in (folder / OWN).iterdir()} == before
    assert [p.name for p in folder.iterdir()] == [OWN]


# -- stale copies in DataLoader workers -------------------------------------


@pytest.mark.parametrize("store", ["memory", "disk"])
def test_spawned_worker_refuses_a_cache_whose_front_end_changed(
    tmp_path: Path, store: Literal["memory", "disk"]
) -> None:
    front, x = _front(), _x()
    cache = gg.FeatureCache(front, TensorDataset(x), store=store, path=tmp_path, progress=False)
    _data(front[0], "weight").mul_(-1)
    loader = DataLoader(cache, batch_size=8, num_workers=1, multiprocessing_context="spawn")
    with (
        pytest.raises(StaleCacheError, match="worker cannot rebuild"),
        pytest.warns(RuntimeWarning),
    ):
        list(loader)
    # the main process rebuilt when the sampler asked for len(): the next pass is fresh
    got = torch.cat([b[0] for b in DataLoader(cache, batch_size=8)])
    assert torch.equal(got, _live(front, x))


def test_unpickled_cache_never_serves_another_caches_features(tmp_path: Path) -> None:
    front, x = _front(), _x()
    mine = _open(front, TensorDataset(x), tmp_path)
    copy = pickle.loads(pickle.dumps(mine))  # what a spawned worker receives
    _open(front, TensorDataset(x * 2), tmp_path)  # another cache takes the folder
    assert torch.equal(mine.features(), _live(front, x))  # the open mapping still holds mine
    with pytest.warns(RuntimeWarning, match="rebuilding"):
        got = copy.features()
    assert torch.equal(got, _live(front, x))


# -- datasets and front-ends that break the contract -------------------------


class Augmented(Items):
    def __init__(self, x: torch.Tensor, where: int) -> None:
        super().__init__(x)
        self.where = where

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, y = super().__getitem__(i)
        if self.where == 0:
            return x + 0.01 * torch.randn_like(x), y
        return x, y + int(torch.randint(0, 1000, ()))


@pytest.mark.parametrize("store", ["memory", "disk"])
@pytest.mark.parametrize(("where", "what"), [(0, "the front-end input"), (1, "element 1")])
def test_random_augmentation_is_reported(
    tmp_path: Path, store: Literal["memory", "disk"], where: int, what: str
) -> None:
    with pytest.raises(NondeterministicDatasetError, match=rf"item 0 changed.*\({what}"):
        gg.FeatureCache(
            _front(), Augmented(_x(), where), store=store, path=tmp_path, progress=False
        )
    assert _no_temp(tmp_path)
    assert not (tmp_path / OWN / "meta.json").exists()


class Rows(nn.Module):
    def __init__(self, delta: int) -> None:
        super().__init__()
        self.delta = delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.flatten(1)
        return out[: len(out) + self.delta] if self.delta < 0 else torch.cat([out, out[:1]])


@pytest.mark.parametrize("delta", [-1, 1])
def test_wrong_row_count_is_refused_and_old_cache_kept(tmp_path: Path, delta: int) -> None:
    front, x = _front(), _x()
    _open(front, Items(x), tmp_path)
    files = _tree(tmp_path)
    got = "7" if delta < 0 else "9"
    with pytest.raises(gg.InvalidArgumentError, match=rf"returned {got} rows for the 8 inputs"):
        _open(Rows(delta), Items(x), tmp_path)
    assert _tree(tmp_path) == files
    assert not _open(front, Items(x), tmp_path).rebuilt


class Counts(nn.Module):
    """A front-end that writes to itself in forward: its key would never settle."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += len(x)
        return x.flatten(1)


def test_front_end_that_changes_itself_is_refused() -> None:
    with pytest.raises(gg.InvalidArgumentError, match="changed itself while computing"):
        gg.FeatureCache(Counts(), Items(_x()), progress=False)


# -- workers under spawn and forkserver ----------------------------------------

_WORKERS = """
import json, multiprocessing, os, sys, torch, gradgate as gg

class Logged(torch.utils.data.Dataset):
    def __init__(self, log): self.log = log
    def __len__(self): return 64
    def __getitem__(self, i):
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()} {i}\\n")
        return torch.full((3,), float(i)), i

if __name__ == "__main__":
    out = {}
    for method in ("spawn", "forkserver"):
        multiprocessing.set_start_method(method, force=True)
        log = os.path.join(sys.argv[1], method + ".log")
        path = os.path.join(sys.argv[1], method)
        front = torch.nn.Linear(3, 2); gg.freeze(front)
        cache = gg.FeatureCache(front, Logged(log), store="disk", path=path,
                                batch_size=16, num_workers=2)
        x = torch.stack([torch.full((3,), float(i)) for i in range(64)])
        lines = open(log).read().split()
        with torch.no_grad():
            ok = torch.equal(cache.features(), front(x))
        checked = len(open(log).read().split()) // 2 - len(lines) // 2
        out[method] = {
            "reads": len(lines) // 2, "pids": len(set(lines[::2])), "ok": ok, "checked": checked
        }
    print(json.dumps(out))
"""


def test_workers_under_spawn_and_forkserver_build_once_each(tmp_path: Path) -> None:
    script = tmp_path / "workers.py"
    script.write_text(_WORKERS)
    env = {**os.environ, "PYTHONPATH": SRC}
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for method in ("spawn", "forkserver"):
        # one keying read and one building read per item, by two workers started once
        # (with the default progress bar, which once started them twice)
        # features() re-checks the dataset: every item read once more (verify="all")
        want = {"reads": 2 * 64, "pids": 2, "ok": True, "checked": 64}
        assert result[method] == want, (method, result)


# -- the dataset changed after the build: re-checked at every pass -------------


class Transformed(Dataset[tuple[torch.Tensor, int]]):
    """A dataset with a transform the user may swap, and items they may replace."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = list(x)
        self.transform: Callable[[torch.Tensor], torch.Tensor] = torch.clone

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.x[i]), i % 3


def _pass(cache: gg.FeatureCache, how: str) -> torch.Tensor:
    """One pass through a door users open; the features of items 0..n-1 in order."""
    if how == "features":
        return cache.features()
    loader = (
        cache.loader(batch_size=5)
        if how == "loader"
        else DataLoader(cache, batch_size=5, shuffle=False)
    )
    return torch.cat([x for x, _ in loader])


_DATA_CHANGES: dict[str, Callable[[Transformed], object]] = {
    "item replaced": lambda d: d.x.__setitem__(N - 3, d.x[N - 3] + 1),
    "item appended": lambda d: d.x.append(d.x[0] * 2),
    "transform changed": lambda d: setattr(d, "transform", torch.neg),
}


@pytest.mark.parametrize("how", ["features", "loader", "plain_dataloader"])
@pytest.mark.parametrize("change", list(_DATA_CHANGES))
def test_a_dataset_changed_after_the_build_is_never_served_old_features(
    change: str, how: str
) -> None:
    front, x = _front(), _x()
    data = Transformed(x)
    cache = gg.FeatureCache(front, data, progress=False, batch_size=8)
    first = _live(front, torch.stack([data[i][0] for i in range(N)]))
    assert torch.equal(_pass(cache, how), first)
    _DATA_CHANGES[change](data)
    inputs = torch.stack([data[i][0] for i in range(len(data))])
    want = torch.cat([_live(front, part) for part in inputs.split(8)])  # as built: by 8
    with pytest.warns(RuntimeWarning, match="rebuilding"):
        got = _pass(cache, how)
    assert torch.equal(got, want)
    assert len(cache) == len(data)


@pytest.mark.parametrize("change", ["transform changed", "item appended"])
def test_verify_sample_sees_length_and_sampled_items_each_pass(change: str) -> None:
    front, x = _front(), _x()
    data = Transformed(x)
    cache = gg.FeatureCache(front, data, progress=False, verify="sample")
    _DATA_CHANGES[change](data)
    with pytest.warns(RuntimeWarning, match="rebuilding"):
        len(cache)
    assert torch.equal(
        cache.features(), _live(front, torch.stack([data[i][0] for i in range(len(data))]))
    )


def test_verify_sample_does_not_see_an_unsampled_item_as_documented() -> None:
    front, x = _front(), _x(1)
    data = Transformed(torch.cat([x, x, x]))  # 72 items: item 1 is not among the 16 sampled
    cache = gg.FeatureCache(front, data, progress=False, verify="sample")
    data.x[1] = data.x[1] + 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        len(cache)


_TENSOR_CHANGES: dict[str, Callable[[TensorDataset], object]] = {
    "written in place": lambda d: d.tensors[0][N - 1].add_(1),
    "replaced": lambda d: setattr(d, "tensors", (d.tensors[0] + 1, d.tensors[1])),
    "label written": lambda d: d.tensors[1].__setitem__(N - 1, 7),
    "written through .data on a sampled row": lambda d: d.tensors[0].data[0].add_(1),
}


@pytest.mark.parametrize("change", list(_TENSOR_CHANGES))
def test_a_changed_tensor_dataset_is_seen_at_the_next_pass(change: str) -> None:
    front, x = _front(), _x()
    data = TensorDataset(x.clone(), torch.arange(N))
    cache = gg.FeatureCache(front, data, progress=False)
    _TENSOR_CHANGES[change](data)
    with pytest.warns(RuntimeWarning, match="rebuilding"):
        batches = list(DataLoader(cache, batch_size=6))
    assert torch.equal(torch.cat([f for f, _ in batches]), _live(front, data.tensors[0]))
    assert torch.equal(torch.cat([y for _, y in batches]), data.tensors[1])


def test_a_changed_dataset_rebuilds_an_extended_cache_too() -> None:
    front, x = _front(), _x()
    data = Transformed(x)
    head = nn.Linear(4 * 36, 2)
    gg.freeze(head)
    moved = gg.FeatureCache(front, data, progress=False, batch_size=N).extend(head)
    _DATA_CHANGES["transform changed"](data)
    with pytest.warns(RuntimeWarning) as caught:
        got = moved.features()
    assert [str(w.message).split(";")[0] for w in caught] == [
        "dataset item 0 changed since it was cached",
        "the cache this one extends was rebuilt",
    ]
    assert torch.equal(got, _live(head, _live(front, torch.stack([-t for t in x]))))
