"""Progress bars that never change what is computed (private).

Two rules, both learnt the hard way:

- tqdm never sees the iterable. Handed a ``DataLoader``, tqdm (``tqdm.auto``
  in particular) may call ``iter()`` on it while building the bar, and every
  ``iter()`` of a shuffling loader draws from its generator: with a bar the run
  trained on other batch orders than without one. Here tqdm only gets
  ``total=`` and ``update(1)``; the items are iterated exactly once, by us.
- Bars only on a terminal. A bar redraws itself with ``\\r``; in a log file, a
  pipe or CI those frames are noise, so a stream that is not a TTY gets none.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Sized
from typing import Any, TextIO, TypeVar

T = TypeVar("T")


def bar_stream() -> TextIO | None:
    """The stream a progress bar may draw on: stderr when it is a terminal, else None.

    Example:
        >>> import contextlib, io
        >>> with contextlib.redirect_stderr(io.StringIO()):
        ...     bar_stream() is None
        True
    """
    stream = sys.stderr
    isatty = getattr(stream, "isatty", None)
    return stream if isatty is not None and isatty() else None


def progress(
    items: Iterable[T], *, enabled: bool = True, total: int | None = None, desc: str = ""
) -> Iterator[T]:
    """Yield ``items`` unchanged, drawing a tqdm bar on a terminal when ``enabled``.

    ``items`` is iterated once, here, whether or not a bar is drawn, so a
    shuffling ``DataLoader`` yields the same batches either way.

    Example:
        >>> list(progress([1, 2], enabled=False))
        [1, 2]
    """
    stream = bar_stream() if enabled else None
    bar: Any = None
    if stream is not None:
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            if total is None and isinstance(items, Sized):
                try:
                    total = len(items)
                except TypeError:  # a DataLoader over an IterableDataset
                    total = None
            bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=stream)
    if bar is None:
        yield from items
        return
    try:
        for item in items:
            yield item
            bar.update(1)
    finally:
        bar.close()
