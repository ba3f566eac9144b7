"""quantpub has no import circles: read from the source (ast), every import counted, also those inside
functions and under TYPE_CHECKING (a circle hidden by a late import is still one)."""

from __future__ import annotations

import ast
from pathlib import Path

import quantpub

PACKAGE = "quantpub"


def module_imports(root: Path, package: str) -> dict[str, set[str]]:
    """``{module: {modules of the same package it imports}}`` for every .py file under ``root`` (its sub-packages
    included); ``from pkg import name`` counts as importing ``pkg.name`` where that is a module, else ``pkg``."""
    names = {}
    for p in sorted(root.rglob("*.py")):
        parts = p.relative_to(root).with_suffix("").parts
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        names[".".join((package, *parts))] = p
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        here = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(here.split(".")[:len(here.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in names else base for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in names and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_quantpub_has_no_import_circles():
    graph = module_imports(Path(quantpub.__file__).parent, PACKAGE)
    assert f"{PACKAGE}.hub.routing" in graph and graph[f"{PACKAGE}.hub.app"]  # the walk sees the sub-packages
    assert f"{PACKAGE}.built" in graph[f"{PACKAGE}.build_gguf"]  # and modules of the top level
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_walk_finds_a_circle_through_a_late_import(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from pkg import c\n")
    (pkg / "c.py").write_text("from . import a\n")
    assert find_cycle(module_imports(pkg, "pkg")) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
    (pkg / "c.py").write_text("import json\n")
    assert find_cycle(module_imports(pkg, "pkg")) is None
