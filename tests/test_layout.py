"""The house rules of the code base (issue 16), read from the source with ``ast``.

Data and imports flow one way: model_store <- merging <- server.runtime <- server.http / server.eval
<- server.cli <- benchmarks; serving never imports merging (the HTTP app only reaches ``merging.pipeline``,
which admin merge jobs run); no import cycles; no module imports another's ``_private`` name. Relative
imports (``from ..http import app``) count like absolute ones; the benchmarks (scripts that import one
another by file name) are scanned too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("model_store", "merging", "server")
#: scripts run from their folder: ``from lowrank_serve import x`` there is ``benchmarks.lowrank_serve``
SCRIPT_DIRS = ("benchmarks",)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    files = [p for top in (*PACKAGES, *SCRIPT_DIRS) for p in sorted((REPO / top).rglob("*.py"))]
    # leaving out hidden folders (benchmark stores and scratch copies)
    return {_module_name(p): p for p in files if not any(x.startswith(".") for x in p.relative_to(REPO).parts)}


MODULES = _modules()


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The module ``from <level dots><node.module> import ...`` names, seen from ``module``."""
    if node.level == 0:
        name = node.module or ""
        top = module.split(".")[0]
        return f"{top}.{name}" if top in SCRIPT_DIRS and f"{top}.{name.split('.')[0]}" in MODULES else name
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _imports_of(source: str, module: str, is_package: bool = False) -> list[tuple[str, list[str]]]:
    """(imported module, names) for every import of a project module in ``source``, anywhere in it."""
    roots = (*PACKAGES, *SCRIPT_DIRS)
    out: list[tuple[str, list[str]]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            target = _absolute(module, is_package, node)
            if target.split(".")[0] in roots:
                names = [a.name for a in node.names]
                # ``from pkg import module`` imports the submodule
                subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
                out.append((target, [n for n in names if f"{target}.{n}" not in MODULES]))
                out.extend((s, []) for s in subs)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                name = alias.name
                if module.split(".")[0] in SCRIPT_DIRS and f"{module.split('.')[0]}.{name}" in MODULES:
                    name = f"{module.split('.')[0]}.{name}"
                if name.split(".")[0] in roots:
                    out.append((name, []))
    return out


def _imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    return _imports_of(path.read_text(), name, path.name == "__init__.py")


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_the_scan_sees_the_whole_code_base():
    assert {"server.runtime.engine", "server.http.app", "merging.pipeline", "model_store.schema"} <= set(MODULES)
    assert {"benchmarks.serve", "benchmarks.lowrank_serve"} <= set(MODULES)
    assert any(dep == "model_store.schema" for dep, _ in GRAPH["server.runtime.bundle_reader"])
    assert ("benchmarks.lowrank_serve", ["synthetic_gate"]) in GRAPH["benchmarks.serve"]  # script-style import


def test_relative_imports_are_resolved_like_absolute_ones():
    engine = "server.runtime.engine"
    assert _imports_of("from ..http.app import create_app", engine) == [("server.http.app", ["create_app"])]
    assert _imports_of("from . import gated_vit", engine) == [("server.runtime", []), ("server.runtime.gated_vit", [])]
    assert _imports_of("from .. import http", engine) == [("server", []), ("server.http", [])]
    assert _imports_of("from .engine import _private", "server.runtime", is_package=True) == [
        ("server.runtime.engine", ["_private"])
    ]
    # and the rules below see them: a relative import from the runtime into the HTTP layer is a violation
    graph = {**GRAPH, engine: _imports_of("from ..http import app", engine)}
    assert (engine, "server.http.app") in _violations(graph, "server.runtime", ("server.http",))


def _violations(graph: dict, layer: str, forbidden: tuple[str, ...]) -> list[tuple[str, str]]:
    return [
        (mod, dep)
        for mod, deps in graph.items()
        if _within(mod, layer)
        for dep, _ in deps
        if any(_within(dep, f) for f in forbidden)
    ]


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        ("model_store", ("merging", "server", "benchmarks")),
        ("merging", ("server", "benchmarks")),
        ("server.runtime", ("merging", "server.http", "server.eval", "server.cli", "benchmarks")),
        ("server.http", ("server.eval", "server.cli", "benchmarks")),
        ("server.eval", ("server.http", "server.cli", "benchmarks")),
        ("server.cli", ("benchmarks",)),
    ],
)
def test_imports_flow_one_way(layer, forbidden):
    bad = _violations(GRAPH, layer, forbidden)
    assert not bad, f"{layer} must not import {forbidden}: {bad}"


def test_the_http_server_reaches_merging_only_through_the_pipeline():
    bad = [
        (mod, dep)
        for mod, deps in GRAPH.items()
        if _within(mod, "server.http")
        for dep, _ in deps
        if _within(dep, "merging") and dep != "merging.pipeline"
    ]
    assert not bad, bad


def test_no_module_imports_a_private_name_of_another():
    bad = [
        (mod, dep, n)
        for mod, deps in GRAPH.items()
        for dep, names in deps
        for n in names
        if n.startswith("_") and not n.startswith("__")
    ]
    assert not bad, bad


def test_no_import_cycles():
    """Depth-first search over module -> imported module (package ``__init__`` edges excluded)."""
    edges = {
        m: sorted({d for d, _ in deps if d in MODULES and d != m and not MODULES[d].name == "__init__.py"})
        for m, deps in GRAPH.items()
    }
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in edges[node]:
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_every_package_says_what_lives_there_and_what_it_may_import():
    inits = [p for p in MODULES.values() if p.name == "__init__.py"]
    missing = [str(p.relative_to(REPO)) for p in inits if not ast.get_docstring(ast.parse(p.read_text()))]
    assert not missing, missing
