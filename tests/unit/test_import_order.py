"""Imports follow the flow of data: no package imports one later in ``probes.ORDER``, experiments and
recipes never import each other, and no two files import each other (nor any longer loop).

Every import statement counts, module-level or inside a function: a function-level import is still a
dependency, only a later one.
"""
from __future__ import annotations

import ast
from pathlib import Path

import probes
from tests.conftest import REPO

PACKAGE = REPO / "probes"


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The ``probes`` modules ``name`` imports (``from pkg import module`` counts as the module)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in found if m == "probes" or m.startswith("probes.")}


def unit(module: str) -> str | None:
    """The entry of ``probes.ORDER`` that ``module`` belongs to."""
    return next((u for u in probes.ORDER if module == u or module.startswith(u + ".")), None)


def sibling(module: str, group: str) -> str:
    """``probes.experiments.lens.runner`` -> ``probes.experiments.lens``."""
    return ".".join(module.split(".")[: len(group.split(".")) + 1])


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: {m for m in imports(name, path, known) if m in known and m != name} for name, path in mods.items()}


def test_every_module_belongs_to_a_declared_package():
    undeclared = [m for m in modules() if m != "probes" and unit(m) is None]
    assert not undeclared, f"add these to probes.ORDER (probes/__init__.py) where they sit in the flow: {undeclared}"


def test_no_package_imports_a_later_one_and_siblings_stay_apart():
    order = {u: k for k, u in enumerate(probes.ORDER)}
    bad = []
    for source, targets in graph().items():
        if source == "probes":
            continue
        for target in sorted(targets):
            if target == "probes":
                bad.append(f"{source} imports the package root")
                continue
            a, b = unit(source), unit(target)
            if order[b] > order[a]:
                bad.append(f"{source} imports {target}: {b} comes after {a} in probes.ORDER")
            elif a == b and a in probes.SIBLINGS and sibling(source, a) != sibling(target, a):
                bad.append(f"{source} imports {target}: {sibling(source, a)} and {sibling(target, a)} are "
                           f"siblings under {a}")
    assert not bad, "imports against the flow:\n  " + "\n  ".join(bad)


def test_no_files_import_each_other():
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    loops: list[list[str]] = []

    def visit(v: str) -> None:      # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                loops.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not loops, f"files that import each other (directly or in a loop): {loops}"


def test_the_check_sees_function_level_and_relative_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import os\nfrom probes.common import hashing\n\ndef f():\n    from probes.cli.main import main\n"
                      "    from . import sibling\n")
    found = imports("probes.store.m", source, {"probes.common.hashing", "probes.store.sibling"})
    assert found == {"probes.common.hashing", "probes.cli.main", "probes.store.sibling"}
