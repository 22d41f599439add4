"""The library's import graph: no module-level import cycle inside place_tf/, and no
module imports another module's private names (`from x import _private`)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    out = {}
    for path in (REPO / "place_tf").rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(path: Path, top_level_only: bool):
    """(imported module, imported names, line) of `path`'s imports."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    for node in nodes:
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module, [a.name for a in node.names], node.lineno


def _resolve(name: str, names, modules) -> list[str]:
    """The project modules an import statement loads (a package's submodules included)."""
    found = [f"{name}.{n}" for n in names if f"{name}.{n}" in modules]
    return found + ([name] if name in modules else [])


def test_no_module_level_import_cycle_in_place_tf():
    modules = _modules()
    graph = {
        m: {d for name, names, _ in _imports(p, True) for d in _resolve(name, names, modules)}
        for m, p in modules.items()
    }
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycles.append(" -> ".join([*stack[stack.index(d) :], d]))
            elif d not in state:
                visit(d, [*stack, d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "module-level import cycles:\n" + "\n".join(cycles)


PENDING: dict[str, set[str]] = {}


def test_no_private_names_imported_across_modules():
    modules = _modules()
    bad = []
    for root in ("place_tf", "tools", "pipelines", "tests"):
        for path in (REPO / root).rglob("*.py"):
            for name, names, line in _imports(path, False):
                if not name.split(".")[0] == "place_tf":
                    continue
                rel = str(path.relative_to(REPO))
                private = [
                    n
                    for n in names
                    if n.startswith("_")
                    and not n.startswith("__")
                    and n not in PENDING.get(rel, set())
                ]
                if private:
                    bad.append(f"{path.relative_to(REPO)}:{line}: from {name} import {private}")
    assert modules and not bad, "private names imported across modules:\n" + "\n".join(bad)
