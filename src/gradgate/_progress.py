"""Progress bars that never change what is computed (private)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


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
