"""The package layers point one way: core -> data -> methods -> checkpoint -> train -> eval -> export.

Every import counts, lazy ones (inside functions) included. The graph is read
from the source with ``ast``, so the test also documents it:
``python tests/test_layering.py`` prints the module graph by layer.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = ["core", "data", "methods", "checkpoint", "train", "eval", "export", "features", "analysis"]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in (REPO / "pipeline").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in files and t != name}
        graph[name] = deps
    return graph


def layer_of(module: str) -> int:
    """pipeline.core.x -> 0, ..., pipeline.export.x -> 6; pipeline itself (the version) -> 0."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 else 0


def test_no_module_imports_a_higher_layer():
    wrong = [(m, d) for m, deps in import_graph().items() for d in deps if layer_of(d) > layer_of(m)]
    assert not wrong, "lower layers importing higher ones: " + ", ".join(f"{m} -> {d}" for m, d in wrong)


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            assert state.get(dep) != 1, "import cycle: " + " -> ".join(path[path.index(dep):] + [dep]) if dep in path \
                else f"import cycle through {dep}"
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_core_needs_only_the_standard_library():
    """So the Makefile can run ``python3 -m pipeline.core.paths`` before any virtual environment exists."""
    for path in (REPO / "pipeline" / "core").glob("*.py"):
        tree = ast.parse(path.read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
        names += [n.module for n in top if isinstance(n, ast.ImportFrom) and n.module]
        third_party = [n for n in names if n.split(".")[0] not in sys.stdlib_module_names | {"pipeline", "__future__"}]
        assert not third_party, f"{path.name} imports {third_party} at top level"


if __name__ == "__main__":
    graph = import_graph()
    for layer in LAYERS:
        for m in sorted(m for m in graph if layer_of(m) == LAYERS.index(layer) and (len(m.split(".")) > 1 or layer == "core")):
            deps = sorted(d.removeprefix("pipeline.") for d in graph[m])
            print(f"{m.removeprefix('pipeline.'):28s} -> {', '.join(deps) if deps else '-'}")
