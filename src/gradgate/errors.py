"""One exception family: every gradgate error is a ``GradgateError``.

Each subclass also derives from the builtin exception a user would already
catch, so ``except LookupError`` keeps working around a selector that matches
nothing.
"""

from __future__ import annotations

__all__ = [
    "AccelerationError",
    "CacheError",
    "CheckpointError",
    "CheckpointKeyError",
    "FingerprintMismatch",
    "FingerprintMismatchError",
    "FrozenTensorChanged",
    "FrozenTensorChangedError",
    "GradgateError",
    "InferenceCopyError",
    "InvalidArgumentError",
    "MissingDependencyError",
    "NoMatchError",
    "NondeterministicDatasetError",
    "SharedParameterError",
    "StaleCacheError",
    "StaleWrapperError",
]


class GradgateError(Exception):
    """Base class of every error raised by gradgate.

    Example:
        >>> import gradgate as gg
        >>> issubclass(gg.NoMatchError, gg.GradgateError)
        True
    """


class InvalidArgumentError(GradgateError, ValueError):
    """An argument has a value outside the documented set.

    Example:
        >>> import torch, gradgate as gg
        >>> try:
        ...     gg.freeze(torch.nn.Linear(2, 2), mode="evel")
        ... except gg.InvalidArgumentError as e:
        ...     print(e)
        mode must be one of 'eval', 'norm', 'keep'; got 'evel'
    """


class NoMatchError(GradgateError, LookupError):
    """A selector matched no module or parameter of the model.

    Example:
        >>> import torch, gradgate as gg
        >>> try:
        ...     gg.select(torch.nn.Sequential(torch.nn.Linear(2, 2)), "1")
        ... except LookupError as e:
        ...     print(type(e).__name__)
        NoMatchError
    """


class SharedParameterError(GradgateError, ValueError):
    """A parameter is shared by a module that would be frozen and one that would train.

    Example:
        >>> import gradgate as gg
        >>> issubclass(gg.SharedParameterError, ValueError)
        True
    """


class FrozenTensorChangedError(GradgateError, RuntimeError):
    """A tensor that ``guard`` watches as frozen changed.

    ``FrozenTensorChanged`` is the same class under its old name (one release).

    Example:
        >>> import gradgate as gg
        >>> issubclass(gg.FrozenTensorChangedError, RuntimeError)
        True
        >>> gg.FrozenTensorChanged is gg.FrozenTensorChangedError
        True
    """


class FingerprintMismatchError(GradgateError, ValueError):
    """A checkpoint or cache was made for a different frozen base.

    ``FingerprintMismatch`` is the same class under its old name (one release).

    Example:
        >>> import gradgate as gg
        >>> issubclass(gg.FingerprintMismatchError, ValueError)
        True
    """


class StaleWrapperError(GradgateError, RuntimeError):
    """A distributed wrapper was built for a trainable set that has since changed.

    Example:
        >>> import gradgate as gg
        >>> issubclass(gg.StaleWrapperError, RuntimeError)
        True
    """


class MissingDependencyError(GradgateError, ImportError):
    """An optional dependency is not installed.

    Example:
        >>> issubclass(MissingDependencyError, ImportError)
        True
    """


class CheckpointError(GradgateError, ValueError):
    """A checkpoint file cannot be read or does not fit the model.

    Example:
        >>> issubclass(CheckpointError, ValueError)
        True
    """


class CheckpointKeyError(CheckpointError, KeyError):
    """A checkpoint lacks a trainable tensor of the model, or holds one it does not have.

    Example:
        >>> issubclass(CheckpointKeyError, KeyError)
        True
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class InferenceCopyError(GradgateError, RuntimeError):
    """``inference_copy``'s optimised copy does not reproduce the original's output.

    ``AccelerationError`` is the same class under its old name (one release).

    Example:
        >>> import gradgate as gg
        >>> issubclass(gg.InferenceCopyError, RuntimeError)
        True
    """


class CacheError(GradgateError, OSError):
    """A disk ``FeatureCache`` folder cannot be used (not writable, no space, not a folder).

    Example:
        >>> issubclass(CacheError, OSError)
        True
    """


class StaleCacheError(GradgateError, RuntimeError):
    """A ``FeatureCache`` no longer matches its front-end where it cannot rebuild.

    Raised in a DataLoader worker: a worker reads, it never builds.

    Example:
        >>> issubclass(StaleCacheError, RuntimeError)
        True
    """


class NondeterministicDatasetError(GradgateError, ValueError):
    """A dataset returned different values for the same item on two reads.

    A ``FeatureCache`` stores one pass; random augmentation belongs after it.

    Example:
        >>> issubclass(NondeterministicDatasetError, ValueError)
        True
    """


# Old names, kept for one release: the same class objects, so ``except`` with
# either name catches both.
FrozenTensorChanged = FrozenTensorChangedError
FingerprintMismatch = FingerprintMismatchError
AccelerationError = InferenceCopyError
