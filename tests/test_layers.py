"""The house's rules (ARCHITECTURE.md), read from the imports: arrows point one way, no file loops.

Every ``import app...`` and ``from app... import`` in ``app/``, at module level or inside a
function, is an arrow. A package may import its own modules, the ground floor and the layers below
it, never a layer above; and no chain of imports between files comes back to where it started.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

APP = Path(__file__).resolve().parent.parent / "app"

# Higher imports lower, never the reverse. The ground floor (``app/*.py``) is 0; the modules that
# build everything (``main``, ``backends``, ``__main__``) stand on top of it all.
RANK = {
    "ground": 0,
    "storage": 1,
    "engines": 1,
    "pipeline": 2,
    "render": 3,
    "formats": 4,
    "tasks": 5,
    "api": 6,
}
TOP = {"app.main", "app.backends", "app.__main__"}


def _module(path: Path) -> str:
    parts = path.relative_to(APP.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in RANK) else "ground"


def _imports(path: Path) -> Iterator[str]:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("app"):
                yield node.module
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name.startswith("app."))


def _graph() -> dict[str, set[str]]:
    modules = {_module(path): path for path in APP.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        # ``from app.x import y`` may name a module ``app.x.y``; the arrow goes to whichever exists.
        graph[name] = {target for target in _imports(path) if target in modules and target != name}
    return graph


def test_imports_point_down_the_layers() -> None:
    upward = [
        f"{source} -> {target}"
        for source, targets in _graph().items()
        if source not in TOP
        for target in targets
        if target in TOP
        or (_layer(source) != _layer(target) and RANK[_layer(target)] >= RANK[_layer(source)])
    ]
    assert upward == []


def test_no_import_loop_between_files() -> None:
    graph = _graph()
    loops: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                loops.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert loops == []
