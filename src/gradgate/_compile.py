"""``torch.compile`` and a parameter made trainable again (private).

On torch 2.6-2.11 the graphs ``torch.compile`` made do not guard on
``requires_grad`` (pytorch issue 139476): after ``gg.unfreeze`` the compiled
forward keeps treating the layer as frozen, its ``.grad`` stays ``None`` and it
silently never trains. torch 2.12 and later recompile by themselves.

This module listens to gradgate's change notices. On an affected torch, when a
call made a parameter trainable (``unfreeze``, ``train_only``, the undo of a
freeze, ``sync`` and the schedules) and dynamo has compiled anything since it
was last reset, it calls ``torch._dynamo.reset()``: the next forward of every
compiled model recompiles, as newer torch versions do on their own. Nothing
happens when nothing was compiled, when only freezing happened (a frozen
layer's gradient is dropped correctly without a recompile), or on torch 2.12+.
"""

from __future__ import annotations

import logging
import sys

import torch

from ._events import Change, subscribe

__all__ = ["AFFECTED", "compiled_frames", "compiled_since_reset", "on_change"]

_log = logging.getLogger("gradgate")


def _version(text: str) -> tuple[int, int]:
    major, minor = text.split("+")[0].split(".")[:2]
    return int(major), int(minor)


AFFECTED = _version(torch.__version__) < (2, 12)
"""Whether this torch misses a ``requires_grad`` flip under ``torch.compile``."""

# dynamo's count of compiled frames when this module last reset it (its
# counters survive a reset, so "compiled since" is "the count moved").
_seen: list[int] = [0]
_told: list[bool] = [False]


def compiled_frames() -> int:
    """How many frames dynamo compiled in this process (0 if it was never imported).

    Example:
        >>> compiled_frames() >= 0
        True
    """
    if "torch._dynamo" not in sys.modules:  # never imported: nothing was compiled
        return 0
    from torch._dynamo.utils import counters

    return int(counters["frames"]["ok"])


def compiled_since_reset() -> bool:
    """Whether ``torch.compile`` compiled a frame since the last reset made here.

    Example:
        >>> isinstance(compiled_since_reset(), bool)
        True
    """
    return compiled_frames() != _seen[0]


def on_change(change: Change) -> None:
    """Reset dynamo when ``change`` made a parameter trainable on an affected torch.

    Example:
        >>> from torch import nn
        >>> on_change(Change(nn.Linear(1, 1), "freeze"))  # a freeze never resets
    """
    if not (AFFECTED and change.unfrozen and compiled_since_reset()):
        return
    torch._dynamo.reset()
    _seen[0] = compiled_frames()
    if not _told[0]:
        _told[0] = True
        _log.info(
            "gradgate: %s made parameters trainable after torch.compile ran; torch %s does "
            "not recompile on a requires_grad flip (pytorch issue 139476), so gradgate reset "
            "torch._dynamo: the next forward recompiles (said once)",
            change.action,
            torch.__version__,
        )


subscribe(on_change)
