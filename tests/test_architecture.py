"""The package's shape: no import cycle inside refsd, no public function shadowing its module.

Every ``import`` / ``from ... import`` of a refsd module is an edge, wherever it stands in the file
(a function-local import that dodges a cycle still counts), so the graph is the design's dependency
graph. Importing ``refsd.a.b`` also runs ``refsd/a/__init__.py``; those implied edges are left out: a
package's ``__init__`` re-exports its public names, which is API, not a design dependency (the few
function-local imports left, in cli*.py for start-up time and in trace.py under refsd.weights' package
import, are there for that reason).
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import refsd

ROOT = Path(refsd.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """module -> the refsd modules it imports (a package's __init__ is the package's name)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, is_pkg, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                while t and t not in mods:  # refsd.a.b.name -> refsd.a.b
                    t = t.rpartition(".")[0]
                if t.startswith("refsd") and t != mod:
                    graph[mod].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None (iterative DFS, three colours)."""
    colour = dict.fromkeys(graph, 0)
    for start in sorted(graph):
        if colour[start]:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        colour[start], path = 1, [start]
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour.get(nxt, 2) == 1:
                return path[path.index(nxt):] + [nxt]
            elif colour.get(nxt) == 0:
                colour[nxt] = 1
                path.append(nxt)
                stack.append((nxt, iter(sorted(graph[nxt]))))
    return None



def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_public_function_shadows_its_module():
    shadowed = []
    for info in pkgutil.walk_packages(refsd.__path__, "refsd."):
        if info.name.endswith("__main__"):
            continue
        mod = importlib.import_module(info.name)
        parent_name, _, leaf = info.name.rpartition(".")
        parent = importlib.import_module(parent_name)
        attr = getattr(parent, leaf, None)
        if attr is not None and attr is not mod:
            shadowed.append(f"{parent_name}.{leaf} is {type(attr).__name__}, not the module")
    assert not shadowed, "; ".join(shadowed)
