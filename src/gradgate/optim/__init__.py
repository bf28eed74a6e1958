"""Optimizers and schedulers that cannot move a frozen weight: param_groups, sync, lint.

``groups`` builds parameter groups (one builder for ``param_groups`` and the
groups ``sync`` adds), ``sync`` keeps an optimizer in line with the model,
``lint`` finds what can still move a frozen weight, and ``schedulers`` lets
new groups join a running learning-rate schedule.
"""

from __future__ import annotations

from .groups import DEFAULT_NO_DECAY, LayerDecay, Rules, param_groups, rule_items
from .lint import Finding, lint
from .schedulers import peak_lr
from .sync import sync

__all__ = [
    "DEFAULT_NO_DECAY",
    "Finding",
    "LayerDecay",
    "Rules",
    "lint",
    "param_groups",
    "peak_lr",
    "rule_items",
    "sync",
]
