"""Sub-tensor freezing: train some rows (dim 0) of a parameter and hold the others fixed.

A partially frozen parameter ``W`` stays the module's parameter (same object,
name, shape and ``state_dict`` key; the forward is untouched). Its trainable
rows live in a small leaf ``R`` (``k x ...``) kept outside the module's
parameter registry, which ``gg.trainable_parameters`` hands to the optimizer
under ``W``'s name, so optimizer state covers only those rows:

- ``W.requires_grad`` stays True so autograd reaches it; a post-accumulate
  hook on ``W`` moves ``W.grad[rows]`` into ``R.grad`` and drops ``W.grad``
  at once. An optimizer given ``W`` anyway skips it (its grad is None), so
  neither momentum nor weight decay can move a frozen row.
- ``R``'s values reach ``W`` by an ``index_copy_`` of the ``k`` rows after
  every optimizer step (a global step post-hook, registered the first time
  rows are used), before every forward of a module that uses ``W`` and before
  ``state_dict``. The write goes through ``.data`` and touches only trainable
  rows, so the version counter and the digest of the frozen rows never move:
  ``guard`` and ``fingerprint`` watch the frozen rows as views of ``W``.

The state (a ``PartialRows``) lives in the ``__dict__`` of every module that
owns ``W``, so it follows ``copy.deepcopy`` and pickling of the model.
"""

from __future__ import annotations

import copy
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ._events import Change, announce
from ._index import ModelIndex, is_float
from .errors import CheckpointError, InvalidArgumentError
from .selection import Selector, SelectorItem, describe_selectors, resolve

__all__ = ["PartialRows", "RowIndex", "Rows", "partials", "rows"]

RowIndex = Union[Sequence[int], Sequence[bool], slice, range, torch.Tensor]  # noqa: UP007
"""What ``gg.rows`` accepts as ``index``: ints, a slice, a bool mask or an integer tensor."""

_REGISTRY = "_gradgate_rows"  # key in an owning module's __dict__: {param name: PartialRows}
_ROWS_KEY = "__rows__."  # checkpoint key prefix of a partial tensor's row indices


class Rows(SelectorItem):
    """A selector item naming rows (dim 0) of the parameters another selector matches.

    Made by ``gg.rows``; accepted wherever a selector is (``select``,
    ``freeze``, ``unfreeze``, ``train_only``).

    Example:
        >>> import gradgate as gg
        >>> gg.rows("embed.weight", [3, 4])
        rows('embed.weight', [3, 4])
    """

    __slots__ = ("index", "selector")

    def __init__(self, selector: Selector, index: RowIndex) -> None:
        self.selector = selector
        self.index = index

    def __repr__(self) -> str:
        return f"rows({describe_selectors([self.selector])}, {_describe_index(self.index)})"


def rows(selector: Selector, index: RowIndex) -> Rows:
    """Name rows (dim 0) of the parameters ``selector`` matches, as a selector item.

    ``train_only(model, rows("embed.weight", new_ids))`` trains just those
    rows; ``freeze(model, rows("fc.weight", slice(0, 1000)))`` holds those
    rows fixed while the rest trains. The index is checked against each
    matched tensor when the item is used; every problem raises before the
    model changes.

    Args:
        selector: any selector (usually a parameter name); every parameter it
            matches must have the same number of rows.
        index: a list of row numbers (negative ones count from the end), a
            ``slice`` or ``range``, a bool mask with one entry per row, or a
            1-D integer ``torch.Tensor``.

    Returns:
        A ``Rows`` selector item.

    Example:
        >>> import torch, gradgate as gg
        >>> emb = torch.nn.Embedding(10, 4)
        >>> _ = gg.train_only(emb, gg.rows("weight", [8, 9]))
        >>> [(n, tuple(p.shape)) for n, p in gg.named_trainable_parameters(emb)]
        [('weight', (2, 4))]
    """
    if isinstance(index, (str, bytes)) or not isinstance(
        index, (Sequence, slice, range, torch.Tensor)
    ):
        raise InvalidArgumentError(
            f"rows({selector!r}, ...): index must be a list of ints, a slice, a bool mask "
            f"or an integer tensor; got {type(index).__name__}"
        )
    return Rows(selector, index)


def _describe_index(index: object) -> str:
    if isinstance(index, torch.Tensor):
        return f"tensor({tuple(index.shape)}, {index.dtype})"
    text = repr(index)
    return text if len(text) <= 60 else text[:57] + "..."


def normalise_index(index: object, n_rows: int, what: str) -> torch.Tensor:
    """Turn a row index into sorted unique row numbers (a CPU int64 tensor).

    Example:
        >>> normalise_index([3, -1, 3], 5, "w").tolist()
        [3, 4]
        >>> normalise_index(slice(1, None, 2), 5, "w").tolist()
        [1, 3]
    """
    if isinstance(index, slice):
        try:
            picked = torch.arange(n_rows)[index]
        except ValueError as e:
            raise InvalidArgumentError(f"{what}: invalid slice {index!r}: {e}") from e
    elif isinstance(index, range):
        picked = torch.tensor(list(index), dtype=torch.int64)
    elif isinstance(index, torch.Tensor):
        picked = index.detach().cpu()
        if picked.dim() != 1:
            raise InvalidArgumentError(
                f"{what}: a row index tensor must be 1-D; got shape {tuple(picked.shape)}"
            )
        if picked.dtype == torch.bool:
            picked = _from_mask(picked, n_rows, what)
        elif picked.is_floating_point() or picked.is_complex():
            raise InvalidArgumentError(
                f"{what}: a row index tensor must hold integers or bools; got {picked.dtype}"
            )
        else:
            picked = picked.to(torch.int64)
    else:
        items = list(index)  # type: ignore[call-overload]
        if items and all(isinstance(i, bool) for i in items):
            picked = _from_mask(torch.tensor(items, dtype=torch.bool), n_rows, what)
        else:
            bad = [i for i in items if isinstance(i, bool) or not isinstance(i, int)]
            if bad:
                raise InvalidArgumentError(
                    f"{what}: row numbers must be ints (or all bools, a mask); got {bad[0]!r}"
                )
            picked = torch.tensor(items, dtype=torch.int64)
    if picked.numel() == 0:
        raise InvalidArgumentError(f"{what}: the row index selects no row; name at least one")
    out_of_range = picked[(picked < -n_rows) | (picked >= n_rows)]
    if out_of_range.numel():
        raise InvalidArgumentError(
            f"{what}: row {int(out_of_range[0])} is out of range for a tensor with "
            f"{n_rows} rows (valid: 0..{n_rows - 1}, or -{n_rows}..-1 from the end)"
        )
    rows_: torch.Tensor = torch.unique(torch.where(picked < 0, picked + n_rows, picked))
    return rows_


def _from_mask(mask: torch.Tensor, n_rows: int, what: str) -> torch.Tensor:
    if mask.numel() != n_rows:
        raise InvalidArgumentError(
            f"{what}: a bool mask needs one entry per row ({n_rows}); got {mask.numel()}"
        )
    return mask.nonzero().reshape(-1)


# Partials alive in this process, for the optimizer step post-hook; a weak set
# so a dropped model takes its partials with it.
_live: weakref.WeakSet[PartialRows] = weakref.WeakSet()
_step_hook: RemovableHandle | None = None
_step_hook_lock = threading.Lock()


# Who averages a partial tensor's row gradient across ranks (gg.distributed.wrap
# sets it); weak keys, so a released or dropped partial takes its entry along.
GradReducer = Callable[["PartialRows", torch.Tensor], None]
"""What ``set_grad_reducer`` accepts: called as ``reducer(part, R.grad)``."""
_reducers: weakref.WeakKeyDictionary[PartialRows, GradReducer] = weakref.WeakKeyDictionary()


def set_grad_reducer(part: PartialRows, reducer: GradReducer) -> None:
    """Call ``reducer(part, R.grad)`` each time a backward has filled ``R.grad``.

    The distributed wrapper uses it to all-reduce the trainable rows' gradient
    (``k x ...``) instead of ``W``'s full one; a later call replaces the reducer.

    Example:
        >>> import torch, gradgate as gg
        >>> lin = torch.nn.Linear(3, 4)
        >>> _ = gg.train_only(lin, gg.rows("weight", [0]))
        >>> part = partials(lin)[id(lin.weight)]
        >>> set_grad_reducer(part, lambda part, grad: grad.mul_(0.5))
        >>> lin(torch.ones(1, 3)).sum().backward()
        >>> part.trainable.grad.tolist()
        [[0.5, 0.5, 0.5]]
    """
    _reducers[part] = reducer


def _after_any_step(optimizer: torch.optim.Optimizer, *args: Any) -> None:
    # Fused optimizers update in place without bumping version counters, so
    # every live partial is written back (k rows each): cheap and always right.
    for part in list(_live):
        part.write_back()


def _ensure_step_hook() -> None:
    global _step_hook
    with _step_hook_lock:
        if _step_hook is None:
            from torch.optim.optimizer import register_optimizer_step_post_hook

            _step_hook = register_optimizer_step_post_hook(_after_any_step)


class _WriteBack:
    """Forward / state_dict pre-hook of a module using ``W``: bring ``W`` up to date.

    An object rather than a closure so that ``copy.deepcopy`` of the model
    gives the copy a hook bound to the copied partial.
    """

    def __init__(self, part: PartialRows) -> None:
        self.part = part

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        self.part.write_back()


class _ReadBack:
    """Load-state-dict post-hook: rows loaded into ``W`` become ``R``'s values."""

    def __init__(self, part: PartialRows) -> None:
        self.part = part

    def __call__(self, *args: Any) -> None:
        self.part.read_back()


class _MoveGrad:
    """Post-accumulate-grad hook on ``W``: its trainable rows' gradient goes to ``R``."""

    def __init__(self, part: PartialRows) -> None:
        self.part = part

    def __call__(self, weight: torch.Tensor) -> None:
        grad = weight.grad
        if grad is None:
            return
        part = self.part
        rows_grad = grad.index_select(0, part.index)
        if rows_grad.is_sparse:
            rows_grad = rows_grad.to_dense()
        r = part.trainable
        if r.grad is None:
            r.grad = rows_grad
        else:
            r.grad.add_(rows_grad)
        weight.grad = None
        reducer = _reducers.get(part)
        if reducer is not None:
            reducer(part, r.grad)


class PartialRows:
    """A parameter ``W`` with some rows trainable (held in ``trainable``) and the rest frozen.

    Attributes:
        weight: the module's parameter ``W`` (unchanged identity and shape).
        index: sorted trainable row numbers (int64, on ``W``'s device).
        trainable: the leaf ``R = W[index]`` the optimizer updates.
        prior: ``W.requires_grad`` before it became partial.

    Example:
        >>> import torch, gradgate as gg
        >>> lin = torch.nn.Linear(3, 4)
        >>> _ = gg.freeze(lin, gg.rows("weight", [0, 1]))
        >>> part = gg.subtensor.partials(lin)[id(lin.weight)]
        >>> part.index.tolist(), tuple(part.trainable.shape)
        ([2, 3], (2, 3))
    """

    def __init__(self, weight: nn.Parameter, index: torch.Tensor, prior: bool) -> None:
        self.weight = weight
        self.index = index.to(weight.device)
        self.trainable = nn.Parameter(weight.detach().index_select(0, self.index))
        self.prior = prior
        self.owners: list[tuple[nn.Module, str]] = []
        self._handles: list[RemovableHandle] = []
        self._grad_handle: RemovableHandle | None = None

    @property
    def frozen_index(self) -> torch.Tensor:
        """Sorted row numbers that are frozen."""
        keep = torch.ones(self.weight.shape[0], dtype=torch.bool, device=self.index.device)
        keep[self.index] = False
        return keep.nonzero().reshape(-1)

    def numel(self) -> tuple[int, int]:
        """``(trainable, frozen)`` element counts."""
        train = self.trainable.numel()
        return train, self.weight.numel() - train

    def write_back(self) -> None:
        """Copy ``R`` into ``W``'s trainable rows (through ``.data``: no version bump)."""
        w = self.weight
        with torch.no_grad():
            w.data.index_copy_(0, self.index, self.trainable.detach().to(w.dtype))

    def read_back(self) -> None:
        """Copy ``W``'s trainable rows into ``R`` (after ``W`` was loaded)."""
        with torch.no_grad():
            self.trainable.copy_(self.weight.detach().index_select(0, self.index))

    def attach(self, model: nn.Module, owners: Sequence[tuple[nn.Module, str]]) -> None:
        """Install hooks and registry entries on ``owners`` (and ``model``)."""
        self.weight.requires_grad_(True)  # autograd must reach W; its frozen rows are held here
        self.weight.grad = None
        self.owners = list(owners)
        modules = {id(m): m for m, _ in self.owners}
        modules.setdefault(id(model), model)
        for m in modules.values():
            self._handles.append(m.register_forward_pre_hook(_WriteBack(self)))
        for m, name in self.owners:
            self._handles.append(m.register_state_dict_pre_hook(_WriteBack(self)))
            self._handles.append(m.register_load_state_dict_post_hook(_ReadBack(self)))
            m.__dict__.setdefault(_REGISTRY, {})[name] = self
        self._attach_grad_hook()
        _ensure_step_hook()

    def _attach_grad_hook(self) -> None:
        self._grad_handle = self.weight.register_post_accumulate_grad_hook(_MoveGrad(self))
        _live.add(self)

    def release(self) -> None:
        """Write ``R`` into ``W`` and remove every hook: ``W`` is a plain parameter again."""
        self.write_back()
        self.trainable.grad = None
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._grad_handle is not None:
            self._grad_handle.remove()
            self._grad_handle = None
        for m, name in self.owners:
            reg = m.__dict__.get(_REGISTRY, {})
            if reg.get(name) is self:
                del reg[name]
            if not reg:
                m.__dict__.pop(_REGISTRY, None)
        _live.discard(self)

    def reattach(self, model: nn.Module) -> None:
        """Make this partial live again, ``R`` refreshed from ``W`` (an undo)."""
        self.read_back()
        self.attach(model, self.owners)

    def __deepcopy__(self, memo: dict[int, Any]) -> PartialRows:
        new = PartialRows.__new__(PartialRows)
        memo[id(self)] = new
        state = {k: v for k, v in self.__dict__.items() if k != "_grad_handle"}
        new.__dict__.update(copy.deepcopy(state, memo))
        # Parameter.__deepcopy__ drops tensor hooks; the copy needs its own.
        new._attach_grad_hook()
        return new

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_grad_handle"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._attach_grad_hook()


def partials(model: nn.Module, index: ModelIndex | None = None) -> dict[int, PartialRows]:
    """Every live partial tensor of ``model``, keyed by ``id(W)``.

    Example:
        >>> import torch, gradgate as gg
        >>> partials(torch.nn.Linear(2, 2))
        {}
    """
    if not _live:  # nothing partial anywhere: skip the walk
        return {}
    out: dict[int, PartialRows] = {}
    # ModelIndex walks iteratively: a 3000-deep chain stays within the recursion limit.
    for m in (index if index is not None else ModelIndex(model)).mods:
        reg = m.__dict__.get(_REGISTRY)
        if reg:
            for name, part in reg.items():
                if m.__dict__["_parameters"].get(name) is part.weight:
                    out[id(part.weight)] = part
    return out


def trainable_of(model: nn.Module, index: ModelIndex | None = None) -> dict[int, nn.Parameter]:
    """``id(W) -> R`` for every partial tensor: what an optimizer gets in ``W``'s place.

    Example:
        >>> import torch, gradgate as gg
        >>> lin = torch.nn.Linear(3, 4)
        >>> _ = gg.train_only(lin, gg.rows("weight", [0]))
        >>> tuple(trainable_of(lin)[id(lin.weight)].shape)
        (1, 3)
    """
    return {key: part.trainable for key, part in partials(model, index).items()}


def write_back_all(model: nn.Module, index: ModelIndex | None = None) -> None:
    """Bring every partial tensor of ``model`` up to date with its trainable rows."""
    for part in partials(model, index).values():
        part.write_back()


def frozen_row_blocks(
    model: nn.Module, index: ModelIndex | None = None
) -> list[tuple[str, torch.Tensor, nn.Parameter]]:
    """The frozen rows of each partial tensor as views of ``W`` (one per run of rows).

    Views share ``W``'s version counter, so ``guard(check="fast")`` sees any
    in-place write to ``W``, and their digests cover exactly the frozen rows.
    Returned as ``(name[start:stop], view, W)``. A partial tensor hands out
    the same view objects on every call, so a guard that follows changes
    watches each block once.

    Example:
        >>> import torch, gradgate as gg
        >>> emb = torch.nn.Embedding(6, 2)
        >>> _ = gg.train_only(emb, gg.rows("weight", [2]))
        >>> [n for n, _, _ in frozen_row_blocks(emb)]
        ['weight[0:2]', 'weight[3:6]']
        >>> frozen_row_blocks(emb)[0][1] is frozen_row_blocks(emb)[0][1]
        True
    """
    found = partials(model, index)
    if not found:
        return []
    out: list[tuple[str, torch.Tensor, nn.Parameter]] = []
    for name, p in (index if index is not None else ModelIndex(model)).params.items():
        part = found.get(id(p))
        if part is not None:
            out += [(f"{name}[{a}:{b}]", view, p) for a, b, view in _blocks(part)]
    return out


_block_views: weakref.WeakKeyDictionary[PartialRows, list[tuple[int, int, torch.Tensor]]] = (
    weakref.WeakKeyDictionary()
)


def _blocks(part: PartialRows) -> list[tuple[int, int, torch.Tensor]]:
    """``(start, stop, W[start:stop])`` per run of frozen rows, made once per partial tensor."""
    w = part.weight
    cached = _block_views.get(part)
    if cached and cached[0][2].untyped_storage().data_ptr() == w.untyped_storage().data_ptr():
        return cached
    frozen = part.frozen_index.tolist()
    out: list[tuple[int, int, torch.Tensor]] = []
    start = 0
    while start < len(frozen):
        stop = start
        while stop + 1 < len(frozen) and frozen[stop + 1] == frozen[stop] + 1:
            stop += 1
        a, b = frozen[start], frozen[stop] + 1
        out.append((a, b, w.detach()[a:b]))
        start = stop + 1
    _block_views[part] = out
    return out


# -- freeze / unfreeze / train_only with rows items ---------------------------


def _flatten(selectors: Sequence[Any]) -> Iterator[Any]:
    for s in selectors:
        if isinstance(s, (list, tuple)):
            yield from _flatten(s)
        else:
            yield s


def has_rows(selectors: Sequence[Any]) -> bool:
    """Whether any selector (in nested lists too) is a ``Rows`` item.

    Example:
        >>> has_rows(["head", [rows("embed.weight", [0])]])
        True
    """
    return any(isinstance(s, Rows) for s in _flatten(selectors))


@dataclass
class RowsPlan:
    """What a freeze call does to partial tensors, checked before anything changes.

    ``want`` maps ``id(W)`` to the ``requires_grad`` the freezing walk must
    give ``W`` (True for a partial tensor: its frozen rows are held here);
    ``carry_out`` then installs, changes or releases the partials.
    """

    model: nn.Module | None = None
    action: str = ""
    want: dict[int, bool] = field(default_factory=dict)
    masks: dict[int, tuple[nn.Parameter, torch.Tensor | None]] = field(default_factory=dict)
    index: ModelIndex | None = None  # the calling freeze's read of the model (not re-walked)

    def carry_out(self, handle: Any) -> None:
        """Apply the planned partials and register their undo on ``handle``.

        Runs inside the freezing call's roll-back: the undo is registered
        before the first change and records each change as it is made, so a
        failure part-way (Ctrl-C) reverts exactly what was installed.
        """
        if self.model is None or not self.masks:
            return
        model = self.model
        undo = _Undo(model)
        handle.undo_hooks.append(undo)
        _install(model, self.masks, undo.done, self.index)
        done = undo.done
        if not done:
            return
        # What a whole tensor was left as: its undo waits while nothing changed it.
        undo.left = {id(w): w.requires_grad for w, _, new in done if new is None}
        # What trains directly: a partial tensor's leaf R, or W itself when whole.
        frozen: list[nn.Parameter] = []
        unfrozen: list[nn.Parameter] = []
        for weight, old, new in done:
            if old is not None:
                frozen.append(old.trainable)
            elif new is not None and new.prior:
                frozen.append(weight)
            if new is not None:
                unfrozen.append(new.trainable)
            elif weight.requires_grad:
                unfrozen.append(weight)
        undo.announced = True
        announce(Change(model, self.action, tuple(frozen), tuple(unfrozen)))


def _owners(index: ModelIndex, weight: nn.Parameter) -> list[tuple[nn.Module, str]]:
    out = []
    for (alias, p), owner in zip(index.aliases, index.alias_owner, strict=True):
        if p is weight:
            out.append((index.mods[owner], alias.rpartition(".")[2]))
    return out


_Done = list[tuple[nn.Parameter, PartialRows | None, PartialRows | None]]


def _install(
    model: nn.Module,
    masks: Mapping[int, tuple[nn.Parameter, torch.Tensor | None]],
    done: _Done,
    index: ModelIndex | None = None,
) -> None:
    """Replace each tensor's partial by the planned one, appending ``(W, old, new)`` to ``done``.

    Each change is in ``done`` as soon as it is made (a release first, then
    the new partial), so an interrupted install can be reverted exactly.
    """
    if index is None:
        index = ModelIndex(model)
    current = partials(model, index)
    for key, (weight, idx) in masks.items():
        old = current.get(key)
        if old is not None and idx is not None and torch.equal(old.index.cpu(), idx):
            continue
        prior = old.prior if old is not None else weight.requires_grad
        if old is not None:
            old.release()
        done.append((weight, old, None))
        if idx is not None:
            new = PartialRows(weight, idx, prior)
            try:
                new.attach(model, _owners(index, weight))
            except BaseException:
                new.release()  # a half-attached partial leaves no hook behind
                raise
            done[-1] = (weight, old, new)


class _Undo:
    """Reverts a call's partial tensors, each only if nothing changed it since."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.done: _Done = []
        self.left: dict[int, bool] = {}  # id(W) -> requires_grad this call left a whole W with
        self.announced = False

    def __call__(self) -> None:
        current = partials(self.model)
        frozen: list[nn.Parameter] = []
        unfrozen: list[nn.Parameter] = []
        for weight, old, new in reversed(self.done):
            if current.get(id(weight)) is not new:
                continue  # changed since: another call owns its rows now
            if new is None and self.left.get(id(weight), weight.requires_grad) != (
                weight.requires_grad
            ):
                continue  # a whole tensor whose flag was changed since
            if new is not None:
                new.release()
                frozen.append(new.trainable)
            if old is not None:
                old.reattach(self.model)
                unfrozen.append(old.trainable)
        if self.announced and (frozen or unfrozen):
            announce(Change(self.model, "undo", tuple(frozen), tuple(unfrozen)))


def plan(
    model: nn.Module,
    action: str,
    selectors: Sequence[Any],
    exclude: Any = None,
    index: ModelIndex | None = None,
) -> tuple[list[Any], RowsPlan]:
    """Check every ``Rows`` item and work out the partial tensors of a freeze call.

    Returns the selectors with each ``Rows`` item replaced by the parameters
    it names (so modes and tied-weight checks treat them as selected) and the
    ``RowsPlan``. Raises before anything changes.
    """
    if exclude is not None and has_rows([exclude]):
        raise InvalidArgumentError(
            f"{action}(..., exclude=...): gg.rows(...) cannot be excluded; name the rows "
            "to train or to freeze as a selector instead"
        )
    given = has_rows(selectors)
    current = partials(model, index)
    if not given and not current:
        return list(selectors), RowsPlan()
    plain: list[Any] = [s for s in _flatten(selectors) if not isinstance(s, Rows)]
    items = [s for s in _flatten(selectors) if isinstance(s, Rows)]
    if index is None:
        index = ModelIndex(model)
    plain_ids: set[int] = set()
    if plain or not given:  # no selector at all means the whole model
        plain_ids = {id(p) for _, p in resolve(index, plain, exclude).named_parameters()}
    picked: dict[int, tuple[str, nn.Parameter, torch.Tensor]] = {}
    named_as: dict[int, tuple[frozenset[str], torch.Tensor, str]] = {}  # tied: which name
    for item in items:
        selection = resolve(index, [item.selector])
        matched = list(selection.named_parameters())
        what = f"rows({describe_selectors([item.selector])}, ...)"
        counts = {n: (p.shape[0] if p.dim() else None) for n, p in matched}
        scalar = [n for n, c in counts.items() if c is None]
        if scalar:
            raise InvalidArgumentError(f"{what}: {scalar[0]!r} is a scalar and has no rows")
        if len(set(counts.values())) > 1:
            shown = ", ".join(f"{n!r} ({c} rows)" for n, c in list(counts.items())[:6])
            raise InvalidArgumentError(
                f"{what} matched tensors with different row counts: {shown}; "
                "name each tensor in its own gg.rows(...)"
            )
        for n, p in matched:
            if not is_float(p):
                raise InvalidArgumentError(
                    f"{what}: {n!r} has dtype {p.dtype}; only floating-point or complex "
                    "tensors can train"
                )
            if callable(getattr(p, "full_tensor", None)):
                raise InvalidArgumentError(
                    f"{what}: {n!r} is sharded by FSDP2 (a DTensor); sub-tensor freezing "
                    "is not supported under FSDP2 (see docs/rows.md): train the whole "
                    "tensor, or train without sharding it"
                )
        idx = normalise_index(item.index, matched[0][1].shape[0], what)
        for n, p in matched:
            if id(p) in index.shared:
                _refuse_other_rows_of_a_tied_name(index, selection.aliases, p, idx, what, named_as)
            prev = picked.get(id(p))
            merged = idx if prev is None else torch.unique(torch.cat([prev[2], idx]))
            picked[id(p)] = (n, p, merged)
    out = RowsPlan(model=model, action=action, index=index)
    for key, settled in current.items():
        # A partial tensor named whole, or frozen by train_only, stops being partial.
        if key not in picked and (key in plain_ids or action == "train_only"):
            out.want[key] = key in plain_ids and action != "freeze"
            out.masks[key] = (settled.weight, None)
    for key, (_, weight, idx) in picked.items():
        n_rows = weight.shape[0]
        part = current.get(key)
        if part is not None:
            now = part.index.cpu()
        elif weight.requires_grad:
            now = torch.arange(n_rows)
        else:
            now = torch.empty(0, dtype=torch.int64)
        if key in plain_ids:  # the whole tensor is selected as well: it wins
            new = torch.empty(0, dtype=torch.int64) if action == "freeze" else torch.arange(n_rows)
        elif action == "freeze":
            new = now[~torch.isin(now, idx)]
        elif action == "unfreeze":
            new = torch.unique(torch.cat([now, idx]))
        else:
            new = idx
        whole = new.numel() == n_rows
        out.want[key] = new.numel() > 0
        out.masks[key] = (weight, None if whole or new.numel() == 0 else new)
    replaced = plain + [picked[key][1] for key in picked]
    return replaced, out


def _refuse_other_rows_of_a_tied_name(
    index: ModelIndex,
    aliases: frozenset[str],
    p: nn.Parameter,
    idx: torch.Tensor,
    what: str,
    named_as: dict[int, tuple[frozenset[str], torch.Tensor, str]],
) -> None:
    """Two ``rows`` items naming different rows of two names of one tied tensor: refuse.

    A tied tensor has one set of trainable rows; uniting ``embed.weight``'s rows
    with ``lm_head.weight``'s would train rows neither item asked for through
    the other name (PEFT raises here too).
    """
    names = frozenset(a for a, q in index.aliases if q is p and a in aliases)
    prev = named_as.get(id(p))
    if prev is None:
        named_as[id(p)] = (names, idx, what)
        return
    before_names, before_idx, before_what = prev
    same_rows = torch.equal(torch.unique(before_idx), torch.unique(idx))
    if names == before_names or same_rows:
        return
    raise InvalidArgumentError(
        f"{before_what} and {what} name different rows ({before_idx.tolist()[:6]} and "
        f"{idx.tolist()[:6]}) of {sorted(before_names)[0]!r} and {sorted(names)[0]!r}, "
        "which are one tied tensor with one set of trainable rows; name the rows once, "
        "through one name (their union if that is what you mean)"
    )


# -- checkpoints ---------------------------------------------------------------


def trainable_rows_state(
    model: nn.Module, index: ModelIndex | None = None
) -> dict[str, torch.Tensor]:
    """For each partial tensor: its trainable rows under its name, and its row numbers.

    The row numbers go under ``"__rows__.<name>"`` so that a load can check
    that the file's rows are the model's.
    """
    found = partials(model, index)
    out: dict[str, torch.Tensor] = {}
    if not found:
        return out
    for name, p in (index if index is not None else ModelIndex(model)).params.items():
        part = found.get(id(p))
        if part is not None:
            out[name] = part.trainable
            out[_ROWS_KEY + name] = part.index.detach().cpu().clone()
    return out


def check_rows(state: Mapping[str, torch.Tensor], saved: Mapping[str, torch.Tensor]) -> None:
    """Refuse a checkpoint whose trained rows are not the model's trainable rows."""
    for key, ours in state.items():
        if key.startswith(_ROWS_KEY) and key in saved:
            theirs = saved[key]
            if theirs.shape != ours.shape or not torch.equal(theirs.cpu(), ours.cpu()):
                name = key[len(_ROWS_KEY) :]
                raise CheckpointError(
                    f"{name!r}: the checkpoint holds rows {_preview(theirs)} but the model "
                    f"trains rows {_preview(ours)}; apply the same gg.rows(...) before loading"
                )


def _preview(t: torch.Tensor) -> str:
    values = t.tolist()
    return str(values) if len(values) <= 8 else f"{values[:8]}... ({len(values)} rows)"
