"""gradgate: decide which parts of a PyTorch model train, keep the rest frozen, make it cheap.

Example:
    >>> import torch, gradgate as gg
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    >>> _ = gg.freeze(net, "0")
    >>> [n for n, _ in gg.named_trainable_parameters(net)]
    ['1.weight', '1.bias']
"""

from __future__ import annotations

import sys
import types

from . import distributed
from .accelerate import Accelerated, accelerate
from .cache import FeatureCache
from .checkpoint import CheckpointError, CheckpointKeyError, load_trainable, save_trainable
from .errors import (
    FingerprintMismatch,
    FrozenTensorChanged,
    GradgateError,
    InvalidArgumentError,
    NoMatchError,
    SharedParameterError,
    StaleWrapperError,
)
from .freeze import (
    Freezing,
    freeze,
    is_sticky,
    named_trainable_parameters,
    train_only,
    trainable_parameters,
    unfreeze,
)
from .guard import Guard, fingerprint, guard
from .optim import DEFAULT_NO_DECAY, Finding, LayerDecay, lint, param_groups, sync
from .report import GradReport, Summary, grad_report, summary
from .schedule import GradualUnfreeze, ProgressiveFreeze, Stages, freeze_to, stages
from .select import Selection, Selector, select

__version__ = "0.1.0"


class _Package(types.ModuleType):
    """Keeps ``gg.freeze`` and ``gg.guard`` the functions.

    The submodules ``gradgate.freeze`` and ``gradgate.guard`` share those
    names; importing them (``import gradgate.guard``) would otherwise rebind
    the package attribute to the submodule.
    """

    def __setattr__(self, name: str, value: object) -> None:
        if isinstance(value, types.ModuleType) and callable(self.__dict__.get(name)):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = [
    "Accelerated",
    "DEFAULT_NO_DECAY",
    "CheckpointError",
    "CheckpointKeyError",
    "FeatureCache",
    "FingerprintMismatch",
    "Finding",
    "Freezing",
    "FrozenTensorChanged",
    "GradReport",
    "GradualUnfreeze",
    "Guard",
    "GradgateError",
    "InvalidArgumentError",
    "LayerDecay",
    "NoMatchError",
    "ProgressiveFreeze",
    "Selection",
    "Selector",
    "SharedParameterError",
    "Stages",
    "StaleWrapperError",
    "Summary",
    "__version__",
    "accelerate",
    "distributed",
    "fingerprint",
    "freeze",
    "freeze_to",
    "grad_report",
    "guard",
    "is_sticky",
    "lint",
    "load_trainable",
    "named_trainable_parameters",
    "param_groups",
    "save_trainable",
    "select",
    "stages",
    "summary",
    "sync",
    "train_only",
    "trainable_parameters",
    "unfreeze",
]
