"""``sync``: an optimizer (and its scheduler) follows the model's trainable set.

With several optimizers over one model each keeps its own parameters. Every
optimizer ``sync`` has seen has a ledger of the parameters it holds or has
held; a newly trainable parameter goes to the optimizer whose ledger has it,
never to a second one.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .._events import Change, announce
from .._index import ModelIndex, gc_paused
from .._optimizers import unwrap_optimizer
from ..errors import InvalidArgumentError
from ..selection import Selector, resolve
from .groups import Rules, build_groups
from .schedulers import extend_scheduler, peak_lr

__all__ = ["Ledger", "claim", "held_elsewhere", "sync"]


class Ledger:
    """The parameters one optimizer holds or has held, as ``sync`` saw them.

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(1))
        >>> ledger = Ledger()
        >>> ledger.note(p); ledger.has(p), ledger.has(torch.nn.Parameter(torch.zeros(1)))
        (True, False)
    """

    def __init__(self) -> None:
        # Weak references: a ledger never keeps a parameter alive, and an id
        # reused by a later tensor is told apart by the referent's identity.
        self.held: dict[int, weakref.ref[torch.Tensor]] = {}
        self.adopted: set[int] = set()
        # How many groups the optimizer had when sync first saw it: the groups
        # it was built with, whose rate a new group without a rule lr takes.
        self.built: int | None = None

    def note(self, p: torch.Tensor, adopted: bool = False) -> None:
        """Record that the optimizer holds ``p`` (``adopted``: only because nobody else did)."""
        if not self.has(p):
            self.adopted.discard(id(p))
        self.held[id(p)] = weakref.ref(p)
        if adopted:
            self.adopted.add(id(p))

    def has(self, p: torch.Tensor) -> bool:
        """Whether the optimizer holds or has held ``p``."""
        ref = self.held.get(id(p))
        return ref is not None and ref() is p

    def forget(self, p: torch.Tensor) -> None:
        """Drop ``p`` from the ledger (it now belongs to another optimizer)."""
        self.held.pop(id(p), None)
        self.adopted.discard(id(p))


_lock = threading.Lock()
_ledgers: weakref.WeakKeyDictionary[torch.optim.Optimizer, Ledger] = weakref.WeakKeyDictionary()


def _ledger(optimizer: torch.optim.Optimizer) -> Ledger:
    with _lock:
        ledger = _ledgers.get(optimizer)
        if ledger is None:
            ledger = _ledgers[optimizer] = Ledger()
        return ledger


def _others(optimizer: torch.optim.Optimizer) -> list[tuple[torch.optim.Optimizer, Ledger]]:
    with _lock:
        return [(o, led) for o, led in list(_ledgers.items()) if o is not optimizer]


def _ids(optimizer: torch.optim.Optimizer) -> set[int]:
    return {id(p) for g in optimizer.param_groups for p in g["params"]}


def held_elsewhere(optimizer: Any, params: Sequence[torch.Tensor]) -> set[int]:
    """The ids of those ``params`` that another optimizer ``sync`` has seen holds or held.

    Example:
        >>> net = torch.nn.Linear(2, 2)
        >>> a = torch.optim.SGD([net.weight], lr=0.1)
        >>> b = torch.optim.SGD([net.bias], lr=0.1)
        >>> _ = sync(b, net, params=[])
        >>> held_elsewhere(a, [net.bias]) == {id(net.bias)}, held_elsewhere(b, [net.bias])
        (True, set())
    """
    opt = unwrap_optimizer(optimizer)
    others = [(led, _ids(o)) for o, led in _others(opt)]
    return {id(p) for p in params if any(led.has(p) or id(p) in ids for led, ids in others)}


def claim(optimizer: Any, model: nn.Module) -> list[torch.optim.Optimizer]:
    """Make ``optimizer`` the only one ``sync`` counts as holding ``model``'s parameters.

    For a trainer callback that owns the fit's optimizer: an optimizer of an
    earlier fit of the same model (the old Trainer, ``model._trainer``, or
    one not yet garbage-collected) still holds or held the parameters, and
    ``sync`` would leave to it what this fit unfreezes. The other optimizers
    are forgotten by ``sync`` (not changed); syncing one of them again makes
    it known afresh. Returns the optimizers forgotten.

    Example:
        >>> net = torch.nn.Linear(2, 2)
        >>> old = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> _ = sync(old, net)
        >>> new = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> claim(new, net) == [old], held_elsewhere(new, [net.weight])
        (True, set())
    """
    opt = unwrap_optimizer(optimizer)
    mine = {id(p) for p in ModelIndex(model).params.values()}
    gone: list[torch.optim.Optimizer] = []
    with _lock:
        for o, led in list(_ledgers.items()):
            if o is not opt and (mine & _ids(o) or mine & set(led.held)):
                del _ledgers[o]
                gone.append(o)
    return gone


def _drop(optimizer: torch.optim.Optimizer, gone: set[int], names: dict[int, str]) -> None:
    """Take the parameters ``gone`` out of every group, with their state."""
    for group in optimizer.param_groups:
        keep = [p for p in group["params"] if id(p) not in gone]
        for p in group["params"]:
            if id(p) in gone:
                optimizer.state.pop(p, None)
        group["params"][:] = keep  # in place: LBFGS keeps a reference to this list
        if "param_names" in group:
            group["param_names"] = [names.get(id(p), "?") for p in keep]
    if gone and isinstance(optimizer, torch.optim.LBFGS):
        # Its curvature history spans the old flat parameter vector.
        optimizer.state.clear()
        optimizer._numel_cache = None


def _meant_lr(
    optimizer: torch.optim.Optimizer, scheduler: Any, built: int, names: Sequence[str]
) -> float:
    """The learning rate of a new group no rule gives one: the rate the user evidently meant.

    The peak rate (``initial_lr``/``max_lr`` when a scheduler set one, else
    ``lr``) of the groups the optimizer was built with when they all agree;
    else the optimizer's default ``lr`` when some built group uses it (it was
    passed to the constructor); else group 0's, with a warning naming the
    rates and how to choose. Never a constructor default no group uses.
    """
    count = max(1, min(built, len(optimizer.param_groups)))
    peaks = [peak_lr(optimizer, scheduler, i) for i in range(count)]
    distinct = sorted(set(peaks))
    if len(distinct) == 1:
        return distinct[0]
    default = optimizer.defaults.get("lr")
    if isinstance(default, (int, float, torch.Tensor)) and float(default) in distinct:
        return float(default)
    shown = ", ".join(f"{v:g}" for v in distinct)
    warnings.warn(
        f"gg.sync: the optimizer's groups train at different rates ({shown}), so the rate "
        f"for the newly trainable {list(names)[:3]} cannot be known; they join at group "
        f"0's ({peaks[0]:g}). Choose with rules={{selector: {{'lr': ...}}}}",
        UserWarning,
        stacklevel=3,
    )
    return peaks[0]


def _init_eager_state(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> None:
    """Create the state an optimizer creates only in its constructor, for added ``params``.

    Adagrad before torch 2.12 builds ``step`` and ``sum`` in ``__init__`` and
    its ``step`` reads them unconditionally (``KeyError: 'sum'`` for a
    parameter added later); they are made here exactly as its constructor
    makes them (with the group's ``initial_accumulator_value``).
    """
    if not isinstance(optimizer, torch.optim.Adagrad):
        return
    wanted = {id(p) for p in params}
    for group in optimizer.param_groups:
        init = group.get(
            "initial_accumulator_value", optimizer.defaults.get("initial_accumulator_value", 0)
        )
        fused = bool(group.get("fused"))
        for p in group["params"]:
            if id(p) not in wanted or optimizer.state.get(p):
                continue
            wide = torch.get_default_dtype() == torch.float64 and not fused
            step = torch.zeros(
                (),
                dtype=torch.float64 if wide else torch.float32,
                device=p.device if fused else None,
            )
            value = complex(init, init) if torch.is_complex(p) else init
            optimizer.state[p] = {
                "step": step,
                "sum": torch.full_like(p, value, memory_format=torch.preserve_format),
            }


def sync(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    scheduler: Any = None,
    rules: Rules = (),
    params: Selector | Sequence[Selector] | None = None,
) -> dict[str, list[str]]:
    """Bring an optimizer (and scheduler) in line with the model's trainable set.

    Call it after any freeze or unfreeze. Newly frozen parameters lose their
    gradient and optimizer state and leave their group (groups stay, possibly
    empty, so schedulers keep their per-group lists aligned); newly trainable
    ones join in new groups with options from ``rules`` (else the optimizer's
    defaults; a rule's ``lr`` is the group's peak). Without a rule ``lr`` a
    new group takes the rate the user evidently meant: the peak rate of the
    groups the optimizer was built with when they agree, else the
    constructor's ``lr`` when a built group uses it, else group 0's with a
    warning (never a constructor default no group uses). The scheduler learns
    the new groups: they start where group 0 is now, scaled to their peak,
    and keep that ratio (docs/optimizers.md). Optimizer wrappers exposing
    ``.optimizer`` (accelerate, Lightning) are accepted.

    Which optimizer a newly trainable parameter joins, with one or several
    optimizers over the model (call ``sync`` on each):

    1. the optimizer that held it before it was frozen gets it back;
    2. an optimizer never adds a parameter another optimizer holds or held;
    3. with ``params=``, the selected parameters no other optimizer holds or
       held join this one (and only those); selecting one another optimizer
       holds or held is refused;
    4. otherwise a parameter no optimizer ever held joins the one synced. If a
       second optimizer that ``sync`` had not seen yet turns out to hold it,
       syncing that one takes it back from the first.

    Args:
        optimizer: any ``torch.optim`` optimizer over (some of) ``model``.
        model: the model whose ``requires_grad`` flags are the truth.
        scheduler: optional LR scheduler (Sequential/Chained included).
        rules: ``{selector: {option: value}}`` for the new groups.
        params: selectors of the new parameters this optimizer takes.

    Returns:
        ``{"removed": [...], "added": [...], "left": [...]}`` parameter names;
        ``left`` are trainable parameters left to another optimizer (or not
        selected by ``params``).

    Raises:
        InvalidArgumentError: ``params`` selects a parameter another optimizer
            holds or held (it would be stepped twice). Nothing is changed then.

    Example:
        >>> import torch, gradgate as gg
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> opt = torch.optim.Adam(gg.param_groups(net, lr=1e-3))
        >>> _ = gg.freeze(net, "0")
        >>> gg.sync(opt, net)["removed"]
        ['0.weight', '0.bias']
    """
    with gc_paused():  # 10^5 ledger entries: no repeated full collections (see _index)
        return sync_indexed(optimizer, ModelIndex(model), scheduler, rules, params)


def sync_indexed(
    optimizer: torch.optim.Optimizer,
    index: ModelIndex,
    scheduler: Any = None,
    rules: Rules = (),
    params: Selector | Sequence[Selector] | None = None,
) -> dict[str, list[str]]:
    """``sync`` over a walk of the model the caller already made (one walk per schedule step).

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(2, 2)
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> _ = net.bias.requires_grad_(False)
        >>> sync_indexed(opt, ModelIndex(net))["removed"]
        ['bias']
    """
    with gc_paused():
        opt = unwrap_optimizer(optimizer)
        model = index.model
        names = dict(index.canonical)
        ledger = _ledger(opt)
        others = _others(opt)
        other_ids = [(o, led, _ids(o)) for o, led in others]
        held_now = [p for g in opt.param_groups for p in g["params"]]
        present = {id(p) for p in held_now}
        chosen: set[str] | None = None
        if params is not None:
            sels = list(params) if isinstance(params, (list, tuple)) else [params]
            chosen = set(resolve(index, sels).parameters) if sels else set()

        fresh: list[tuple[str, nn.Parameter]] = []
        adopted: set[int] = set()
        left: list[str] = []
        for name, w in index.params.items():
            p = w
            if not p.requires_grad or id(p) in present:
                continue
            holders = [o for o, led, ids in other_ids if id(p) in ids or led.has(p)]
            if holders:
                if chosen is not None and name in chosen:
                    raise InvalidArgumentError(
                        f"params= selects {name!r}, which another optimizer "
                        f"({type(holders[0]).__name__}) holds or held: it returns there when "
                        "that one is synced, and in both it would be stepped twice. Leave it out "
                        "of params="
                    )
                left.append(name)
            elif ledger.has(p) or chosen is None or name in chosen:
                fresh.append((name, p))
                if chosen is None and not ledger.has(p):
                    adopted.add(id(p))  # a default choice: a holder seen later takes it back
            else:
                left.append(name)
        is_lbfgs = isinstance(opt, torch.optim.LBFGS)
        with_names = "param_names" in opt.param_groups[0]
        # Built before anything changes (also with nothing new, so that a rule
        # that matches nothing is reported at once): a failure leaves all as it was.
        new_groups = build_groups(model, fresh, rules, with_names=with_names, index=index)
        if ledger.built is None:
            ledger.built = len(opt.param_groups)
        if any("lr" not in g for g in new_groups):
            meant = _meant_lr(opt, scheduler, ledger.built, [n for n, _ in fresh])
            for g in new_groups:
                g.setdefault("lr", meant)

        # Parameters this optimizer holds that another one only adopted by default.
        for o, led, ids in other_ids:
            reclaimed = {id(p) for p in held_now if id(p) in led.adopted and id(p) in ids}
            if reclaimed:
                _drop(o, reclaimed, names)
                for p in held_now:
                    if id(p) in reclaimed:
                        led.forget(p)

        gone = [p for p in held_now if id(p) in names and not p.requires_grad]
        for p in gone:
            p.grad = None
        _drop(opt, {id(p) for p in gone}, names)
        for p in held_now:
            ledger.note(p)
        for _, p in fresh:
            ledger.note(p, adopted=id(p) in adopted)
            for _, led, _ in other_ids:
                led.forget(p)

        if is_lbfgs and fresh:
            first = opt.param_groups[0]
            first["params"].extend(p for _, p in fresh)
            if with_names:
                first["param_names"].extend(n for n, _ in fresh)
            opt.state.clear()
            opt._numel_cache = None  # type: ignore[attr-defined]
        elif fresh:
            start = len(opt.param_groups)
            for group in new_groups:
                opt.add_param_group(group)
            positions = list(range(start, len(opt.param_groups)))
            _init_eager_state(opt, [p for _, p in fresh])
            extend_scheduler(scheduler, opt, positions)
        removed = [names[id(p)] for p in gone]
        added = [n for n, _ in fresh]
        if gone or fresh:
            announce(Change(model, "sync", tuple(gone), tuple(p for _, p in fresh)))
        return {"removed": removed, "added": added, "left": left}
