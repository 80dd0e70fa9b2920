"""The package's imports flow one way: no module imports (at any depth, inside functions too) one that imports it
back, so no import is hidden inside a function to dodge a loop."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "inferaligner"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    relative = Path(*name.split(".")[1:]) if "." in name else Path()
    return (PACKAGE / relative).with_suffix(".py").is_file() or (PACKAGE / relative / "__init__.py").is_file()


def import_graph() -> dict[str, set[str]]:
    """Each module of the package and the package modules it imports anywhere in its body."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name.startswith("inferaligner")}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("inferaligner"):
                for alias in node.names:
                    child = f"{node.module}.{alias.name}"
                    edges.add(child if _is_module(child) else node.module)
        graph[name] = {e for e in edges if e != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_package_has_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_finder_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_models_imports_nothing_above_it() -> None:
    assert import_graph()["inferaligner.models"] <= {"inferaligner.errors"}


LAYERS = {"zoo": 1, "eval": 2, "build": 3, "demo": 3, "align": 3, "serve": 4, "cli": 5}
"""Above the core (0: the library itself), each part may import only parts of its own layer or below: the demo
models (zoo), evaluation, the builder, the demo and `align`, the server, the command line."""


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], 0) if len(parts) > 1 else 99  # the package's own __init__ assembles everything


def test_imports_flow_down_the_layers() -> None:
    upward = sorted(
        f"{module} -> {target}"
        for module, targets in import_graph().items()
        for target in targets
        if layer(target) > layer(module)
    )
    assert not upward, "imports that reach a higher layer: " + "; ".join(upward)


def test_serving_is_layered_protocol_serving_app() -> None:
    """serve/: the shapes (protocol) import no other part of the server, the API's logic (openai) never imports the
    HTTP layer (app), and only the package and Ray Serve import the app."""
    graph = import_graph()
    assert not {m for m in graph["inferaligner.serve.protocol"] if m.startswith("inferaligner.serve")}
    assert "inferaligner.serve.app" not in graph["inferaligner.serve.openai"]
    importers = {module for module, targets in graph.items() if "inferaligner.serve.app" in targets}
    assert importers <= {"inferaligner.serve", "inferaligner.serve.rayserve"}, importers
