"""Plain-text tables for summaries, reports and the tools (private)."""

from __future__ import annotations

from collections.abc import Sequence


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    """Render rows as a plain-text table (right-aligned columns in ``right``)."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        out = [
            c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(cells)
        ]
        return "  ".join(out).rstrip()

    rule = "-" * len(line(["-" * w for w in widths]))
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])
