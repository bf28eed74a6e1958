"""Optional dependencies, imported lazily with a message naming the extra (private)."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingDependencyError


def optional_import(name: str, extra: str) -> ModuleType:
    """Import an optional dependency or say which extra installs it.

    Example:
        >>> optional_import("json", "io").__name__
        'json'
    """
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise MissingDependencyError(
            f"{name} is needed here but not installed; pip install 'gradgate[{extra}]'"
        ) from e
