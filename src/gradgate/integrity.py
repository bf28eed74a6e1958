"""Integrity: a guard that proves nothing frozen changed (digests live in ``hashing``)."""

from __future__ import annotations

import enum
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from operator import getitem, is_not
from types import TracebackType
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.modules.module import (
    register_module_buffer_registration_hook,
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)
from torch.nn.parameter import is_lazy

from ._events import Change, subscribe
from ._index import ModelIndex, gc_paused
from ._optimizers import unwrap_optimizer
from ._options import choice
from ._state import ModelState, TensorEntry, model_entries
from .errors import FrozenTensorChangedError, InvalidArgumentError
from .hashing import fingerprint, named_digest, tensor_digest

__all__ = [
    "Guard",
    "TensorEntry",
    "fingerprint",
    "frozen_entries",
    "frozen_tensors",
    "guard",
    "model_entries",
    "named_digest",
    "tensor_digest",
]


def frozen_entries(index: ModelIndex, buffers: bool) -> list[TensorEntry]:
    """Frozen parameters, then (with ``buffers``) the buffers of frozen modules.

    Example:
        >>> import torch
        >>> from gradgate._index import ModelIndex
        >>> lin = torch.nn.Linear(1, 1).requires_grad_(False)
        >>> [e.name for e in frozen_entries(ModelIndex(lin), buffers=True)]
        ['weight', 'bias']
    """
    return ModelState(index).frozen_entries(buffers)


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
    with gc_paused():
        return [(e.name, e.tensor, e.kind) for e in ModelState(model).frozen_entries(buffers)]


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
    """One frozen tensor under watch: the object, its name's slot, and its baseline."""

    name: str
    tensor: torch.Tensor
    kind: str
    owner: nn.Module
    leaf: str
    position: int
    version: int
    digest: str | None
    lost: bool = False  # no longer anywhere in the model (its module was replaced)


_REPLACED_CAUSE = (
    "another tensor now sits under its name: load_state_dict(..., assign=True), or a new "
    "Parameter/buffer (or module) assigned to the model"
)


class Guard:
    """The live guard returned by ``guard()``; also usable as a context manager.

    While active it follows the model: parameters that gradgate makes
    trainable (``unfreeze``, a schedule, ``sync``) leave its watch at that
    moment, and parameters gradgate freezes join it, with their baseline
    taken at the freeze. A parameter made trainable behind gradgate's back
    (``requires_grad_(True)``) stays watched: if it changes, that is a
    violation.

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
        self._watched: dict[int, _Watched] = {}
        # (parent, key, child) for every module on the path to a watched
        # tensor's owner: a replaced module replaces the names under it.
        self._links: list[tuple[nn.Module, str, nn.Module]] = []
        self._fast: _FastView | None = None  # rebuilt whenever the watch or a baseline changes
        # Set when any module registers a parameter, buffer or submodule (torch's global
        # registration hooks): only then can a name hold another tensor, so only then are
        # names compared on a fast check. Deletions and raw ``_parameters`` writes fire no
        # hook; exact checks and the check on exit compare names always.
        self._renamed = True
        self._handles: list[Any] = []
        self._unsubscribe: Callable[[], None] | None = None
        self._lock = threading.RLock()
        self._pending: list[str] = []
        self._entered = False
        # Until the guard is entered: a step pre-hook per optimizer that warns that
        # this guard watches nothing (``gg.guard(model, opt)`` without ``with``).
        self._unentered: list[Any] = []

    def _arm(self) -> None:
        """Warn at the first optimizer step, or when dropped, if this guard was never entered."""
        ref = weakref.ref(self)

        def unentered_step(optimizer: torch.optim.Optimizer, *args: Any) -> None:
            guard = ref()
            if guard is not None and not guard._entered:
                guard._warn_unentered("an optimizer step ran")

        self._unentered = [opt.register_step_pre_hook(unentered_step) for opt in self.optimizers]

    def _warn_unentered(self, when: str) -> None:
        for h in self._unentered:
            h.remove()
        self._unentered = []
        if self._entered:
            return
        self._entered = True  # warn once
        warnings.warn(
            f"{when} but gg.guard({type(self.model).__name__}, ...) was never entered, so it "
            "watches nothing: use it as `with gg.guard(model, optimizer):` around the "
            "training loop (or call its __enter__/__exit__)",
            RuntimeWarning,
            stacklevel=4,
        )

    def __del__(self) -> None:
        if not getattr(self, "_entered", True):
            self._warn_unentered("the guard was dropped")

    def _watch(self, entries: Sequence[TensorEntry], state: ModelState) -> None:
        exact = self.check_mode is not Check.FAST
        for e in entries:
            if id(e.tensor) in self._watched:
                continue
            if is_lazy(e.tensor):
                raise InvalidArgumentError(
                    f"guard cannot watch frozen {e.kind} {e.name!r}: it is an uninitialised "
                    "lazy parameter (no values yet); run one forward pass first"
                )
            self._watched[id(e.tensor)] = _Watched(
                name=e.name,
                tensor=e.tensor,
                kind=e.kind,
                owner=e.owner,
                leaf=e.leaf,
                position=e.position,
                version=e.tensor._version,
                # Buffers get a baseline in every mode: DDP rewrites them in place with the
                # same values at each forward on some torch versions (2.8 bumps the version).
                digest=named_digest(e.name, e.tensor) if exact or e.kind == "buffer" else None,
            )
        self._relink(state)

    def _relink(self, state: ModelState) -> None:
        # Positions change when modules come and go: take each tensor's place afresh.
        index = state.index
        place = {id(e.tensor): e for e in state.entries()}
        needed: set[int] = set()
        for w in self._watched.values():
            e = place.get(id(w.tensor))
            if e is None:
                w.lost = True
                continue
            w.owner, w.leaf, w.position = e.owner, e.leaf, e.position
            i = w.position
            while i > 0 and i not in needed:
                needed.add(i)
                i = index.parent[i]
        self._links = [
            (index.mods[index.parent[i]], index.names[i].rpartition(".")[2], index.mods[i])
            for i in sorted(needed)
        ]
        self._fast = None

    def __enter__(self) -> Guard:
        for h in self._unentered:
            h.remove()
        self._unentered = []
        with self._lock, gc_paused():
            self._entered = True
            state = ModelState(self.model)
            self._watched = {}
            self._watch(state.frozen_entries(self.buffers), state)
        self._unsubscribe = subscribe(self._on_change)
        self._handles += [
            register_module_parameter_registration_hook(self._on_register),
            register_module_buffer_registration_hook(self._on_register),
            register_module_module_registration_hook(self._on_register),
        ]
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
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if exc_type is None:
            self.check(exact=self.check_mode is not Check.FAST, where="on exit")

    def _on_register(self, module: nn.Module, name: str, value: Any) -> None:
        self._renamed = True

    def _on_change(self, change: Change) -> None:
        """Follow a change gradgate announced: unfrozen tensors leave, frozen ones join."""
        with self._lock, gc_paused():
            unfrozen = {id(p) for p in change.unfrozen}
            for key in [k for k, w in self._watched.items() if id(w.tensor) in unfrozen]:
                del self._watched[key]
            self._fast = None
            if not (change.frozen or change.unfrozen):
                return
            state = ModelState(self.model)
            current = state.frozen_entries(self.buffers)
            if change.unfrozen and self.buffers:
                # Buffers follow their module: once it trains (through gradgate) they may move.
                still = {id(e.tensor) for e in current}
                for key in [
                    k for k, w in self._watched.items() if w.kind == "buffer" and k not in still
                ]:
                    del self._watched[key]
            try:
                self._watch(current, state)
            except InvalidArgumentError as e:
                # The change itself is done; a listener must not make it look failed.
                self._pending.append(str(e))

    def _after_step(self, optimizer: torch.optim.Optimizer, *args: Any) -> None:
        self.steps += 1
        exact = self.check_mode is not Check.FAST and self.steps % self.every == 0
        where = f"after optimizer step {self.steps}"
        self._check(exact, where, stepped=optimizer, names=False)

    def check(self, exact: bool | None = None, where: str = "on demand") -> None:
        """Compare every watched tensor (and what its name holds) with its baseline now.

        Args:
            exact: also compare fingerprints (default: as the guard's ``check``).
            where: words used in the message to say when the check ran.

        Raises:
            FrozenTensorChangedError: a frozen tensor changed (``on_violation="raise"``).
            InvalidArgumentError: a tensor frozen while the guard was active
                cannot be watched (an uninitialised lazy parameter).
        """
        self._check(exact, where, stepped=None, names=True)

    def _check(
        self,
        exact: bool | None,
        where: str,
        stepped: torch.optim.Optimizer | None,
        names: bool,
    ) -> None:
        if exact is None:
            exact = self.check_mode is not Check.FAST
        versions = self.check_mode is not Check.EXACT
        with self._lock:
            if self._pending:
                message = self._pending.pop(0)
                raise InvalidArgumentError(message)
            # Read and clear before comparing: a registration from now on is seen next time.
            names = names or self._renamed
            self._renamed = False
            if not exact:
                if self._fast is None:
                    self._fast = _FastView(self._watched.values(), self._links)
                if self._fast.unchanged(versions, names=names):
                    return
            moved = any(_slot(up._modules, key) is not down for up, key, down in self._links)
            moved = moved or any(w.lost for w in self._watched.values())
            # A replaced module replaces every name under it: resolve names afresh then.
            now_state = ModelState(self.model) if moved else None
            resolved = (
                {e.name: e.tensor for e in now_state.entries()} if now_state is not None else None
            )
            replaced = False
            try:
                for w in list(self._watched.values()):
                    if resolved is not None:
                        now = resolved.get(w.name)
                    else:
                        now = _slot(
                            w.owner._parameters if w.kind == "parameter" else w.owner._buffers,
                            w.leaf,
                        )
                    if now is not w.tensor:
                        replaced = True
                        self._violation(
                            w, "replaced" if now is not None else "removed", where, stepped
                        )
                        continue
                    bumped = w.tensor._version != w.version
                    if exact and w.digest is not None:
                        if tensor_digest(w.tensor) != w.digest:
                            self._violation(
                                w, "bumped" if bumped else "unversioned", where, stepped
                            )
                    elif versions and bumped:
                        if w.kind == "buffer" and tensor_digest(w.tensor) == w.digest:
                            # rewritten with the very same values (DDP's buffer broadcast)
                            w.version = w.tensor._version
                            self._fast = None
                        else:
                            self._violation(w, "bumped", where, stepped)
            finally:
                if replaced:  # watch what the names hold now; report a replacement once
                    self._rebase(now_state)

    def _cause(self, w: _Watched, how: str, stepped: torch.optim.Optimizer | None) -> str:
        if how == "replaced":
            return f"Likely cause: {_REPLACED_CAUSE}"
        if how == "removed":
            return (
                "Likely cause: its name no longer holds a tensor (deleted, set to None, or its "
                "module replaced)"
            )
        if w.kind == "buffer" and w.owner.training:
            return (
                f"Likely cause: {type(w.owner).__name__} is in training mode and updates its "
                "running statistics (frozen with mode='keep', or .train() called on it); "
                "freeze with mode='eval'"
            )
        if how == "unversioned":
            return (
                "Likely cause: a write through .data or another path that bypasses autograd's "
                "version counter"
            )
        if w.kind == "buffer":
            return (
                "Likely cause: an in-place write to the buffer (load_state_dict, copy_, or "
                "custom code)"
            )
        holders = [stepped] if stepped is not None else []
        holders += [o for o in self.optimizers if o is not stepped]
        for opt in holders:
            for group in opt.param_groups:
                if any(p is w.tensor for p in group["params"]):
                    return _held_cause(w.tensor, opt, group, stepped is opt)
        return (
            "No optimizer under the guard holds it. Likely cause: an in-place write "
            "(load_state_dict, copy_, or a custom update)"
        )

    def _violation(
        self, w: _Watched, how: str, where: str, stepped: torch.optim.Optimizer | None
    ) -> None:
        what = {
            "replaced": "was replaced by another tensor",
            "removed": "was removed",
            "bumped": "was written in place",
            "unversioned": "its values changed without an in-place version bump",
        }[how]
        behind = ""
        if w.kind == "parameter" and w.tensor.requires_grad:
            behind = (
                " It was made trainable outside gradgate (requires_grad_(True)), so the guard "
                "kept watching it; make parts trainable with gg.unfreeze (or enter a new "
                "guard after the change) to let them train under a guard."
            )
        cause = self._cause(w, how, stepped)
        msg = f"frozen {w.kind} {w.name!r} changed {where}: {what}. {cause}.{behind}"
        # Each change is reported once: what it left becomes the new baseline.
        self._fast = None
        w.version = w.tensor._version
        if w.digest is not None and how not in ("replaced", "removed"):
            w.digest = tensor_digest(w.tensor)
        if self.on_violation is OnViolation.RAISE:
            raise FrozenTensorChangedError(msg)
        self.violations.append(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def _rebase(self, state: ModelState | None) -> None:
        """After a reported replacement (warn mode), watch what the names hold now."""
        if state is None:
            state = ModelState(self.model)
        names = {w.name for w in self._watched.values()}
        self._watched = {}
        entries = state.entries()
        self._watch([e for e in entries if e.name in names], state)


def _held_cause(
    tensor: torch.Tensor, opt: torch.optim.Optimizer, group: dict[str, Any], stepped: bool
) -> str:
    """What is known when an optimizer holds the changed tensor; a cause only where it is sure.

    Torch's optimizers (all but LBFGS) skip a tensor whose ``grad`` is
    ``None``: then the write came from other code, whatever the optimizer holds.
    """
    name = type(opt).__name__
    state = opt.state.get(tensor, {})
    held = (
        f"{name} still holds it (state: {', '.join(sorted(state)) or 'none'}; "
        f"weight_decay={group.get('weight_decay', 0)})"
    )
    grad = tensor.grad
    skips = type(opt).__module__.startswith("torch.optim") and not isinstance(
        opt, torch.optim.LBFGS
    )
    if grad is None and skips:
        return (
            f"Known: {held}, but it has no gradient and {name} skips a tensor without "
            "one, so the write came from other code (an in-place op on it, copy_, "
            "load_state_dict); still, call gg.sync(optimizer, model) after freezing to take "
            "it out of the optimizer"
        )
    if grad is None:
        kind = "no gradient"
    elif grad.is_sparse or bool(grad.any()):
        kind = "a stale non-zero gradient"
    else:
        kind = "an all-zero gradient"
    if stepped:
        return (
            f"Likely cause: optimizer step (weight decay/momentum with a zero or stale "
            f"gradient): {held} with {kind}, and a step moves such a tensor (weight decay, "
            "momentum, moments); call gg.sync(optimizer, model) after freezing"
        )
    return (
        f"Known: {held} with {kind}; the check did not run right after its step, so "
        f"whether {name}'s step or other code wrote it is unknown; call "
        "gg.sync(optimizer, model) after freezing"
    )


class _FastView:
    """The watch as flat lists, so the per-step check runs in C-level ``map`` calls.

    ``unchanged`` answers only "is everything as it was?"; when it is not,
    the detailed loop finds and explains what changed. Names are compared
    only when something was registered on a module since the last check.
    """

    def __init__(
        self, watched: Iterable[_Watched], links: Sequence[tuple[nn.Module, str, nn.Module]]
    ) -> None:
        ws = list(watched)
        self.lost = any(w.lost for w in ws)
        self.tensors = [w.tensor for w in ws]
        self.held = [w.tensor for w in ws]
        self.versions = [w.version for w in ws]
        self.slots = [
            w.owner._parameters if w.kind == "parameter" else w.owner._buffers for w in ws
        ]
        self.leaves = [w.leaf for w in ws]
        self.link_slots = [up._modules for up, _, _ in links]
        self.link_keys = [key for _, key, _ in links]
        self.link_children = [down for _, _, down in links]

    def unchanged(self, versions: bool, names: bool) -> bool:
        if self.lost:
            return False
        if not names:
            return not versions or [t._version for t in self.tensors] == self.versions
        try:
            if any(map(is_not, map(getitem, self.link_slots, self.link_keys), self.link_children)):
                return False
            if any(map(is_not, map(getitem, self.slots, self.leaves), self.held)):
                return False
        except KeyError:
            return False
        return not versions or [t._version for t in self.tensors] == self.versions


def _slot(slots: Any, key: str) -> Any:
    """``slots[key]`` or None; works on dicts and TorchScript's dict wrappers (no ``.get``)."""
    try:
        return slots[key]
    except KeyError:
        return None


def guard(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
    check: Literal["fast", "exact", "both"] = "fast",
    every: int = 1,
    on_violation: Literal["raise", "warn"] = "raise",
    buffers: bool = True,
) -> Guard:
    """Watch every frozen tensor of ``model`` and fail at the step that changes one.

    Watched: every parameter with ``requires_grad=False`` (however it was
    frozen) and, with ``buffers=True``, the buffers of frozen modules (also
    under ``mode="keep"``, where BatchNorm statistics moving are reported).
    Names are watched, not only tensor objects: a frozen tensor replaced by
    another under its name (``load_state_dict(assign=True)``, a new
    Parameter assigned) is a change. The guard follows gradgate's own
    freezes and unfreezes while it is active (see ``Guard``).

    Args:
        model: the model whose frozen part must not change.
        optimizer: one or several optimizers, or wrappers exposing one as
            ``.optimizer`` (accelerate, Lightning); the guard checks after
            each ``step()`` (a step post-hook). Without one, it checks on
            exit and whenever ``Guard.check()`` is called.
        check: ``"fast"`` compares tensor version counters (near-zero cost;
            misses writes through ``.data``), ``"exact"`` compares SHA-256
            fingerprints every ``every`` steps, ``"both"`` does both.
        every: exact comparisons run every this many steps (and on exit).
        on_violation: ``"raise"`` (``FrozenTensorChangedError``) or ``"warn"``.
        buffers: also watch buffers of frozen modules.

    Returns:
        A ``Guard``, to be used as a context manager. One never entered
        watches nothing: it warns (``RuntimeWarning``) at the first step of
        its optimizer, or when it is dropped.

    Raises:
        InvalidArgumentError: a bad option, something that is not an
            optimizer, or a frozen tensor without values (lazy, meta).

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
        ... except gg.FrozenTensorChangedError as e:
        ...     print(str(e)[:51])
        frozen parameter '0.weight' changed after optimizer
    """
    check_e: Check = choice(Check, "check", check)
    on_e: OnViolation = choice(OnViolation, "on_violation", on_violation)
    if not isinstance(every, int) or every < 1:
        raise InvalidArgumentError(f"every must be a positive int; got {every!r}")
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"guard expects a torch.nn.Module; got {type(model).__name__}")
    if optimizer is None:
        given: list[object] = []
    elif isinstance(optimizer, (list, tuple)):
        given = list(optimizer)
    else:
        given = [optimizer]
    opts = [unwrap_optimizer(o) for o in given]
    watch = Guard(model, opts, check_e, every, on_e, buffers)
    watch._arm()
    return watch
