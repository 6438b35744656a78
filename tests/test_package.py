"""The package's shape: one import namespace, layers that import only downwards, no import cycle.

Read from the source with ``ast`` (nothing is imported), so the checks hold for every module, including the ones
whose imports sit inside functions.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOP = "mlmscope"
#: Lowest layer first; a module may import its own layer and the layers before it.
LAYERS = ("checkpoints", "probes", "analyses", "app")


def _modules() -> dict[str, Path]:
    """``mlmscope.<folder>.<module>`` -> file, for every module of the four folders."""
    out = {TOP: REPO / TOP / "__init__.py"}
    for layer in LAYERS:
        for f in sorted((REPO / layer).rglob("*.py")):
            parts = f.relative_to(REPO).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            out[".".join((TOP, *parts))] = f
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str, top_level_only: bool) -> Iterator[tuple[str, int]]:
    """(imported module, line) for every import of ``name`` that resolves inside the package."""
    tree = ast.parse(MODULES[name].read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    base = name.split(".") if _is_package(name) else name.split(".")[:-1]
    for node in nodes:
        if isinstance(node, ast.If) and top_level_only and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            target = ".".join(base[: len(base) - node.level + 1] + ([mod] if mod else [])) if node.level else mod
            candidates = [f"{target}.{a.name}" for a in node.names] + [target]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        for c in candidates:
            if c in MODULES:
                yield c, node.lineno
                break


def test_every_module_lives_under_the_one_namespace():
    bad = [f"{MODULES[m].relative_to(REPO)}:{line} imports {t}" for m in MODULES for t, line in _absolute_old(m)]
    assert not bad, "imports of the old top-level packages:\n" + "\n".join(bad)


def _absolute_old(name: str) -> Iterator[tuple[str, int]]:
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        names = (
            [node.module or ""]
            if isinstance(node, ast.ImportFrom) and not node.level
            else [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else []
        )
        for n in names:
            if n.split(".")[0] in LAYERS:
                yield n, node.lineno


@pytest.mark.parametrize("layer", LAYERS)
def test_layers_import_only_downwards(layer):
    allowed = set(LAYERS[: LAYERS.index(layer) + 1])
    bad = [
        f"{MODULES[m].relative_to(REPO)}:{line} imports {t}"
        for m in MODULES
        if m.split(".")[1:2] == [layer]
        for t, line in _imports(m, top_level_only=False)
        if t != TOP and t.split(".")[1] not in allowed
    ]
    assert not bad, f"{layer}/ may import only {sorted(allowed)}:\n" + "\n".join(bad)


def test_no_import_cycle():
    graph = {m: {t for t, _ in _imports(m, top_level_only=True) if t != m} for m in MODULES}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                return path + [m, t]
            if t not in state and (cycle := visit(t, path + [m])):
                return cycle
        state[m] = 2
        return None

    for m in sorted(MODULES):
        if m not in state:
            cycle = visit(m, [])
            assert cycle is None, "import cycle: " + " -> ".join(cycle[cycle.index(cycle[-1]) :])


def test_the_checker_sees_relative_imports():
    """Guards the checks above against resolving nothing: known edges must be found."""
    edges = {t for t, _ in _imports("mlmscope.analyses.runner", top_level_only=True)}
    assert {"mlmscope.analyses.base", "mlmscope.checkpoints.errors"} <= edges
    assert "mlmscope.checkpoints.errors" in {t for t, _ in _imports("mlmscope.app.views.model", top_level_only=True)}
