"""bench/comparison.py, the pure logic of bench/compare.py: medians, ratios new/old,
verdicts, the table; and which parser a side's redis-py gets. No Redis."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench import common
from bench.comparison import Metric, compare_rows, median, ratio_of, render_table, verdict

LATENCY = Metric("latency p99", "ms", lower_is_better=True)
THROUGHPUT = Metric("resets/s", "", lower_is_better=False)
COUNT = Metric("keys", "", lower_is_better=None)


def test_median_ignores_missing_values() -> None:
    assert median([3.0, None, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0]) == 2.5
    assert median([None, float("inf")]) is None
    assert median([]) is None


def test_ratio_is_new_over_old() -> None:
    assert ratio_of(5.0, 10.0) == 0.5
    assert ratio_of(None, 10.0) is None
    assert ratio_of(5.0, 0.0) is None


def test_verdict_follows_the_metric_direction() -> None:
    assert verdict(LATENCY, [5.0, 6.0], [10.0, 11.0]) == "better"
    assert verdict(LATENCY, [10.0, 11.0], [5.0, 6.0]) == "worse"
    assert verdict(THROUGHPUT, [1200.0, 1250.0], [900.0, 950.0]) == "better"
    assert verdict(THROUGHPUT, [900.0, 950.0], [1200.0, 1250.0]) == "worse"
    assert verdict(COUNT, [1.0], [2.0]) == ""


def test_verdict_needs_no_overlap_and_a_margin() -> None:
    assert verdict(LATENCY, [5.0, 12.0], [10.0, 11.0]) == "~"  # ranges overlap
    assert verdict(LATENCY, [9.8, 9.9], [10.0, 10.1]) == "~"  # apart, but under 5 %
    assert verdict(LATENCY, [5.0], [None]) == "n/a"  # old never arrived


def test_compare_rows_takes_medians_over_rounds() -> None:
    new_runs = [{"latency p99": 5.0, "resets/s": 1200.0}, {"latency p99": 7.0}]
    old_runs = [
        {"latency p99": 10.0, "resets/s": 1000.0},
        {"latency p99": 14.0, "resets/s": 1100.0},
    ]
    rows = compare_rows("burst", [LATENCY, THROUGHPUT], new_runs, old_runs)
    assert [r.metric for r in rows] == [LATENCY, THROUGHPUT]
    lat, thr = rows
    assert (lat.new, lat.old) == ((5.0, 7.0), (10.0, 14.0))
    assert (lat.new_median, lat.old_median, lat.ratio, lat.verdict) == (6.0, 12.0, 0.5, "better")
    assert thr.new == (1200.0, None)  # a run that did not report it
    assert (thr.new_median, thr.old_median, thr.verdict) == (1200.0, 1050.0, "better")


def test_table_has_a_row_per_metric() -> None:
    rows = compare_rows(
        "burst", [LATENCY, COUNT], [{"latency p99": 5.0}], [{"latency p99": 10.0, "keys": 3.0}]
    )
    table = render_table(rows, "abc", "def").splitlines()
    assert table[0].startswith("| benchmark | metric | new abc | old def |")
    assert table[2] == "| burst | latency p99 (ms) ↓ | 5 | 10 | 0.500 | better |"
    assert table[3] == "| burst | keys | - | 3 | - |  |"


def test_a_side_without_hiredis_in_its_pyproject_runs_without_it(tmp_path: Path) -> None:
    """bench/common: the stub put in a launch directory hides hiredis from redis-py."""
    old, new = tmp_path / "old", tmp_path / "new"
    for tree, dep in ((old, '"redis>=5.0"'), (new, '"redis[hiredis]>=5.0"')):
        tree.mkdir()
        (tree / "pyproject.toml").write_text(f"[project]\ndependencies = [{dep}]\n")
    assert not common._declares_hiredis(old)
    assert common._declares_hiredis(new)
    (old / "hiredis.py").write_text(common._NO_HIREDIS)
    probe = "import redis.utils as u; print(u.HIREDIS_AVAILABLE)"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=old, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"
