"""The layout rules of docs/architecture.md, checked on the source itself."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "gradgate"
# __main__.py is the command line entry point, a tool of its own.
LIBRARY = [
    p
    for p in SRC.rglob("*.py")
    if "tools" not in p.relative_to(SRC).parts and p.name != "__main__.py"
]


def _imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) for every ``from X import name`` and ``import X`` in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = ".".join(("gradgate", *path.relative_to(SRC).with_suffix("").parts[:-1]))
    found: list[tuple[str, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found += [(base, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(a.name, "") for a in node.names]
    return found


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_no_module_imports_an_underscore_name_from_another(path: Path) -> None:
    private = [
        f"{mod}.{name}"
        for mod, name in _imports(path)
        if name.startswith("_") and name not in ("__version__", "__future__")
    ]
    assert private == [], f"{path.relative_to(SRC)} imports private names {private}"


@pytest.mark.parametrize("path", sorted(LIBRARY), ids=lambda p: str(p.relative_to(SRC)))
def test_the_library_never_imports_a_tool(path: Path) -> None:
    tools = [m for m, name in _imports(path) if m.startswith("gradgate.tools") or name == "tools"]
    assert tools == [], f"{path.relative_to(SRC)} imports {tools}"


def test_no_module_shares_its_name_with_a_public_function() -> None:
    import gradgate

    modules = {p.stem for p in SRC.glob("*.py")} | {p.name for p in SRC.iterdir() if p.is_dir()}
    modules -= {"__init__", "__main__"}
    clash = sorted(n for n in modules if callable(getattr(gradgate, n, None)))
    assert clash == []


def test_import_gradgate_is_light_and_changes_no_global_torch_state() -> None:
    code = """
import json, sys
from torch.utils.data._utils.collate import default_collate_fn_map
before = set(default_collate_fn_map)
torch_loaded = set(sys.modules)  # torch itself may import some of these (torch.hub: tqdm)
import gradgate
after = set(default_collate_fn_map)
heavy = ("matplotlib", "sklearn", "transformers", "lightning", "pytorch_lightning",
         "accelerate", "peft", "tqdm", "safetensors", "gradgate.tools")
print(json.dumps({
    "loaded": sorted(m for m in set(sys.modules) - torch_loaded
                     if m.split(".")[0] in heavy or m.startswith("gradgate.tools")),
    "collate_added": sorted(str(t) for t in after - before),
}))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    report = json.loads(out.strip().splitlines()[-1])
    assert report == {"loaded": [], "collate_added": []}
