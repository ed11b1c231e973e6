"""The package's shape, as the README's Layout states it."""

from __future__ import annotations

import ast
from pathlib import Path

import trio_counter_worker

PACKAGE = Path(trio_counter_worker.__file__).parent
REDIS_MODULES = {"functions", "redis_bridge", "redis_cluster", "redis_reads", "redis_replies"}


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
