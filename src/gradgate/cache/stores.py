"""Where cached features live: memory or a folder on disk (private to the cache).

A store opens what it holds for a key (``open``) or writes a new set
(``writer`` -> ``write`` rows -> ``commit``). What comes back is ``Stored``:
the feature rows and the pass-through columns, read by index.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ..errors import CacheError, InvalidArgumentError

__all__ = ["Column", "DiskStore", "MemoryStore", "Shape", "Store", "Stored", "Writer"]

FORMAT = "gradgate-feature-cache/2"
FOLDER = "gradgate-feature-cache"  # the disk store's own folder inside the user's path=
MARKER = ".gradgate-feature-cache"  # in FOLDER: written by whoever created it
_MARK = "gradgate FeatureCache folder: created and owned by gradgate; safe to delete whole\n"
_TMP = ".tmp"
# The only temporary files a disk store ever removes: its own, in its own folder.
_TEMPORARIES = ("features.*.npy.tmp", "rest.*.pt.tmp", "meta.*.json.tmp")

Column = torch.Tensor | list[Any]


@dataclass(frozen=True)
class Shape:
    """What one build produces: ``n`` rows of ``row`` in ``storage``, read back as ``dtype``."""

    n: int
    row: tuple[int, ...]
    dtype: torch.dtype
    storage: torch.dtype


class Stored(Protocol):
    """Cached features and pass-through columns, read by index."""

    shape: Shape
    rest: list[Column]

    def rows(self, index: Any) -> torch.Tensor:
        """Feature rows at ``index`` (an int, a slice or a LongTensor), in storage dtype."""

    def readable(self, key: str) -> bool:
        """Whether this process can still read what was opened as ``key``."""

    def whole(self) -> torch.Tensor:
        """Every row as one tensor in storage dtype, without copying what is stored.

        Writes to it never reach what other processes read (memory: this
        process's own copy; disk: a copy-on-write mapping of the file).
        """


class Writer(Protocol):
    """Receives the rows of one build in order; ``commit`` makes them readable."""

    def write(self, start: int, rows: torch.Tensor) -> None: ...

    def commit(self, rest: list[Column]) -> Stored: ...

    def abort(self) -> None:
        """Drop what was written (a failed build)."""


class Store(Protocol):
    """A place for features: ``open`` what is there for a key, or write anew."""

    def lock(self) -> contextlib.AbstractContextManager[bool]:
        """Hold the store for one open-or-build; yields whether a build may happen."""

    def open(self, key: str) -> Stored | None: ...

    def writer(self, key: str, shape: Shape) -> Writer: ...


# Python numbers stored as torch.utils.data.default_collate batches them:
# a float is a double, an int an int64.
_NUMBERS = {bool: torch.bool, int: torch.int64, float: torch.float64}


def columns(values: list[list[Any]]) -> list[Column]:
    """Each pass-through column as one tensor where its values stack exactly, else a list.

    Every value keeps its own dtype: tensors of one dtype and shape stack,
    Python floats become float64 (ints int64, bools bool), numpy scalars of
    one dtype keep it; a column of mixed types stays a list of the values.

    Example:
        >>> columns([[torch.tensor(1), torch.tensor(2)], ["a", "b"], [0.1, 0.2]])
        [tensor([1, 2]), ['a', 'b'], tensor([0.1000, 0.2000], dtype=torch.float64)]
    """
    out: list[Column] = []
    for col in values:
        first = type(col[0])
        one_type = all(type(v) is first for v in col)
        try:
            if one_type and issubclass(first, torch.Tensor):
                dtypes = {v.dtype for v in col}
                out.append(torch.stack(col) if len(dtypes) == 1 else col)
            elif one_type and first in _NUMBERS:
                out.append(torch.tensor(col, dtype=_NUMBERS[first]))
            elif one_type and issubclass(first, np.generic) and len({v.dtype for v in col}) == 1:
                out.append(torch.from_numpy(np.array(col)))
            else:
                out.append(col)
        except (TypeError, ValueError, RuntimeError, OverflowError):
            out.append(col)
    return out


# -- memory ----------------------------------------------------------------


@dataclass
class _MemoryStored:
    shape: Shape
    rest: list[Column]
    features: torch.Tensor

    def rows(self, index: Any) -> torch.Tensor:
        return self.features[index]

    def readable(self, key: str) -> bool:
        return True

    def whole(self) -> torch.Tensor:
        return self.features


class _MemoryWriter:
    def __init__(self, shape: Shape) -> None:
        self.shape = shape
        self.features = torch.empty((shape.n, *shape.row), dtype=shape.storage)

    def write(self, start: int, rows: torch.Tensor) -> None:
        self.features[start : start + len(rows)] = rows

    def commit(self, rest: list[Column]) -> Stored:
        return _MemoryStored(self.shape, rest, self.features)

    def abort(self) -> None:
        del self.features


class MemoryStore:
    """Features in this process's memory; nothing outlives the cache object.

    Example:
        >>> w = MemoryStore().writer("k", Shape(2, (3,), torch.float32, torch.float32))
        >>> w.write(0, torch.ones(2, 3)); w.commit([]).rows(1)
        tensor([1., 1., 1.])
    """

    @contextlib.contextmanager
    def lock(self) -> Iterator[bool]:
        yield True

    def open(self, key: str) -> Stored | None:
        return None

    def writer(self, key: str, shape: Shape) -> Writer:
        return _MemoryWriter(shape)


# -- disk ------------------------------------------------------------------


def _np_dtype(dtype: torch.dtype) -> np.dtype[Any]:
    if dtype == torch.bfloat16:
        return np.dtype(np.uint16)  # numpy has no bfloat16: store the bits
    return np.dtype(torch.empty(0, dtype=dtype).numpy().dtype)


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(name)
    return dtype


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _identity(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return (st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass
class _DiskStored:
    shape: Shape
    rest: list[Column]
    folder: Path  # the user's path=, as DiskStore was given it
    path: Path
    identity: tuple[int, int, int]
    mm: np.ndarray[Any, Any] | None = None

    def rows(self, index: Any) -> torch.Tensor:
        if self.mm is None:
            self.mm = np.load(self.path, mmap_mode="r")
        if isinstance(index, torch.Tensor):
            index = index.numpy()
        arr = self.mm[index]  # fancy indexing copies; a slice is a read-only view
        if not arr.flags.writeable or not arr.flags.c_contiguous:
            arr = np.array(arr)
        rows = torch.from_numpy(arr)
        return rows.view(torch.bfloat16) if self.shape.storage == torch.bfloat16 else rows

    def whole(self) -> torch.Tensor:
        rows = torch.from_numpy(np.load(self.path, mmap_mode="c"))  # writes stay private
        return rows.view(torch.bfloat16) if self.shape.storage == torch.bfloat16 else rows

    def readable(self, key: str) -> bool:
        # A mapping inherited by fork still shows the verified file; a process
        # that maps it anew must find the very file that was verified.
        return self.mm is not None or DiskStore(self.folder).holds(key, self.identity)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "mm": None}  # each process maps the file itself


class _DiskWriter:
    def __init__(self, store: DiskStore, key: str, shape: Shape) -> None:
        from numpy.lib.format import open_memmap

        self.store, self.key, self.shape = store, key, shape
        self.tmp = store.features.with_name(f"features.{os.getpid()}.npy{_TMP}")
        self.rest_tmp = store.rest.with_name(f"rest.{os.getpid()}.pt{_TMP}")
        self.meta_tmp = store.meta.with_name(f"meta.{os.getpid()}.json{_TMP}")
        with store.failing("write the features of"):
            self.mm: Any = open_memmap(
                self.tmp, mode="w+", dtype=_np_dtype(shape.storage), shape=(shape.n, *shape.row)
            )

    def write(self, start: int, rows: torch.Tensor) -> None:
        if rows.dtype == torch.bfloat16:
            rows = rows.view(torch.uint16)
        self.mm[start : start + len(rows)] = rows.numpy()

    def commit(self, rest: list[Column]) -> Stored:
        store, rest_tmp, meta_tmp = self.store, self.rest_tmp, self.meta_tmp
        with store.failing("write the features of"):
            self.mm.flush()
            del self.mm
            torch.save(rest, rest_tmp)
        try:
            # Reading back with weights_only is the check that every value can be
            # loaded again without unpickling code.
            rest = torch.load(rest_tmp, weights_only=True)
        except pickle.UnpicklingError as e:
            self.abort()
            raise InvalidArgumentError(
                "a disk FeatureCache keeps the rest of each item (everything after the "
                f"front-end input) in a file loaded without pickled code, and it cannot: {e}. "
                "Return tensors, numbers or strings there, or use store='memory'"
            ) from None
        meta = {
            "format": FORMAT,
            "key": self.key,
            "n": self.shape.n,
            "row": list(self.shape.row),
            "dtype": str(self.shape.dtype),
            "storage": str(self.shape.storage),
            "bytes": self.tmp.stat().st_size,
            "sha256": _sha256(self.tmp),
            "rest_sha256": _sha256(rest_tmp),
        }
        with store.failing("write the features of"):
            meta_tmp.write_text(json.dumps(meta))
            # The marker goes first and comes back last: a process killed between
            # these renames leaves files whose checksums do not match, never a
            # marker over torn data.
            store.meta.unlink(missing_ok=True)
            os.replace(self.tmp, store.features)
            os.replace(rest_tmp, store.rest)
            os.replace(meta_tmp, store.meta)
        stored = _DiskStored(
            self.shape, rest, store.path, store.features, _identity(store.features)
        )
        stored.rows(slice(0, 0))  # map it now, before another build can replace the file
        return stored

    def abort(self) -> None:
        self.__dict__.pop("mm", None)
        for tmp in (self.tmp, self.rest_tmp, self.meta_tmp):
            tmp.unlink(missing_ok=True)


class DiskStore:
    """Features in its own folder ``gradgate-feature-cache`` inside ``path``.

    The store never writes, renames or deletes a file of yours in ``path``:
    everything lives in that subfolder, ``features.npy`` (a ``numpy.memmap``),
    ``rest.pt``, ``meta.json``, a ``.lock`` and the marker
    ``.gradgate-feature-cache``. The subfolder is created whole (marker
    inside) under a unique temporary name and renamed into place, so it exists
    only with its marker; a folder of that name without the marker is not
    gradgate's and is refused (``CacheError``), never written to.

    Builds write temporary files (``features.<pid>.npy.tmp`` and the like) and
    rename them into place under an exclusive lock; ``meta.json`` holds the
    key and the checksums and is written last. Whoever holds the lock removes
    those temporary files left by a killed build, since no other build can be
    running, and a ``.gradgate-feature-cache.*.tmp`` folder in ``path`` that is
    empty or holds nothing but the marker, whole or partly written (what a
    process killed while creating the subfolder leaves); no other file is ever
    removed.

    Example:
        >>> import tempfile
        >>> store = DiskStore(tempfile.mkdtemp())
        >>> with store.lock():
        ...     store.open("some key") is None
        True
        >>> sorted(p.name for p in store.path.iterdir())
        ['gradgate-feature-cache']
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.own = self.path / FOLDER
        self.features = self.own / "features.npy"
        self.rest = self.own / "rest.pt"
        self.meta = self.own / "meta.json"

    @contextlib.contextmanager
    def failing(self, doing: str) -> Iterator[None]:
        """Re-raise an operating-system failure as a ``CacheError`` naming the folder."""
        try:
            yield
        except OSError as e:
            if isinstance(e, CacheError):
                raise
            raise CacheError(
                f"could not {doing} the disk FeatureCache in {self.path}: {e}; "
                "pass a writable path= with enough free space"
            ) from e

    @contextlib.contextmanager
    def lock(self) -> Iterator[bool]:
        """Hold the folder's lock and remove stale temporary files.

        Yields False when the folder cannot be written: a valid cache there can
        still be read, but nothing can be built.
        """
        import fcntl

        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._create_own()
            self._check_own()
            f = open(self.own / ".lock", "a")  # noqa: SIM115 - held across the yield
        except PermissionError:
            if self.own.is_dir():
                self._check_own()
            yield False
            return
        except CacheError:
            raise
        except OSError as e:
            raise CacheError(
                f"cannot use {self.path} for a disk FeatureCache: {e}; pass path= naming a folder"
            ) from e
        with f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                writable = os.access(self.own, os.W_OK)
                if writable:
                    for pattern in _TEMPORARIES:
                        for stale in self.own.glob(pattern):
                            stale.unlink(missing_ok=True)
                    self._remove_killed_creations()
                yield writable
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _create_own(self) -> None:
        """Create the store's folder with its marker in one rename, unless it exists."""
        if self.own.exists() or self.own.is_symlink():
            return
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix=f".{FOLDER}.", suffix=_TMP, dir=self.path))
        try:
            (tmp / MARKER).write_text(_MARK)
            os.rename(tmp, self.own)  # fails if another process created it meanwhile
        except OSError:
            if not self.own.is_dir():
                raise
        finally:
            (tmp / MARKER).unlink(missing_ok=True)
            with contextlib.suppress(FileNotFoundError):
                tmp.rmdir()

    def _remove_killed_creations(self) -> None:
        """Remove the temporary folders a creator killed before its rename left in ``path``.

        Only a folder named like ``_create_own``'s (``.gradgate-feature-cache.*.tmp``)
        that is empty or holds nothing but a (possibly partly written) marker is
        removed: that is exactly what a killed creator leaves. Anything else of that name is the
        user's and is kept. Called under the lock, so the store's folder exists and
        a creator running now fails its rename whether or not its folder is removed.
        """
        mark = _MARK.encode()
        for tmp in self.path.glob(f".{FOLDER}.*{_TMP}"):
            try:
                if tmp.is_symlink() or not tmp.is_dir():
                    continue
                entries = list(tmp.iterdir())
                if any(e.name != MARKER or e.is_symlink() or not e.is_file() for e in entries):
                    continue
                if entries:
                    with entries[0].open("rb") as f:
                        head = f.read(len(mark) + 1)  # a large file is not read
                    if not mark.startswith(head):
                        continue
                for e in entries:
                    e.unlink()
                tmp.rmdir()
            except OSError:
                continue  # gone meanwhile, not readable, or not removable: left as it is

    def _check_own(self) -> None:
        """Refuse a folder of the store's name that gradgate did not create."""
        try:
            mark = (self.own / MARKER).read_text()
        except OSError:
            mark = None
        if mark != _MARK or self.own.is_symlink():
            raise CacheError(
                f"cannot use {self.path} for a disk FeatureCache: it holds {FOLDER}/, which "
                f"gradgate did not create (no {MARKER} marker in it), and gradgate never "
                "writes into a folder it does not own; move that folder away or pass another path="
            )

    def _meta(self) -> dict[str, Any] | None:
        try:
            meta = json.loads(self.meta.read_text())
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None

    def open(self, key: str) -> Stored | None:
        """The stored features for ``key`` if every file is whole, else None."""
        meta = self._meta()
        if meta is None or meta.get("key") != key:
            return None
        try:
            if self.features.stat().st_size != meta["bytes"]:
                return None
            if (
                _sha256(self.features) != meta["sha256"]
                or _sha256(self.rest) != meta["rest_sha256"]
            ):
                return None
            rest = torch.load(self.rest, weights_only=True)
            shape = Shape(
                int(meta["n"]), tuple(meta["row"]), _dtype(meta["dtype"]), _dtype(meta["storage"])
            )
            stored = _DiskStored(shape, rest, self.path, self.features, _identity(self.features))
            stored.rows(slice(0, 0))  # the header parses: numpy agrees with the checksum
        except (OSError, KeyError, TypeError, ValueError, pickle.UnpicklingError):
            return None
        return stored

    def holds(self, key: str, identity: tuple[int, int, int]) -> bool:
        """Whether the folder still holds exactly the files opened as ``key``."""
        meta = self._meta()
        try:
            return (
                meta is not None and meta.get("key") == key and _identity(self.features) == identity
            )
        except OSError:
            return False

    def writer(self, key: str, shape: Shape) -> Writer:
        return _DiskWriter(self, key, shape)
