"""bench/courier_shape.py runs, and each shape sends every request and reads every
answer (it measures the worker's own courier path, so a change there must not break it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import RESULTS_ENV
from bench.courier_shape import available

pytestmark = pytest.mark.backend_only


def test_every_shape_sends_every_request(tmp_path: Path) -> None:
    small = ["--rounds", "1", "--requests", "60", "--lanes", "4"]
    subprocess.run(
        [sys.executable, "-m", "bench.courier_shape", *small],
        env={**os.environ, RESULTS_ENV: str(tmp_path)},
        capture_output=True,
        check=True,
        timeout=120,
    )
    runs = json.loads((tmp_path / "courier_shape.json").read_text())["runs"]
    assert {shape: [run["done"] for run in runs[shape]] for shape in runs} == {
        shape: [60] for shape in available()
    }
