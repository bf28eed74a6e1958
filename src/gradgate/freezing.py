"""freeze / unfreeze / train_only, sticky inference mode, and the undo handle."""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import TracebackType

from torch import nn

from . import subtensor
from ._events import Change, announce
from ._index import ModelIndex, gc_paused, is_float, owner_of, trainable_flags
from ._options import choice
from .errors import GradgateError, SharedParameterError
from .selection import Selection, Selector, describe_selectors, resolve

__all__ = [
    "Freezing",
    "freeze",
    "is_sticky",
    "named_trainable_parameters",
    "train_only",
    "trainable_parameters",
    "unfreeze",
]


class Mode(enum.Enum):
    """What happens to the train/eval mode of frozen modules."""

    EVAL = "eval"
    KEEP = "keep"


class Shared(enum.Enum):
    """Which side wins for a parameter shared by a frozen and a trainable module."""

    FREEZE = "freeze"
    TRAIN = "train"


class _StickyEval:
    """Replaces a frozen module's ``train`` so that it stays in inference mode.

    Stored on the module instance itself (the model is the only registry), so
    it survives ``copy.deepcopy`` and ``torch.save``; children still receive
    the requested mode and decide for themselves.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, mode: bool = True) -> nn.Module:
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        module = self.module
        module.training = False
        for child in module.children():
            child.train(mode)
        return module


def is_sticky(module: nn.Module) -> bool:
    """Whether ``module`` is held in inference mode by a freeze.

    Example:
        >>> import torch, gradgate as gg
        >>> bn = torch.nn.BatchNorm1d(3)
        >>> _ = gg.freeze(bn)
        >>> gg.is_sticky(bn), bn.train().training
        (True, False)
    """
    return isinstance(module.__dict__.get("train"), _StickyEval)


def _set_sticky(module: nn.Module) -> None:
    # Plain attribute writes: nn.Module.__setattr__ is slow on large trees.
    module.__dict__["train"] = _StickyEval(module)
    module.__dict__["training"] = False


def _release(module: nn.Module) -> None:
    module.__dict__.pop("train", None)


class Freezing:
    """The record of one freeze, unfreeze or train_only call.

    Called plainly the change persists; ``undo()`` or leaving a ``with``
    block restores the exact prior ``requires_grad`` of every parameter and
    ``training`` (and stickiness) of every module, also on an exception.
    Gradients cleared by a freeze are not restored.

    Attributes:
        action: ``"freeze"``, ``"unfreeze"`` or ``"train_only"``.
        selection: what the selectors matched.
        frozen: names of parameters this call froze.
        unfrozen: names of parameters this call made trainable.
        undo_hooks: reverts of sub-tensor (``gg.rows``) changes, run first by ``undo``.

    Example:
        >>> import torch, gradgate as gg
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> with gg.freeze(net, "0"):
        ...     net[0].weight.requires_grad
        False
        >>> net[0].weight.requires_grad
        True
    """

    def __init__(
        self,
        model: nn.Module,
        action: str,
        selection: Selection,
        prior: _Snapshot,
    ) -> None:
        self.model = model
        self.action = action
        self.selection = selection
        self._prior = prior
        self.frozen: list[str] = []
        self.unfrozen: list[str] = []
        self._undone = False
        self.undo_hooks: list[Callable[[], None]] = []

    def undo(self) -> None:
        """Restore every ``requires_grad``, ``training`` flag and sticky mark.

        Example:
            >>> import torch, gradgate as gg
            >>> lin = torch.nn.Linear(2, 2)
            >>> h = gg.freeze(lin)
            >>> h.undo(); lin.weight.requires_grad
            True
        """
        for revert in reversed(self.undo_hooks):  # rows (issue 16): partial tensors first
            revert()
        prior = self._prior
        frozen: list[nn.Parameter] = []
        unfrozen: list[nn.Parameter] = []
        with gc_paused():
            for p, flag in zip(prior.params, prior.requires_grad):
                if p.requires_grad != flag:
                    (unfrozen if flag else frozen).append(p)
                p.requires_grad_(flag)
            for m, training, train_attr in zip(prior.modules, prior.training, prior.train_attr):
                if train_attr is None:
                    _release(m)
                else:
                    m.__dict__["train"] = train_attr
                m.__dict__["training"] = training
        self._undone = True
        if frozen or unfrozen:
            announce(Change(self.model, "undo", tuple(frozen), tuple(unfrozen)))

    def __enter__(self) -> Freezing:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.undo()

    def __repr__(self) -> str:
        return (
            f"Freezing({self.action} {type(self.model).__name__}: "
            f"{len(self.frozen)} frozen, {len(self.unfrozen)} unfrozen"
            f"{', undone' if self._undone else ''})"
        )


class _Snapshot:
    """Every flag a call may change, as parallel lists (few objects on large models)."""

    def __init__(self, index: ModelIndex) -> None:
        self.params = list(index.params.values())
        self.requires_grad = [p.requires_grad for p in self.params]
        self.modules = index.mods
        self.training = [m.training for m in self.modules]
        self.train_attr = [m.__dict__.get("train") for m in self.modules]


def _check_shared(
    index: ModelIndex,
    sel: Selection,
    action: str,
    shared: Shared | None,
    selectors: Sequence[object],
) -> dict[int, bool]:
    """Find tied parameters split across the selection boundary.

    Returns the forced ``requires_grad`` for each such parameter (when
    ``shared`` decides) and raises ``SharedParameterError`` otherwise.
    """
    forced: dict[int, bool] = {}
    if not index.shared:
        return forced
    by_id: dict[int, list[str]] = {}
    for name, p in index.aliases:
        if id(p) in index.shared:
            by_id.setdefault(id(p), []).append(name)
    for key, names in by_id.items():
        inside = [n for n in names if n in sel.aliases]
        outside = [n for n in names if n not in sel.aliases]
        if not inside or not outside:
            continue
        p = index.params[index.canonical[key]]
        if action == "freeze" and not p.requires_grad:
            continue
        if action == "unfreeze" and p.requires_grad:
            continue
        if shared is not None:
            forced[key] = shared is Shared.TRAIN
            continue
        want, other = {
            "freeze": ("freeze", "trains"),
            "unfreeze": ("unfreeze", "is frozen"),
            "train_only": ("train", "would be frozen"),
        }[action]
        raise SharedParameterError(
            f"parameter {index.canonical[key]!r} is shared: {action}("
            f"{describe_selectors(selectors)}) would {want} it through "
            f"{', '.join(repr(owner_of(n) or '(root)') for n in inside)}, but "
            f"{', '.join(repr(owner_of(n) or '(root)') for n in outside)} {other}; "
            "pass shared='freeze' or shared='train' to choose"
        )
    return forced


def _apply(
    model: nn.Module,
    action: str,
    selectors: Sequence[Selector],
    exclude: Selector | None,
    mode: object,
    shared: object,
) -> Freezing:
    mode_e: Mode = choice(Mode, "mode", mode)
    shared_e: Shared | None = None if shared is None else choice(Shared, "shared", shared)
    selectors, rows_plan = subtensor.plan(model, action, selectors, exclude)  # rows (issue 16)
    with gc_paused():
        handle = _apply_walk(model, action, selectors, exclude, mode_e, shared_e, rows_plan.want)
    rows_plan.carry_out(handle)  # rows (issue 16): install the partial tensors
    return handle


def _apply_walk(
    model: nn.Module,
    action: str,
    selectors: Sequence[Selector],
    exclude: Selector | None,
    mode_e: Mode,
    shared_e: Shared | None,
    rows_want: dict[int, bool],
) -> Freezing:
    index = ModelIndex(model)
    sel = resolve(index, selectors, exclude)
    forced = _check_shared(index, sel, action, shared_e, selectors)
    handle = Freezing(model, action, sel, _Snapshot(index))
    selected_ids = {id(p) for _, p in sel.named_parameters()}
    try:
        for name, p in index.params.items():
            key = id(p)
            if key in forced:
                want = forced[key]
            elif key in rows_want:  # rows (issue 16): a partial tensor keeps requires_grad
                want = rows_want[key]
            elif key in selected_ids:
                want = action != "freeze"
            elif action == "train_only":
                want = False
            else:
                continue
            want = want and is_float(p)
            if want == p.requires_grad:
                continue
            p.requires_grad_(want)
            if want:
                handle.unfrozen.append(name)
            else:
                p.grad = None
                handle.frozen.append(name)
        _update_modes(index, sel, action, mode_e)
    except BaseException as e:
        handle.undo()
        if isinstance(e, GradgateError):
            raise
        raise GradgateError(
            f"error while running {action}({describe_selectors(selectors)}) on "
            f"{type(model).__name__}: {e}"
        ) from e
    if handle.frozen or handle.unfrozen:
        params = index.params
        announce(
            Change(
                model,
                action,
                tuple(params[n] for n in handle.frozen),
                tuple(params[n] for n in handle.unfrozen),
            )
        )
    return handle


def _update_modes(index: ModelIndex, sel: Selection, action: str, mode: Mode) -> None:
    trains = trainable_flags(index)
    selected = set(sel.modules)
    names, mods, parent = index.names, index.mods, index.parent
    if action == "freeze":
        candidate = [n in selected for n in names]
    elif action == "train_only":
        ancestor = [False] * len(names)
        position = index.position
        marks = [position[r] for r in sel.roots]
        marks += [
            index.alias_owner[i] for i, (n, _) in enumerate(index.aliases) if n in sel.aliases
        ]
        for i in marks:
            while i >= 0 and not ancestor[i]:
                ancestor[i] = True
                i = parent[i]
        candidate = [not (n in selected or a) for n, a in zip(names, ancestor)]
    else:
        candidate = [False] * len(names)
    released: list[int] = []
    for i, module in enumerate(mods):
        sticky = is_sticky(module)
        if trains[i] or (action == "unfreeze" and names[i] in selected):
            if sticky:
                _release(module)
                released.append(i)
        elif mode is Mode.EVAL and candidate[i] and not sticky:
            _set_sticky(module)
    for i in released:  # pre-order: a parent is settled before its children
        if i:
            mods[i].training = mods[parent[i]].training


def freeze(
    model: nn.Module,
    *selectors: Selector,
    exclude: Selector | None = None,
    mode: str = "eval",
    shared: str | None = None,
) -> Freezing:
    """Freeze the selected parts of ``model`` (the whole model with no selector).

    Selected parameters get ``requires_grad=False`` and ``grad=None`` (a zero
    gradient is what lets momentum, Adam or weight decay move a frozen
    weight). With ``mode="eval"`` every module left fully frozen stays in
    inference mode (BatchNorm keeps its running statistics, Dropout is off)
    even after a later ``model.train()``.

    Args:
        model: the model to change in place.
        *selectors: what to freeze (see ``select``).
        exclude: selectors that stay as they are.
        mode: ``"eval"`` (sticky inference mode) or ``"keep"`` (leave modes).
        shared: for a parameter tied between a frozen and a trainable module,
            ``"freeze"`` or ``"train"``; ``None`` raises.

    Returns:
        A ``Freezing`` handle; use it as a context manager for a temporary freeze.

    Raises:
        NoMatchError: a selector matched nothing (the model is unchanged).
        SharedParameterError: a tied parameter crosses the boundary.
        InvalidArgumentError: ``mode`` or ``shared`` is not a valid value.

    Example:
        >>> import torch, gradgate as gg
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
        >>> _ = gg.freeze(net, "1")
        >>> net.train()[1].training, net[1].weight.requires_grad
        (False, False)
    """
    return _apply(model, "freeze", selectors, exclude, mode, shared)


def unfreeze(
    model: nn.Module,
    *selectors: Selector,
    exclude: Selector | None = None,
    shared: str | None = None,
) -> Freezing:
    """Make the selected parts trainable again (the whole model with no selector).

    Unfreezing releases sticky inference mode: a released module follows its
    parent's train/eval mode again. Integer parameters never train.

    Args:
        model: the model to change in place.
        *selectors: what to unfreeze (see ``select``).
        exclude: selectors that stay as they are.
        shared: for a tied parameter whose other owner stays frozen,
            ``"train"`` or ``"freeze"``; ``None`` raises.

    Returns:
        A ``Freezing`` handle.

    Example:
        >>> import torch, gradgate as gg
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> _ = gg.freeze(net)
        >>> _ = gg.unfreeze(net, "1")
        >>> [p.requires_grad for p in net.parameters()]
        [False, False, True, True]
    """
    return _apply(model, "unfreeze", selectors, exclude, "eval", shared)


def train_only(
    model: nn.Module,
    *selectors: Selector,
    exclude: Selector | None = None,
    mode: str = "eval",
    shared: str | None = None,
) -> Freezing:
    """Make exactly the selection trainable and freeze everything else.

    ``train_only(agent, "front_end")`` gives gradients only to the front-end;
    gradients still flow *through* the frozen back-end to reach it.

    Args:
        model: the model to change in place.
        *selectors: what trains (see ``select``).
        exclude: selectors removed from what trains (they are frozen).
        mode: ``"eval"`` (sticky inference mode for frozen modules) or ``"keep"``.
        shared: as in ``freeze``.

    Returns:
        A ``Freezing`` handle.

    Example:
        >>> import torch, gradgate as gg
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> _ = gg.train_only(net, "0")
        >>> [n for n, p in net.named_parameters() if p.requires_grad]
        ['0.weight', '0.bias']
    """
    return _apply(model, "train_only", selectors, exclude, mode, shared)


def named_trainable_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Yield ``(name, parameter)`` for each trainable parameter, tied ones once.

    Example:
        >>> import torch, gradgate as gg
        >>> lin = torch.nn.Linear(2, 2)
        >>> _ = gg.freeze(lin, "bias")
        >>> [n for n, _ in gg.named_trainable_parameters(lin)]
        ['weight']
    """
    rows = subtensor.trainable_of(model)  # rows (issue 16): a partial tensor's trainable rows
    for name, p in model.named_parameters():
        if p.requires_grad:
            yield name, rows.get(id(p), p)


def trainable_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Yield each trainable parameter once (what an optimizer should get).

    Example:
        >>> import torch, gradgate as gg
        >>> lin = torch.nn.Linear(2, 2)
        >>> _ = gg.freeze(lin, "bias")
        >>> len(list(gg.trainable_parameters(lin)))
        1
    """
    for _, p in named_trainable_parameters(model):
        yield p


def frozen_modules(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """Yield modules that hold no trainable parameter and are frozen.

    A module counts as frozen when it is sticky, or when it has parameters
    and none of them trains (however they were frozen).

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
        >>> _ = net[0].requires_grad_(False)
        >>> [n for n, _ in frozen_modules(net)]
        ['', '0']
    """
    index = ModelIndex(model)
    trains = trainable_flags(index)
    has_params = [False] * len(index.names)
    for owner in index.alias_owner:
        has_params[owner] = True
    for i in range(len(has_params) - 1, 0, -1):
        if has_params[i]:
            has_params[index.parent[i]] = True
    seen: set[int] = set()
    for i, (name, module) in enumerate(zip(index.names, index.mods)):
        if id(module) in seen:
            continue
        seen.add(id(module))
        if not trains[i] and (is_sticky(module) or has_params[i]):
            yield name, module
