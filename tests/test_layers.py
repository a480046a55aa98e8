"""The layers point one way: each folder imports only the layers below it, and no module imports itself back.

Read from the source with ``ast`` (nothing is imported), so a new upward import or a cycle fails here
before it can bite at run time. The order is README's layout table.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, Set, Tuple

ROOT = Path(__file__).resolve().parents[1]

# folder -> the installed package it is (pyproject.toml [tool.setuptools.package-dir]), bottom layer first
LAYERS = ["base", "schemas", "operators", "sources", "sinks", "dataflows", "meterflow"]
RANK = {name: i for i, name in enumerate(LAYERS)}
GENERIC = {"operators", "schemas", "sinks", "sources", "dataflows", "base", "benchmarks", "tests"}


def modules() -> Iterator[Tuple[str, str, Path]]:
    """(layer, dotted module name, path) of every module of the installed namespace."""
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            rel = path.relative_to(ROOT / layer).with_suffix("")
            parts = [] if rel.name == "__init__" else list(rel.parts)
            prefix = ["meterflow"] if layer == "meterflow" else ["meterflow", layer]
            yield layer, ".".join(prefix + parts), path


def imports_of(path: Path) -> Iterator[Tuple[int, str]]:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "meterflow":
        return None
    if len(parts) > 1 and parts[1] in RANK and parts[1] != "meterflow":
        return parts[1]
    return "meterflow"


def test_every_import_points_down_the_layers():
    upward = []
    for layer, _name, path in modules():
        for line, target in imports_of(path):
            top = target.split(".")[0]
            assert top not in GENERIC, f"{path.relative_to(ROOT)}:{line} imports {target!r}: import it as " \
                                       f"meterflow.{target}"
            dest = layer_of(target)
            if dest is not None and RANK[dest] > RANK[layer]:
                upward.append(f"{path.relative_to(ROOT)}:{line}: {layer} imports {target} ({dest} is above)")
    assert not upward, "imports that run up the layers:\n" + "\n".join(upward)


def test_base_imports_nothing_of_ours():
    for layer, _, path in modules():
        if layer == "base":
            ours = [t for _, t in imports_of(path) if t.split(".")[0] == "meterflow"]
            assert all(t.startswith("meterflow.base") for t in ours), (path, ours)


def test_no_import_cycles_between_modules():
    graph: Dict[str, Set[str]] = {}
    names = {name for _, name, _ in modules()}
    for _, name, path in modules():
        graph[name] = set()
        for _, target in imports_of(path):
            # "from meterflow.x import y" may name a module y or an attribute y of x: take the module it is
            while target and target not in names:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                graph[name].add(target)
    state: Dict[str, int] = {}
    stack: list = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                cycle = stack[stack.index(m):] + [m]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_the_installed_namespace_is_one_package():
    text = (ROOT / "pyproject.toml").read_text()
    for layer in LAYERS[:-1]:
        assert f'"meterflow.{layer}" = "{layer}"' in text, layer
