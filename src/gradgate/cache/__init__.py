"""FeatureCache: run a frozen front-end once per sample, read its features afterwards."""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .._options import choice
from .._progress import progress
from ..errors import GradgateError, InvalidArgumentError
from ..integrity import fingerprint, tensor_digest

__all__ = ["FeatureCache"]

_FORMAT = "gradgate-feature-cache/1"
_NONDETERMINISTIC = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._NormBase)


def _first(item: Any) -> Any:
    return item[0] if isinstance(item, (tuple, list)) else item


def _rest(item: Any) -> tuple[Any, ...]:
    return tuple(item[1:]) if isinstance(item, (tuple, list)) else ()


def _collate_inputs(batch: list[Any], input_fn: Callable[[Any], Any]) -> tuple[Any, list[Any]]:
    from torch.utils.data import default_collate

    return default_collate([input_fn(b) for b in batch]), [_rest(b) for b in batch]


def _as_tensor(values: list[Any]) -> torch.Tensor | list[Any]:
    try:
        if isinstance(values[0], torch.Tensor):
            return torch.stack(values)
        return torch.as_tensor(values)
    except (TypeError, ValueError, RuntimeError, IndexError):
        return values


def _append_rest(columns: list[list[Any]], rows: list[tuple[Any, ...]]) -> None:
    """Append each sample's pass-through values to their columns (made on first use)."""
    for row in rows:
        if not columns:
            columns.extend([] for _ in row)
        for col, value in zip(columns, row):
            col.append(value)


def _np_dtype(dtype: torch.dtype) -> np.dtype[Any]:
    if dtype == torch.bfloat16:
        return np.dtype(np.uint16)  # numpy has no bfloat16: store the bits
    return np.dtype(torch.empty(0, dtype=dtype).numpy().dtype)


def _dataset_key(dataset: Any, input_fn: Callable[[Any], Any]) -> str:
    h = hashlib.sha256(f"{type(dataset).__qualname__}|{len(dataset)}|".encode())
    tensors = getattr(dataset, "tensors", None)
    if isinstance(tensors, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in tensors):
        for t in tensors:
            tensor_digest(t, h)
        return h.hexdigest()
    n = len(dataset)
    for i in sorted({int(k) for k in np.linspace(0, n - 1, num=min(n, 16))}):
        item = dataset[i]
        for value in (input_fn(item), *_rest(item)):
            if isinstance(value, torch.Tensor):
                tensor_digest(value, h)
            else:
                h.update(repr(value).encode())
    return h.hexdigest()


class FeatureCache(Dataset[tuple[Any, ...]]):
    """A ``Dataset`` of ``(features, *rest)``: the frozen front-end runs once per sample.

    The first time, the front-end runs over ``dataset`` in batches under
    ``torch.inference_mode`` (with a progress bar); afterwards every read is a
    lookup. The cache is keyed by the front-end's fingerprint plus the
    dataset's identity: a changed weight or dataset rebuilds it, never serves
    stale features. A disk store (``numpy.memmap``) holds more than memory, is
    written to a temporary file, checksummed and renamed into place, and a
    torn or corrupted one is rebuilt.

    ``DataLoader(cache, batch_size=64, shuffle=True)`` reads whole batches at
    once through ``__getitems__``.

    Args:
        front_end: the frozen module; no trainable parameter allowed, and
            BatchNorm/Dropout must be in inference mode (``gg.freeze`` does it).
        dataset: items are tuples whose first element is the front-end input
            (or see ``input_fn``); the rest is passed through.
        store: ``"memory"`` or ``"disk"``.
        path: the folder of a disk store.
        batch_size: batch size of the building pass.
        dtype: storage dtype (``torch.bfloat16``/``float16`` halve memory);
            features are read back in the front-end's own dtype.
        num_workers: DataLoader workers for the building pass.
        progress: show a progress bar while building.
        input_fn: how to get the front-end input from an item.
        dataset_key: a string naming the dataset's content; by default it is
            derived (all tensors of a ``TensorDataset``, else the length and 16
            evenly spaced samples).
        device: where the front-end runs while building (default: where its
            parameters are).

    Example:
        >>> import torch, gradgate as gg
        >>> from torch.utils.data import TensorDataset
        >>> front = torch.nn.Linear(4, 2); _ = gg.freeze(front)
        >>> data = TensorDataset(torch.randn(10, 4), torch.arange(10))
        >>> cache = gg.FeatureCache(front, data, progress=False)
        >>> feats, label = cache[3]
        >>> torch.equal(feats, front(data[3][0])), int(label)
        (True, 3)
    """

    def __init__(
        self,
        front_end: nn.Module,
        dataset: Any,
        store: str = "memory",
        path: str | os.PathLike[str] | None = None,
        batch_size: int = 256,
        dtype: torch.dtype | None = None,
        num_workers: int = 0,
        progress: bool = True,
        input_fn: Callable[[Any], Any] | None = None,
        dataset_key: str | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.store = choice(_StoreEnum, "store", store).value
        if self.store == _StoreEnum.DISK.value and path is None:
            raise InvalidArgumentError("store='disk' needs path= (a folder for the cache)")
        if batch_size < 1:
            raise InvalidArgumentError(f"batch_size must be positive; got {batch_size}")
        self.front_end = front_end
        self.dataset = dataset
        self.path = Path(path) if path is not None else None
        self.batch_size = batch_size
        self.storage_dtype = dtype
        self.num_workers = num_workers
        self.progress = progress
        self.input_fn: Callable[[Any], Any] = input_fn or _first
        self.device = torch.device(device) if device is not None else None
        self._check_front_end()
        self._dataset_key = dataset_key or _dataset_key(dataset, self.input_fn)
        self._features: torch.Tensor | None = None
        self._memmap: np.ndarray[Any, Any] | None = None
        self._rest: list[torch.Tensor | list[Any]] = []
        self._meta: dict[str, Any] = {}
        self._versions: list[tuple[torch.Tensor, int]] = []
        self.rebuilt = False
        self._load_or_build()

    # -- building ----------------------------------------------------------

    def _check_front_end(self) -> None:
        trainable = [n for n, p in self.front_end.named_parameters() if p.requires_grad]
        if trainable:
            raise GradgateError(
                f"FeatureCache needs a frozen front-end, but {type(self.front_end).__name__} "
                f"still trains {', '.join(trainable[:5])}; call gg.freeze(front_end) first"
            )
        moving = [
            n or type(m).__name__
            for n, m in self.front_end.named_modules()
            if isinstance(m, _NONDETERMINISTIC) and m.training
        ]
        if moving:
            raise GradgateError(
                f"FeatureCache needs a deterministic front-end, but {', '.join(moving[:5])} "
                "is in training mode (Dropout/BatchNorm); gg.freeze(front_end) keeps it in eval"
            )

    def key(self) -> str:
        """The cache key: front-end fingerprint plus dataset identity."""
        return hashlib.sha256(
            f"{fingerprint(self.front_end)}|{self._dataset_key}".encode()
        ).hexdigest()

    def _watch(self) -> None:
        self._versions = [
            (t, t._version) for t in [*self.front_end.parameters(), *self.front_end.buffers()]
        ]

    def _batches(self) -> Any:
        tensors = getattr(self.dataset, "tensors", None)
        if (
            self.input_fn is _first
            and isinstance(tensors, (tuple, list))
            and tensors
            and all(isinstance(t, torch.Tensor) for t in tensors)
        ):
            # A TensorDataset: slice whole batches instead of indexing samples.
            bs = self.batch_size
            return [
                (tensors[0][i : i + bs], list(zip(*(t[i : i + bs] for t in tensors[1:]))))
                if len(tensors) > 1
                else (tensors[0][i : i + bs], [()] * len(tensors[0][i : i + bs]))
                for i in range(0, len(tensors[0]), bs)
            ]
        input_fn = self.input_fn
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=lambda b: _collate_inputs(b, input_fn),
        )

    def _run(self) -> Iterator[tuple[torch.Tensor, list[tuple[Any, ...]]]]:
        loader = self._batches()
        device = self.device
        if device is None:
            first = next(iter(self.front_end.parameters()), None)
            device = first.device if first is not None else torch.device("cpu")
        batches = progress(
            loader,
            enabled=self.progress,
            total=len(loader),
            desc=f"caching {type(self.front_end).__name__} features",
        )
        with torch.inference_mode():
            for inputs, rest in batches:
                x = inputs.to(device) if isinstance(inputs, torch.Tensor) else inputs
                out = self.front_end(x)
                if not isinstance(out, torch.Tensor):
                    raise GradgateError(
                        "FeatureCache needs the front-end to return a tensor; "
                        f"got {type(out).__name__}"
                    )
                yield out, rest

    def _build_memory(self) -> None:
        n = len(self.dataset)
        feats: torch.Tensor | None = None
        rest_cols: list[list[Any]] = []
        pos = 0
        for out, rest in self._run():
            if feats is None:
                self._meta = {"shape": list(out.shape[1:]), "dtype": str(out.dtype)}
                store = self.storage_dtype or out.dtype
                feats = torch.empty((n, *out.shape[1:]), dtype=store)
            feats[pos : pos + len(out)] = out.to("cpu", feats.dtype)
            pos += len(out)
            _append_rest(rest_cols, rest)
        if feats is None:
            raise InvalidArgumentError("FeatureCache needs a non-empty dataset")
        self._features = feats
        self._rest = [_as_tensor(col) for col in rest_cols]

    def _load_or_build(self) -> None:
        key = self.key()
        if self.store == _StoreEnum.MEMORY.value:
            self._build_memory()
        else:
            self._open_or_build_disk(key)
        self._key = key
        self._watch()

    # -- disk store --------------------------------------------------------

    def _disk_paths(self) -> tuple[Path, Path, Path]:
        assert self.path is not None
        return self.path / "features.npy", self.path / "rest.pt", self.path / "meta.json"

    def _disk_valid(self, key: str) -> bool:
        feat_path, rest_path, meta_path = self._disk_paths()
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            return False
        if meta.get("format") != _FORMAT or meta.get("key") != key:
            return False
        try:
            if feat_path.stat().st_size != meta["bytes"]:
                return False
            if _file_sha256(feat_path) != meta["sha256"]:
                return False
            if _file_sha256(rest_path) != meta["rest_sha256"]:
                return False
        except (OSError, KeyError):
            return False
        self._meta = meta
        return True

    def _open_or_build_disk(self, key: str) -> None:
        assert self.path is not None
        self.path.mkdir(parents=True, exist_ok=True)
        with _locked(self.path / ".lock"):
            if not self._disk_valid(key):
                self._build_disk(key)
                self.rebuilt = True
        self._open_disk()

    def _build_disk(self, key: str) -> None:
        from numpy.lib.format import open_memmap

        feat_path, rest_path, meta_path = self._disk_paths()
        meta_path.unlink(missing_ok=True)  # the completion marker goes first and last
        n = len(self.dataset)
        tmp = feat_path.with_name(f"features.{os.getpid()}.tmp.npy")
        mm: Any = None  # numpy.memmap
        rest_cols: list[list[Any]] = []
        pos = 0
        out_dtype = torch.float32
        try:
            for out, rest in self._run():
                if mm is None:
                    out_dtype = out.dtype
                    store = self.storage_dtype or out.dtype
                    mm = open_memmap(
                        tmp, mode="w+", dtype=_np_dtype(store), shape=(n, *out.shape[1:])
                    )
                    shape = list(out.shape[1:])
                chunk = out.to("cpu", self.storage_dtype or out.dtype).contiguous()
                if chunk.dtype == torch.bfloat16:
                    chunk = chunk.view(torch.uint16)
                mm[pos : pos + len(out)] = chunk.numpy()
                pos += len(out)
                _append_rest(rest_cols, rest)
            if mm is None:
                raise InvalidArgumentError("FeatureCache needs a non-empty dataset")
            mm.flush()
            del mm
            os.replace(tmp, feat_path)
        finally:
            tmp.unlink(missing_ok=True)
        rest_tmp = rest_path.with_name(f"rest.{os.getpid()}.tmp")
        torch.save([_as_tensor(c) for c in rest_cols], rest_tmp)
        os.replace(rest_tmp, rest_path)
        meta = {
            "format": _FORMAT,
            "key": key,
            "n": n,
            "shape": shape,
            "dtype": str(out_dtype),
            "storage_dtype": str(self.storage_dtype or out_dtype),
            "bytes": feat_path.stat().st_size,
            "sha256": _file_sha256(feat_path),
            "rest_sha256": _file_sha256(rest_path),
        }
        meta_tmp = meta_path.with_name(f"meta.{os.getpid()}.tmp")
        meta_tmp.write_text(json.dumps(meta))
        os.replace(meta_tmp, meta_path)
        self._meta = meta

    def _open_disk(self) -> None:
        feat_path, rest_path, _ = self._disk_paths()
        self._memmap = np.load(feat_path, mmap_mode="r")
        self._rest = torch.load(rest_path, weights_only=False)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_memmap"] = None  # reopened lazily in each DataLoader worker
        return state

    # -- reading -----------------------------------------------------------

    def _out_dtype(self) -> torch.dtype:
        name = str(self._meta.get("dtype", "torch.float32")).replace("torch.", "")
        dtype = getattr(torch, name)
        assert isinstance(dtype, torch.dtype)
        return dtype

    def _rows(self, index: Any) -> torch.Tensor:
        self._check_fresh()
        if self._features is not None:
            rows = self._features[index]
        else:
            if self._memmap is None:
                self._open_disk()
            assert self._memmap is not None
            arr = self._memmap[index]  # fancy indexing copies; a slice is a read-only view
            if not arr.flags.writeable or not arr.flags.c_contiguous:
                arr = np.array(arr)
            rows = torch.from_numpy(arr)
            if str(self._meta.get("storage_dtype")) == "torch.bfloat16":
                rows = rows.view(torch.bfloat16)
        out = self._out_dtype()
        return rows if rows.dtype == out else rows.to(out)

    def _check_fresh(self) -> None:
        if all(t._version == v for t, v in self._versions):
            return
        key = self.key()
        if key != self._key:
            warnings.warn(
                "the front-end changed since its features were cached; rebuilding the cache",
                RuntimeWarning,
                stacklevel=4,
            )
            self._load_or_build()
        else:
            self._watch()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        feats = self._rows(index)
        return (feats, *(col[index] for col in self._rest))

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        """Read a whole batch with one indexing operation per column.

        The rows returned are light views of that batch; the default collate
        function hands the batch back whole instead of re-stacking the rows.
        """
        idx = torch.as_tensor(indices, dtype=torch.long)
        feats = self._rows(idx if self._features is not None else np.asarray(indices))
        cols = [
            col[idx] if isinstance(col, torch.Tensor) else [col[i] for i in indices]
            for col in self._rest
        ]
        batch = _Batch([feats, *cols])
        return [_Row(batch, i) for i in range(len(indices))]

    def features(self) -> torch.Tensor:
        """All cached features as one tensor (a copy for the disk store).

        Example:
            >>> import torch, gradgate as gg
            >>> front = torch.nn.Identity()
            >>> gg.FeatureCache(front, [(torch.ones(2),)], progress=False).features()
            tensor([[1., 1.]])
        """
        return self._rows(slice(None))

    def __repr__(self) -> str:
        shape = self._meta.get("shape")
        return (
            f"FeatureCache({type(self.front_end).__name__}, {len(self)} samples, "
            f"features {shape}, store={self.store!r})"
        )


class _StoreEnum(enum.Enum):
    MEMORY = "memory"
    DISK = "disk"


class _Batch(list[Any]):
    """The columns of one batch read by ``FeatureCache.__getitems__``."""


class _Row(Sequence[Any]):
    """Sample ``i`` of a ``_Batch``, indexed lazily like ``(features, *rest)``."""

    __slots__ = ("batch", "i")

    def __init__(self, batch: _Batch, i: int) -> None:
        self.batch = batch
        self.i = i

    def __getitem__(self, k: Any) -> Any:
        if isinstance(k, slice):
            return tuple(col[self.i] for col in self.batch[k])
        return self.batch[k][self.i]

    def __len__(self) -> int:
        return len(self.batch)


def _collate_rows(batch: Sequence[_Row], **kwargs: Any) -> Any:
    """Collate rows of one cached batch: hand the batch back, in order, unstacked."""
    first = batch[0].batch
    if len(first[0]) == len(batch) and all(
        r.batch is first and r.i == i for i, r in enumerate(batch)
    ):
        return list(first)
    from torch.utils.data import default_collate

    return default_collate([tuple(r) for r in batch])


def _register_collate() -> None:
    from torch.utils.data._utils.collate import default_collate_fn_map

    default_collate_fn_map[_Row] = _collate_rows


_register_collate()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock, so two processes never build one cache at once."""
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
