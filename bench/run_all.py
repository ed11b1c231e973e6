"""Run every benchmark, then the plot and the summary. From the repository root:

    .venv/bin/python bench/run_all.py            # everything (~16 minutes on 2 cores)
    .venv/bin/python bench/run_all.py burst idle # some of them

Each benchmark runs as its own process (``python -m bench.<name>``) with a time limit,
writes bench/results/<name>.json, and starts and stops its own redis-server, backend and
workers on loopback. Afterwards docs/latency.png is drawn (if matplotlib is installed:
``.venv/bin/pip install -e '.[bench]'``) and bench/results/summary.md written.
Exit status: 1 if a benchmark failed to run, else 0 (problems the benchmarks found in
the worker are listed in the JSON files and the summary, not turned into a failure).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# name -> time limit in seconds (normal durations on 2 cores: ~130, ~40, ~210, ~70, ~50,
# see docs/BENCHMARKS.md for million, ~10, ~30, ~170, ~160, ~180, ~400 for steady:
# 1M keys loaded, a 55 s warm-up, 300 s measured)
BENCHMARKS = {
    "latency": 300,
    "failover": 240,
    "burst": 420,
    "idle": 150,
    "scale": 300,
    "million": 1200,
    "gcpause": 120,
    "unrelated": 120,
    "poison": 360,
    "slowlink": 480,
    "touch": 420,
    "steady": 900,
    "peer": 420,  # this worker beside BullMQ (node + npm): ~5 minutes, 3 rounds
}


def run(name: str, limit: float) -> bool:
    print(f"=== {name} (limit {limit:.0f} s)", flush=True)
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", f"bench.{name}"], cwd=ROOT, timeout=limit, check=False
        )
    except subprocess.TimeoutExpired:
        print(f"=== {name}: TIMED OUT after {limit:.0f} s", flush=True)
        return False
    ok = proc.returncode == 0
    status = "ok" if ok else f"FAILED (exit {proc.returncode})"
    print(f"=== {name}: {status} in {time.monotonic() - t0:.0f} s", flush=True)
    return ok


def main() -> int:
    names = sys.argv[1:] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s): {unknown}; choose from {list(BENCHMARKS)}")
        return 2
    t0 = time.monotonic()
    failed = [n for n in names if not run(n, BENCHMARKS[n])]
    if importlib.util.find_spec("matplotlib") is None:
        print(
            "matplotlib not installed: skipping docs/latency.png "
            "(.venv/bin/pip install -e '.[bench]')"
        )
    elif (ROOT / "bench" / "results" / "latency.json").exists():
        subprocess.run([sys.executable, "-m", "bench.plot"], cwd=ROOT, check=False)
    subprocess.run([sys.executable, "-m", "bench.report"], cwd=ROOT, check=False)
    print(f"=== all done in {time.monotonic() - t0:.0f} s; failed: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
