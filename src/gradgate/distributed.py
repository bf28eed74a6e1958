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

Partially frozen tensors (``gg.rows``) need nothing here: ``W`` is a frozen
parameter and its trainable rows ``R`` an ordinary trainable parameter of
the module tree, so DDP buckets and all-reduces ``R`` (``k x ...``) only.
Choosing other rows replaces ``R`` (same name, new tensor): the wrapper
compares the trainable parameters by identity, so it goes stale then too.

FSDP2 (``torch.distributed.fsdp.fully_shard``) reads ``requires_grad`` at
each all-gather and reduce-scatters only parameters that have gradients, so
freezing and unfreezing need no rewrap there; ``gg.sync`` still keeps the
optimizer honest.
"""

from __future__ import annotations

import inspect
import weakref
from typing import Any, TypeVar

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ._events import Change, subscribe
from ._index import ModelIndex
from .errors import InvalidArgumentError, StaleWrapperError
from .optim import Rules
from .optim.sync import sync_indexed

__all__ = ["CommCounter", "GatedDDP", "rewrap", "track_communication", "wrap"]


def _trainable_names(index: ModelIndex) -> tuple[str, ...]:
    return tuple(n for n, p in index.params.items() if p.requires_grad)


def _trainable_ids(index: ModelIndex) -> tuple[tuple[str, int], ...]:
    # Names alone miss a tensor replaced under its name (other gg.rows of a tensor).
    return tuple((n, id(p)) for n, p in index.params.items() if p.requires_grad)


def _walk(module: nn.Module, index: ModelIndex | None) -> ModelIndex:
    """The caller's walk of ``module`` if it made one, else a fresh one."""
    return index if index is not None and index.model is module else ModelIndex(module)


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
        """Count one all-reduced tensor."""
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

    def __init__(
        self, module: nn.Module, *, gg_index: ModelIndex | None = None, **ddp_kwargs: Any
    ) -> None:
        # gg_index: a walk of ``module`` the caller made (rewrap's), not a DDP option.
        index = _walk(module, gg_index)
        super().__init__(module, **ddp_kwargs)
        self.gg_ddp_kwargs = dict(ddp_kwargs)
        self.gg_trainable = _trainable_names(index)
        self.gg_counter: CommCounter | None = None
        self._gg_ids = _trainable_ids(index)
        # Announced changes mark the wrapper stale at once; a hand-made
        # ``requires_grad_`` is caught by comparing the flags at the next forward.
        self.gg_stale = False
        self._gg_params = tuple(index.params.values())
        self._gg_flags = tuple(p.requires_grad for p in self._gg_params)
        ids = {id(p) for p in self._gg_params}
        me = weakref.ref(self)

        def hear(change: Change) -> None:
            # A weak reference: a listener must not keep a dropped wrapper alive.
            wrapper = me()
            if wrapper is not None and any(
                id(p) in ids for p in (*change.frozen, *change.unfrozen)
            ):
                wrapper.gg_stale = True

        weakref.finalize(self, subscribe(hear))

    def gg_is_stale(self, index: ModelIndex | None = None) -> bool:
        """Whether the trainable set differs from the one this wrapper was built for.

        ``index``: a walk of the module the caller already made (else one is
        made, only when a flag changed or a change was announced).

        Example (needs a process group): ``ddp.gg_is_stale()``
        """
        flags = tuple(p.requires_grad for p in self._gg_params)
        if self.gg_stale or flags != self._gg_flags:
            self.gg_stale = _trainable_ids(_walk(self.module, index)) != self._gg_ids
        return self.gg_stale

    def gg_refresh(self, index: ModelIndex | None = None) -> GatedDDP:
        """This wrapper if it fits the trainable set, else ``rewrap(self)`` (a collective call).

        ``index``: a walk of the module the caller already made (a schedule
        step's), used for the check and the rebuild alike.

        Example (needs a process group): ``ddp = ddp.gg_refresh()``
        """
        flags = tuple(p.requires_grad for p in self._gg_params)
        if index is None and (self.gg_stale or flags != self._gg_flags):
            index = ModelIndex(self.module)  # one walk for the check and the rebuild
        return rewrap_indexed(self, index) if self.gg_is_stale(index) else self

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        if self.gg_is_stale():
            index = ModelIndex(self.module)
            now = _trainable_names(index)
            was, cur = set(self.gg_trainable), set(now)
            frozen = sorted(was - cur)
            unfrozen = sorted(cur - was)
            replaced = sorted(
                {n for n, _ in set(self._gg_ids) ^ set(_trainable_ids(index))} & was & cur
            )
            raise StaleWrapperError(
                "the trainable set changed after DDP was built "
                f"(frozen since: {frozen[:5] or 'none'}, "
                f"unfrozen since: {unfrozen[:5] or 'none'}, "
                f"replaced since: {replaced[:5] or 'none'}); "
                "DDP would stall or let the ranks silently diverge. Call "
                "model = gg.distributed.rewrap(model, optimizer) after freezing or unfreezing"
            )
        return super().forward(*inputs, **kwargs)  # type: ignore[no-untyped-call]


def wrap(model: nn.Module, **ddp_kwargs: Any) -> GatedDDP:
    """Wrap ``model`` in DDP, recording its trainable set.

    Frozen parameters are never registered with DDP's reducer, so they are
    never all-reduced; of a partially frozen tensor (``gg.rows``) only the
    trainable rows are. A forward after the trainable set changed raises
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
    return rewrap_indexed(ddp_model, None, optimizer, scheduler, rules, in_place=in_place)


def rewrap_indexed(
    ddp_model: _DDP,
    index: ModelIndex | None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    rules: Rules = (),
    *,
    in_place: bool = False,
) -> _DDP:
    """``rewrap`` over a walk of the module the caller made (``None``: made here if needed).

    A schedule step freezes, syncs and rebuilds over one walk; a plain DDP
    rebuilt without an optimizer needs none.

    Example (needs a process group): ``ddp = rewrap_indexed(ddp, ModelIndex(ddp.module))``
    """
    module = ddp_model.module
    counter: CommCounter | None = None
    options: dict[str, Any]
    if isinstance(ddp_model, GatedDDP):
        index = _walk(module, index)
        options = {**ddp_model.gg_ddp_kwargs, "gg_index": index}
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
        sync_indexed(optimizer, _walk(module, index), scheduler, rules)
    return new
