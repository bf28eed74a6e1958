"""The layout rules of docs/architecture.md, checked on the source itself."""

from __future__ import annotations

import ast
import json
import re
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


ARCHITECTURE = SRC.parent.parent / "docs" / "architecture.md"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in SRC.rglob("*.py")}


def _edges() -> dict[str, set[str]]:
    """Module -> the gradgate modules it imports anywhere (function-level imports included)."""
    out: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        found: set[str] = set()
        for base, item in _imports(path):
            for target in (f"{base}.{item}", base):  # ``from . import x`` names module x
                while target and target not in MODULES:
                    target = target.rpartition(".")[0]
                if target:
                    break
            if target.startswith("gradgate") and target != name:
                found.add(target)
        out[name] = found
    return out


def _layers() -> dict[str, int]:
    """Module -> its layer, read from the layer table of docs/architecture.md."""
    text = ARCHITECTURE.read_text(encoding="utf-8")
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    layer_of: dict[str, int] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].isdigit():
            continue
        for module in re.findall(r"`([^`]+)`", cells[2]):
            layer_of["gradgate" if module == "gradgate" else f"gradgate.{module}"] = int(cells[0])
    return layer_of


def _layer(layer_of: dict[str, int], module: str) -> int | None:
    if module in layer_of:
        return layer_of[module]
    if f"{module}.*" in layer_of:  # the package of a ``tools.*`` row
        return layer_of[f"{module}.*"]
    package = module.rpartition(".")[0]
    return layer_of.get(f"{package}.*") if package else None


def test_every_module_has_a_layer_in_the_architecture_doc() -> None:
    layer_of = _layers()
    missing = sorted(m for m in MODULES if _layer(layer_of, m) is None)
    unknown = sorted(m for m in layer_of if not m.endswith(".*") and m not in MODULES)
    assert (missing, unknown) == ([], []), (
        f"docs/architecture.md's layer table lacks {missing} and names modules that do not "
        f"exist {unknown}"
    )


def test_each_module_imports_only_from_layers_above_it() -> None:
    layer_of = _layers()
    wrong = []
    for module, targets in sorted(_edges().items()):
        mine = _layer(layer_of, module)
        for target in sorted(targets):
            theirs = _layer(layer_of, target)
            if mine is None or theirs is None:
                continue  # reported by the test above
            if module.startswith("gradgate.tools") and target.startswith("gradgate.tools"):
                continue  # tools among themselves: only the cycle test applies
            if theirs >= mine:
                wrong.append(f"{module} (layer {mine}) imports {target} (layer {theirs})")
    assert wrong == []


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycle_anywhere_in_the_package() -> None:
    edges = _edges()
    # A package's __init__ importing its own children is no cycle of design.
    plain = {
        m: {t for t in ts if not (MODULES[m].name == "__init__.py" and t.startswith(m + "."))}
        for m, ts in edges.items()
    }
    assert _cycles(plain) == []


def test_the_cycle_finder_finds_a_function_level_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
