"""gradgate: decide which parts of a PyTorch model train, keep the rest frozen, make it cheap.

Example:
    >>> import torch, gradgate as gg
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    >>> _ = gg.freeze(net, "0")
    >>> [n for n, _ in gg.named_trainable_parameters(net)]
    ['1.weight', '1.bias']
"""

from __future__ import annotations

from . import distributed
from ._compile import on_change as _compile_listener  # noqa: F401 (compile after unfreeze)
from ._version import __version__
from .cache import FeatureCache
from .checkpoint import load_trainable, save_trainable
from .errors import (
    AccelerationError,
    CacheError,
    CheckpointError,
    CheckpointKeyError,
    FingerprintMismatch,
    FingerprintMismatchError,
    FrozenTensorChanged,
    FrozenTensorChangedError,
    GradgateError,
    InferenceCopyError,
    InvalidArgumentError,
    MissingDependencyError,
    NoMatchError,
    NondeterministicDatasetError,
    SharedParameterError,
    StaleCacheError,
    StaleWrapperError,
)
from .freezing import (
    Freezing,
    freeze,
    is_sticky,
    named_trainable_parameters,
    train_only,
    trainable_parameters,
    unfreeze,
)
from .hashing import fingerprint
from .inference import Accelerated, InferenceCopy, accelerate, inference_copy
from .integrity import Guard, guard
from .optim import DEFAULT_NO_DECAY, Finding, LayerDecay, lint, param_groups, sync
from .reports import GradReport, Summary, grad_report, summary
from .schedules import GradualUnfreeze, ProgressiveFreeze, Stages, freeze_to, stages
from .selection import Selection, Selector, norms, select
from .subtensor import Rows, rows

__all__ = [
    "Accelerated",
    "AccelerationError",
    "CacheError",
    "CheckpointError",
    "CheckpointKeyError",
    "DEFAULT_NO_DECAY",
    "FeatureCache",
    "Finding",
    "FingerprintMismatch",
    "FingerprintMismatchError",
    "Freezing",
    "FrozenTensorChanged",
    "FrozenTensorChangedError",
    "GradReport",
    "GradgateError",
    "GradualUnfreeze",
    "Guard",
    "InferenceCopy",
    "InferenceCopyError",
    "InvalidArgumentError",
    "LayerDecay",
    "MissingDependencyError",
    "NoMatchError",
    "NondeterministicDatasetError",
    "ProgressiveFreeze",
    "Rows",
    "Selection",
    "Selector",
    "SharedParameterError",
    "Stages",
    "StaleCacheError",
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
    "inference_copy",
    "is_sticky",
    "lint",
    "load_trainable",
    "named_trainable_parameters",
    "norms",
    "param_groups",
    "rows",
    "save_trainable",
    "select",
    "stages",
    "summary",
    "sync",
    "train_only",
    "trainable_parameters",
    "unfreeze",
]

from .adaptive import AutoFreeze

__all__ += ["AutoFreeze"]
__all__.sort()
