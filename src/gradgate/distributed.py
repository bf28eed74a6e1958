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

FSDP2 (``torch.distributed.fsdp.fully_shard``) reads ``requires_grad`` at
each all-gather and reduce-scatters only parameters that have gradients, so
freezing and unfreezing need no rewrap there; ``gg.sync`` still keeps the
optimizer honest.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import subtensor
from ._events import Change, subscribe
from ._index import ModelIndex
from .errors import StaleWrapperError
from .optim import Rules, sync

__all__ = ["CommCounter", "GatedDDP", "rewrap", "track_communication", "wrap"]


def _trainable_names(module: nn.Module) -> tuple[str, ...]:
    return tuple(n for n, p in ModelIndex(module).params.items() if p.requires_grad)


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

    def hook(self, state: Any, bucket: Any) -> torch.futures.Future[torch.Tensor]:
        """A comm hook: count the bucket, then all-reduce it as DDP would."""
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        buf = bucket.buffer()
        self.bytes += buf.numel() * buf.element_size()
        self.elements += buf.numel()
        self.calls += 1
        return default_hooks.allreduce_hook(state, bucket)


class GatedDDP(DistributedDataParallel):
    """A ``DistributedDataParallel`` that refuses to run on a stale trainable set.

    Built by ``gg.distributed.wrap``; see there.
    """

    def __init__(self, module: nn.Module, **ddp_kwargs: Any) -> None:
        super().__init__(module, **ddp_kwargs)
        self.gg_ddp_kwargs = dict(ddp_kwargs)
        self.gg_trainable = _trainable_names(module)
        self.gg_counter: CommCounter | None = None
        # Announced changes mark the wrapper stale at once; a hand-made
        # ``requires_grad_`` is caught by comparing the flags at the next forward.
        self.gg_stale = False
        self._gg_params = tuple(ModelIndex(module).params.values())
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

    def gg_is_stale(self) -> bool:
        """Whether the trainable set differs from the one this wrapper was built for.

        Example (needs a process group): ``ddp.gg_is_stale()``
        """
        flags = tuple(p.requires_grad for p in self._gg_params)
        if self.gg_stale or flags != self._gg_flags:
            self.gg_stale = _trainable_names(self.module) != self.gg_trainable
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
            raise StaleWrapperError(
                "the trainable set changed after DDP was built "
                f"(frozen since: {frozen[:5] or 'none'}, "
                f"unfrozen since: {unfrozen[:5] or 'none'}); "
                "DDP would stall or let the ranks silently diverge. Call "
                "model = gg.distributed.rewrap(model, optimizer) after freezing or unfreezing"
            )
        return super().forward(*inputs, **kwargs)  # type: ignore[no-untyped-call]


def wrap(model: nn.Module, **ddp_kwargs: Any) -> GatedDDP:
    """Wrap ``model`` in DDP, recording its trainable set.

    Frozen parameters are never registered with DDP's reducer, so they are
    never all-reduced. A forward after the trainable set changed raises
    ``StaleWrapperError`` instead of diverging.

    Args:
        model: the (already frozen as wanted) module.
        **ddp_kwargs: passed to ``DistributedDataParallel``.

    Returns:
        The wrapper; ``rewrap`` builds a fresh one with the same options.

    Example (needs an initialised process group, so not run here):
        ``ddp = gg.distributed.wrap(model)``
    """
    subtensor.refuse_distributed(model, "gg.distributed.wrap")  # rows (issue 16)
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


def rewrap(
    ddp_model: GatedDDP,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    rules: Rules = (),
) -> GatedDDP:
    """Build a fresh DDP around the same module after the trainable set changed.

    The old wrapper's autograd hooks are removed, the new one broadcasts the
    module state from rank 0 as DDP does at construction, and, when given,
    the optimizer and scheduler are brought in line with ``gg.sync``.

    Example (needs a process group): ``ddp = gg.distributed.rewrap(ddp, opt)``
    """
    module = ddp_model.module
    ddp_model._remove_autograd_hooks()  # type: ignore[no-untyped-call]
    new = GatedDDP(module, **ddp_model.gg_ddp_kwargs)
    if ddp_model.gg_counter is not None:
        _register(new, ddp_model.gg_counter)
        new.gg_counter = ddp_model.gg_counter
    if optimizer is not None:
        sync(optimizer, module, scheduler, rules)
    return new
