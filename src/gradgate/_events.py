"""Change notices: listeners told when gradgate changes a model's trainable set (private).

``freeze``/``unfreeze``/``train_only`` (and their undo), ``sync`` and the
schedules announce what they changed; a live ``guard`` and the distributed
helpers subscribe, so nothing that reacts to a change has to be imported by
what makes it (the dependency runs from listener to announcer, never back).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

__all__ = ["Change", "announce", "subscribe"]


@dataclass(frozen=True)
class Change:
    """What one gradgate call changed in a model.

    Attributes:
        model: the module the call was made on (it may be a submodule of a
            larger model a listener watches).
        action: ``"freeze"``, ``"unfreeze"``, ``"train_only"``, ``"undo"``,
            or the name of another announcer (``"sync"``, a schedule).
        frozen: parameters the call made frozen (``requires_grad=False``).
        unfrozen: parameters the call made trainable.
    """

    model: nn.Module
    action: str
    frozen: tuple[nn.Parameter, ...] = ()
    unfrozen: tuple[nn.Parameter, ...] = ()


Listener = Callable[[Change], None]

_lock = threading.Lock()
_listeners: list[Listener] = []


def subscribe(listener: Listener) -> Callable[[], None]:
    """Call ``listener`` on every announced change; return the function that unsubscribes.

    Example:
        >>> seen = []
        >>> stop = subscribe(seen.append)
        >>> announce(Change(nn.Linear(1, 1), "freeze"))
        >>> stop(); len(seen)
        1
    """
    with _lock:
        _listeners.append(listener)

    def unsubscribe() -> None:
        with _lock:
            if listener in _listeners:
                _listeners.remove(listener)

    return unsubscribe


def announce(change: Change) -> None:
    """Tell every listener about ``change`` (in subscription order)."""
    with _lock:
        listeners = list(_listeners)
    for listener in listeners:
        listener(change)
