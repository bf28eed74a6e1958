"""FeatureCache: run a frozen front-end once per sample, read its features afterwards."""

from __future__ import annotations

import enum
import hashlib
import math
import numbers
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate, get_worker_info

from .._index import ModelIndex
from .._options import choice
from .._progress import progress
from .._state import model_entries
from ..errors import (
    CacheError,
    InvalidArgumentError,
    NondeterministicDatasetError,
    StaleCacheError,
)
from ..hashing import tensor_digest
from .key import global_hooks_digest, input_fn_digest, module_digests, value_digests
from .stores import Column, DiskStore, MemoryStore, Shape, Store, Stored, Writer, columns

__all__ = ["FeatureCache", "collate_rows"]

_NONDETERMINISTIC = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._NormBase)
_SAMPLED = 16  # items keyed and compared under verify="sample"
# Integer, bool and complex storage would truncate or reinterpret features.
_STORAGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class _StoreKind(enum.Enum):
    MEMORY = "memory"
    DISK = "disk"


class _Verify(enum.Enum):
    ALL = "all"
    SAMPLE = "sample"


def _first(item: Any) -> Any:
    """The default input function: the first element of a tuple, else the item itself."""
    if isinstance(item, (tuple, list)):
        return item[0]
    if isinstance(item, (Mapping, torch.Tensor, np.ndarray, numbers.Number)):
        return item
    raise InvalidArgumentError(
        f"FeatureCache cannot tell the front-end input in a dataset item of type "
        f"{type(item).__name__}: items are tuples (input, *rest), mappings or tensors; "
        "pass input_fn= to take the input out of the item"
    )


def _rest(item: Any) -> tuple[Any, ...]:
    """What is passed through: a tuple's tail, a mapping whole (whatever input_fn read)."""
    if isinstance(item, (tuple, list)):
        return tuple(item[1:])
    return (item,) if isinstance(item, Mapping) else ()


@dataclass
class _Batch:
    """Items ``start .. start + len(rest) - 1``: collated inputs, pass-through values, digests."""

    inputs: Any
    rest: list[tuple[Any, ...]]
    digests: list[tuple[bytes, ...]] | None


class _Collate:
    """Collates dataset items into a ``_Batch``; a class so spawn workers can unpickle it."""

    def __init__(self, input_fn: Callable[[Any], Any], hashing: bool) -> None:
        self.input_fn = input_fn
        self.hashing = hashing

    def __call__(self, items: list[Any]) -> _Batch:
        inputs = [self.input_fn(it) for it in items]
        rest = [_rest(it) for it in items]
        digests = (
            [value_digests((x, *r)) for x, r in zip(inputs, rest, strict=True)]
            if self.hashing
            else None
        )
        return _Batch(default_collate(inputs), rest, digests)


def _evenly(n: int) -> list[int]:
    """The 16 evenly spaced items keyed under ``verify="sample"`` (all of a small dataset).

    Example:
        >>> _evenly(5), _evenly(100)[:4]
        ([0, 1, 2, 3, 4], [0, 7, 13, 20])
    """
    if n <= _SAMPLED:
        return list(range(n))
    return sorted({round(k * (n - 1) / (_SAMPLED - 1)) for k in range(_SAMPLED)})


def _item_digest(values: tuple[bytes, ...]) -> bytes:
    return hashlib.blake2b(b"".join(values), digest_size=16).digest()


def _plain_tensor_dataset(dataset: Any) -> bool:
    return (
        isinstance(dataset, TensorDataset)
        and type(dataset).__getitem__ is TensorDataset.__getitem__
        and len(dataset.tensors) > 0
    )


def _take(col: Column, idx: torch.Tensor, indices: Sequence[int]) -> Column:
    if not isinstance(col, torch.Tensor):
        return [col[i] for i in indices]
    if get_worker_info() is None:
        return col[idx]
    # In a DataLoader worker the batch crosses into the main process through
    # shared memory: gather straight into it (as default_collate's stack does)
    # rather than into private memory that pickling then copies again.
    numel = len(idx) * math.prod(col.shape[1:])
    out = col.new(col._typed_storage()._new_shared(numel, device=col.device))
    return torch.index_select(col, 0, idx, out=out.resize_(len(idx), *col.shape[1:]))


# A cache of at most this many row views (features plus each tensor column;
# each view is one Python tensor object) keeps one view per row, so a batch's
# rows are looked up instead of made (see ``_Reader.table``).
_TABLE_VIEWS = 1 << 16


class _Reader:
    """Reads batches from one stored build: as columns, or as rows of views.

    ``columns`` indexes each column once (``cache.loader()`` hands them back
    as they are). ``table`` is for a plain ``DataLoader``, whose
    ``default_collate`` re-stacks rows: one view per stored row, made once
    per process, so a batch's rows are picked from it (no gather, no per-batch
    ``unbind``) and the stack is the batch's only copy. It exists for
    features read in their storage dtype, up to ``_TABLE_VIEWS`` views (a
    disk store's are views of a copy-on-write mapping of its file); otherwise
    rows are views of the gathered columns. In a DataLoader worker ``columns``
    gathers straight into shared memory, which is how a batch reaches the
    main process.
    """

    __slots__ = ("_table", "_whole", "stored")

    def __init__(self, stored: Stored) -> None:
        self.stored = stored
        self._table: list[Sequence[Any]] | None = None
        self._whole: torch.Tensor | None = None

    def whole(self) -> torch.Tensor:
        """Every stored row (storage dtype), mapped once per process."""
        if self._whole is None:
            self._whole = self.stored.whole()
        return self._whole

    def features(self, index: Any) -> torch.Tensor:
        rows = self.stored.rows(index)
        dtype = self.stored.shape.dtype
        return rows if rows.dtype == dtype else rows.to(dtype)

    def columns(self, indices: Sequence[int]) -> list[Column]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        shape = self.stored.shape
        if shape.storage == shape.dtype and get_worker_info() is not None:
            features = _take(self.whole(), idx, indices)
        else:
            features = self.features(idx)
        return [features, *(_take(col, idx, indices) for col in self.stored.rest)]

    def table(self) -> list[Sequence[Any]] | None:
        if self._table is None:
            shape, rest = self.stored.shape, self.stored.rest
            views = shape.n * (1 + sum(isinstance(c, torch.Tensor) for c in rest))
            if shape.storage == shape.dtype and views <= _TABLE_VIEWS:
                whole = self.whole()
                self._table = [
                    c.unbind(0) if isinstance(c, torch.Tensor) else c for c in (whole, *rest)
                ]
        return self._table

    def __getstate__(self) -> Stored:
        return self.stored  # each process makes its own table

    def __setstate__(self, state: Stored) -> None:
        self.stored = state
        self._table = self._whole = None


class _Rows(Sequence[tuple[Any, ...]]):
    """The samples of one batch read by ``FeatureCache.__getitems__``.

    Nothing is read until asked: ``columns`` (what ``collate_rows`` hands
    back) indexes each column once; read as a sequence it is a list of
    ``(features, *rest)`` tuples, so torch's ``default_collate`` and any user
    collate see plain rows. The rows are picked from the reader's table of
    row views where it has one, else made from the columns with ``unbind``
    (views, no copies).
    """

    __slots__ = ("_columns", "_reader", "_tuples", "indices")

    def __init__(self, reader: _Reader, indices: Sequence[int]) -> None:
        self._reader = reader
        self.indices = indices
        self._columns: list[Column] | None = None
        self._tuples: list[tuple[Any, ...]] | None = None

    @property
    def columns(self) -> list[Column]:
        if self._columns is None:
            self._columns = self._reader.columns(self.indices)
        return self._columns

    def _rows(self) -> list[tuple[Any, ...]]:
        if self._tuples is None:
            table = self._reader.table() if self._columns is None else None
            if table is not None:
                cells: list[Sequence[Any]] = [[col[i] for i in self.indices] for col in table]
            else:
                cells = [
                    col.unbind(0) if isinstance(col, torch.Tensor) else col for col in self.columns
                ]
            self._tuples = list(zip(*cells, strict=True))
        return self._tuples

    def __getitem__(self, k: Any) -> Any:
        return self._rows()[k]

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return iter(self._rows())

    def __len__(self) -> int:
        return len(self.indices)


def collate_rows(rows: Sequence[Any]) -> Any:
    """Collate a batch read by ``FeatureCache.__getitems__`` without re-stacking it.

    Returns exactly what torch's ``default_collate`` returns for the same
    rows (a plain ``DataLoader(cache)``): a list with one batched value per
    field. A batch as ``__getitems__`` returned it comes back as its columns
    (tensor columns as they are, others through ``default_collate``); any
    other list of rows goes through ``default_collate``.

    Example:
        >>> import torch
        >>> from gradgate.cache.stores import MemoryStore, Shape
        >>> w = MemoryStore().writer("k", Shape(2, (3,), torch.float32, torch.float32))
        >>> w.write(0, torch.zeros(2, 3))
        >>> stored = w.commit([torch.tensor([4, 5]), ["a", "b"]])
        >>> batch = _Rows(_Reader(stored), [0, 1])
        >>> collate_rows(batch)[1:]
        [tensor([4, 5]), ('a', 'b')]
        >>> collate_rows([batch[1]])[1]
        tensor([5])
    """
    if type(rows) is _Rows:
        # A tuple, as default_collate receives each field of transposed rows
        # (a str field then batches as a tuple of str, exactly as there).
        return [
            col if isinstance(col, torch.Tensor) else default_collate(tuple(col))  # type: ignore[arg-type]
            for col in rows.columns
        ]
    return default_collate(list(rows))


class FeatureCache(Dataset[tuple[Any, ...]]):
    """A ``Dataset`` of ``(features, *rest)``: the frozen front-end runs once per sample.

    The first time, the front-end runs over ``dataset`` in batches under
    ``torch.inference_mode`` (with a progress bar); afterwards every read is a
    lookup. The cache key covers everything that determines the features:
    the front-end's weights, buffers, structure and parameter-free settings
    (module types, the code of every method and the plain class attributes
    that forward reaches through ``self``, the body of every function and
    class it reaches in the user's own files (sibling modules included;
    installed packages are keyed by name, torch by version), attributes such
    as a LeakyReLU slope or a conv stride, forward hooks, torch's global
    forward hooks), the input function (code and every value it reads), the
    storage dtype, the torch version, and every sample.

    The key is checked when the cache is opened, once in every process that
    reads it (DataLoader workers, fork or spawn), at the start of every pass
    over it (the first ``len()``, which every sampler calls, and the first
    read after it), by ``features()``, and before any read after a front-end
    tensor was written in place. A mismatch rebuilds the cache with a
    ``RuntimeWarning``; in a DataLoader worker, which cannot rebuild, it
    raises ``StaleCacheError`` (the main process has rebuilt by the next
    pass). A write that bypasses version counters (``p.data[...] = ...``, a
    changed attribute) is seen at the next of these checks, not in the middle
    of a pass; persistent workers keep the snapshot they started with.

    The dataset is re-checked at the start of every pass and by
    ``features()`` (not in workers, not mid-pass): its length, then its
    items, so a replaced or appended item or a changed transform rebuilds
    the cache with a ``RuntimeWarning``. What is read per pass:
    ``verify="all"`` reads and hashes every item again (one pass over the
    raw dataset, without the front-end); ``verify="sample"`` the 16 sampled
    items; a plain ``TensorDataset`` is never re-read: the identity and
    version counters of its tensors (any in-place write or replacement) and
    16 evenly spaced rows; with ``dataset_key=`` only the length.

    Building reads every item twice, once to key the cache and once to run the
    front-end, and compares the two reads: a dataset that returns different
    values for the same index (random augmentation) raises
    ``NondeterministicDatasetError`` instead of being cached as one draw.
    Reopening a valid disk cache reads every item once. ``verify="sample"``
    keys and compares only 16 evenly spaced items (for datasets too large to
    read twice); a change to any other item is then not seen. A plain
    ``TensorDataset`` is keyed by its tensors and sliced, never read twice.

    A disk store (``numpy.memmap``) holds more than memory. It lives in its
    own folder ``gradgate-feature-cache`` inside ``path`` (created with a
    marker file, under a temporary name renamed into place; a folder of that
    name without the marker is refused) and never writes, renames or deletes
    anything else in ``path``. It is written to temporary files, checksummed
    and renamed into place under a lock, so two processes building one cache
    end with one valid cache; a torn or corrupted one is rebuilt, never read;
    temporary files left by a killed build, and the marker-only temporary
    folder left by a process killed while creating the folder, are removed by
    the next open in that folder.

    Read it in batches with ``cache.loader(...)`` (a ``DataLoader`` with
    ``collate_fn=cache.collate_fn``): each batch is one indexing operation
    per column, handed back whole. A plain ``DataLoader(cache, batch_size=...)``
    reads through ``__getitems__`` and returns exactly the same batches; its
    ``default_collate`` stacks each batch from views of the stored rows, kept
    once per process for a cache of up to 65,536 row views (one tensor object
    each), so the stack is the batch's one copy (see docs/BENCHMARKS.md,
    ``cache``, for what each path costs). No collate function is registered
    anywhere in torch. DataLoader workers (``num_workers=``) do not make a
    cached read faster: each batch then crosses into the main process through
    shared memory, which costs more than the read. That cost is the
    DataLoader's, paid as much by a ``TensorDataset`` of the same features
    read with workers (``workers2_floor`` in docs/BENCHMARKS.md, ``cache``);
    read a cache with ``num_workers=0``.

    Args:
        front_end: the frozen module; no trainable parameter allowed, and
            BatchNorm/Dropout must be in inference mode (``gg.freeze`` does it).
        dataset: items are tuples whose first element is the front-end input
            (or see ``input_fn``); the rest (``item[1:]``) is passed through.
            A mapping item (a dict) is passed through whole, so a sample
            reads ``(features, item)`` and keeps its label. A tensor, array
            or number item is the input itself, with nothing passed through.
        store: ``"memory"`` or ``"disk"``.
        path: the folder of a disk store (one cache per folder); the cache
            keeps its files in its own subfolder ``gradgate-feature-cache``.
        batch_size: batch size of the building pass.
        dtype: storage dtype, a floating one (``torch.bfloat16``/``float16``
            halve memory); features are read back in the front-end's own dtype.
            A dtype that would turn finite features into ``inf`` (float16
            holds at most 65504) is refused with the count of such values.
            Every other item field is kept at its own dtype (a Python float
            as float64, as ``default_collate`` batches it).
        num_workers: DataLoader workers for the reading passes (started once).
        progress: show a progress bar while building.
        input_fn: how to get the front-end input from an item; it must be
            hashable by value (a function, lambda or ``functools.partial`` over
            data), else it is refused with ``InvalidArgumentError``. It does
            not change what is passed through: for a tuple item that is still
            ``item[1:]`` (so ``input_fn=lambda it: it[1]`` on ``(label, image)``
            items passes the image again, not the label), for a mapping the
            whole item.
        dataset_key: a string naming what the dataset and input function
            produce; it replaces reading and hashing the samples (and the
            determinism check), so it must change whenever they do.
        device: where the front-end runs while building (default: where its
            parameters are).
        verify: ``"all"`` (default) keys every sample; ``"sample"`` 16 of them.

    Raises:
        InvalidArgumentError: a bad option, a front-end that still trains or
            returns a wrong number of rows, an input function that cannot be keyed.
        NondeterministicDatasetError: two reads of one item differ.
        CacheError: the disk folder cannot be written (and holds no valid cache),
            or its ``gradgate-feature-cache`` subfolder was not made by gradgate.

    Example:
        >>> import torch, gradgate as gg
        >>> from torch.utils.data import TensorDataset
        >>> front = torch.nn.Linear(4, 2); _ = gg.freeze(front)
        >>> data = TensorDataset(torch.randn(10, 4), torch.arange(10))
        >>> cache = gg.FeatureCache(front, data, progress=False)
        >>> feats, label = cache[3]
        >>> torch.allclose(feats, front(data[3][0])), int(label)
        (True, 3)
        >>> for x, y in cache.loader(batch_size=4, shuffle=True):  # or DataLoader(cache, ...)
        ...     pass
        >>> x.shape, y.shape
        (torch.Size([2, 2]), torch.Size([2]))
    """

    def __init__(
        self,
        front_end: nn.Module,
        dataset: Any,
        store: Literal["memory", "disk"] = "memory",
        path: str | os.PathLike[str] | None = None,
        batch_size: int = 256,
        dtype: torch.dtype | None = None,
        num_workers: int = 0,
        progress: bool = True,
        input_fn: Callable[[Any], Any] | None = None,
        dataset_key: str | None = None,
        device: torch.device | str | None = None,
        verify: Literal["all", "sample"] = "all",
    ) -> None:
        kind = choice(_StoreKind, "store", store)
        self._verify = choice(_Verify, "verify", verify)
        if kind is _StoreKind.DISK and path is None:
            raise InvalidArgumentError("store='disk' needs path= (a folder for the cache)")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidArgumentError(f"batch_size must be a positive int; got {batch_size!r}")
        if dtype is not None and dtype not in _STORAGE_DTYPES:
            raise InvalidArgumentError(
                f"FeatureCache cannot store features as dtype={dtype!r}: storage must be a "
                f"floating dtype, one of {', '.join(map(str, _STORAGE_DTYPES))} (or None for "
                "the front-end's own dtype)"
            )
        if num_workers < 0:
            raise InvalidArgumentError(f"num_workers must be 0 or more; got {num_workers}")
        self.store = kind.value
        self.front_end = front_end
        self.dataset = dataset
        self.path = path
        self.batch_size = batch_size
        self.storage_dtype = dtype
        self.num_workers = num_workers
        self.progress = progress
        self.input_fn: Callable[[Any], Any] = input_fn or _first
        self.dataset_key = dataset_key
        self.device = torch.device(device) if device is not None else None
        self.rebuilt = False
        # A FeatureCache read as a dataset (``extend``): its stored features are
        # the input, its other columns pass through as stored, its key is chained.
        self._parent = (
            dataset
            if isinstance(dataset, FeatureCache) and input_fn is None and dataset_key is None
            else None
        )
        self._parent_key = ""
        self._key = ""
        self._n = dataset._n if self._parent is not None else len(dataset)
        self._open(self._check_front_end())

    # -- keys --------------------------------------------------------------

    def _check_front_end(self) -> ModelIndex:
        """Refuse a front-end that trains or is not deterministic; return the walk made."""
        name = type(self.front_end).__name__
        index = ModelIndex(self.front_end)  # the one read of the front-end for the opening
        trainable = [n for n, p in index.params.items() if p.requires_grad]
        if trainable:
            raise InvalidArgumentError(
                f"FeatureCache needs a frozen front-end, but {name} still trains "
                f"{', '.join(trainable[:5])}; call gg.freeze(front_end) first"
            )
        moving: list[str] = []
        seen: set[int] = set()
        for n, m in zip(index.names, index.mods, strict=True):
            if isinstance(m, _NONDETERMINISTIC) and m.training and id(m) not in seen:
                seen.add(id(m))
                moving.append(n or name)
        if moving:
            raise InvalidArgumentError(
                f"FeatureCache needs a deterministic front-end, but {', '.join(moving[:5])} "
                "is in training mode (Dropout/BatchNorm); gg.freeze(front_end) keeps it in eval"
            )
        return index

    def _front_key(self, index: ModelIndex | None = None) -> tuple[list[tuple[str, str]], str]:
        """Per-module digests of the front-end, and one digest of them with the input function.

        ``index``: the calling read's walk of the front-end (else one is made).
        """
        modules = module_digests(self.front_end, index)
        reads = (
            "extends a FeatureCache"
            if self._parent is not None
            else f"dataset_key:{self.dataset_key}"
            if self.dataset_key is not None
            else input_fn_digest(self.input_fn)
        )
        hooks = global_hooks_digest()
        h = hashlib.sha256(
            f"{torch.__version__}|{self.storage_dtype}|{reads}|hooks:{hooks}".encode()
        )
        for name, digest in modules:
            h.update(f"|{name}:{digest}".encode())
        return modules, h.hexdigest()

    def _sampled(self) -> list[int]:
        if self._verify is _Verify.ALL:
            return list(range(self._n))
        return _evenly(self._n)

    # -- reading the dataset -----------------------------------------------

    def _batches(self, loader: Iterable[_Batch] | None, desc: str) -> Iterator[_Batch]:
        batches = self._tensor_batches() if loader is None else iter(loader)
        yield from progress(
            batches,
            enabled=self.progress,
            total=math.ceil(self._n / self.batch_size),
            desc=desc,
        )

    def _parent_batches(self) -> Iterator[_Batch]:
        """The parent cache's stored features in order, read back as its front-end returned."""
        parent = self._parent
        assert parent is not None
        for i in range(0, self._n, self.batch_size):
            rows = parent._rows(slice(i, i + self.batch_size))
            yield _Batch(rows, [()] * len(rows), None)

    def _tensor_batches(self) -> Iterator[_Batch]:
        """A plain TensorDataset: whole batches sliced from its tensors, no DataLoader."""
        tensors = self.dataset.tensors
        for i in range(0, self._n, self.batch_size):
            cols = [t[i : i + self.batch_size] for t in tensors]
            yield _Batch(cols[0], list(zip(*cols[1:], strict=True)) or [()] * len(cols[0]), None)

    def _loader(self) -> DataLoader[Any] | None:
        if _plain_tensor_dataset(self.dataset) and self.input_fn is _first:
            return None
        # Persistent workers serve both passes: they start once per build.
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=_Collate(self.input_fn, hashing=self.dataset_key is None),
            persistent_workers=self.num_workers > 0,
        )

    def _dataset_digest(self, loader: DataLoader[Any] | None) -> tuple[str, dict[int, bytes]]:
        """Digest of every sample (or the sampled ones), and the per-item digests read."""
        h = hashlib.sha256(f"{self._verify.value}|{self._n}|".encode())
        if self.dataset_key is not None:
            h.update(self.dataset_key.encode())
            return h.hexdigest(), {}
        if loader is None:
            for t in self.dataset.tensors:
                tensor_digest(t, h)
            return h.hexdigest(), {}
        seen: dict[int, bytes] = {}
        if self._verify is _Verify.SAMPLE:
            for i in self._sampled():
                item = self.dataset[i]
                seen[i] = _item_digest(value_digests((self.input_fn(item), *_rest(item))))
        else:
            pos = 0
            desc = f"keying FeatureCache on {self._n} samples"
            for batch in self._batches(loader, desc):
                assert batch.digests is not None
                for d in batch.digests:
                    seen[pos] = _item_digest(d)
                    pos += 1
        for i in sorted(seen):
            h.update(seen[i])
        return h.hexdigest(), seen

    # -- opening and building ----------------------------------------------

    def _store(self) -> Store:
        if self.store == _StoreKind.DISK.value:
            assert self.path is not None
            return DiskStore(self.path)
        return MemoryStore()

    def _open(self, index: ModelIndex | None = None) -> None:
        index = index if index is not None else ModelIndex(self.front_end)
        modules, front = self._front_key(index)
        loader: DataLoader[Any] | None = None
        if self._parent is None:
            self._n = len(self.dataset)
        if self._parent is not None:
            # The parent's key covers its front-end and every sample: chain it.
            self._parent_key = self._parent._key
            data, expected = f"parent:{self._parent_key}", dict[int, bytes]()
        else:
            loader = self._loader()
            data, expected = self._dataset_digest(loader)
        key = hashlib.sha256(f"{front}|{data}".encode()).hexdigest()
        store = self._store()
        built = False
        with store.lock() as writable:
            stored = store.open(key)
            if stored is None:
                if not writable:
                    raise CacheError(
                        f"cannot build a disk FeatureCache in {self.path}: the folder is not "
                        "writable and holds no valid cache for this front-end and dataset; "
                        "pass a writable path="
                    )
                writers: list[Writer] = []
                try:
                    stored = self._build(store, key, loader, expected, writers, index)
                except BaseException:
                    for w in writers:
                        w.abort()
                    raise
                self.rebuilt = built = True
        # Only a forward can change the front-end: read it afresh after one.
        after = self._front_key(ModelIndex(self.front_end))[0] if built else modules
        if after != modules:
            changed = next(a for a, b in zip(after, modules, strict=True) if a != b)[0]
            raise InvalidArgumentError(
                f"the front-end changed itself while computing features (in "
                f"{changed or 'its root module'}); FeatureCache needs a forward pass that "
                "leaves parameters, buffers and attributes as they were"
            )
        self._stored = stored
        self._reader = _Reader(stored)
        self._key = key
        self._front = front
        self._data = data
        self._seen = expected
        self._tensors: tuple[torch.Tensor, ...] | None = None
        if self._parent is None and loader is None and self.dataset_key is None:
            # A plain TensorDataset: its tensors' identity and version counters,
            # and 16 of its rows, are what each pass re-checks.
            self._tensors = self.dataset.tensors
            self._tensor_versions = [t._version for t in self.dataset.tensors]
            self._rows_seen = self._row_digests()
        self._pid: int | None = os.getpid()
        self._pending = False
        self._watch(index)

    def _row_digests(self) -> dict[int, bytes]:
        tensors = self.dataset.tensors
        return {
            i: _item_digest(value_digests(tuple(t[i] for t in tensors))) for i in _evenly(self._n)
        }

    def _build(
        self,
        store: Store,
        key: str,
        loader: DataLoader[Any] | None,
        expected: dict[int, bytes],
        writers: list[Writer],
        index: ModelIndex,
    ) -> Stored:
        """The one build loop: run the front-end over every batch, write its rows in order."""
        device = self.device
        if device is None:
            first = next(iter(index.params.values()), None)
            device = first.device if first is not None else torch.device("cpu")
        name = type(self.front_end).__name__
        writer: Writer | None = None
        shape = Shape(0, (), torch.float32, torch.float32)
        rest: list[list[Any]] = []
        pos = 0
        batches = (
            self._batches(loader, f"caching {name} features")
            if self._parent is None
            else progress(
                self._parent_batches(),
                enabled=self.progress,
                total=math.ceil(self._n / self.batch_size),
                desc=f"extending the cache with {name}",
            )
        )
        for batch in batches:
            count = len(batch.rest)
            if batch.digests is not None:
                self._compare(pos, batch.digests, expected)
            x = batch.inputs.to(device) if isinstance(batch.inputs, torch.Tensor) else batch.inputs
            with torch.inference_mode():
                out = self.front_end(x)
            if not isinstance(out, torch.Tensor):
                raise InvalidArgumentError(
                    f"FeatureCache needs the front-end to return a tensor; {name} returned "
                    f"{type(out).__name__}"
                )
            if out.dim() == 0 or len(out) != count:
                raise InvalidArgumentError(
                    f"FeatureCache needs one feature row per input: {name} returned "
                    f"{len(out) if out.dim() else 'a scalar'} rows for the {count} inputs of "
                    f"items {pos}..{pos + count - 1}; make the front-end keep the batch dimension"
                )
            if writer is None:
                shape = Shape(
                    self._n, tuple(out.shape[1:]), out.dtype, self.storage_dtype or out.dtype
                )
                writer = store.writer(key, shape)
                writers.append(writer)
            elif tuple(out.shape[1:]) != shape.row or out.dtype != shape.dtype:
                raise InvalidArgumentError(
                    f"FeatureCache needs rows of one shape and dtype: {name} returned "
                    f"{tuple(out.shape[1:])} {out.dtype} for items {pos}.., after "
                    f"{shape.row} {shape.dtype}"
                )
            if pos + count > self._n:
                raise InvalidArgumentError(
                    f"the dataset yielded more than len(dataset) = {self._n} items"
                )
            stored = out.to("cpu", shape.storage).contiguous()
            if shape.storage != out.dtype:
                self._check_range(out, stored, pos)
            writer.write(pos, stored)
            for row in batch.rest:
                if not rest:
                    rest.extend([] for _ in row)
                for col, value in zip(rest, row, strict=True):
                    col.append(value)
            pos += count
        if writer is None:
            raise InvalidArgumentError("FeatureCache needs a non-empty dataset")
        if pos != self._n:
            raise InvalidArgumentError(
                f"the dataset yielded {pos} items but len(dataset) is {self._n}"
            )
        # An extended cache keeps the parent's columns as they are stored.
        return writer.commit(columns(rest) if self._parent is None else self._parent._stored.rest)

    def _check_range(self, out: torch.Tensor, stored: torch.Tensor, pos: int) -> None:
        """Refuse storage that turns finite features into inf (float16 above 65504)."""
        lost = torch.isfinite(out).cpu() & ~torch.isfinite(stored)
        count = int(lost.sum())
        if count:
            largest = float(out.detach().abs().masked_fill(~lost.to(out.device), 0).max())
            raise InvalidArgumentError(
                f"FeatureCache cannot store these features as {stored.dtype}: {count} of the "
                f"{out.numel()} values of items {pos}..{pos + len(out) - 1} overflow it to inf "
                f"(largest magnitude {largest:.4g}, {stored.dtype} holds at most "
                f"{torch.finfo(stored.dtype).max:.4g}); store them as torch.bfloat16 (float32's "
                "range at half the memory) or torch.float32, or scale the front-end's output"
            )

    def _compare(
        self, start: int, digests: list[tuple[bytes, ...]], expected: dict[int, bytes]
    ) -> None:
        for i, values in enumerate(digests, start):
            want = expected.get(i)
            if want is None or want == _item_digest(values):
                continue
            item = self.dataset[i]
            third = value_digests((self.input_fn(item), *_rest(item)))
            differs = [k for k, (a, b) in enumerate(zip(values, third, strict=False)) if a != b]
            what = (
                "the front-end input"
                if differs[:1] == [0]
                else f"element {differs[0]} of the item"
                if differs
                else "its value"
            )
            raise NondeterministicDatasetError(
                f"dataset item {i} changed between two reads ({what} differs), so its features "
                "are not one value to cache; FeatureCache stores one deterministic pass: apply "
                "random augmentation after the cache (to the features) or seed it by index"
            )

    # -- freshness ---------------------------------------------------------

    def _watch(self, index: ModelIndex | None = None) -> None:
        index = index if index is not None else ModelIndex(self.front_end)
        self._versions = [(e.tensor, e.tensor._version) for e in model_entries(index)]

    def _check(self, full: bool) -> None:
        """Make sure what is served matches the front-end; rebuild or raise if not."""
        if self._pid != os.getpid():
            self._check_new_process()
        elif full or self._pending or any(t._version != v for t, v in self._versions):
            self._pending = False
            index = ModelIndex(self.front_end)  # the one read of the front-end for this check
            if self._front_key(index)[1] != self._front:
                what = "the front-end changed since its features were cached"
            elif full and (what := self._source_changed()):
                pass
            else:
                self._watch(index)
                return
            warnings.warn(f"{what}; rebuilding the cache", RuntimeWarning, stacklevel=4)
            self._open(index)

    def _source_changed(self) -> str:
        """What changed in what the features were computed from ("" if nothing).

        The dataset's length, then its items: every item under
        ``verify="all"``, the 16 sampled ones under ``"sample"``; a plain
        TensorDataset by its tensors' identity and version counters plus 16
        rows; nothing more than the length under ``dataset_key=``.
        """
        parent = self._parent
        if parent is not None:
            parent._check(full=True)  # rebuilds the parent first if it went stale
            if parent._key != self._parent_key:
                return "the cache this one extends was rebuilt"
            return ""
        n = len(self.dataset)
        if n != self._n:
            return f"the dataset's length changed from {self._n} to {n} since it was cached"
        if self.dataset_key is not None:
            return ""
        if self._tensors is not None:
            tensors = self.dataset.tensors
            if tensors is not self._tensors or [t._version for t in tensors] != (
                self._tensor_versions
            ):
                return "the dataset's tensors were replaced or written since they were cached"
            seen, rows = self._rows_seen, self._row_digests()
        else:
            data, rows = self._dataset_digest(self._loader())
            if data == self._data:
                return ""
            seen = self._seen
        changed = next((i for i in sorted(rows) if seen.get(i) != rows[i]), None)
        return "" if changed is None else f"dataset item {changed} changed since it was cached"

    def _check_new_process(self) -> None:
        index = ModelIndex(self.front_end)  # the one read of the front-end for this check
        if self._front_key(index)[1] == self._front and self._stored.readable(self._key):
            self._pid = os.getpid()
            self._watch(index)
            return
        if get_worker_info() is not None:
            raise StaleCacheError(
                "this FeatureCache no longer matches its front-end or its files (they changed "
                "after the cache was opened), and a DataLoader worker cannot rebuild it; call "
                "len(cache) in the main process before starting the workers (a new DataLoader "
                "with shuffle=True does), which rebuilds it there"
            )
        warnings.warn(
            "the front-end or the cache files changed since the features were cached; "
            "rebuilding the cache",
            RuntimeWarning,
            stacklevel=4,
        )
        self._open(index)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_pid"] = None  # the first read in the new process checks the key
        state["_versions"] = []
        return state

    # -- reading -----------------------------------------------------------

    def _rows(self, index: Any) -> torch.Tensor:
        return self._reader.features(index)

    def __len__(self) -> int:
        # A sampler calls len() several times as a pass starts: check at the
        # first call, and again at the first read after the last one.
        if not self._pending:
            self._check(full=True)
            self._pending = True
        return self._n

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        self._check(full=False)
        return (self._rows(index), *(col[index] for col in self._stored.rest))

    def __getitems__(self, indices: Sequence[int]) -> Sequence[Any]:
        """Read a whole batch with one indexing operation per column.

        PyTorch's ``DataLoader`` calls this for every batch of a map-style
        dataset. The result reads as a list of ``(features, *rest)`` tuples
        (views, made on first access: of the stored rows for a cache of up to
        65,536 row views, else of the batch indexed once per column), so
        ``default_collate`` and any collate function work on it; ``collate_fn``
        (``cache.loader()``) hands the batch back whole, indexed once per
        column, instead of re-stacking rows. Both give the same
        batches. As with ``cache[i]``, a memory cache's rows are views of what
        it stores: write to a copy (a disk cache's rows are copy-on-write:
        its file is never written).

        Example:
            >>> import torch, gradgate as gg
            >>> items = [(torch.ones(2) * i, i) for i in range(4)]
            >>> cache = gg.FeatureCache(torch.nn.Identity(), items, progress=False)
            >>> rows = cache.__getitems__([2, 0])
            >>> rows[0]
            (tensor([2., 2.]), tensor(2))
            >>> cache.collate_fn(rows)
            [tensor([[2., 2.],
                    [0., 0.]]), tensor([2, 0])]
        """
        self._check(full=False)
        return _Rows(self._reader, indices)

    collate_fn = staticmethod(collate_rows)

    def loader(self, **kwargs: Any) -> DataLoader[Any]:
        """A ``DataLoader`` over this cache with its fast ``collate_fn``.

        Example:
            >>> import torch, gradgate as gg
            >>> cache = gg.FeatureCache(torch.nn.Identity(), [(torch.ones(2), 1)], progress=False)
            >>> next(iter(cache.loader(batch_size=1)))
            [tensor([[1., 1.]]), tensor([1])]
        """
        return DataLoader(self, collate_fn=collate_rows, **kwargs)

    def extend(
        self,
        module: nn.Module,
        *,
        store: Literal["memory", "disk"] | None = None,
        path: str | os.PathLike[str] | None = None,
        batch_size: int | None = None,
        dtype: torch.dtype | None = None,
        progress: bool | None = None,
        device: torch.device | str | None = None,
    ) -> FeatureCache:
        """Move the cache boundary past ``module``: a cache of ``(module(features), *rest)``.

        When more of the network is frozen, the new boundary's features are
        computed from this cache's features (one pass of ``module`` over them,
        not a new pass over the raw dataset); every other item field (labels,
        mappings, strings) is kept exactly as stored here. The result is a
        ``FeatureCache`` like any other, with the same staleness guarantees: its
        key chains this cache's key (front-end and samples) with ``module``'s
        own key, and every pass re-checks this cache first (which re-checks the
        dataset and rebuilds if needed), then ``module``; either change rebuilds
        the extended cache. ``FeatureCache(module, cache)`` is the same call.

        Args:
            module: the newly frozen stage(s); same rules as a front-end (no
                trainable parameter, BatchNorm/Dropout in eval).
            store: ``"memory"`` or ``"disk"``; default: this cache's store.
            path: a disk store's folder; default for a disk parent: the folder
                ``extended`` inside this cache's own folder.
            batch_size, dtype, progress, device: as for ``FeatureCache``;
                defaults: this cache's batch size and progress setting,
                ``module``'s own output dtype and device.

        Raises:
            InvalidArgumentError: as for ``FeatureCache``.

        Example:
            >>> import torch, gradgate as gg
            >>> from torch.utils.data import TensorDataset
            >>> a, b = torch.nn.Linear(4, 3), torch.nn.Linear(3, 2); _ = gg.freeze(a), gg.freeze(b)
            >>> data = TensorDataset(torch.randn(10, 4), torch.arange(10.0, dtype=torch.float64))
            >>> cache = gg.FeatureCache(a, data, progress=False)
            >>> moved = cache.extend(b)
            >>> feats, label = moved[3]
            >>> torch.allclose(feats, b(a(data[3][0]))), label.dtype
            (True, torch.float64)
        """
        kind: Literal["memory", "disk"] = (
            store if store is not None else "disk" if self.store == "disk" else "memory"
        )
        if path is None and kind == "disk" and self.store == kind:
            assert self.path is not None
            path = DiskStore(self.path).own / "extended"
        return FeatureCache(
            module,
            self,
            store=kind,
            path=path,
            batch_size=batch_size if batch_size is not None else self.batch_size,
            dtype=dtype,
            progress=progress if progress is not None else self.progress,
            device=device,
        )

    def features(self) -> torch.Tensor:
        """All cached features as one tensor (a copy for the disk store).

        Example:
            >>> import torch, gradgate as gg
            >>> front = torch.nn.Identity()
            >>> gg.FeatureCache(front, [(torch.ones(2),)], progress=False).features()
            tensor([[1., 1.]])
        """
        self._check(full=True)
        return self._rows(slice(None))

    @property
    def nbytes(self) -> int:
        """Bytes the stored features take (in memory, or on disk for a disk store).

        Example:
            >>> import torch, gradgate as gg
            >>> cache = gg.FeatureCache(torch.nn.Identity(), [(torch.ones(4),)], progress=False)
            >>> cache.nbytes
            16
        """
        shape = self._stored.shape
        return shape.n * math.prod(shape.row) * shape.storage.itemsize

    def __repr__(self) -> str:
        return (
            f"FeatureCache({type(self.front_end).__name__}, {self._n} samples, "
            f"features {list(self._stored.shape.row)}, store={self.store!r})"
        )
