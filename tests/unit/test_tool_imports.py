"""The tool library's modules import each other one way (issue 16: ``registry`` and
``builtins`` used to import each other, one of the two imports hidden in a function).

Read from the source, function-level imports included, so a cycle cannot hide behind a
lazy import again."""

from __future__ import annotations

import ast
from pathlib import Path

import loom_services.tools

PACKAGE = "loom_services.tools"
FOLDER = Path(loom_services.tools.__file__).parent


def _imports(path: Path, modules: set[str]) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == PACKAGE:  # `from loom_services.tools import netguard`
                found |= {a.name for a in node.names if a.name in modules}
            elif node.module.startswith(PACKAGE + "."):
                found.add(node.module.removeprefix(PACKAGE + ".").split(".")[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(PACKAGE + "."):
                    found.add(alias.name.removeprefix(PACKAGE + ".").split(".")[0])
    return found


def _graph() -> dict[str, set[str]]:
    modules = {p.stem for p in FOLDER.glob("*.py") if p.stem != "__init__"}
    return {m: _imports(FOLDER / f"{m}.py", modules) - {m} for m in modules}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return [*trail, node, nxt]
            if nxt not in state and (found := visit(nxt, [*trail, node])):
                return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [])):
            return found
    return None


def test_the_tool_modules_import_each_other_one_way() -> None:
    graph = _graph()
    assert graph["library"] >= {"builtins", "http_request", "registry"}
    assert "builtins" not in graph["registry"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_default_registry_is_still_offered_by_the_package() -> None:
    from loom_services.tools import default_registry

    assert "http_request" in default_registry()
