"""Sub-tensor freezing: train some rows (dim 0) of a parameter and hold the others fixed.

The trainable rows are state the model owns, in its module tree (as PEFT's
Trainable Tokens keeps its delta), so everything PyTorch does to a module
sees them with no extra call:

- ``W`` stays the owner's parameter under the same name and ``state_dict``
  key, with ``requires_grad=False``: an ordinary frozen tensor that
  ``guard`` and ``fingerprint`` watch whole and that no optimizer is given.
- The trainable rows ``R`` (``k x ...``) are a parameter of a small child
  module ``TrainableRows`` registered under every module using ``W``
  (``embed.weight_rows.weight``), with their row numbers as a buffer. So
  ``model.parameters()``, ``zero_grad``, ``clip_grad_norm_``, ``.to()``,
  DDP, ``deepcopy`` and pickling all see ``R`` as a plain parameter.
- The owner's class becomes a subclass (same name) whose ``W`` attribute
  reads ``W.index_copy(0, index, R)``: the forward is the module's own and
  autograd reaches ``R`` directly; ``state_dict`` stores that merged tensor
  under ``W``'s key and ``load_state_dict`` splits a loaded one (``assign``
  too). The subclass pickles as "the plain class plus these names".

No hook, process-global or per tensor, is installed; nothing is patched.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._events import Change, announce
from ._index import ModelIndex, is_float
from .errors import CheckpointError, InvalidArgumentError
from .selection import Selector, SelectorItem, describe_selectors, resolve

__all__ = [
    "PartialRows",
    "RowIndex",
    "Rows",
    "TrainableRows",
    "partial_tensors",
    "partials",
    "rows",
]

RowIndex = Union[Sequence[int], Sequence[bool], slice, range, torch.Tensor]  # noqa: UP007
"""What ``gg.rows`` accepts as ``index``: ints, a slice, a bool mask or an integer tensor."""

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
        [('weight_rows.weight', (2, 4))]
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


_ROWS_SUFFIX = "_rows"  # the owner's child holding a partial tensor's trainable rows: "<name>_rows"
_NAMES = "_gg_rows_names"  # class attribute of an owner's rows class: the partial tensor names
_PLAIN = "_gg_rows_plain"  # class attribute of an owner's rows class: the class it extends

# (plain class, partial names) -> the owner class that serves those names merged.
_classes: dict[tuple[type[nn.Module], tuple[str, ...]], type[nn.Module]] = {}
_classes_lock = threading.Lock()


class TrainableRows(nn.Module):
    """The trainable rows of one partially frozen parameter, a child of each module using it.

    ``W`` stays its owner's parameter (frozen, same name, shape and
    ``state_dict`` key); this child holds the trainable rows ``R`` as a
    parameter named like ``W`` (``embed.weight_rows.weight``) and their row
    numbers as the buffer ``index``. The owner reads ``W`` merged,
    ``W.index_copy(0, index, R)``, so autograd reaches ``R`` directly.

    Attributes:
        index: sorted trainable row numbers (int64 buffer, follows ``.to(device)``).
        trainable: ``R``, the parameter holding those rows (``k x ...``).
        base: ``W``, the frozen full tensor (as the first owner holds it).
        prior: ``W.requires_grad`` before it became partial.

    Example:
        >>> import torch, gradgate as gg
        >>> lin = torch.nn.Linear(3, 4)
        >>> _ = gg.freeze(lin, gg.rows("weight", [0, 1]))
        >>> part = partials(lin)[id(lin._parameters["weight"])]
        >>> part.index.tolist(), tuple(part.trainable.shape)
        ([2, 3], (2, 3))
        >>> [n for n, p in lin.named_parameters() if p.requires_grad]
        ['bias', 'weight_rows.weight']
    """

    index: torch.Tensor
    name: str
    prior: bool

    def __init__(self, weight: nn.Parameter, name: str, index: torch.Tensor, prior: bool) -> None:
        super().__init__()
        if name == "index" or hasattr(TrainableRows, name):
            raise InvalidArgumentError(
                f"gg.rows: a parameter named {name!r} cannot be partial (the name is taken by "
                "gradgate's TrainableRows); train it whole"
            )
        idx = index.to(weight.device)
        self.register_buffer("index", idx, persistent=False)
        self.register_parameter(name, nn.Parameter(weight.detach().index_select(0, idx)))
        self.__dict__["name"] = name
        self.__dict__["prior"] = prior
        self.__dict__["owners"] = []  # (module, attribute) pairs that read W merged

    @property
    def trainable(self) -> nn.Parameter:
        """``R``: the trainable rows."""
        r: nn.Parameter = self._parameters[self.__dict__["name"]]  # type: ignore[assignment]
        return r

    @property
    def base(self) -> nn.Parameter:
        """``W``: the frozen full tensor (as the first owner holds it)."""
        owner, attr = self.__dict__["owners"][0]
        w: nn.Parameter = owner._parameters[attr]
        return w

    def merge(self, base: torch.Tensor) -> torch.Tensor:
        """``base`` with the trainable rows in place: differentiable in ``R``, a new tensor."""
        r = self._parameters[self.__dict__["name"]]
        assert r is not None
        return base.index_copy(0, self.index, r if r.dtype == base.dtype else r.to(base.dtype))

    def position_of(self, row: int | None) -> int | None:
        """Where ``row`` sits among the trainable rows (``None`` if it is frozen or ``None``)."""
        if row is None:
            return None
        cache: dict[int, int | None] = self.__dict__.setdefault("_positions", {})
        if row not in cache:
            found = (self.index == row).nonzero()
            cache[row] = int(found[0, 0]) if found.numel() else None
        return cache[row]

    def numel(self) -> tuple[int, int]:
        """``(trainable, frozen)`` element counts of the partial tensor."""
        train = self.trainable.numel()
        return train, self.base.numel() - train

    @property
    def frozen_index(self) -> torch.Tensor:
        """Sorted row numbers that are frozen."""
        keep = torch.ones(self.base.shape[0], dtype=torch.bool, device=self.index.device)
        keep[self.index] = False
        return keep.nonzero().reshape(-1)

    def extra_repr(self) -> str:
        return f"{self.trainable.shape[0]} trainable rows of {self.__dict__['name']!r}"

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        # The owner stores W merged under its own key; R has no key of its own.
        return

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        # The owner loads R from W's key (see _RowsOwner._load_from_state_dict).
        return

    def attach(self, model: nn.Module, owners: Sequence[tuple[nn.Module, str]]) -> None:
        """Register this child under every module using ``W`` and make them read ``W`` merged."""
        for m, attr in owners:
            child = attr + _ROWS_SUFFIX
            taken = (
                child in m._modules
                or child in m._parameters
                or child in m._buffers
                or child in m.__dict__
                or hasattr(type(m), child)
            )
            if taken:
                raise InvalidArgumentError(
                    f"gg.rows: {type(m).__name__} already has an attribute {child!r}, where the "
                    f"trainable rows of {attr!r} would go; rename it, or train {attr!r} whole"
                )
        self.__dict__["owners"] = list(owners)
        w = self.base
        w.requires_grad_(False)
        w.grad = None
        with torch.no_grad():
            # W's trainable rows live in R; W holds zeros there, so what a fingerprint
            # of W covers is its frozen rows alone. Through .data, like an optimizer.
            w.data.index_fill_(0, self.index.to(w.device), 0)
        for m, attr in owners:
            m._modules[attr + _ROWS_SUFFIX] = self
            names = tuple(sorted({*getattr(type(m), _NAMES, ()), attr}))
            m.__class__ = _rows_class(getattr(type(m), _PLAIN, type(m)), names)

    def release(self) -> None:
        """Write ``R`` into ``W``'s rows and detach: ``W`` is a plain parameter again."""
        owners = self.__dict__["owners"]
        with torch.no_grad():
            r = self.trainable.detach()
            done: set[int] = set()
            for m, attr in owners:
                w = m._parameters.get(attr)
                if w is not None and id(w) not in done:
                    done.add(id(w))
                    # Through .data: W's version counter stays, like an optimizer's write.
                    w.data.index_copy_(0, self.index.to(w.device), r.to(w.device, w.dtype))
        self.trainable.grad = None
        for m, attr in owners:
            if m._modules.get(attr + _ROWS_SUFFIX) is self:
                del m._modules[attr + _ROWS_SUFFIX]
            names = tuple(n for n in getattr(type(m), _NAMES, ()) if n != attr)
            plain = getattr(type(m), _PLAIN, type(m))
            m.__class__ = _rows_class(plain, names) if names else plain

    def reattach(self, model: nn.Module) -> None:
        """Make this partial live again, ``R`` refreshed from ``W`` (an undo)."""
        with torch.no_grad():
            self.trainable.copy_(self.base.detach().index_select(0, self.index))
        self.attach(model, self.__dict__["owners"])


PartialRows = TrainableRows
"""The name issue 16 gave the state of a partial tensor."""


def _merged_property(attr: str) -> property:
    child = attr + _ROWS_SUFFIX

    def get(self: nn.Module) -> torch.Tensor:
        rows: TrainableRows = self._modules[child]  # type: ignore[assignment]
        return rows.merge(self._parameters[attr])  # type: ignore[arg-type]

    return property(get, doc=f"``{attr}`` with its trainable rows merged in (gg.rows).")


def _rows_embedding_forward(self: nn.Embedding, input: torch.Tensor) -> torch.Tensor:
    """``nn.Embedding.forward`` on a partial weight, without the full-size merge.

    Looks tokens up in the frozen ``W`` and, for tokens among the trainable
    rows, in ``R``: the same values as ``F.embedding(input, W merged)``, but
    the backward fills a ``k x d`` gradient for ``R`` instead of a full-size
    one for the merged tensor (and no merged copy is made).
    """
    rows: TrainableRows = self._modules["weight" + _ROWS_SUFFIX]  # type: ignore[assignment]
    base: torch.Tensor = self._parameters["weight"]  # type: ignore[assignment]
    if self.max_norm is not None or self.scale_grad_by_freq:
        # max_norm renormalises the looked-up rows in place, scale_grad_by_freq counts
        # over the whole vocabulary: both need the merged tensor.
        return F.embedding(
            input,
            rows.merge(base),
            self.padding_idx,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            self.sparse,
        )
    r = rows.trainable
    if r.dtype != base.dtype:
        r = r.to(base.dtype)  # type: ignore[assignment]
    index = rows.index
    pos = torch.searchsorted(index, input.to(index.dtype).contiguous())  # place among the rows
    pos = pos.clamp_(max=index.shape[0] - 1)
    hit = index[pos] == input
    trained = F.embedding(pos, r, rows.position_of(self.padding_idx), sparse=self.sparse)
    return torch.where(hit.unsqueeze(-1), trained, F.embedding(input, base))


def _rows_linear_forward(self: nn.Linear, input: torch.Tensor) -> torch.Tensor:
    """``nn.Linear.forward`` on a partial weight, without the full-size merge.

    ``W`` holds zeros in the trainable rows, so ``F.linear(input, W, bias)``
    gives the frozen outputs (and the bias alone in the trainable rows'
    columns); ``F.linear(input, R)`` is added into those columns. The
    backward computes ``R``'s ``k x d`` gradient, not a full-size one.
    With a third or more of the rows trainable the merged tensor is cheaper.
    """
    rows: TrainableRows = self._modules["weight" + _ROWS_SUFFIX]  # type: ignore[assignment]
    base: torch.Tensor = self._parameters["weight"]  # type: ignore[assignment]
    index = rows.index
    if 3 * index.shape[0] >= base.shape[0]:
        return F.linear(input, rows.merge(base), self.bias)
    r = rows.trainable
    if r.dtype != base.dtype:
        r = r.to(base.dtype)  # type: ignore[assignment]
    out = F.linear(input, base, self.bias)
    # In place: F.linear's backward does not need its output, and no logits-size copy is made.
    return out.index_add_(-1, index, F.linear(input, r))


def _fast_forward(plain: type[nn.Module], names: tuple[str, ...]) -> Any:
    """The rows-aware forward for a stock ``nn.Embedding`` / ``nn.Linear`` with a partial weight."""
    if "weight" not in names:
        return None
    if issubclass(plain, nn.Embedding) and plain.forward is nn.Embedding.forward:
        return _rows_embedding_forward
    if issubclass(plain, nn.Linear) and plain.forward is nn.Linear.forward:
        return _rows_linear_forward
    return None


class _RowsOwner(nn.Module):
    """Mixed into an owner's class: ``W``'s ``state_dict`` key holds the full current tensor."""

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for attr in getattr(type(self), _NAMES):
            key = prefix + attr
            if key in destination:
                with torch.no_grad():
                    destination[key] = getattr(self, attr)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        loaded: dict[str, torch.Tensor] = {}
        for attr in getattr(type(self), _NAMES):
            key, base = prefix + attr, self._parameters[attr]
            full = state_dict.get(key)
            rows: TrainableRows = self._modules[attr + _ROWS_SUFFIX]  # type: ignore[assignment]
            if isinstance(full, torch.Tensor) and base is not None and full.shape == base.shape:
                idx = rows.index.to(full.device)
                loaded[attr] = full.detach().index_select(0, idx)
                # W keeps its own values in the trainable rows (its frozen part is what
                # a fingerprint covers); the loaded rows go to R below.
                keep = base.detach().index_select(0, rows.index).to(full.device, full.dtype)
                state_dict[key] = full.detach().index_copy(0, idx, keep)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        assign = bool(local_metadata.get("assign_to_params_buffers", False))
        for attr, values in loaded.items():
            rows = self._modules[attr + _ROWS_SUFFIX]  # type: ignore[assignment]
            r = rows.trainable
            with torch.no_grad():
                if assign:
                    new = nn.Parameter(values.clone(), requires_grad=r.requires_grad)
                    rows._parameters[rows.__dict__["name"]] = new
                else:
                    r.copy_(values)

    def __reduce_ex__(self, protocol: Any) -> Any:
        cls = type(self)
        return (_rebuild, (getattr(cls, _PLAIN), getattr(cls, _NAMES)), self.__dict__)


def _rows_class(plain: type[nn.Module], names: tuple[str, ...]) -> type[nn.Module]:
    """The class an owner of partial tensors ``names`` gets: ``plain`` reading them merged."""
    key = (plain, names)
    with _classes_lock:
        cls = _classes.get(key)
        if cls is None:
            body: dict[str, Any] = {n: _merged_property(n) for n in names}
            fast = _fast_forward(plain, names)
            if fast is not None:
                body["forward"] = fast
            body.update(
                {
                    _NAMES: names,
                    _PLAIN: plain,
                    "__module__": plain.__module__,
                    "__qualname__": plain.__qualname__,
                }
            )
            cls = type(plain.__name__, (_RowsOwner, plain), body)
            _classes[key] = cls
    return cls


def _rebuild(plain: type[nn.Module], names: tuple[str, ...]) -> nn.Module:
    """Unpickle (and deep-copy) an owner of partial tensors: a bare instance of its rows class."""
    cls = _rows_class(plain, names)
    obj: nn.Module = cls.__new__(cls)
    return obj


def partials(model: nn.Module, index: ModelIndex | None = None) -> dict[int, TrainableRows]:
    """Every partial tensor of ``model``: ``id(W) -> TrainableRows``.

    Example:
        >>> import torch, gradgate as gg
        >>> partials(torch.nn.Linear(2, 2))
        {}
    """
    if not _classes:  # gg.rows never used in this process: skip the walk
        return {}
    out: dict[int, TrainableRows] = {}
    # ModelIndex walks iteratively: a 3000-deep chain stays within the recursion limit.
    for m in (index if index is not None else ModelIndex(model)).mods:
        for attr in getattr(type(m), _NAMES, ()):
            rows = m._modules.get(attr + _ROWS_SUFFIX)
            base = m._parameters.get(attr)
            if isinstance(rows, TrainableRows) and base is not None:
                out[id(base)] = rows
    return out


def partial_tensors(
    model: nn.Module, index: ModelIndex | None = None
) -> Iterator[tuple[nn.Module, str, torch.Tensor]]:
    """``(owner module, parameter name, trainable row numbers)`` per use of a partial tensor.

    The one view of partial tensors the rest of gradgate needs: the frozen
    full tensor is ``owner._parameters[name]`` (``requires_grad=False``), its
    trainable rows the parameter ``owner.<name>_rows.<name>`` (an ordinary
    trainable parameter of the module tree).

    Example:
        >>> import torch, gradgate as gg
        >>> emb = torch.nn.Embedding(6, 2)
        >>> _ = gg.train_only(emb, gg.rows("weight", [2]))
        >>> [(type(m).__name__, n, i.tolist()) for m, n, i in partial_tensors(emb)]
        [('Embedding', 'weight', [2])]
    """
    if not _classes:
        return
    for m in (index if index is not None else ModelIndex(model)).mods:
        for attr in getattr(type(m), _NAMES, ()):
            rows = m._modules.get(attr + _ROWS_SUFFIX)
            if isinstance(rows, TrainableRows) and m._parameters.get(attr) is not None:
                yield m, attr, rows.index


def element_counts(model: nn.Module, index: ModelIndex | None = None) -> dict[int, tuple[int, int]]:
    """``id(tensor) -> (trainable, frozen)`` elements for the tensors of partial tensors.

    ``W`` counts its frozen rows as frozen and its trainable rows as
    trainable; ``R`` counts nothing (its elements are ``W``'s). Other
    tensors are absent.

    Example:
        >>> import torch, gradgate as gg
        >>> emb = torch.nn.Embedding(6, 2)
        >>> _ = gg.train_only(emb, gg.rows("weight", [2]))
        >>> sorted(element_counts(emb).values())
        [(0, 0), (2, 10)]
    """
    out: dict[int, tuple[int, int]] = {}
    for key, part in partials(model, index).items():
        out[key] = part.numel()
        out[id(part.trainable)] = (0, 0)
    return out


def trainable_of(model: nn.Module, index: ModelIndex | None = None) -> dict[int, nn.Parameter]:
    """``id(W) -> R`` for every partial tensor.

    Example:
        >>> import torch, gradgate as gg
        >>> lin = torch.nn.Linear(3, 4)
        >>> _ = gg.train_only(lin, gg.rows("weight", [0]))
        >>> tuple(trainable_of(lin)[id(lin._parameters["weight"])].shape)
        (1, 3)
    """
    return {key: part.trainable for key, part in partials(model, index).items()}


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
class FreezePlan:
    """What a freeze call must leave to the partial tensors, checked before anything changes.

    The one interface between the freezing walk and rows (reached through
    ``_state.plan_freeze``). The walk reads four generic facts and runs one
    step after its own changes; it never asks whether a tensor is partial:

    - ``fixed``: ``requires_grad`` the walk sets as given (ahead of the
      selection): a partial ``W`` keeps its flag (``carry_out`` sets it), and
      ``R`` of a partial that keeps its rows keeps training;
    - ``ties``: how a tensor counts in the tied-weight check: ``True`` as
      trainable (a partial ``W``), ``None`` not at all (``R``), absent by its flag;
    - ``trains``: tensors that count as trainable for module modes (every
      tensor partial once the call is done);
    - ``gains``: tensors that start to train in this call without their flag
      changing (rows of a wholly frozen tensor);
    - ``carry_out``: installs, changes or releases the partials after the
      walk and registers their undo.

    An empty plan (no ``gg.rows`` given or in force) changes nothing.
    """

    model: nn.Module | None = None
    action: str = ""
    fixed: dict[int, bool] = field(default_factory=dict)
    masks: dict[int, tuple[nn.Parameter, torch.Tensor | None]] = field(default_factory=dict)
    final: dict[int, bool] = field(default_factory=dict)
    """``requires_grad`` of a tensor that ends the call whole."""
    ties: dict[int, bool | None] = field(default_factory=dict)
    """For tied-weight checks: a partial ``W`` counts as trainable (True), its ``R`` not at all."""
    trains: set[int] = field(default_factory=set)
    """``id(W)`` of every tensor partial once the call is done (its module trains)."""
    gains: set[int] = field(default_factory=set)
    """``id(W)`` of the tensors whose rows start to train in this call (were wholly frozen)."""
    index: ModelIndex | None = None  # the calling freeze's read of the model (not re-walked)

    def carry_out(self, register_undo: Callable[[Callable[[], None]], None]) -> None:
        """Apply the planned partials, handing their undo to ``register_undo`` first.

        Runs inside the freezing call's roll-back: the undo is registered
        before the first change and records each change as it is made, so a
        failure part-way (Ctrl-C) reverts exactly what was installed.
        """
        if self.model is None or not self.masks:
            return
        model = self.model
        undo = _Undo(model)
        register_undo(undo)
        if self.index is not None:
            self.index.reshaped = True  # row modules come and go: the walk is stale
        _install(model, self.masks, self.final, undo.done, self.index)
        if undo.done:
            undo.left = {id(w): w.requires_grad for w, _, new, _ in undo.done if new is None}
            undo.announced = True
            _announce(model, self.action, undo.done)


_Done = list[tuple[nn.Parameter, "TrainableRows | None", "TrainableRows | None", bool]]


def _announce(model: nn.Module, action: str, done: _Done) -> None:
    """Tell listeners what trains now: ``R`` of each partial, ``W`` when whole.

    ``done`` holds ``(W, partial before, partial after, W's flag before)``.
    A ``W`` frozen before and after whose values changed (trained rows
    written in, or cleared) is announced both ways, so a guard takes it afresh.
    """
    frozen: list[nn.Parameter] = []
    unfrozen: list[nn.Parameter] = []
    for weight, old, new, before in done:
        if old is not None:
            frozen.append(old.trainable)
        if new is not None:
            unfrozen.append(new.trainable)
        after = weight.requires_grad
        if before and not after:
            frozen.append(weight)
        elif after and not before:
            unfrozen.append(weight)
        elif not after:
            unfrozen.append(weight)
            frozen.append(weight)
    announce(Change(model, action, tuple(frozen), tuple(unfrozen)))


def _owners(index: ModelIndex, weight: nn.Parameter) -> list[tuple[nn.Module, str]]:
    out = []
    for (alias, p), owner in zip(index.aliases, index.alias_owner, strict=True):
        if p is weight:
            out.append((index.mods[owner], alias.rpartition(".")[2]))
    return out


def _install(
    model: nn.Module,
    masks: Mapping[int, tuple[nn.Parameter, torch.Tensor | None]],
    final: Mapping[int, bool],
    done: _Done,
    index: ModelIndex | None = None,
) -> None:
    """Replace each tensor's partial by the planned one, appending the change to ``done``.

    Each change is in ``done`` as soon as it is made (a release first, then
    the new partial), so an interrupted install can be reverted exactly.
    """
    if index is None:
        index = ModelIndex(model)
    current = partials(model, index)
    for key, (weight, idx) in masks.items():
        old = current.get(key)
        if old is None and idx is None:
            continue  # whole before and after: the freezing walk sets its flag
        if old is not None and idx is not None and torch.equal(old.index.cpu(), idx):
            continue
        before = weight.requires_grad
        prior = old.prior if old is not None else before
        if old is not None:
            old.release()
        done.append((weight, old, None, before))
        if idx is None:
            weight.requires_grad_(final[key])
            continue
        owners = _owners(index, weight)
        new = TrainableRows(weight, owners[0][1], idx, prior)
        try:
            new.attach(model, owners)
        except BaseException:
            new.release()  # a half-attached partial leaves nothing behind
            weight.requires_grad_(before)
            raise
        done[-1] = (weight, old, new, before)


class _Undo:
    """Reverts a call's partial tensors, each only if nothing changed it since."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.done: _Done = []
        self.left: dict[int, bool] = {}  # id(W) -> requires_grad this call left a whole W with
        self.announced = False

    def __call__(self) -> None:
        current = partials(self.model)
        reverted: _Done = []
        for weight, old, new, before in reversed(self.done):
            if current.get(id(weight)) is not new:
                continue  # changed since: another call owns its rows now
            if new is None and weight.requires_grad != self.left.get(
                id(weight), weight.requires_grad
            ):
                continue  # a whole tensor whose flag was changed since
            flag = weight.requires_grad
            if new is not None:
                new.release()
            if old is not None:
                old.reattach(self.model)
            else:
                weight.requires_grad_(before)
            reverted.append((weight, new, old, flag))
        if self.announced and reverted:
            _announce(self.model, "undo", reverted)


def plan(
    model: nn.Module,
    action: str,
    selectors: Sequence[Any],
    exclude: Any = None,
    index: ModelIndex | None = None,
) -> tuple[list[Any], FreezePlan]:
    """Check every ``Rows`` item and work out the partial tensors of a freeze call.

    Returns the selectors with each ``Rows`` item replaced by the parameters
    it names (so modes and tied-weight checks treat them as selected) and the
    ``FreezePlan``. Raises before anything changes.
    """
    if exclude is not None and has_rows([exclude]):
        raise InvalidArgumentError(
            f"{action}(..., exclude=...): gg.rows(...) cannot be excluded; name the rows "
            "to train or to freeze as a selector instead"
        )
    given = has_rows(selectors)
    current = partials(model, index)
    if not given and not current:
        return list(selectors), FreezePlan()
    plain: list[Any] = [s for s in _flatten(selectors) if not isinstance(s, Rows)]
    items = [s for s in _flatten(selectors) if isinstance(s, Rows)]
    if index is None:
        index = ModelIndex(model)
    plain_ids: set[int] = set()
    if plain or not given:  # no selector at all means the whole model
        plain_ids = {id(p) for _, p in resolve(index, plain, exclude).named_parameters()}
    picked: dict[int, tuple[str, nn.Parameter, torch.Tensor]] = {}
    leaves = {id(part.trainable) for part in current.values()}
    named_as: dict[int, tuple[frozenset[str], torch.Tensor, str]] = {}  # tied: which name
    for item in items:
        selection = resolve(index, [item.selector])
        matched = [
            (n, p)
            for n, p in selection.named_parameters()
            if id(p) not in leaves  # rows of a partial tensor are named through W
        ]
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
    out = FreezePlan(model=model, action=action, index=index)
    for key, live in current.items():
        out.ties[key] = True
        out.ties[id(live.trainable)] = None
    for key, settled in current.items():
        out.fixed[key] = False  # a partial W's flag is carry_out's
        # A partial tensor named whole, or frozen by train_only, stops being partial.
        if key not in picked and (key in plain_ids or action == "train_only"):
            out.final[key] = key in plain_ids and action != "freeze"
            out.masks[key] = (settled.base, None)
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
        partial_after = not whole and new.numel() > 0
        # The walk sets the flag of a tensor whole before and after; carry_out the others'.
        out.fixed[key] = weight.requires_grad if part is not None or partial_after else whole
        out.final[key] = whole
        out.masks[key] = (weight, new if partial_after else None)
        if part is not None and not whole and torch.equal(now, new):
            out.fixed[id(part.trainable)] = True  # the same rows stay: R keeps training
        if partial_after:
            out.trains.add(key)
            if part is None and not weight.requires_grad:
                out.gains.add(key)
    out.trains |= {key for key in current if key not in out.masks}
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
    model: nn.Module, state: dict[str, torch.Tensor], index: ModelIndex | None = None
) -> dict[str, torch.Tensor]:
    """``state`` with each partial tensor's row numbers stored once, as ``"__rows__.<name>"``.

    The rows themselves are the parameter ``R`` (saved under its own name like
    any trainable parameter); the numbers let a load check that the file's
    rows are the model's. The ``TrainableRows`` child's ``index`` buffer holds
    the same numbers and is left out (files before it was, still load: see
    ``check_rows``).

    Example:
        >>> import torch, gradgate as gg
        >>> emb = torch.nn.Embedding(6, 2)
        >>> _ = gg.train_only(emb, gg.rows("weight", [2, 4]))
        >>> state = dict(emb.weight_rows.named_parameters(prefix="weight_rows"))
        >>> state["weight_rows.index"] = emb.weight_rows.index  # a buffer of a training module
        >>> {k: v.tolist() for k, v in trainable_rows_state(emb, state).items() if "__" in k}
        {'__rows__.weight': [2, 4]}
        >>> sorted(state)  # the index is stored once
        ['__rows__.weight', 'weight_rows.weight']
    """
    found = partials(model, index)
    if not found:
        return state
    index = index if index is not None else ModelIndex(model)
    for name, m in zip(index.names, index.mods, strict=True):
        if isinstance(m, TrainableRows):
            state.pop((name + "." if name else "") + "index", None)
    for name, p in index.params.items():
        part = found.get(id(p))
        if part is not None:
            state[_ROWS_KEY + name] = part.index.detach().cpu().clone()
    return state


def check_rows(
    state: Mapping[str, torch.Tensor], saved: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Refuse a checkpoint whose trained rows are not the model's trainable rows.

    ``state`` is what the model would save (``trainable_state``), ``saved``
    the file's tensors; a ``CheckpointError`` names both row sets. Returns
    ``saved`` without the duplicate ``<name>_rows.index`` entries that files
    written before the row numbers were stored once still hold.

    Example:
        >>> import torch
        >>> check_rows(  # doctest: +ELLIPSIS
        ...     {"__rows__.w": torch.tensor([1])}, {"__rows__.w": torch.tensor([2])})
        Traceback (most recent call last):
        ...
        gradgate.errors.CheckpointError: 'w': the checkpoint holds rows [2] but the model ...
        >>> old = {"__rows__.w": torch.tensor([1]), "w_rows.index": torch.tensor([1])}
        >>> sorted(check_rows({"__rows__.w": torch.tensor([1])}, old))
        ['__rows__.w']
    """

    def ours_of(name: str) -> str:
        ours = state.get(_ROWS_KEY + name)
        if ours is not None:
            return f"rows {_preview(ours)}"
        return "the whole tensor" if name in state else "none of its rows"

    names = {k[len(_ROWS_KEY) :] for k in (*state, *saved) if k.startswith(_ROWS_KEY)}
    for name in sorted(names):
        ours, theirs = state.get(_ROWS_KEY + name), saved.get(_ROWS_KEY + name)
        if (
            ours is not None
            and theirs is not None
            and theirs.shape == ours.shape
            and torch.equal(theirs.cpu(), ours.cpu())
        ):
            continue
        if theirs is not None:
            held = f"rows {_preview(theirs)}"
        else:
            held = "the whole tensor" if name in saved else "none of its rows"
        raise CheckpointError(
            f"{name!r}: the checkpoint holds {held} but the model trains {ours_of(name)}; "
            "apply the same gg.rows(...) before loading"
        )
    duplicates = set()
    for key, numbers in saved.items():
        if key.startswith(_ROWS_KEY):
            legacy = key[len(_ROWS_KEY) :] + _ROWS_SUFFIX + ".index"
            old = saved.get(legacy)
            if legacy not in state and old is not None and torch.equal(old.cpu(), numbers.cpu()):
                duplicates.add(legacy)
    return {k: v for k, v in saved.items() if k not in duplicates}


def _preview(t: torch.Tensor) -> str:
    values = t.tolist()
    return str(values) if len(values) <= 8 else f"{values[:8]}... ({len(values)} rows)"
