"""Architecture: no two taskvec modules import each other.

Two modules that import each other are one module split in two: neither can be
read, tested or imported on its own, and one side has to hide its import inside
a function to load at all. The import graph is read from the source (every
`import` and `from ... import` of a taskvec module, function-level and
TYPE_CHECKING ones included), so the check costs no imports.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "taskvec"

# Pairs that still import each other, each to be removed from here when its cycle goes (the test says when).
KNOWN_CYCLES: set[frozenset[str]] = set()


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _known(name: str, mods: dict[str, Path]) -> str | None:
    """The taskvec module `name` refers to: itself, else its closest enclosing package; None outside taskvec."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """module -> the taskvec modules it imports (`from pkg import sub` counts as importing pkg.sub)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = package[:len(package) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                hit = _known(t, mods)
                if hit and hit != mod:
                    graph[mod].add(hit)
    return graph


def two_cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    return {frozenset({a, b}) for a, deps in graph.items() for b in deps if a in graph.get(b, ())}


def test_the_graph_sees_the_imports_it_should():
    graph = import_graph()
    assert "taskvec.config.parse" in graph["taskvec.config.plan"]  # a module-level import
    assert "taskvec.model_card" in graph["taskvec.config.run"]
    assert "taskvec.io.lora" in graph["taskvec.io.sources"]
    assert "taskvec.merging" in graph["taskvec.config.plan"]  # a function-level import


def test_no_two_taskvec_modules_import_each_other():
    found = two_cycles(import_graph())
    new = sorted(" <-> ".join(sorted(pair)) for pair in found - KNOWN_CYCLES)
    assert not new, ("these taskvec modules import each other; move what both need into one of them or into a "
                     f"small module of its own, or pass it in: {new}")
    gone = sorted(" <-> ".join(sorted(pair)) for pair in KNOWN_CYCLES - found)
    assert not gone, f"no longer a cycle, remove it from KNOWN_CYCLES in {Path(__file__).name}: {gone}"
