"""Small shared helpers: optional imports and progress bars."""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Iterator
from types import ModuleType
from typing import Any, TypeVar

from .errors import GradgateError

T = TypeVar("T")


class MissingDependencyError(GradgateError, ImportError):
    """An optional dependency is not installed.

    Example:
        >>> issubclass(MissingDependencyError, ImportError)
        True
    """


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


def progress(
    items: Iterable[T], *, enabled: bool = True, total: int | None = None, desc: str = ""
) -> Iterator[T]:
    """Wrap ``items`` in a tqdm progress bar when tqdm is installed and ``enabled``.

    Example:
        >>> list(progress([1, 2], enabled=False))
        [1, 2]
    """
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            pass
        else:
            bar: Any = tqdm(items, total=total, desc=desc, leave=False, dynamic_ncols=True)
            yield from bar
            return
    yield from items
