"""Package structure: every module imports, no import circle, the public API at the root."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import torchrec_dimgrow

ROOT = Path(torchrec_dimgrow.__file__).parent
PKG = "torchrec_dimgrow"


def all_modules() -> list[str]:
    names = [PKG]
    for info in pkgutil.walk_packages([str(ROOT)], prefix=f"{PKG}."):
        if not info.name.endswith("__main__"):
            names.append(info.name)
    return sorted(names)


def module_file(name: str) -> Path:
    rel = Path(*name.split(".")[1:])
    pkg_init = ROOT / rel / "__init__.py"
    return pkg_init if pkg_init.is_file() else (ROOT / rel).with_suffix(".py")


def imported_modules(name: str, known: set[str]) -> set[str]:
    """Package modules ``name`` imports anywhere in its file (function bodies and
    ``TYPE_CHECKING`` blocks included: a circle hidden in a local import is still a circle)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(module_file(name).read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from pkg.sub import x``: an edge to pkg.sub, and to pkg.sub.x when x is a module
            targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for target in targets:
            if target in known:
                out.add(target)
    return out - {name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_imports() -> None:
    for name in all_modules():
        importlib.import_module(name)


def test_no_import_circle_in_the_package() -> None:
    names = all_modules()
    known = set(names)
    graph = {n: imported_modules(n, known) for n in names}
    # The root re-exports the public API, so every module that imports the package root
    # sees it; only the root itself may import downward into everything.
    assert not any(PKG in deps for n, deps in graph.items() if n != PKG), "no module imports the root"
    assert cycles(graph) == []


def test_cycle_finder_finds_a_circle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_public_api_from_the_package_root() -> None:
    from torchrec_dimgrow import DimGrowConfig, DimGrowController, export, swap_in
    from torchrec_dimgrow.controller import DimGrowController as Controller
    from torchrec_dimgrow.swap import export as swap_export
    from torchrec_dimgrow.swap import swap_in as swap_swap_in

    assert DimGrowController is Controller and export is swap_export and swap_in is swap_swap_in
    assert DimGrowConfig().d_max == 16
