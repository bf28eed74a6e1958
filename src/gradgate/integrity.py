"""Integrity: exact fingerprints, and a guard that proves nothing frozen changed."""

from __future__ import annotations

import enum
import hashlib
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
from torch import nn

from . import subtensor
from ._options import choice
from .errors import FrozenTensorChanged, InvalidArgumentError
from .freezing import frozen_modules

__all__ = ["Guard", "fingerprint", "frozen_tensors", "guard", "tensor_digest"]

TensorSource = nn.Module | Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]


def tensor_digest(t: torch.Tensor, hasher: Any = None) -> str:
    """SHA-256 of one tensor's dtype, shape and bytes (device independent).

    For a DTensor (FSDP2) it digests this rank's local shard.

    Example:
        >>> import torch
        >>> tensor_digest(torch.ones(2)) == tensor_digest(torch.ones(2, dtype=torch.float32))
        True
        >>> tensor_digest(torch.ones(2)) == tensor_digest(torch.ones(2, dtype=torch.float64))
        False
    """
    h = hasher if hasher is not None else hashlib.sha256()
    data = _local(t.detach())
    if data.device.type == "meta":
        raise InvalidArgumentError("cannot fingerprint a tensor on the meta device (no values)")
    h.update(f"{data.dtype}|{tuple(data.shape)}|".encode())
    if data.numel():
        flat = data.cpu().contiguous().reshape(-1)
        if flat.is_complex():
            flat = torch.view_as_real(flat).reshape(-1)
        h.update(flat.view(torch.uint8).numpy().data)
    return str(h.hexdigest())


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2); any other tensor as it is."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _named_tensors(obj: TensorSource) -> list[tuple[str, torch.Tensor]]:
    if isinstance(obj, nn.Module):
        seen: set[int] = set()
        out: list[tuple[str, torch.Tensor]] = []
        for name, t in [*obj.named_parameters(), *obj.named_buffers()]:
            if id(t) not in seen:
                seen.add(id(t))
                out.append((name, t))
        return out
    if isinstance(obj, Mapping):
        return list(obj.items())
    return list(obj)


def fingerprint(obj: TensorSource) -> str:
    """Exact digest of names, dtypes, shapes and values; equal on CPU and GPU copies.

    Args:
        obj: a module (its parameters and buffers), a ``{name: tensor}``
            mapping, or an iterable of ``(name, tensor)`` pairs.

    Returns:
        A hex SHA-256 string; any changed bit, name, shape or dtype changes it.

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
        tensor_digest(t, h)
    return h.hexdigest()


def frozen_tensors(model: nn.Module, buffers: bool = True) -> list[tuple[str, torch.Tensor, str]]:
    """Every frozen parameter and (optionally) buffer of a frozen module.

    Returns ``(name, tensor, kind)`` with kind ``"parameter"`` or ``"buffer"``;
    tied tensors appear once.

    Example:
        >>> import torch, gradgate as gg
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
        >>> _ = gg.freeze(net, "1")
        >>> [(n, k) for n, _, k in frozen_tensors(net)][:3]
        [('1.weight', 'parameter'), ('1.bias', 'parameter'), ('1.running_mean', 'buffer')]
    """
    out: list[tuple[str, torch.Tensor, str]] = []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            seen.add(id(p))
            out.append((name, p, "parameter"))
    out += subtensor.frozen_row_blocks(model)  # rows (issue 16): frozen rows of partial tensors
    if buffers:
        for mname, module in frozen_modules(model):
            prefix = mname + "." if mname else ""
            for bname, b in module.named_buffers(recurse=False):
                if b is not None and id(b) not in seen:
                    seen.add(id(b))
                    out.append((prefix + bname, b, "buffer"))
    return out


class Check(enum.Enum):
    """How ``guard`` detects a change."""

    FAST = "fast"
    EXACT = "exact"
    BOTH = "both"


class OnViolation(enum.Enum):
    """What ``guard`` does when a frozen tensor changed."""

    RAISE = "raise"
    WARN = "warn"


@dataclass
class _Watched:
    name: str
    tensor: torch.Tensor
    kind: str
    owner: nn.Module
    version: int
    digest: str | None


def _owner_of(model: nn.Module, name: str) -> nn.Module:
    head = name.rpartition(".")[0]
    return model.get_submodule(head) if head else model


class Guard:
    """The live guard returned by ``guard()``; also usable as a context manager.

    Attributes:
        steps: optimizer steps seen so far.
        violations: messages of the violations found (with ``on_violation="warn"``).

    Example:
        >>> import torch, gradgate as gg
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> _ = gg.freeze(net, "0")
        >>> with gg.guard(net) as g:
        ...     pass
        >>> g.violations
        []
    """

    def __init__(
        self,
        model: nn.Module,
        optimizers: Sequence[torch.optim.Optimizer],
        check: Check,
        every: int,
        on_violation: OnViolation,
        buffers: bool,
    ) -> None:
        self.model = model
        self.optimizers = list(optimizers)
        self.check_mode = check
        self.every = every
        self.on_violation = on_violation
        self.buffers = buffers
        self.steps = 0
        self.violations: list[str] = []
        self._watched: list[_Watched] = []
        self._handles: list[Any] = []

    def _snapshot(self) -> None:
        exact = self.check_mode is not Check.FAST
        self._watched = [
            _Watched(
                name=name,
                tensor=t,
                kind=kind,
                owner=_owner_of(self.model, name),
                version=t._version,
                digest=tensor_digest(t) if exact else None,
            )
            for name, t, kind in frozen_tensors(self.model, self.buffers)
        ]

    def __enter__(self) -> Guard:
        self._snapshot()
        for opt in self.optimizers:
            self._handles.append(opt.register_step_post_hook(self._after_step))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if exc_type is None:
            self.check(exact=self.check_mode is not Check.FAST, where="on exit")

    def _after_step(self, optimizer: torch.optim.Optimizer, *args: Any) -> None:
        self.steps += 1
        exact = self.check_mode is not Check.FAST and self.steps % self.every == 0
        self.check(exact=exact, where=f"after optimizer step {self.steps}")

    def check(self, exact: bool | None = None, where: str = "on demand") -> None:
        """Compare every watched tensor with its baseline now.

        Args:
            exact: also compare fingerprints (default: as the guard's ``check``).
            where: words used in the message to say when the check ran.

        Raises:
            FrozenTensorChanged: a frozen tensor changed (``on_violation="raise"``).
        """
        if exact is None:
            exact = self.check_mode is not Check.FAST
        version = self.check_mode is not Check.EXACT
        for w in self._watched:
            how = ""
            if version and w.tensor._version != w.version:
                how = "written in place"
            elif exact and w.digest is not None and tensor_digest(w.tensor) != w.digest:
                how = "its values changed without an in-place version bump"
            if how:
                self._violation(w, how, where)

    def _cause(self, w: _Watched, how: str) -> str:
        if w.kind == "buffer":
            if w.owner.training:
                return (
                    f"{type(w.owner).__name__} is in training mode and updates its running "
                    "statistics (frozen with mode='keep', or .train() called on it); "
                    "freeze with mode='eval'"
                )
            return "an in-place write to the buffer (load_state_dict, copy_, or custom code)"
        if "without" in how:
            return "a write through .data or another path that bypasses autograd's version counter"
        for opt in self.optimizers:
            for group in opt.param_groups:
                if any(p is w.tensor for p in group["params"]):
                    state = opt.state.get(w.tensor, {})
                    keys = ", ".join(sorted(state)) or "none"
                    return (
                        f"{type(opt).__name__} still holds it (state: {keys}; weight_decay="
                        f"{group.get('weight_decay', 0)}) and moves it even with a zero or "
                        "missing gradient; call gg.sync(optimizer, model) after freezing"
                    )
        return "an in-place write (load_state_dict, copy_, or a custom update)"

    def _violation(self, w: _Watched, how: str, where: str) -> None:
        msg = (
            f"frozen {w.kind} {w.name!r} changed {where}: {how}. "
            f"Likely cause: {self._cause(w, how)}"
        )
        if self.on_violation is OnViolation.RAISE:
            raise FrozenTensorChanged(msg)
        self.violations.append(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        w.version = w.tensor._version
        if w.digest is not None:
            w.digest = tensor_digest(w.tensor)


def guard(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
    check: str = "fast",
    every: int = 1,
    on_violation: str = "raise",
    buffers: bool = True,
) -> Guard:
    """Watch every frozen tensor of ``model`` and fail at the step that changes one.

    Watched: every parameter with ``requires_grad=False`` (however it was
    frozen) and, with ``buffers=True``, the buffers of frozen modules (also
    under ``mode="keep"``, where BatchNorm statistics moving are reported).

    Args:
        model: the model whose frozen part must not change.
        optimizer: one or several optimizers; the guard checks after each
            ``step()`` (a step post-hook). Without one, it checks on exit and
            whenever ``Guard.check()`` is called.
        check: ``"fast"`` compares tensor version counters (near-zero cost;
            misses writes through ``.data``), ``"exact"`` compares SHA-256
            fingerprints every ``every`` steps, ``"both"`` does both.
        every: exact comparisons run every this many steps (and on exit).
        on_violation: ``"raise"`` (``FrozenTensorChanged``) or ``"warn"``.
        buffers: also watch buffers of frozen modules.

    Returns:
        A ``Guard``, to be used as a context manager.

    Example:
        >>> import torch, gradgate as gg
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> _ = gg.freeze(net, "0")
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1, weight_decay=0.1)
        >>> net(torch.ones(1, 2)).sum().backward()
        >>> net[0].weight.grad = torch.zeros(2, 2)  # the zero-gradient trap
        >>> try:
        ...     with gg.guard(net, opt):
        ...         opt.step()
        ... except gg.FrozenTensorChanged as e:
        ...     print(str(e)[:51])
        frozen parameter '0.weight' changed after optimizer
    """
    check_e: Check = choice(Check, "check", check)
    on_e: OnViolation = choice(OnViolation, "on_violation", on_violation)
    if not isinstance(every, int) or every < 1:
        raise InvalidArgumentError(f"every must be a positive int; got {every!r}")
    if optimizer is None:
        opts: list[torch.optim.Optimizer] = []
    elif isinstance(optimizer, torch.optim.Optimizer):
        opts = [optimizer]
    else:
        opts = list(optimizer)
    for opt in opts:
        if not isinstance(opt, torch.optim.Optimizer):
            raise InvalidArgumentError(
                f"optimizer must be a torch.optim.Optimizer; got {type(opt).__name__}"
            )
    return Guard(model, opts, check_e, every, on_e, buffers)
