"""gradgate: decide which parts of a PyTorch model train, keep the rest frozen, make it cheap.

Example:
    >>> import torch, gradgate as gg
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    >>> _ = gg.freeze(net, "0")
    >>> [n for n, _ in gg.named_trainable_parameters(net)]
    ['1.weight', '1.bias']
"""

from __future__ import annotations

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
from .report import GradReport, Summary, grad_report, summary
from .select import Selection, Selector, select

__version__ = "0.1.0"

__all__ = [
    "FingerprintMismatch",
    "Freezing",
    "FrozenTensorChanged",
    "GradReport",
    "GradgateError",
    "InvalidArgumentError",
    "NoMatchError",
    "Selection",
    "Selector",
    "SharedParameterError",
    "StaleWrapperError",
    "Summary",
    "__version__",
    "freeze",
    "grad_report",
    "is_sticky",
    "named_trainable_parameters",
    "select",
    "summary",
    "train_only",
    "trainable_parameters",
    "unfreeze",
]
