"""DDP and FSDP2 with frozen parts: nothing frozen is communicated.

Changing the trainable set is safe too.

DDP registers only the parameters that require gradients when it is built.
Freezing after wrapping fails at the next forward ("Expected to have finished
reduction ..."), and unfreezing after wrapping raises nothing while the ranks
silently diverge. ``wrap`` records the trainable set and listens to the
changes gradgate announces (freeze, unfreeze, ``sync``, schedules); a forward
after the trainable set changed (announced or by hand) raises
``StaleWrapperError``, and ``rewrap`` builds a fresh wrapper with the same
options. Schedules given the wrapper rebuild it through ``gg_refresh``: the
dependency runs from here to the schedules, never back.

Partially frozen tensors (``gg.rows``): DDP ignores each such ``W`` (its
full gradient is never bucketed) and the wrapper all-reduces the trainable
rows' gradient ``R.grad`` (``k x ...``) in the hook that fills it, once per
backward that DDP itself would synchronise: under ``no_sync()`` the rows
accumulate locally like DDP's gradients, and the next synchronised backward
averages the accumulated sum, as DDP does.

FSDP2 (``torch.distributed.fsdp.fully_shard``) reads ``requires_grad`` at
each all-gather and reduce-scatters only parameters that have gradients, so
freezing and unfreezing need no rewrap there; ``gg.sync`` still keeps the
optimizer honest.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import subtensor
from ._events import Change, subscribe
from ._index import ModelIndex
from .errors import InvalidArgumentError, StaleWrapperError
from .optim import Rules, sync

__all__ = ["CommCounter", "GatedDDP", "rewrap", "track_communication", "wrap"]


_IGNORED = "_gg_ddp_ignored"  # module attribute: the names gradgate added to DDP's ignore list
_DDP_IGNORE = "_ddp_params_and_buffers_to_ignore"  # read by DistributedDataParallel.__init__


def _trainable_names(module: nn.Module) -> tuple[str, ...]:
    return tuple(n for n, p in ModelIndex(module).params.items() if p.requires_grad)


def _rows_signature(module: nn.Module) -> tuple[tuple[str, int], ...]:
    # A partial's identity changes whenever its rows do (a new PartialRows).
    found = subtensor.partials(module)
    return tuple(
        sorted(
            (n, id(found[id(p)])) for n, p in ModelIndex(module).params.items() if id(p) in found
        )
    )


class CommCounter:
    """Counts what a DDP communication hook all-reduces (elements and bytes).

    Example:
        >>> c = CommCounter()
        >>> c.bytes, c.calls
        (0, 0)
    """

    def __init__(self) -> None:
        self.bytes = 0
        self.elements = 0
        self.calls = 0

    def count(self, tensor: torch.Tensor) -> None:
        """Count one all-reduced tensor (the rows of a partially frozen parameter)."""
        self.bytes += tensor.numel() * tensor.element_size()
        self.elements += tensor.numel()
        self.calls += 1

    def hook(self, state: Any, bucket: Any) -> torch.futures.Future[torch.Tensor]:
        """A comm hook: count the bucket, then all-reduce it as DDP would."""
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        self.count(bucket.buffer())
        return default_hooks.allreduce_hook(state, bucket)


class GatedDDP(DistributedDataParallel):
    """A ``DistributedDataParallel`` that refuses to run on a stale trainable set.

    Built by ``gg.distributed.wrap``; see there.
    """

    def __init__(self, module: nn.Module, **ddp_kwargs: Any) -> None:
        index = ModelIndex(module)
        found = subtensor.partials(module)
        _refuse_rows_only(index, found)
        restore = _ignore_partials(module, index, found)
        try:
            super().__init__(module, **ddp_kwargs)
            if found and ddp_kwargs.get("init_sync", True):
                _broadcast_partials(list(found.values()), self.process_group)
        except BaseException:
            restore()
            raise
        self.gg_ddp_kwargs = dict(ddp_kwargs)
        self.gg_trainable = _trainable_names(module)
        self.gg_counter: CommCounter | None = None
        # Partials whose row gradient the next backward must all-reduce: set by
        # each forward DDP synchronises, emptied by the reducer as it runs.
        self.gg_pending_rows: set[int] = set()
        self._gg_parts = frozenset(id(part) for part in found.values())
        self._gg_rows = _rows_signature(module)
        reducer = _RowsReducer(self)
        for part in found.values():
            subtensor.set_grad_reducer(part, reducer)
        # Announced changes mark the wrapper stale at once; a hand-made
        # ``requires_grad_`` is caught by comparing the flags at the next forward.
        self.gg_stale = False
        self._gg_params = tuple(index.params.values())
        self._gg_flags = tuple(p.requires_grad for p in self._gg_params)
        ids = {id(p) for p in self._gg_params} | {id(part.trainable) for part in found.values()}
        me = weakref.ref(self)

        def hear(change: Change) -> None:
            # A weak reference: a listener must not keep a dropped wrapper alive.
            wrapper = me()
            if wrapper is not None and any(
                id(p) in ids for p in (*change.frozen, *change.unfrozen)
            ):
                wrapper.gg_stale = True

        weakref.finalize(self, subscribe(hear))

    def gg_is_stale(self) -> bool:
        """Whether the trainable set differs from the one this wrapper was built for.

        Example (needs a process group): ``ddp.gg_is_stale()``
        """
        flags = tuple(p.requires_grad for p in self._gg_params)
        if self.gg_stale or flags != self._gg_flags:
            now = (_trainable_names(self.module), _rows_signature(self.module))
            self.gg_stale = now != (self.gg_trainable, self._gg_rows)
        return self.gg_stale

    def gg_refresh(self) -> GatedDDP:
        """This wrapper if it fits the trainable set, else ``rewrap(self)`` (a collective call).

        Example (needs a process group): ``ddp = ddp.gg_refresh()``
        """
        return rewrap(self) if self.gg_is_stale() else self

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        if self.gg_is_stale():
            now = _trainable_names(self.module)
            was, cur = set(self.gg_trainable), set(now)
            frozen = sorted(was - cur)
            unfrozen = sorted(cur - was)
            rows = sorted({n for n, _ in set(self._gg_rows) ^ set(_rows_signature(self.module))})
            raise StaleWrapperError(
                "the trainable set changed after DDP was built "
                f"(frozen since: {frozen[:5] or 'none'}, "
                f"unfrozen since: {unfrozen[:5] or 'none'}, "
                f"rows changed since: {rows[:5] or 'none'}); "
                "DDP would stall or let the ranks silently diverge. Call "
                "model = gg.distributed.rewrap(model, optimizer) after freezing or unfreezing"
            )
        synced = torch.is_grad_enabled() and self.require_backward_grad_sync
        self.gg_pending_rows = set(self._gg_parts) if synced else set()
        return super().forward(*inputs, **kwargs)  # type: ignore[no-untyped-call]


class _RowsReducer:
    """Averages a partial tensor's row gradient over the ranks of one wrapper.

    Runs in the hook that fills ``R.grad``, once per backward DDP synchronises:
    the same point, and the same accumulated gradient, that DDP all-reduces.
    """

    def __init__(self, ddp: GatedDDP) -> None:
        self.ddp = weakref.ref(ddp)

    def __call__(self, part: subtensor.PartialRows, grad: torch.Tensor) -> None:
        ddp = self.ddp()
        if ddp is None or id(part) not in ddp.gg_pending_rows:
            return  # under no_sync(), or a forward that bypassed the wrapper: stays local
        ddp.gg_pending_rows.discard(id(part))
        group = ddp.process_group
        grad.div_(dist.get_world_size(group))
        dist.all_reduce(grad, group=group)
        if ddp.gg_counter is not None:
            ddp.gg_counter.count(grad)


def _refuse_rows_only(index: ModelIndex, found: dict[int, subtensor.PartialRows]) -> None:
    if not found or any(p.requires_grad and id(p) not in found for p in index.params.values()):
        return
    names = [n for n, p in index.params.items() if id(p) in found]
    raise InvalidArgumentError(
        f"gg.distributed.wrap: only rows of {', '.join(repr(n) for n in names)} train "
        "(gg.rows) and DDP refuses a model with no other trainable parameter; train at "
        "least one whole tensor as well, or all-reduce the rows' gradients yourself "
        "without DDP (see docs/rows.md)"
    )


def _ignore_partials(
    module: nn.Module, index: ModelIndex, found: dict[int, subtensor.PartialRows]
) -> Callable[[], None]:
    """Put every name of a partial ``W`` on DDP's ignore list; return what undoes it.

    The user's own ignore entries stay; the names gradgate added for an
    earlier wrapper and that are whole again leave the list.
    """
    d = module.__dict__
    saved = {k: d[k] for k in (_IGNORED, _DDP_IGNORE) if k in d}
    flags = [(p, p.__dict__.get("_ddp_ignored")) for _, p in index.aliases]
    before = set(d.get(_IGNORED, ()))
    user = [n for n in d.get(_DDP_IGNORE, ()) if n not in before]
    ours = [n for n, p in index.aliases if id(p) in found]
    for n, p in index.aliases:
        if id(p) in found:
            p._ddp_ignored = True  # type: ignore[attr-defined]  # DDP's mixed precision reads it
        elif n in before:
            p.__dict__.pop("_ddp_ignored", None)
    if ours or before:
        d[_IGNORED] = ours
        d[_DDP_IGNORE] = user + ours

    def restore() -> None:
        for k in (_IGNORED, _DDP_IGNORE):
            d.pop(k, None)
        d.update(saved)
        for p, flag in flags:
            p.__dict__.pop("_ddp_ignored", None)
            if flag is not None:
                p._ddp_ignored = flag  # type: ignore[attr-defined]

    return restore


def _broadcast_partials(parts: list[subtensor.PartialRows], group: Any) -> None:
    # DDP broadcasts the parameters it manages from rank 0 when built; the
    # partial tensors it ignores get the same, and their rows follow.
    for part in parts:
        part.write_back()
        dist.broadcast(part.weight.data, group=group, group_src=0)
        part.read_back()


def wrap(model: nn.Module, **ddp_kwargs: Any) -> GatedDDP:
    """Wrap ``model`` in DDP, recording its trainable set.

    Frozen parameters are never registered with DDP's reducer, so they are
    never all-reduced. A partially frozen tensor (``gg.rows``) is ignored by
    DDP and only its trainable rows' gradient is all-reduced (see the module
    docstring); a model where nothing but rows trains is refused
    (``InvalidArgumentError``). A forward after the trainable set changed raises
    ``StaleWrapperError`` instead of diverging.

    Args:
        model: the (already frozen as wanted) module.
        **ddp_kwargs: passed to ``DistributedDataParallel``.

    Returns:
        The wrapper; ``rewrap`` builds a fresh one with the same options.

    Example (needs an initialised process group, so not run here):
        ``ddp = gg.distributed.wrap(model)``
    """
    return GatedDDP(model, **ddp_kwargs)


def track_communication(ddp: GatedDDP) -> CommCounter:
    """Register a counting all-reduce hook on ``ddp``; ``rewrap`` carries it over.

    Example (needs a process group): ``counter = track_communication(ddp)``
    """
    counter = CommCounter()
    _register(ddp, counter)
    ddp.gg_counter = counter
    return counter


def _register(ddp: DistributedDataParallel, counter: CommCounter) -> None:
    # DDP checks the hook's annotations against dist.GradBucket at run time;
    # postponed (string) annotations fail that check, an unannotated lambda passes.
    ddp.register_comm_hook(None, lambda state, bucket: counter.hook(state, bucket))


_DDP = TypeVar("_DDP", bound=DistributedDataParallel)


def _ddp_options(ddp: DistributedDataParallel) -> dict[str, Any]:
    """The constructor options a plain DDP was built with, read back from it.

    DDP keeps each option it was given as an attribute; the ones gradgate
    cannot read back (delayed all-reduce parameters) are refused.
    """
    if getattr(ddp, "_delay_all_reduce_params", None):
        raise InvalidArgumentError(
            "cannot rebuild this DistributedDataParallel after the trainable set changed: it "
            "was built with delay_all_reduce_named_params, which it does not keep; wrap the "
            "model with gg.distributed.wrap (which records its options) instead"
        )
    accepted = inspect.signature(DistributedDataParallel.__init__).parameters
    options: dict[str, Any] = {
        "device_ids": ddp.device_ids,
        "output_device": ddp.output_device,
        "dim": ddp.dim,
        "find_unused_parameters": ddp.find_unused_parameters,
        "gradient_as_bucket_view": ddp.gradient_as_bucket_view,
        "static_graph": ddp.static_graph,
    }
    mesh = getattr(ddp, "device_mesh", None)
    if mesh is not None and "device_mesh" in accepted:
        options["device_mesh"] = mesh
    else:
        options["process_group"] = ddp.process_group
    if "forward_sync_buffers" in accepted and hasattr(ddp, "forward_sync_buffers"):
        options["forward_sync_buffers"] = ddp.forward_sync_buffers
    elif hasattr(ddp, "broadcast_buffers"):
        options["broadcast_buffers"] = ddp.broadcast_buffers
    cap = getattr(ddp, "bucket_bytes_cap", None)
    if cap is not None:
        options["bucket_cap_mb"] = cap / (1024 * 1024)
    for name in ("mixed_precision", "skip_all_reduce_unused_params", "batched_grad_copy"):
        if name in accepted and hasattr(ddp, name):
            options[name] = getattr(ddp, name)
    return options


def rewrap(
    ddp_model: _DDP,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    rules: Rules = (),
    *,
    in_place: bool = False,
) -> _DDP:
    """Build a fresh DDP around the same module after the trainable set changed.

    The one rebuild every part of gradgate uses (``GatedDDP.gg_refresh``,
    the schedules, ``AutoFreeze``, the Lightning and HF callbacks). The old
    wrapper's autograd hooks are removed, the new one is built with the same
    options (a ``gg.distributed.wrap`` wrapper recorded them; a plain
    ``DistributedDataParallel``'s are read back from it) and broadcasts the
    module state from rank 0 as DDP does at construction; communication hooks
    registered on the old one are registered again. When given, the optimizer
    and scheduler are brought in line with ``gg.sync``.

    A collective call: every rank must make it at the same point.

    Args:
        ddp_model: a ``DistributedDataParallel`` (or ``GatedDDP``).
        optimizer: an optimizer to ``gg.sync`` with the new trainable set.
        scheduler: its scheduler.
        rules: ``gg.sync`` rules for new groups.
        in_place: rebuild the same wrapper object (the one a trainer's loop
            already holds, as the HF Trainer's does) instead of a new one.

    Returns:
        The new wrapper (``ddp_model`` itself with ``in_place=True``).

    Raises:
        InvalidArgumentError: a plain DDP built with options it does not keep.

    Example (needs a process group): ``ddp = gg.distributed.rewrap(ddp, opt)``
    """
    module = ddp_model.module
    counter: CommCounter | None = None
    if isinstance(ddp_model, GatedDDP):
        options = dict(ddp_model.gg_ddp_kwargs)
        counter = ddp_model.gg_counter
    else:
        options = _ddp_options(ddp_model)
    hooks = list(getattr(ddp_model, "_comm_hooks", []))
    ddp_model._remove_autograd_hooks()  # type: ignore[no-untyped-call]
    if in_place:
        type(ddp_model).__init__(ddp_model, module, **options)
        new = ddp_model
    else:
        new = type(ddp_model)(module, **options)
    for hook, state in hooks:
        new.register_comm_hook(state, hook)
    if counter is not None and isinstance(new, GatedDDP):
        if not hooks:  # a torch without _comm_hooks: register the counting hook again
            _register(new, counter)
        new.gg_counter = counter
    if optimizer is not None:
        sync(optimizer, module, scheduler, rules)
    return new
