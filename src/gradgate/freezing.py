"""freeze / unfreeze / train_only, sticky inference mode, and the undo handle."""

from __future__ import annotations

import enum
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Literal

import torch
from torch import nn

from ._events import Change, announce
from ._index import ModelIndex, gc_paused, is_float, owner_of
from ._options import choice
from ._state import FreezePlan, ModelState, plan_freeze
from ._sticky import FollowParent, StickyEval, attach_follower, attach_mark, is_sticky, remove_mark
from .errors import GradgateError, InvalidArgumentError, SharedParameterError
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

ModeName = Literal["eval", "norm", "keep"]
SharedName = Literal["freeze", "train"]


class Mode(enum.Enum):
    """What happens to the train/eval mode of frozen modules."""

    EVAL = "eval"
    NORM = "norm"
    KEEP = "keep"


class Shared(enum.Enum):
    """Which side wins for a parameter shared by a frozen and a trainable module."""

    FREEZE = "freeze"
    TRAIN = "train"


def _set_flag(p: nn.Parameter, flag: bool) -> None:
    # An uninitialised lazy parameter refuses requires_grad_() but keeps the
    # attribute through its materialisation.
    if nn.parameter.is_lazy(p):
        p.requires_grad = flag
    else:
        p.requires_grad_(flag)


def _has_running_stats(module: nn.Module) -> bool:
    buffers = module.__dict__["_buffers"]  # a mapping, also on TorchScript modules
    return any(k in buffers and buffers[k] is not None for k in ("running_mean", "running_var"))


ModeRecord = tuple[nn.Module, StickyEval | None, StickyEval | None]


class Freezing:
    """The record of one freeze, unfreeze or train_only call.

    Called plainly the change persists; ``undo()`` or leaving a ``with``
    block reverts it, also on an exception. Undo is honest: it reverts only
    what this call changed and what nothing has changed since, per
    parameter flag and per module mode:

    - a ``requires_grad`` flag this call set is restored only while it still
      holds the value this call gave it;
    - a module this call put in sticky eval is released (back to the mode the
      trainer last asked for) only while this call's mark is still on it; a
      module this call released is held again only while nothing re-marked it.

    So handles can be undone in any order, and two threads may each run
    ``with gg.freeze(model, their_part):`` on disjoint parts of one model.
    Undoing out of order reverts each handle's own surviving changes: after
    ``a = freeze(m)`` and ``b = unfreeze(m, "x")``, ``a.undo()`` makes all but
    ``x`` trainable (``x`` was changed since) and a later ``b.undo()``
    freezes ``x`` again. Gradients cleared by a freeze are not restored; a
    second ``undo()`` does nothing.

    Attributes:
        action: ``"freeze"``, ``"unfreeze"`` or ``"train_only"``.
        selection: what the selectors matched.
        frozen: names of parameters this call froze.
        unfrozen: names of parameters this call made trainable.
        undo_hooks: reverts of what the call's ``FreezePlan`` did after the walk
            (partial tensors), run first by ``undo`` and by a failed call's roll-back.

    Example:
        >>> import torch, gradgate as gg
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> with gg.freeze(net, "0"):
        ...     net[0].weight.requires_grad
        False
        >>> net[0].weight.requires_grad
        True
    """

    def __init__(self, model: nn.Module, action: str, selection: Selection) -> None:
        self.model = model
        self.action = action
        self.selection = selection
        self.frozen: list[str] = []
        self.unfrozen: list[str] = []
        self._params: list[tuple[nn.Parameter, bool]] = []
        self._modes: list[ModeRecord] = []
        self._undone = False
        self.undo_hooks: list[Callable[[], None]] = []

    def undo(self) -> None:
        """Revert this call's changes that nothing has changed since.

        Example:
            >>> import torch, gradgate as gg
            >>> lin = torch.nn.Linear(2, 2)
            >>> h = gg.freeze(lin)
            >>> h.undo(); lin.weight.requires_grad
            True
        """
        self._revert(notify=True)

    def extend(self, other: Freezing) -> None:
        """Take over ``other``'s changes so that one ``undo()`` reverts both.

        Example:
            >>> import torch, gradgate as gg
            >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
            >>> h = gg.freeze(net, "0"); h.extend(gg.freeze(net, "1")); h.undo()
            >>> all(p.requires_grad for p in net.parameters())
            True
        """
        self.frozen += other.frozen
        self.unfrozen += other.unfrozen
        self._params += other._params
        self._modes += other._modes
        self.undo_hooks += other.undo_hooks
        other._params, other._modes, other.undo_hooks = [], [], []

    def _revert(self, notify: bool) -> None:
        if self._undone:
            return
        self._undone = True
        for revert in reversed(self.undo_hooks):  # what came after the walk goes first
            revert()
        frozen: list[nn.Parameter] = []
        unfrozen: list[nn.Parameter] = []
        with gc_paused():
            for p, before in self._params:
                if p.requires_grad != before:
                    _set_flag(p, before)
                    (unfrozen if before else frozen).append(p)
            for m, old, new in reversed(self._modes):
                mark = m.__dict__.get("train")
                if isinstance(mark, FollowParent):
                    mark = None  # released by a call, not marked since
                if mark is not new:
                    continue  # changed since: another call or the flags own it now
                if new is not None:
                    remove_mark(m)
                    m.__dict__["training"] = new.wanted
                elif old is not None:
                    old.wanted = m.training
                    attach_mark(m, old)
        if notify and (frozen or unfrozen):
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


def _check_shared(
    index: ModelIndex,
    sel: Selection,
    action: str,
    shared: Shared | None,
    selectors: Sequence[object],
    plan: FreezePlan,
) -> dict[int, bool]:
    """Find tied parameters split across the selection boundary.

    A tensor in ``plan.ties`` counts as the plan says (trainable, or not at all).

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
        counts = plan.ties.get(key, False)
        if counts is None:
            continue
        inside = [n for n in names if n in sel.aliases]
        outside = [n for n in names if n not in sel.aliases]
        if not inside or not outside:
            continue
        trains = index.params[index.canonical[key]].requires_grad or counts
        if action == "freeze" and not trains:
            continue
        if action == "unfreeze" and trains:
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
    with gc_paused():
        index = ModelIndex(model)  # the one read of the model for this call
        return apply_indexed(index, action, selectors, exclude, mode, shared)


def apply_indexed(
    index: ModelIndex,
    action: str,
    selectors: Sequence[Selector],
    exclude: Selector | None = None,
    mode: object = Mode.EVAL,
    shared: object = None,
) -> Freezing:
    """``freeze`` / ``unfreeze`` / ``train_only`` (``action``) over a walk the caller made.

    For a call that changes the trainable set and then reads the model again
    (a schedule step: freeze, ``sync``, DDP rebuild): one walk serves all of
    it. Flags are read live from the index; if row modules are installed,
    the index is marked ``reshaped`` (see ``_index.current``).

    Example:
        >>> import torch
        >>> from gradgate._index import ModelIndex
        >>> net = torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.Linear(1, 1))
        >>> apply_indexed(ModelIndex(net), "freeze", ["0"]).frozen
        ['0.weight', '0.bias']
    """
    mode_e: Mode = choice(Mode, "mode", mode)
    shared_e: Shared | None = None if shared is None else choice(Shared, "shared", shared)
    selectors, plan = plan_freeze(index, action, selectors, exclude)
    return _apply_walk(index, action, selectors, exclude, mode_e, shared_e, plan)


def _plan_flags(
    index: ModelIndex,
    sel: Selection,
    action: str,
    fixed: dict[int, bool],
) -> list[tuple[str, nn.Parameter, bool]]:
    """The ``(name, parameter, new requires_grad)`` changes a call makes.

    ``fixed`` flags (a tied-weight choice, a plan's) win over the selection.
    """
    selected_ids = {id(p) for _, p in sel.named_parameters()}
    changes = []
    # Only the selection can change unless train_only or a fixed flag reaches
    # further: then every parameter is looked at.
    scope = index.params if fixed or action == "train_only" else dict(sel.named_parameters())
    for name, p in scope.items():
        key = id(p)
        if key in fixed:
            want = fixed[key]
        elif key in selected_ids:
            want = action != "freeze"
        elif action == "train_only":
            want = False
        else:
            continue
        want = want and is_float(p)
        if want != p.requires_grad:
            changes.append((name, p, want))
    return changes


def _plan_modes(
    index: ModelIndex,
    sel: Selection,
    action: str,
    mode: Mode,
    unfrozen: set[int],
    also_trains: set[int],
) -> tuple[list[int], list[tuple[int, int]]]:
    """Which modules a call releases, and which it holds in eval (with their anchors).

    Runs after the call has set the parameter flags; ``unfrozen`` holds the
    ids of the parameters it made trainable, ``also_trains`` those of tensors
    that count as trainable whatever their flag (a plan's ``trains``).

    A module is frozen when no parameter under it trains; a parameter-free
    module takes the state of its parent (or is frozen when it is itself a
    root of a freeze). Only modules in the call's scope go sticky: the
    selection for ``freeze``, everything outside it for ``train_only``.
    Only modules whose anchor gains a trainable parameter through this call
    (or, for ``unfreeze``/``train_only``, that lie in the selection) are
    released, so calls on disjoint parts never touch each other's modules.
    """
    names, mods, parent = index.names, index.mods, index.parent
    n = len(names)
    selected = set(sel.modules)
    release: list[int] = []
    if action != "freeze":  # a freeze makes nothing trainable: nothing to release
        gained = [False] * n
        for (_, p), o in zip(index.aliases, index.alias_owner, strict=True):
            if id(p) in unfrozen:
                gained[o] = True
        for i in range(n - 1, 0, -1):
            if gained[i]:
                gained[parent[i]] = True
        position: dict[int, int] | None = None
        released: set[int] = set()
        for i, m in enumerate(mods):
            mark = m.__dict__.get("train")
            if not isinstance(mark, StickyEval):
                continue
            if mark.anchor is m:
                a = i
            else:
                if position is None:
                    position = {id(x): j for j, x in enumerate(mods)}
                a = position.get(id(mark.anchor), i)
            if (gained[a] or names[i] in selected) and id(m) not in released:
                released.add(id(m))
                release.append(i)
    stick: list[tuple[int, int]] = []
    if mode is Mode.KEEP or action == "unfreeze":
        return release, stick
    has_params = [False] * n
    trains = [False] * n
    for (_, p), o in zip(index.aliases, index.alias_owner, strict=True):
        has_params[o] = True
        if p.requires_grad or id(p) in also_trains:
            trains[o] = True
    for i in range(n - 1, 0, -1):
        up = parent[i]
        if has_params[i]:
            has_params[up] = True
        if trains[i]:
            trains[up] = True
    roots = set(sel.roots) if action == "freeze" else set()
    frozen = [h and not t for h, t in zip(has_params, trains, strict=True)]
    anchor = list(range(n))
    for i in [i for i, h in enumerate(has_params) if not h]:  # pre-order: parents first
        if names[i] in roots:
            frozen[i] = True
        elif i:
            frozen[i] = frozen[parent[i]]
            anchor[i] = anchor[parent[i]]
    inside = action == "freeze"
    candidates = [
        i
        for i, (name, f) in enumerate(zip(names, frozen, strict=True))
        if f and (name in selected) is inside
    ]
    seen: set[int] = set()
    for i in candidates:
        m = mods[i]
        if mode is Mode.NORM and not _has_running_stats(m):
            continue
        if id(m) in seen or isinstance(m.__dict__.get("train"), StickyEval):
            continue
        seen.add(id(m))
        stick.append((i, anchor[i]))
    return release, stick


def _refuse_script(index: ModelIndex, stick: list[tuple[int, int]], action: str) -> None:
    for i, _ in stick:
        m = index.mods[i]
        if isinstance(m, torch.jit.ScriptModule):
            raise InvalidArgumentError(
                f"{action} cannot hold TorchScript module {index.names[i] or '(root)'!r} "
                f"({type(m).__name__}) in inference mode: TorchScript runs no forward "
                "hooks, so a later `module.training = True` would go unseen; pass "
                "mode='keep' and call .eval() on it yourself, or exclude it"
            )


def _warn_nothing(
    action: str,
    shared: Shared | None,
    sel: Selection,
    forced: dict[int, bool],
    selectors: Sequence[object],
) -> None:
    """Warn when ``shared=`` handed every selected parameter to the other side."""
    if not forced or not len(sel):
        return
    ids = [id(p) for _, p in sel.named_parameters()]
    if action == "freeze" and shared is Shared.TRAIN and all(forced.get(k) is True for k in ids):
        message = (
            f"freeze({describe_selectors(selectors)}, shared='train') froze nothing: "
            "every selected parameter is tied to a part that trains; pass "
            "shared='freeze' to freeze them"
        )
    elif (
        action == "train_only"
        and shared is Shared.FREEZE
        and all(forced.get(k) is False for k in ids)
    ):
        message = (
            f"train_only({describe_selectors(selectors)}, shared='freeze') trains "
            "nothing: every selected parameter is tied to a part that is frozen; "
            "pass shared='train' to train them"
        )
    else:
        return
    warnings.warn(message, UserWarning, stacklevel=5)


def _apply_walk(
    index: ModelIndex,
    action: str,
    selectors: Sequence[Selector],
    exclude: Selector | None,
    mode_e: Mode,
    shared_e: Shared | None,
    plan: FreezePlan,
) -> Freezing:
    # Selectors (predicates included: their exceptions keep their type) and
    # tied-weight checks run before anything changes; what fails later (a
    # TorchScript module that cannot be held, Ctrl-C) is rolled back.
    model = index.model
    sel = resolve(index, selectors, exclude)
    forced = _check_shared(index, sel, action, shared_e, selectors, plan)
    changes = _plan_flags(index, sel, action, {**plan.fixed, **forced})
    _warn_nothing(action, shared_e, sel, forced, selectors)
    handle = Freezing(model, action, sel)
    mods, parent = index.mods, index.parent
    announced = False
    try:
        record_flag = handle._params.append
        plain = nn.Parameter
        for name, p, want in changes:
            record_flag((p, not want))
            if type(p) is plain:
                p.requires_grad_(want)
            else:
                _set_flag(p, want)
            if want:
                handle.unfrozen.append(name)
            else:
                p.grad = None
                handle.frozen.append(name)
        unfrozen = {id(p) for _, p, want in changes if want} | plan.gains
        release, stick = _plan_modes(index, sel, action, mode_e, unfrozen, plan.trains)
        _refuse_script(index, stick, action)
        # Each released module follows the nearest ancestor this call did not release.
        leader: dict[int, nn.Module] = {}
        for i in release:  # pre-order: a parent is settled before its children
            m = mods[i]
            old = m.__dict__["train"]
            handle._modes.append((m, old, None))
            remove_mark(m)
            m.__dict__["training"] = mods[parent[i]].training if i else old.wanted
            if i:
                leader[i] = leader.get(parent[i], mods[parent[i]])
                attach_follower(m, leader[i])
        record = handle._modes.append
        for i, a in stick:
            m = mods[i]
            mark = StickyEval(m, mods[a], m.__dict__["training"])
            record((m, None, mark))
            attach_mark(m, mark)
        if handle.frozen or handle.unfrozen:
            announced = True
            params = index.params
            announce(
                Change(
                    model,
                    action,
                    tuple(params[n] for n in handle.frozen),
                    tuple(params[n] for n in handle.unfrozen),
                )
            )
        plan.carry_out(handle.undo_hooks.append)
    except BaseException as e:
        # Roll back, then let the exception out with its own type (Ctrl-C
        # must stay a KeyboardInterrupt); only our own errors get context.
        handle._revert(notify=announced)
        if isinstance(e, GradgateError):
            e.add_note(
                f"while running {action}({describe_selectors(selectors)}) on "
                f"{type(model).__name__}; the model was left as it was"
            )
        raise
    return handle


def freeze(
    model: nn.Module,
    *selectors: Selector,
    exclude: Selector | None = None,
    mode: ModeName = "eval",
    shared: SharedName | None = None,
) -> Freezing:
    """Freeze the selected parts of ``model`` (the whole model with no selector).

    Selected parameters get ``requires_grad=False`` and ``grad=None`` (a zero
    gradient is what lets momentum, Adam or weight decay move a frozen
    weight). A module is frozen when no parameter under it trains; a
    parameter-free module (Dropout, ReLU) takes the state of its parent,
    unless it is itself what you selected. What happens to the train/eval
    mode of the frozen modules:

    ========  ==========================  ======================  ===========
    mode      BatchNorm/InstanceNorm      Dropout, other modules  held?
    ========  ==========================  ======================  ===========
    "eval"    eval: uses, keeps stats     eval (off)              sticky
    "norm"    eval: uses, keeps stats     left to the trainer     sticky
    "keep"    left to the trainer         left to the trainer     no
    ========  ==========================  ======================  ===========

    "Sticky" modules stay in inference mode after ``model.train()`` and even
    after ``module.training = True`` is written directly (a forward pre-hook
    re-asserts it); they let go, at their next ``train()`` or forward, as
    soon as a parameter under them trains again by any means.
    ``"norm"`` is Keras's ``trainable=False``: frozen statistics, Dropout on.

    Args:
        model: the model to change in place.
        *selectors: what to freeze (see ``select``).
        exclude: selectors that stay as they are.
        mode: ``"eval"``, ``"norm"`` or ``"keep"`` (the table above).
        shared: for a parameter tied between a frozen and a trainable module,
            ``"freeze"`` or ``"train"``; ``None`` raises. A ``"train"`` that
            leaves nothing frozen warns.

    Returns:
        A ``Freezing`` handle; use it as a context manager for a temporary freeze.

    Raises:
        NoMatchError: a selector matched nothing (the model is unchanged).
        SharedParameterError: a tied parameter crosses the boundary.
        InvalidArgumentError: ``mode`` or ``shared`` is not a valid value, or
            a TorchScript module would have to be held in eval.

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
    shared: SharedName | None = None,
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
    return _apply(model, "unfreeze", selectors, exclude, Mode.EVAL, shared)


def train_only(
    model: nn.Module,
    *selectors: Selector,
    exclude: Selector | None = None,
    mode: ModeName = "eval",
    shared: SharedName | None = None,
) -> Freezing:
    """Make exactly the selection trainable and freeze everything else.

    ``train_only(agent, "front_end")`` gives gradients only to the front-end;
    gradients still flow *through* the frozen back-end to reach it.

    Args:
        model: the model to change in place.
        *selectors: what trains (see ``select``).
        exclude: selectors removed from what trains (they are frozen).
        mode: ``"eval"``, ``"norm"`` or ``"keep"``, as in ``freeze``. A
            parameter-free module next to what trains (the dropout at the root
            of a classifier whose head trains) stays as the trainer sets it.
        shared: as in ``freeze``; a ``"freeze"`` that leaves nothing
            trainable warns.

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
    for name, p in model.named_parameters():
        if p.requires_grad:
            yield name, p


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

    A module counts as frozen when a freeze holds it in inference mode, or
    when it has parameters and none of them trains (however they were frozen).

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
        >>> _ = net[0].requires_grad_(False)
        >>> [n for n, _ in frozen_modules(net)]
        ['', '0']
    """
    with gc_paused():
        found = ModelState(model).frozen_modules()
    yield from found
