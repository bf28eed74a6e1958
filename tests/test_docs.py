"""Every ```python block of README.md and docs/*.md runs as written.

The blocks of one file run in order in one namespace (a page may build on its
earlier blocks) inside a temporary folder. A block preceded by the line
``<!-- no-test -->`` is skipped (for what needs several processes or a GPU; use
sparingly). A block followed by ``<!-- output -->`` and a ```text block must
print exactly that text.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
BLOCK = re.compile(
    r"(?P<skip><!-- no-test -->\n)?```python\n(?P<code>.*?)```\n"
    r"(?:\n?<!-- output -->\n```text\n(?P<output>.*?)```\n)?",
    re.DOTALL,
)


def test_the_block_pattern_finds_skips_and_outputs() -> None:
    text = (
        "```python\nprint(1)\n```\n\n<!-- output -->\n```text\n1\n```\n"
        "<!-- no-test -->\n```python\nraise SystemExit\n```\n"
    )
    found = [(m["skip"] is not None, m["code"], m["output"]) for m in BLOCK.finditer(text)]
    assert found == [(False, "print(1)\n", "1\n"), (True, "raise SystemExit\n", None)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_snippets_run_as_written(
    page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocks = list(BLOCK.finditer(page.read_text()))
    if not blocks:
        pytest.skip(f"{page.name} has no python block")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__docs__"}
    try:
        for number, block in enumerate(blocks, 1):
            if block["skip"]:
                continue
            line = page.read_text()[: block.start()].count("\n") + 1
            code = compile(block["code"], f"{page.name}:{line} (block {number})", "exec")
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                exec(code, namespace)
            if block["output"] is not None:
                assert printed.getvalue() == block["output"], f"{page.name} block {number} output"
    finally:
        # a page that failed between its init_process_group and its
        # destroy_process_group must not leave the group to the next page
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


PRIVATE = re.compile(r"^\s*(?:from|import)\s+gradgate(?:\.\w+)*\._\w+", re.MULTILINE)


@pytest.mark.parametrize(
    "path",
    [*PAGES, *sorted((ROOT / "examples").glob("*.py"))],
    ids=lambda p: p.relative_to(ROOT).as_posix(),
)
def test_no_snippet_or_example_imports_a_private_module(path: Path) -> None:
    assert PRIVATE.findall(path.read_text()) == []
