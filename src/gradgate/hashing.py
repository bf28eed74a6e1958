"""Hashing: exact digests of tensors and fingerprints of models (no watching: see ``integrity``).

A digest covers a tensor's dtype, shape and bytes (device independent);
a fingerprint covers the names, dtypes, shapes and values of a model's
parameters and buffers, or of any named tensors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from ._index import gc_paused
from ._state import ModelState
from .errors import InvalidArgumentError

__all__ = ["TensorSource", "fingerprint", "named_digest", "tensor_digest"]

TensorSource = nn.Module | Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]


def tensor_digest(t: torch.Tensor, hasher: Any = None) -> str:
    """SHA-256 of one tensor's dtype, shape and bytes (device independent).

    For a DTensor (FSDP2) it digests this rank's local shard; a sparse tensor
    is digested by its layout, coalesced indices and values.

    Raises:
        InvalidArgumentError: the tensor has no values (meta device, or an
            uninitialised lazy parameter).

    Example:
        >>> import torch
        >>> tensor_digest(torch.ones(2)) == tensor_digest(torch.ones(2, dtype=torch.float32))
        True
        >>> tensor_digest(torch.ones(2)) == tensor_digest(torch.ones(2, dtype=torch.float64))
        False
    """
    h = hasher if hasher is not None else hashlib.sha256()
    if is_lazy(t):
        raise InvalidArgumentError(
            "cannot fingerprint an uninitialised lazy parameter (it has no values yet); "
            "run one forward pass through the lazy module first"
        )
    data = _local(t.detach())
    if data.device.type == "meta":
        raise InvalidArgumentError("cannot fingerprint a tensor on the meta device (no values)")
    if data.layout != torch.strided:
        coo = data.to_sparse_coo().coalesce() if data.layout != torch.sparse_coo else data
        coo = coo.coalesce()
        h.update(f"{data.layout}|{data.dtype}|{tuple(data.shape)}|".encode())
        _update_bytes(h, coo.indices())
        _update_bytes(h, coo.values())
        return str(h.hexdigest())
    h.update(f"{data.dtype}|{tuple(data.shape)}|".encode())
    _update_bytes(h, data)
    return str(h.hexdigest())


def _update_bytes(h: Any, data: torch.Tensor) -> None:
    if data.numel():
        flat = data.cpu().contiguous().reshape(-1)
        if flat.is_complex():
            flat = torch.view_as_real(flat).reshape(-1)
        h.update(flat.view(torch.uint8).numpy().data)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2); any other tensor as it is."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _named_tensors(obj: TensorSource) -> list[tuple[str, torch.Tensor]]:
    if isinstance(obj, nn.Module):
        with gc_paused():
            return [(e.name, e.tensor) for e in ModelState(obj).entries()]
    if isinstance(obj, Mapping):
        pairs = list(obj.items())
    elif isinstance(obj, Iterable) and not isinstance(obj, (str, bytes, torch.Tensor)):
        pairs = list(obj)
    else:
        raise InvalidArgumentError(
            f"fingerprint(obj) needs a module, a {{name: tensor}} mapping or (name, tensor) "
            f"pairs; got obj={obj!r:.80}"
        )
    for i, pair in enumerate(pairs):
        if not (
            isinstance(pair, (tuple, list))
            and len(pair) == 2
            and isinstance(pair[0], str)
            and isinstance(pair[1], torch.Tensor)
        ):
            raise InvalidArgumentError(
                f"fingerprint(obj) needs (name, tensor) pairs, but entry {i} of obj is "
                f"{pair!r:.80}; pass a module, a {{name: tensor}} mapping or "
                "model.named_parameters()"
            )
    return [(name, t) for name, t in pairs]


def fingerprint(obj: TensorSource) -> str:
    """Exact digest of names, dtypes, shapes and values; equal on CPU and GPU copies.

    Args:
        obj: a module (its parameters and buffers), a ``{name: tensor}``
            mapping, or an iterable of ``(name, tensor)`` pairs.

    Returns:
        A hex SHA-256 string; any changed bit, name, shape or dtype changes it.

    Raises:
        InvalidArgumentError: ``obj`` is none of these, or a tensor has no
            values (an uninitialised lazy parameter, the meta device); the
            message names it.

    Example:
        >>> import torch, gradgate as gg
        >>> lin = torch.nn.Linear(2, 2)
        >>> before = gg.fingerprint(lin)
        >>> with torch.no_grad():
        ...     lin.bias.data[0] += 1
        >>> gg.fingerprint(lin) == before
        False
    """
    h = hashlib.sha256()
    for name, t in _named_tensors(obj):
        h.update(name.encode() + b"\0")
        named_digest(name, t, h)
    return h.hexdigest()


def named_digest(name: str, t: torch.Tensor, hasher: Any = None) -> str:
    """``tensor_digest`` whose error names the tensor.

    Example:
        >>> import torch
        >>> named_digest("w", torch.ones(1)) == tensor_digest(torch.ones(1))
        True
    """
    try:
        return tensor_digest(t, hasher)
    except InvalidArgumentError as e:
        raise InvalidArgumentError(f"{name!r}: {e}") from None
