"""Trainable-only checkpoints (safetensors) bound to the fingerprint of the frozen base."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import subtensor
from .errors import CheckpointError, CheckpointKeyError, FingerprintMismatch
from .freezing import frozen_modules
from .integrity import frozen_tensors, tensor_digest

__all__ = [
    "load_trainable",
    "save_trainable",
    "trainable_state",
]

_PER_TENSOR_LIMIT = 20_000  # above this many frozen tensors only the total digest is kept


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters plus buffers of modules that are not frozen, by name.

    Example:
        >>> import torch, gradgate as gg
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
        >>> _ = gg.freeze(net, "0")
        >>> sorted(trainable_state(net))[:3]
        ['1.bias', '1.num_batches_tracked', '1.running_mean']
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if p.requires_grad:
            seen.add(id(p))
            out[name] = p
    out.update(subtensor.trainable_rows_state(model))  # rows (issue 16): rows and their numbers
    frozen = {id(m) for _, m in frozen_modules(model)}
    for mname, module in model.named_modules():
        if id(module) in frozen:
            continue
        prefix = mname + "." if mname else ""
        for bname, b in module.named_buffers(recurse=False):
            if b is not None and id(b) not in seen:
                seen.add(id(b))
                out[prefix + bname] = b
    return out


def _frozen_digests(model: nn.Module) -> tuple[str, dict[str, str]]:
    import hashlib

    total = hashlib.sha256()
    per: dict[str, str] = {}
    for name, t, _ in frozen_tensors(model):
        d = tensor_digest(_full(t))
        per[name] = d
        total.update(f"{name}\0{d}\n".encode())
    return total.hexdigest(), per


def _optimizer_payload(
    optimizer: torch.optim.Optimizer, model: nn.Module
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    names = {id(p): n for n, p in model.named_parameters()}
    names.update({id(r): names[k] for k, r in subtensor.trainable_of(model).items()})  # rows
    tensors: dict[str, torch.Tensor] = {}
    groups: list[dict[str, Any]] = []
    scalars: dict[str, dict[str, Any]] = {}
    for group in optimizer.param_groups:
        opts = {
            k: v
            for k, v in group.items()
            if k != "params" and isinstance(v, (int, float, bool, str, type(None), list, tuple))
        }
        try:
            pnames = [names[id(p)] for p in group["params"]]
        except KeyError as e:
            raise CheckpointError(
                "the optimizer holds a parameter that is not part of the model"
            ) from e
        groups.append({"params": pnames, **opts})
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                pname = names[id(p)]
                if isinstance(value, torch.Tensor):
                    tensors[f"__optim__.{pname}.{key}"] = value
                else:
                    scalars.setdefault(pname, {})[key] = value
    return tensors, {"groups": groups, "scalars": scalars}


def save_trainable(
    model: nn.Module, path: str | os.PathLike[str], optimizer: torch.optim.Optimizer | None = None
) -> Path:
    """Write only what trains (and the optimizer state) to a safetensors file.

    The frozen rest is not stored: its fingerprint is, so loading onto a
    different frozen base fails loudly. The file is written atomically.
    Under ``torch.distributed`` every rank must call it (FSDP2 shards are
    gathered); rank 0 writes.

    Args:
        model: the model whose trainable tensors are saved.
        path: destination ``.safetensors`` file.
        optimizer: optionally, an optimizer whose state and groups are saved
            by parameter name.

    Returns:
        The path written.

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
    state = {k: _full(v) for k, v in trainable_state(model).items()}
    total, per = _frozen_digests(model)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    metadata = {
        "gradgate.format": "1",
        "gradgate.version": _version(),
        "torch.version": torch.__version__,
        "gradgate.frozen_fingerprint": total,
        "gradgate.frozen_count": str(len(per)),
        "gradgate.trainable": json.dumps(sorted(state)),
    }
    if len(per) <= _PER_TENSOR_LIMIT:
        metadata["gradgate.frozen_digests"] = json.dumps(per)
    if optimizer is not None:
        opt_tensors, opt_meta = _optimizer_payload(optimizer, model)
        tensors.update({k: v.detach().cpu().contiguous().clone() for k, v in opt_tensors.items()})
        metadata["gradgate.optimizer"] = json.dumps(opt_meta)
    dest = Path(path)
    if not _is_writer():
        return dest  # under torch.distributed only rank 0 writes (all ranks gathered)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        st.save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
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
    from . import __version__

    return __version__


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
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
    if meta.get("gradgate.format") != "1":
        raise CheckpointError(f"{str(path)!r} is not a gradgate trainable-only checkpoint")
    return tensors, meta


def _check_base(model: nn.Module, meta: Mapping[str, str], path: Path) -> None:
    total, per = _frozen_digests(model)
    if total == meta["gradgate.frozen_fingerprint"]:
        return
    detail = ""
    if "gradgate.frozen_digests" in meta:
        saved: dict[str, str] = json.loads(meta["gradgate.frozen_digests"])
        changed = [n for n in per if n in saved and saved[n] != per[n]]
        missing = [n for n in saved if n not in per]
        extra = [n for n in per if n not in saved]
        parts = []
        if changed:
            parts.append("values differ: " + ", ".join(changed[:8]))
        if missing:
            parts.append("frozen in the checkpoint's base only: " + ", ".join(missing[:8]))
        if extra:
            parts.append("frozen in this model only: " + ", ".join(extra[:8]))
        detail = " (" + "; ".join(parts) + ")"
    raise FingerprintMismatch(
        f"checkpoint {str(path)!r} was saved on a different frozen base{detail}; "
        "load it onto the model it was trained with, or pass strict=False"
    )


def load_trainable(
    model: nn.Module,
    path: str | os.PathLike[str],
    optimizer: torch.optim.Optimizer | None = None,
    strict: bool = True,
) -> dict[str, Any]:
    """Load a ``save_trainable`` file into ``model`` (and ``optimizer``).

    Everything is read and checked before anything is written, so a failed
    load leaves the model and optimizer exactly as they were.

    Args:
        model: the model to load into; its trainable set must match the file.
        path: the ``.safetensors`` file.
        optimizer: optionally, an optimizer built over the same parameters.
        strict: check the frozen base's fingerprint and require exactly the
            same trainable names.

    Returns:
        The checkpoint's metadata.

    Raises:
        FingerprintMismatch: the frozen base differs (naming what differs).
        CheckpointKeyError: missing or unexpected trainable tensors.
        CheckpointError: a truncated, corrupted or foreign file, or a shape mismatch.

    Example:
        >>> import tempfile, os, torch, gradgate as gg
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> _ = gg.freeze(net, "0")
        >>> p = gg.save_trainable(net, os.path.join(tempfile.mkdtemp(), "h.safetensors"))
        >>> _ = gg.load_trainable(net, p)
    """
    src = Path(path)
    tensors, meta = _read(src)
    if strict:
        _check_base(model, meta, src)
    state = trainable_state(model)
    sharded = [k for k, v in state.items() if callable(getattr(v, "full_tensor", None))]
    if sharded:
        raise CheckpointError(
            f"loading into FSDP2-sharded parameters ({sharded[0]!r}, ...) is not supported; "
            "load_trainable before fully_shard"
        )
    saved = {k: v for k, v in tensors.items() if not k.startswith("__optim__.")}
    missing = [k for k in state if k not in saved]
    unexpected = [k for k in saved if k not in state]
    if strict and (missing or unexpected):
        raise CheckpointKeyError(
            f"checkpoint {str(src)!r} does not match the model's trainable set: "
            f"missing {missing or 'none'}, unexpected {unexpected or 'none'}"
        )
    for k, v in saved.items():
        if k in state and state[k].shape != v.shape:
            raise CheckpointError(
                f"{k!r}: checkpoint shape {tuple(v.shape)} != model shape {tuple(state[k].shape)}"
            )
    subtensor.check_rows(state, saved)  # rows (issue 16): the file's rows are the model's
    opt_state: dict[str, Any] | None = None
    if optimizer is not None:
        opt_state = _optimizer_state(optimizer, model, tensors, meta, src)
    with torch.no_grad():
        for k, v in saved.items():
            if k in state:
                state[k].copy_(v)
    subtensor.write_back_all(model)  # rows (issue 16): loaded rows reach W at once
    if optimizer is not None and opt_state is not None:
        optimizer.load_state_dict(opt_state)
    return meta


def _optimizer_state(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    meta: Mapping[str, str],
    src: Path,
) -> dict[str, Any]:
    if "gradgate.optimizer" not in meta:
        raise CheckpointError(f"checkpoint {str(src)!r} holds no optimizer state")
    info = json.loads(meta["gradgate.optimizer"])
    names = {id(p): n for n, p in model.named_parameters()}
    names.update({id(r): names[k] for k, r in subtensor.trainable_of(model).items()})  # rows
    current = [[names.get(id(p), "?") for p in g["params"]] for g in optimizer.param_groups]
    saved_groups = [g["params"] for g in info["groups"]]
    if current != saved_groups:
        raise CheckpointError(
            f"optimizer groups differ from the checkpoint's: saved {saved_groups}, "
            f"current {current}; rebuild the optimizer (or gg.sync) before loading"
        )
    state: dict[int, dict[str, Any]] = {}
    groups = []
    index = 0
    for g_saved in info["groups"]:
        ids = []
        for pname in g_saved["params"]:
            entry: dict[str, Any] = dict(info["scalars"].get(pname, {}))
            prefix = f"__optim__.{pname}."
            for key, value in tensors.items():
                if key.startswith(prefix):
                    entry[key[len(prefix) :]] = value
            if entry:
                state[index] = entry
            ids.append(index)
            index += 1
        groups.append({**{k: v for k, v in g_saved.items() if k != "params"}, "params": ids})
    return {"state": state, "param_groups": groups}
