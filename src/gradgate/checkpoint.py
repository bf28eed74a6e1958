"""Trainable-only checkpoints (safetensors) that verify themselves and their frozen base.

A file holds the trainable tensors (and optimizer state), the fingerprint of
the frozen rest, and a SHA-256 digest of its own payload: every stored
tensor's name, dtype, shape and bytes, and every metadata entry. A load
checks all of it (file, digest, base, names, shapes, dtypes, optimizer
groups and state) before it writes anything, then applies model and
optimizer together, restoring both if applying fails part-way.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from ._index import ModelIndex, covering_paths, gc_paused
from ._optimizers import unwrap_optimizer
from ._state import ModelState
from ._tempfiles import remove_orphans, temp_path
from ._version import __version__
from .errors import CheckpointError, CheckpointKeyError, FingerprintMismatchError
from .hashing import named_digest, tensor_digest

__all__ = [
    "LoadResult",
    "load_trainable",
    "save_trainable",
    "trainable_state",
]

_FORMAT = "2"
_DIGEST = "gradgate.payload_digest"
# Above this many frozen tensors (or bytes of their names and digests) only the total
# digest is kept: safetensors caps its header at 100 MB, and mismatch reports need no more.
_PER_TENSOR_LIMIT = 20_000
_PER_TENSOR_BYTES = 8 << 20
_STATE = "__optim__."  # prefix of stored optimizer-state tensors
_GROUP = "__optim_group__."  # prefix of tensor-valued group options (a tensor lr)


@dataclass(frozen=True, eq=False)
class LoadResult(Mapping[str, str]):
    """What ``load_trainable`` loaded, and from which base.

    Short to print; still the file's metadata as a read-only mapping
    (``result["torch.version"]``), as ``load_trainable`` returned before.

    Attributes:
        path: the file read.
        loaded: the names of the tensors written into the model, model order.
        optimizer: whether optimizer state was loaded too.
        frozen: how many frozen tensors the file's base had.
        fingerprint: the frozen base's fingerprint (``gg.fingerprint`` of it).
        saved_with: the gradgate and torch versions that wrote the file.
        metadata: every metadata entry of the file.

    Example:
        >>> import tempfile, os, torch, gradgate as gg
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> _ = gg.freeze(net, "0")
        >>> p = gg.save_trainable(net, os.path.join(tempfile.mkdtemp(), "h.safetensors"))
        >>> result = gg.load_trainable(net, p)
        >>> result.loaded, result.frozen, result.optimizer
        (('1.weight', '1.bias'), 2, False)
        >>> result["gradgate.format"]
        '2'
    """

    path: Path
    loaded: tuple[str, ...]
    optimizer: bool
    frozen: int
    fingerprint: str
    saved_with: str
    metadata: Mapping[str, str] = field(repr=False)

    def __getitem__(self, key: str) -> str:
        return self.metadata[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.metadata)

    def __len__(self) -> int:
        return len(self.metadata)

    def __repr__(self) -> str:
        shown = ", ".join(self.loaded[:4]) + (", ..." if len(self.loaded) > 4 else "")
        return (
            f"LoadResult({len(self.loaded)} tensors from {str(self.path)!r}: {shown}; "
            f"optimizer state {'loaded' if self.optimizer else 'not loaded'}; base: "
            f"{self.frozen} frozen tensors, fingerprint {self.fingerprint[:12]}; "
            f"saved by {self.saved_with})"
        )

    __str__ = __repr__


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters plus buffers of modules that are not frozen, by name.

    Example:
        >>> import torch, gradgate as gg
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
        >>> _ = gg.freeze(net, "0")
        >>> sorted(trainable_state(net))[:3]
        ['1.bias', '1.num_batches_tracked', '1.running_mean']
    """
    with gc_paused():
        return ModelState(model).trainable_state()


def _frozen_digests(record: ModelState) -> tuple[str, dict[str, str]]:
    total = hashlib.sha256()
    per: dict[str, str] = {}
    with gc_paused():
        entries = record.frozen_entries(buffers=True)
    for e in entries:
        name = e.name
        d = named_digest(name, _full(e.tensor))
        per[name] = d
        total.update(f"{name}\0{d}\n".encode())
    return total.hexdigest(), per


_SETTINGS = "gradgate.frozen_settings"


def _settings_of(module: nn.Module) -> dict[str, str]:
    """A module's parameter-free settings (BatchNorm's ``eps``, a conv's ``stride``), as text.

    Its public attributes holding numbers, strings, booleans, ``None`` or
    tuples of these: what changes the computation without being a tensor.
    """
    out: dict[str, str] = {}
    for key, value in vars(module).items():
        if key.startswith("_") or key == "training":
            continue
        items = value if isinstance(value, tuple) else (value,)
        if all(v is None or isinstance(v, (bool, int, float, str)) for v in items):
            out[key] = repr(value)
    return out


def _frozen_settings(record: ModelState) -> dict[str, dict[str, str]]:
    """The settings of every module that owns a frozen tensor, by module path."""
    out: dict[str, dict[str, str]] = {}
    seen: set[int] = set()
    with gc_paused():
        entries = record.frozen_entries(buffers=True)
    for e in entries:
        if id(e.owner) in seen:
            continue
        seen.add(id(e.owner))
        path = e.name.rpartition(".")[0] if e.name.endswith("." + e.leaf) else ""
        out[path] = {"class": type(e.owner).__name__, **_settings_of(e.owner)}
    return out


def _payload_digest(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode() + b"\0")
        tensor_digest(tensors[name], h)
    h.update(json.dumps(sorted((k, v) for k, v in metadata.items() if k != _DIGEST)).encode())
    return h.hexdigest()


def _encode(value: Any, key: str, tensors: dict[str, torch.Tensor], what: str) -> Any:
    """A JSON spec of an optimizer value; its tensors go to ``tensors`` under ``key``."""
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().cpu().contiguous().clone()
        return {"t": key}
    if isinstance(value, (list, tuple)):
        items = [_encode(v, f"{key}.{i}", tensors, what) for i, v in enumerate(value)]
        return {"list": items, "tuple": isinstance(value, tuple)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"v": value}
    raise CheckpointError(
        f"cannot save {what}: a {type(value).__name__} (only tensors, numbers, strings, "
        "None and lists/tuples of them can be stored); save that optimizer with torch.save"
    )


def _decode(spec: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if not isinstance(spec, dict):
        raise CheckpointError(f"malformed optimizer entry {spec!r}")
    if "t" in spec:
        if spec["t"] not in tensors:
            raise CheckpointError(f"optimizer tensor {spec['t']!r} is missing from the file")
        return tensors[spec["t"]]
    if "list" in spec:
        items = [_decode(s, tensors) for s in spec["list"]]
        return tuple(items) if spec.get("tuple") else items
    if "v" in spec:
        return spec["v"]
    raise CheckpointError(f"malformed optimizer entry {spec!r}")


def _optimizer_payload(
    optimizer: torch.optim.Optimizer, record: ModelState
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    names = dict(record.index.canonical)
    tensors: dict[str, torch.Tensor] = {}
    groups: list[dict[str, Any]] = []
    state: dict[str, dict[str, Any]] = {}
    for gi, group in enumerate(optimizer.param_groups):
        missing = [i for i, p in enumerate(group["params"]) if id(p) not in names]
        if missing:
            raise CheckpointError(
                f"optimizer group {gi} holds a parameter that is not part of "
                f"{type(record.model).__name__} (position {missing[0]} in the group); save each "
                "model with the optimizer over its own parameters"
            )
        options = {
            k: _encode(v, f"{_GROUP}{gi}.{k}", tensors, f"optimizer group option {k!r}")
            for k, v in group.items()
            if k != "params"
        }
        groups.append({"params": [names[id(p)] for p in group["params"]], "options": options})
        for p in group["params"]:
            pname = names[id(p)]
            state[pname] = {
                k: _encode(
                    v, f"{_STATE}{pname}.{k}", tensors, f"optimizer state {k!r} of {pname!r}"
                )
                for k, v in optimizer.state.get(p, {}).items()
            }
    info = {"class": _lineage(optimizer), "groups": groups, "state": state}
    return tensors, info


def _lineage(optimizer: torch.optim.Optimizer) -> list[str]:
    """The optimizer's class and its bases below ``torch.optim.Optimizer`` (a subclass is kin)."""
    out = []
    for cls in type(optimizer).__mro__:
        if cls is torch.optim.Optimizer:
            break
        out.append(cls.__name__)
    return out


def _storable(name: str, t: torch.Tensor) -> torch.Tensor:
    """A dense CPU copy safetensors can store (complex as real pairs), or a clear error."""
    if is_lazy(t):
        raise CheckpointError(
            f"cannot save {name!r}: it is an uninitialised lazy parameter (no values yet); "
            "run one forward pass through the model first"
        )
    if t.layout != torch.strided:
        raise CheckpointError(
            f"cannot save {name!r}: a {t.layout} tensor (safetensors stores dense tensors); "
            "freeze it, or keep it dense while training"
        )
    data = t.detach().cpu().contiguous().clone()
    return torch.view_as_real(data).clone() if data.is_complex() else data


def save_trainable(
    model: nn.Module, path: str | os.PathLike[str], optimizer: torch.optim.Optimizer | None = None
) -> Path:
    """Write only what trains (and the optimizer state) to a safetensors file.

    The frozen rest is not stored: its fingerprint is, so loading onto a
    different frozen base fails loudly; a digest of the file's own payload
    makes any damaged byte fail the load. The file is written to a temp file
    named after this process and renamed into place, so a reader sees the
    old file or the new one, never a torn one; temp files left by killed
    processes are removed by the next save or load in that folder. Under
    ``torch.distributed`` every rank must call it (FSDP2 shards are
    gathered); rank 0 writes.

    Args:
        model: the model whose trainable tensors are saved.
        path: destination ``.safetensors`` file.
        optimizer: optionally, an optimizer (or a wrapper exposing one as
            ``.optimizer``) whose state and groups are saved by parameter
            name; tensor-valued options such as a tensor ``lr`` are kept.

    Returns:
        The path written.

    Raises:
        CheckpointError: ``path`` is a directory, a tensor cannot be stored
            (uninitialised lazy, sparse), or the optimizer holds a foreign parameter or a value
            that cannot be stored.

    Example:
        >>> import tempfile, os, torch, gradgate as gg
        >>> net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 2))
        >>> _ = gg.freeze(net, "0")
        >>> path = gg.save_trainable(net, os.path.join(tempfile.mkdtemp(), "head.safetensors"))
        >>> os.path.getsize(path) < 4096
        True
    """
    from ._deps import optional_import

    st = optional_import("safetensors.torch", "io")
    dest = Path(path)
    if dest.is_dir():
        raise CheckpointError(
            f"save_trainable(path={str(dest)!r}): that path is a directory; pass a file "
            f"path, e.g. {str(dest / 'trainable.safetensors')!r}"
        )
    blocker = next((p for p in dest.parents if p.is_file()), None)
    if blocker is not None:
        raise CheckpointError(
            f"save_trainable(path={str(dest)!r}): {str(blocker)!r} is a file, not a folder; "
            "choose a path whose folders are folders"
        )
    opt = unwrap_optimizer(optimizer) if optimizer is not None else None
    with gc_paused():
        record = ModelState(model)
        state = {k: _full(v) for k, v in record.trainable_state().items()}
    total, per = _frozen_digests(record)
    tensors = {k: _storable(k, v) for k, v in state.items()}
    metadata = {
        "gradgate.format": _FORMAT,
        "gradgate.version": _version(),
        "torch.version": torch.__version__,
        "gradgate.frozen_fingerprint": total,
        "gradgate.frozen_count": str(len(per)),
        "gradgate.trainable": json.dumps(sorted(state)),
        "gradgate.complex": json.dumps(sorted(k for k, v in state.items() if v.is_complex())),
    }
    if len(per) <= _PER_TENSOR_LIMIT:
        per_json = json.dumps(per)
        if len(per_json) <= _PER_TENSOR_BYTES:
            metadata["gradgate.frozen_digests"] = per_json
        settings_json = json.dumps(_frozen_settings(record))
        if len(settings_json) <= _PER_TENSOR_BYTES:
            metadata[_SETTINGS] = settings_json
    if opt is not None:
        opt_tensors, opt_meta = _optimizer_payload(opt, record)
        tensors.update(opt_tensors)
        metadata["gradgate.optimizer"] = json.dumps(opt_meta)
    metadata[_DIGEST] = _payload_digest(tensors, metadata)
    if not _is_writer():
        return dest  # under torch.distributed only rank 0 writes (all ranks gathered)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(
            f"save_trainable(path={str(dest)!r}): cannot create its folder "
            f"({e.strerror or e}); choose a folder you can write"
        ) from e
    remove_orphans(dest.parent)
    tmp = temp_path(dest)
    try:
        st.save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, dest)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, Exception) and type(e).__module__.startswith("safetensors"):
            raise CheckpointError(f"safetensors could not write {str(dest)!r}: {e}") from e
        raise
    return dest


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective: every rank must call it)."""
    full_tensor = getattr(t, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else t


def _is_writer() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _version() -> str:
    return __version__


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a checkpoint and verify its payload digest; complex tensors come back complex."""
    from ._deps import optional_import

    st = optional_import("safetensors", "io")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        with st.safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except Exception as e:  # safetensors raises its own error types for torn files
        raise CheckpointError(
            f"checkpoint {str(path)!r} is truncated or corrupted and was not loaded: {e}"
        ) from e
    fmt = meta.get("gradgate.format")
    if fmt is None:
        raise CheckpointError(f"{str(path)!r} is not a gradgate trainable-only checkpoint")
    if fmt != _FORMAT:
        raise CheckpointError(
            f"{str(path)!r} has checkpoint format {fmt!r}; this gradgate reads format "
            f"{_FORMAT!r} (re-save it with the gradgate that wrote it, or a matching one)"
        )
    if meta.get(_DIGEST) != _payload_digest(tensors, meta):
        raise CheckpointError(
            f"checkpoint {str(path)!r} is damaged: its payload digest does not match its "
            "tensors and metadata (a changed byte, or an edited file); nothing was loaded"
        )
    complex_names = _json(meta, "gradgate.complex", path)
    if not isinstance(complex_names, list):
        raise CheckpointError(f"{str(path)!r}: malformed 'gradgate.complex' entry")
    for name in complex_names:
        if name not in tensors or tensors[name].shape[-1:] != (2,):
            raise CheckpointError(f"{str(path)!r}: complex tensor {name!r} is malformed")
        # A fresh, aligned copy: the file's buffer may sit at an 8-byte offset, and
        # viewing that as complex128 (16-byte elements) crashed torch 2.6 on copy_.
        tensors[name] = torch.view_as_complex(
            tensors[name].clone(memory_format=torch.contiguous_format)
        )
    return tensors, meta


def _json(meta: Mapping[str, str], key: str, path: Path) -> Any:
    if key not in meta:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks its {key!r} entry")
    try:
        return json.loads(meta[key])
    except ValueError as e:
        raise CheckpointError(f"checkpoint {str(path)!r}: {key!r} is not valid JSON ({e})") from e


def _freeze_first(model: nn.Module, meta: Mapping[str, str], path: Path) -> str | None:
    """The advice when ``model`` trains what the checkpoint's base had frozen, else None."""
    try:
        saved = set(json.loads(meta.get("gradgate.trainable", "[]")))
    except ValueError:
        return None
    index = ModelIndex(model)
    params = index.params
    extra = {n for n, p in params.items() if p.requires_grad and n not in saved}
    if not extra or not saved & set(params):
        return None
    sels = ", ".join(repr(s) for s in covering_paths(index, [n for n in params if n in extra])[:4])
    return (
        f"{type(model).__name__} trains {len(extra)} tensor(s) the checkpoint's base had "
        f"frozen ({', '.join(sorted(extra)[:3])}{', ...' if len(extra) > 3 else ''}): "
        f"freeze it the same way first, then load: gg.freeze(model, {sels}); "
        f"gg.load_trainable(model, {str(path)!r})"
    )


def _settings_diff(record: ModelState, meta: Mapping[str, str], path: Path) -> list[str]:
    """The frozen modules whose settings differ from the checkpoint's, as ``path.key a -> b``."""
    if _SETTINGS not in meta:
        return []  # written before settings were recorded
    saved = _json(meta, _SETTINGS, path)
    if not isinstance(saved, dict):
        raise CheckpointError(f"checkpoint {str(path)!r}: malformed {_SETTINGS!r} entry")
    out = []
    for module, now in _frozen_settings(record).items():
        before = saved.get(module)
        if not isinstance(before, dict):
            continue
        for key in sorted(set(before) & set(now)):
            if before[key] != now[key]:
                out.append(f"{module or '(root)'}.{key} {before[key]} -> {now[key]}")
    return out


def _check_base(record: ModelState, meta: Mapping[str, str], path: Path) -> None:
    total, per = _frozen_digests(record)
    if "gradgate.frozen_fingerprint" not in meta:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks the frozen base's fingerprint")
    settings = _settings_diff(record, meta, path)
    if total == meta["gradgate.frozen_fingerprint"] and not settings:
        return
    parts = []
    if "gradgate.frozen_digests" in meta:
        saved = _json(meta, "gradgate.frozen_digests", path)
        if not isinstance(saved, dict):
            raise CheckpointError(f"checkpoint {str(path)!r}: malformed frozen digests")
        changed = [n for n in per if n in saved and saved[n] != per[n]]
        missing = [n for n in saved if n not in per]
        extra = [n for n in per if n not in saved]
        if changed:
            parts.append("values differ: " + ", ".join(changed[:8]))
        if missing:
            parts.append("frozen in the checkpoint's base only: " + ", ".join(missing[:8]))
        if extra:
            parts.append("frozen in this model only: " + ", ".join(extra[:8]))
    if settings:
        parts.append("settings differ: " + ", ".join(settings[:8]))
    detail = " (" + "; ".join(parts) + ")" if parts else ""
    advice = _freeze_first(record.model, meta, path)
    raise FingerprintMismatchError(
        f"checkpoint {str(path)!r} was saved on a different frozen base{detail}; "
        + (advice or "load it onto the model it was trained with, or pass strict=False")
    )


def load_trainable(
    model: nn.Module,
    path: str | os.PathLike[str],
    optimizer: torch.optim.Optimizer | None = None,
    strict: bool = True,
) -> LoadResult:
    """Load a ``save_trainable`` file into ``model`` (and ``optimizer``).

    Everything is read and checked first (the file's payload digest, the
    frozen base, names, shapes, dtypes, optimizer class, groups and state);
    then model and optimizer are written together. If writing fails part-way
    (a tensor that cannot be copied, an optimizer whose ``load_state_dict``
    raises), both are restored, so a failed load leaves them exactly as they
    were. Tensors are never cast: a dtype mismatch is an error.

    Args:
        model: the model to load into; its trainable set must match the file.
        path: the ``.safetensors`` file.
        optimizer: optionally, an optimizer (or a wrapper exposing one as
            ``.optimizer``) built over the same parameters in the same groups.
        strict: check the frozen base's fingerprint and require exactly the
            same trainable names. With ``strict=False`` the names both sides
            have are loaded; at least one must match.

    Returns:
        A ``LoadResult``: what was loaded, from which base (printing it is
        one line); it is also a mapping of the file's metadata.

    Raises:
        FingerprintMismatchError: the frozen base differs (naming what differs).
        CheckpointKeyError: missing or unexpected trainable tensors, or (with
            ``strict=False``) no name in common.
        CheckpointError: a missing, truncated, damaged or foreign file, or a
            shape, dtype or optimizer mismatch.

    Example:
        >>> import tempfile, os, torch, gradgate as gg
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> _ = gg.freeze(net, "0")
        >>> p = gg.save_trainable(net, os.path.join(tempfile.mkdtemp(), "h.safetensors"))
        >>> _ = gg.load_trainable(net, p)
    """
    opt = unwrap_optimizer(optimizer) if optimizer is not None else None
    src = Path(path)
    if src.parent.is_dir():
        remove_orphans(src.parent)
    tensors, meta = _read(src)
    with gc_paused():
        record = ModelState(model)
        state = record.trainable_state()
    tensors = record.check_saved(state, tensors)  # the file's row sets are the model's
    if strict:
        _check_base(record, meta, src)
    sharded = [k for k, v in state.items() if callable(getattr(v, "full_tensor", None))]
    if sharded:
        raise CheckpointError(
            f"loading into FSDP2-sharded parameters ({sharded[0]!r}, ...) is not supported; "
            "load_trainable before fully_shard"
        )
    saved = {k: v for k, v in tensors.items() if not k.startswith((_STATE, _GROUP))}
    missing = [k for k in state if k not in saved]
    unexpected = [k for k in saved if k not in state]
    if strict and (missing or unexpected):
        advice = _freeze_first(model, meta, src)
        raise CheckpointKeyError(
            f"checkpoint {str(src)!r} does not match the model's trainable set: "
            f"missing {missing or 'none'}, unexpected {unexpected or 'none'}"
            + (f"; {advice}" if advice else "")
        )
    load = {k: saved[k] for k in state if k in saved}  # in the model's order
    if saved and not load:
        raise CheckpointKeyError(
            f"checkpoint {str(src)!r} shares no trainable name with {type(model).__name__}, "
            f"so strict=False would load nothing: the file has {sorted(saved)[:5]}, the "
            f"model trains {sorted(state)[:5]}; freeze/unfreeze the same parts as when saving"
        )
    for k, v in load.items():
        if state[k].shape != v.shape:
            raise CheckpointError(
                f"{k!r}: checkpoint shape {tuple(v.shape)} != model shape {tuple(state[k].shape)}"
            )
        if state[k].dtype != v.dtype:
            raise CheckpointError(
                f"{k!r}: checkpoint dtype {v.dtype} != model dtype {state[k].dtype}; tensors "
                "are never cast on load: convert the model (or the file) to the saved dtype"
            )
    opt_state = _optimizer_state(opt, record, tensors, meta, src) if opt is not None else None
    _apply(state, load, opt, opt_state, src)
    return LoadResult(
        path=src,
        loaded=tuple(load),
        optimizer=opt is not None,
        frozen=int(meta.get("gradgate.frozen_count", "0") or 0),
        fingerprint=meta.get("gradgate.frozen_fingerprint", ""),
        saved_with=f"gradgate {meta.get('gradgate.version', '?')}, "
        f"torch {meta.get('torch.version', '?')}",
        metadata=meta,
    )


def _apply(
    state: Mapping[str, torch.Tensor],
    load: Mapping[str, torch.Tensor],
    opt: torch.optim.Optimizer | None,
    opt_state: dict[str, Any] | None,
    src: Path,
) -> None:
    """Write everything or nothing: on any failure, model and optimizer are restored."""
    backup = {k: state[k].detach().clone() for k in load}
    opt_backup = (
        ({p: dict(s) for p, s in opt.state.items()}, [dict(g) for g in opt.param_groups])
        if opt is not None
        else None
    )
    written: list[str] = []
    try:
        with torch.no_grad():
            for k, v in load.items():
                try:
                    state[k].copy_(v)
                except RuntimeError as e:
                    raise CheckpointError(
                        f"could not write {k!r} from {str(src)!r} into the model ({e}); "
                        "nothing was changed"
                    ) from e
                written.append(k)
        if opt is not None and opt_state is not None:
            opt.load_state_dict(opt_state)
    except BaseException:
        with torch.no_grad():
            for k in written:
                state[k].copy_(backup[k])
        if opt is not None and opt_backup is not None:
            old_state, old_groups = opt_backup
            opt.__setstate__({"state": defaultdict(dict, old_state), "param_groups": old_groups})
        raise


def _optimizer_state(
    optimizer: torch.optim.Optimizer,
    record: ModelState,
    tensors: Mapping[str, torch.Tensor],
    meta: Mapping[str, str],
    src: Path,
) -> dict[str, Any]:
    """The optimizer's ``state_dict`` rebuilt from the file, validated against ``optimizer``."""
    if "gradgate.optimizer" not in meta:
        raise CheckpointError(f"checkpoint {str(src)!r} holds no optimizer state")
    info = _json(meta, "gradgate.optimizer", src)
    try:
        cls, saved_groups, saved_state = info["class"], info["groups"], info["state"]
        saved_names = [list(g["params"]) for g in saved_groups]
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {str(src)!r}: malformed optimizer entry ({e})") from e
    if not isinstance(cls, list) or not set(map(str, cls)) & set(_lineage(optimizer)):
        saved_cls = cls[0] if isinstance(cls, list) and cls else repr(cls)
        raise CheckpointError(
            f"checkpoint {str(src)!r} holds {saved_cls} state; the optimizer "
            f"given is {type(optimizer).__name__}: build the same optimizer class before loading"
        )
    names = dict(record.index.canonical)
    current = [[names.get(id(p), "?") for p in g["params"]] for g in optimizer.param_groups]
    if current != saved_names:
        raise CheckpointError(
            f"optimizer groups differ from the checkpoint's: saved {saved_names}, "
            f"current {current}; rebuild the optimizer (or gg.sync) before loading"
        )
    state: dict[int, dict[str, Any]] = {}
    groups = []
    index = 0
    try:
        for g_saved in saved_groups:
            ids = []
            for pname in g_saved["params"]:
                entry = {k: _decode(s, tensors) for k, s in saved_state.get(pname, {}).items()}
                if entry:
                    state[index] = entry
                ids.append(index)
                index += 1
            options = {k: _decode(s, tensors) for k, s in g_saved["options"].items()}
            groups.append({**options, "params": ids})
    except (KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"checkpoint {str(src)!r}: malformed optimizer entry ({e})") from e
    return {"state": state, "param_groups": groups}
