"""The package's shape, as the README's Layout states it."""

from __future__ import annotations

import ast
import tomllib
from fnmatch import fnmatch
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
