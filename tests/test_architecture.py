"""The folder tree is the architecture: packages by concern in layers that import only downward, no
import cycles, few top-level modules, and no library's private attribute read outside the compat module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]  # read as text: nothing of transfer is imported

PACKAGE = ROOT / "transfer"
# Lowest first: a module may import its own package and the layers before it, never those after.
LAYERS = [
    ("transfer.errors", "transfer.compat", "transfer.progress", "transfer.config"),
    ("transfer.data",),
    ("transfer.tasks",),
    ("transfer.model",),
    ("transfer.augment",),
    ("transfer.inference",),
    ("transfer.training",),
    ("transfer.cli", "transfer.api"),
]
LIBRARIES = ("lightning", "timm", "litserve", "huggingface_hub", "torch")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every transfer module ``path`` imports, at module level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.update([node.module, *(f"{node.module}.{alias.name}" for alias in node.names)])
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    resolved = set()
    for name in found:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name.startswith("transfer."):
            resolved.add(name)
    return resolved


def layer_of(module: str) -> int:
    for index, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


GRAPH = {module_name(p): imports(p) - {module_name(p)} for p in PACKAGE.rglob("*.py") if module_name(p) != "transfer"}


def test_no_import_cycles() -> None:
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on.add(node)
        for target in GRAPH.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on.discard(member)
                component.append(member)
                if member == node:
                    break
            # a package's __init__ re-exporting its own modules is not a cycle of design
            if len(component) > 1 and not all(m.startswith(min(component)) for m in component):
                cycles.append(sorted(component))

    for node in GRAPH:
        if node not in index:
            visit(node)
    assert cycles == []


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_layers_import_only_downward(module: str) -> None:
    upward = sorted(target for target in GRAPH[module] if layer_of(target) > layer_of(module))
    assert upward == [], f"{module} (layer {layer_of(module)}) imports higher layers"


def test_the_run_calls_neither_cross_validation_nor_commands_after_training() -> None:
    assert not {
        t
        for t in GRAPH["transfer.training.run"] | GRAPH["transfer.training.fit"] | GRAPH["transfer.training.planner"]
        if t.startswith(("transfer.training.cv", "transfer.inference"))
    }


def test_at_most_ten_modules_directly_in_the_package() -> None:
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 10, top


def test_no_private_attribute_of_a_library_outside_the_compat_module() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "compat.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            parts = node.module.split(".") if isinstance(node, ast.ImportFrom) and node.module else []
            if parts and parts[0] in LIBRARIES and any(part.startswith("_") for part in parts):
                found.append(f"{path.name}:{node.lineno} from {node.module}")
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and node.attr != "_target_"
                and not (isinstance(node.value, ast.Name) and node.value.id == "self")
            ):
                found.append(f"{path.name}:{node.lineno} {ast.unparse(node)}")
    assert found == []
