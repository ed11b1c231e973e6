"""The package's shape, as the README's Layout states it."""

from __future__ import annotations

import ast
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import trio_counter_worker

PACKAGE = Path(trio_counter_worker.__file__).parent
REDIS_MODULES = {
    "functions",
    "redis_bridge",
    "redis_cluster",
    "redis_listener",
    "redis_pipelines",
    "redis_preflight",
    "redis_reads",
    "redis_replies",
}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_redis_modules_import_redis_py() -> None:
    importers = {p.stem for p in PACKAGE.glob("*.py") if "redis" in _imports(p)}
    assert importers == REDIS_MODULES


def test_the_worker_never_imports_the_lab() -> None:
    """Only the command line reaches the lab (lazily, for `demo` and `chaos`)."""
    for path in PACKAGE.glob("*.py"):
        if path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith(("lab", "trio_counter_worker.lab")), path.name


def test_every_subpackage_is_installed() -> None:
    """A plain `pip install .` (the README's quick start) ships lab/ and lab/chaos/ too:
    the editable install the tests run from would not notice a package left out.
    (setuptools matches `include` patterns against dotted names as fnmatch does.)"""
    root = PACKAGE.parent
    config = tomllib.loads((root / "pyproject.toml").read_text())
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    on_disk = {".".join(p.parent.relative_to(root).parts) for p in PACKAGE.rglob("__init__.py")}
    assert "trio_counter_worker.lab.chaos" in on_disk
    left_out = {name for name in on_disk if not any(fnmatch(name, i) for i in include)}
    assert left_out == set()


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _dependencies(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` imports, wherever the import stands (in a
    function, under TYPE_CHECKING): a lazy or type-only import is a dependency too."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = parts[: len(parts) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            # `from . import functions` names a module; `from .x import y`, names in x.
            targets = [f"{module}.{alias.name}" for alias in node.names] + [module]
        else:
            continue
        for target in targets:
            if target in modules:
                found.add(target)
                break
    return found - {name}


def _import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    return {_module_name(p): _dependencies(p, modules) for p in paths}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected part of ``graph`` (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    parts: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            part = set()
            while True:
                member = stack.pop()
                part.add(member)
                if member == node:
                    break
            if len(part) > 1:
                parts.append(part)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_a_cycle(graph, part) for part in parts]


def _a_cycle(graph: dict[str, set[str]], part: set[str]) -> list[str]:
    start = min(part)
    path = [start]
    seen = {start}
    while True:
        nxt = min(m for m in graph[path[-1]] if m in part)
        if nxt in seen:
            return [*path[path.index(nxt) :], nxt]
        path.append(nxt)
        seen.add(nxt)


def test_the_cycle_finder_finds_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_graph_reads_every_kind_of_import() -> None:
    graph = _import_graph()
    assert "trio_counter_worker.config" in graph["trio_counter_worker.worker"]  # from .x import
    assert "trio_counter_worker.lab.chaos" in graph["trio_counter_worker.cli"]  # lazy
    assert "trio_counter_worker._version" in graph["trio_counter_worker"]  # the package


def test_no_module_imports_itself_in_a_circle() -> None:
    """Read as a dependency graph, every import counted (lazy ones in functions and
    type-only ones too), the package's modules have no cycle: each can be read, tested
    and changed knowing only what it imports."""
    assert _cycles(_import_graph()) == []
