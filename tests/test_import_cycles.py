"""No import cycle between detkit's modules.

The graph is read from the source with `ast`: every `import` / `from ... import` anywhere in a
module (function-level imports included: they run too, only later), resolved to the detkit
module it names (`from detkit.engine import checkpoint` is an edge to detkit.engine.checkpoint;
`from detkit.data import read_image` to the package detkit.data). A cycle means two modules that
cannot be understood, tested or imported one without the other.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "detkit"

# Cycles accepted for now, as {frozenset of modules: one-line reason}. None today.
KNOWN_CYCLES: dict[frozenset[str], str] = {}


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the detkit package (packages by __init__.py)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the detkit modules it imports."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . import x, from ..y import z
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                # `from package import submodule` imports the submodule; `from module import name` the module.
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names
                ]
            else:
                continue
            for target in targets:
                while target not in modules and "." in target:  # import a.b.c where c is a name
                    target = target.rpartition(".")[0]
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_holds_module_level_and_function_level_imports():
    graph = import_graph(module_files())
    assert len(graph) > 50
    assert "detkit.engine.predictor" in graph["detkit.engine.video"]  # module level
    assert "detkit.modeling" in graph["detkit.engine.predictor"]  # inside build_model_from_checkpoint
    assert "detkit.engine.checkpoint" in graph["detkit.engine.predictor"]  # inside Predictor.__init__
    assert "detkit.utils.files" in graph["detkit.engine.checkpoint"]


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": {"d"}, "f": set()}
    assert sorted(map(sorted, cycles(graph))) == [["a", "b", "c"], ["d", "e"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_detkit_modules():
    found = cycles(import_graph(module_files()))
    unexpected = [sorted(component) for component in found if component not in KNOWN_CYCLES]
    assert unexpected == [], f"import cycles: {unexpected}"
    # A known cycle that is gone should leave the list too.
    assert set(KNOWN_CYCLES) <= set(found)
