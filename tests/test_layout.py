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
    # a script-style import (run from its folder) is the sibling module
    assert _imports_of("from lowrank_serve import x", "benchmarks.serve") == [("benchmarks.lowrank_serve", ["x"])]


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


@pytest.mark.parametrize("layer", ["server.http", "server.eval"])
def test_http_and_eval_reach_merging_only_through_the_pipeline(layer):
    bad = [
        (mod, dep)
        for mod, deps in GRAPH.items()
        if _within(mod, layer)
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


BENCHMARKS = sorted((REPO / "benchmarks").glob("*.py"))
SECTIONS = {
    line.removeprefix("## ").removeprefix("### ").strip()
    for line in (REPO / "BENCHMARKS.md").read_text().splitlines()
    if line.startswith("## ") or line.startswith("### ")
}


def test_no_relative_imports():
    files = [*MODULES.values(), *BENCHMARKS]
    bad = [
        str(p.relative_to(REPO))
        for p in files
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, ast.ImportFrom) and node.level > 0
    ]
    assert not bad, bad


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.name)
def test_a_benchmark_names_its_command_and_section_and_imports_only_the_package(path):
    """Its docstring gives the command that runs it and the BENCHMARKS.md section it feeds; it imports the
    installed packages (no sibling benchmark, no ``sys.path`` edit, no ``__import__``, no private name)."""
    tree = ast.parse(path.read_text())
    doc = ast.get_docstring(tree) or ""
    assert f"benchmarks/{path.name}" in doc, "the docstring shows no command line"
    fed = doc.split("Feeds BENCHMARKS.md, section", 1)[-1].split('"')
    assert "Feeds BENCHMARKS.md, section" in doc and len(fed) > 1 and fed[1] in SECTIONS, f"no known section: {fed}"
    siblings = {p.stem for p in BENCHMARKS}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            assert node.module.split(".")[0] not in siblings, f"imports the benchmark {node.module}"
            assert not any(a.name.startswith("_") for a in node.names), f"private name from {node.module}"
        elif isinstance(node, ast.Import):
            assert not {a.name.split(".")[0] for a in node.names} & siblings, "imports another benchmark"
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            assert (node.value.id, node.attr) != ("sys", "path"), "edits sys.path"
        elif isinstance(node, ast.Name):
            assert node.id != "__import__", "imports through __import__"
