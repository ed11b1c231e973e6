"""Compare the working tree's worker with another commit's, benchmark by benchmark.

    .venv/bin/python -m bench.compare --against 9092cec             # every benchmark below
    .venv/bin/python -m bench.compare --against 9092cec burst scale --rounds 3
    .venv/bin/python -m bench.compare --against HEAD~1 --quick burst   # smoke-sized
    .venv/bin/python -m bench.compare --against 9092cec million \\
        --args million="--sizes 100000"                                # a benchmark's own options
    .venv/bin/python -m bench.compare --against HEAD~1 steady --rounds 1 \\
        --args steady="--counters 1000000 --duration 300"              # #14's steady state

Each named benchmark runs as its own process (``python -m bench.<name>``, its usual
options or ``--quick`` ones, the same for both sides) once per side per round, sides
alternating: new, old in even rounds and old, new in odd ones, so that a drift of the
machine's load over the run weighs on both alike. "new" is the worker package of the
working tree as it is; "old" that of REV, checked out with ``git worktree add`` in a
temp dir and removed afterwards. Only the workers' code differs: the benchmark driver,
the backend and the lab are the working tree's (see ``CODE_ENV`` in bench/common.py).
Each run writes its usual JSON into a temp dir (bench/results/<name>.json is left
alone); from it a few metrics are read (``SPECS``), and per metric the median over
rounds of each side and the ratio new/old are printed as a table and written with every
value to ``bench/results/compare-<REV>.json``.

A verdict is given only when it is clear: every new value better than every old one (or
worse than all of them), by at least 5 % of the medians; "~" otherwise. With one round
that just compares two numbers: use ``--rounds 2`` or more for anything to quote.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from .common import (
    BASE_COMMIT,
    CODE_ENV,
    RESULTS_DIR,
    RESULTS_ENV,
    ROOT,
    WorkerCode,
    clean_json,
    code_at,
    log,
    machine_info,
    measured_code,
)
from .comparison import Metric, Row, compare_rows, render_table
from .peer import side_metrics as peer_metrics
from .run_all import BENCHMARKS

# --- what each benchmark reports -----------------------------------------------------------

Values = dict[str, float | None]


def _get(d: Any, *path: str | int) -> float | None:
    for p in path:
        try:
            d = d[p]
        except (KeyError, IndexError, TypeError):
            return None
    return float(d) if isinstance(d, int | float) else None


@attrs.frozen
class Spec:
    """How to run one benchmark under compare and what to read from its JSON."""

    args: tuple[str, ...]
    quick: tuple[str, ...]
    metrics: Callable[[dict[str, Any]], list[tuple[Metric, float | None]]]


def _burst(d: dict[str, Any]) -> list[tuple[Metric, float | None]]:
    out = []
    for run in d.get("runs", []):
        tag = f"in-flight {run['max_in_flight']}: "
        out += [
            (Metric(tag + "resets/s", "", False), _get(run, "resets_per_s")),
            (Metric(tag + "drain", "s", True), _get(run, "drain_s")),
            (Metric(tag + "CPU per reset", "ms", True), _get(run, "burst_cpu_ms_per_reset")),
            (Metric(tag + "of it in the kernel", "ms", True), _get(run, "burst_sys_ms_per_reset")),
            (Metric(tag + "latency p50", "ms", True), _get(run, "latency_ms", "p50")),
            (Metric(tag + "latency p99", "ms", True), _get(run, "latency_ms", "p99")),
            (
                Metric(tag + "all deadlines recorded after", "ms", True),
                _get(run, "all_tracked_after_ms"),
            ),
            (Metric(tag + "RSS after", "MiB", True), _get(run, "rss_mib", "after")),
            (Metric(tag + "keys without a reset", "", True), _get(run, "missing_keys")),
        ]
    return out


def _scale(d: dict[str, Any]) -> list[tuple[Metric, float | None]]:
    out = []
    for run in d.get("runs", []):
        n = run["counters"]
        tag = f"{n:,}: "
        mem = run.get("redis_used_memory_bytes", {})
        added = (mem["after_reconcile"] - mem["keys_loaded"]) / n if mem else None
        out += [
            (
                Metric(tag + "reconcile", "s", True),
                _get(run, "reconcile", "acquired_to_reconciled_s"),
            ),
            (Metric(tag + "leader RSS", "MiB", True), _get(run, "reconcile", "rss_mib")),
            (Metric(tag + "idle CPU", "%", True), _get(run, "idle_after_reconcile", "cpu_pct")),
            (
                Metric(tag + "re-arm all: tracked in", "s", True),
                _get(run, "live_events", "all_tracked_after_s"),
            ),
            (Metric(tag + "RSS after re-arm", "MiB", True), _get(run, "live_events", "rss_mib")),
            (Metric(tag + "Redis memory added per counter", "B", True), added),
        ]
    return out


def _million(d: dict[str, Any]) -> list[tuple[Metric, float | None]]:
    out = []
    for run in d.get("runs", []):
        tag = f"{run['counters']:,}: "
        out += [
            (
                Metric(tag + "reconcile (first leader)", "s", True),
                _get(run, "first_leader", "acquired_to_reconciled_s"),
            ),
            (Metric(tag + "leader RSS", "MiB", True), _get(run, "first_leader", "rss_mib")),
            (Metric(tag + "standby RSS", "MiB", True), _get(run, "standby", "rss_mib")),
            (
                Metric(tag + "takeover: first on-time reset", "s", True),
                _get(run, "takeover", "first_on_time_reset_s"),
            ),
            (
                Metric(tag + "takeover: reconciled", "s", True),
                _get(run, "takeover", "reconciled_s"),
            ),
            (
                Metric(tag + "takeover: resets late > 50 ms", "", True),
                _get(run, "takeover", "ticks_late"),
            ),
            (
                Metric(tag + "takeover: p99 of resets due while reconciling", "ms", True),
                _get(run, "takeover", "during_reconcile", "p99_ms"),
            ),
            (Metric(tag + "new leader RSS", "MiB", True), _get(run, "takeover", "rss_mib")),
            (
                Metric(tag + "deadline zset per counter", "B", True),
                _get(run, "redis", "deadlines_zset_bytes_per_counter"),
            ),
            (
                Metric(tag + "Redis memory added per counter", "B", True),
                _get(run, "redis", "used_memory_added_per_counter"),
            ),
        ]
    return out


def _steady(d: dict[str, Any]) -> list[tuple[Metric, float | None]]:
    run = d.get("run", {})
    res, leader = run.get("resets", {}), run.get("leader", {})
    tag = f"{run.get('counters', 0):,}: "
    return [
        *(
            (Metric(tag + f"latency {p}", "ms", True), _get(res, "latency_ms", p))
            for p in ("p50", "p99", "max")
        ),
        (Metric(tag + "missed", "", True), _get(res, "missed")),
        (Metric(tag + "doubled + stale", "", True), _sum(res, "doubled", "stale_posts")),
        (Metric(tag + "resets/s", "", None), _get(res, "resets_per_s_in_window")),
        (Metric(tag + "leader CPU", "%", True), _get(leader, "cpu_pct")),
        (Metric(tag + "leader CPU per reset", "ms", True), _get(leader, "cpu_ms_per_reset")),
        (Metric(tag + "leader RSS at the end", "MiB", True), _get(leader, "rss_mib", "last")),
        (
            Metric(tag + "leader RSS slope", "MiB/min", True),
            _get(leader, "rss_mib", "slope_mib_per_min"),
        ),
        (Metric(tag + "Redis CPU", "%", True), _get(run, "redis", "cpu_pct")),
    ]


def _sum(d: dict[str, Any], *names: str) -> float | None:
    values = [_get(d, n) for n in names]
    return None if any(v is None for v in values) else sum(v for v in values if v is not None)


def _latency(d: dict[str, Any]) -> list[tuple[Metric, float | None]]:
    out = []
    for sc in d.get("scenarios", []):
        tag = f"{sc['other_keys']:,} other keys: "
        out += [
            (Metric(tag + f"latency {p}", "ms", True), _get(sc, "worker", "latency_ms", p))
            for p in ("p50", "p99", "max")
        ]
        out.append((Metric(tag + "CPU", "%", True), _get(sc, "worker", "cpu", "cpu_pct")))
    return out


def _failover(d: dict[str, Any]) -> list[tuple[Metric, float | None]]:
    out = []
    for res in d.get("results", []):
        tag = f"lease {res['lease_ttl_ms']} ms: "
        out += [
            (Metric(tag + "SIGKILL p50", "ms", True), _get(res, "SIGKILL", "poll_ms", "p50")),
            (
                Metric(tag + "SIGKILL: after expiry p50", "ms", True),
                _get(res, "SIGKILL", "after_expiry_ms", "p50"),
            ),
            (Metric(tag + "SIGTERM p50", "ms", True), _get(res, "SIGTERM", "poll_ms", "p50")),
        ]
    return out


def _idle(d: dict[str, Any]) -> list[tuple[Metric, float | None]]:
    a = d.get("attribution", {})
    return [
        (Metric(f"{who}: {what}", unit, True), _get(a, who, key))
        for who in ("leader", "standby")
        for what, unit, key in (
            ("CPU", "%", "cpu_pct"),
            ("RSS", "MiB", "rss_mib"),
            ("Redis client commands/s", "", "round_trips_per_s"),  # (a pipeline of 2: 2)
        )
    ]


def _gcpause(d: dict[str, Any]) -> list[tuple[Metric, float | None]]:
    return [
        *(
            (Metric(f"latency {p}", "ms", True), _get(d, "latency_ms", p))
            for p in ("p50", "p99", "max")
        ),
        (Metric("full collections", "", True), float(len(d.get("full_collections", [])))),
    ]


def _unrelated(d: dict[str, Any]) -> list[tuple[Metric, float | None]]:
    return [
        (Metric(f"{w}: {what}", unit, True), _get(d, w, *path))
        for w in ("quiet", "churn")
        for what, unit, path in (
            ("leader CPU", "%", ("leader_cpu", "cpu_pct")),
            ("latency p50", "ms", ("counter_latency_ms", "p50")),
            ("latency p99", "ms", ("counter_latency_ms", "p99")),
        )
    ]


def _peer(d: dict[str, Any]) -> list[tuple[Metric, float | None]]:
    medians = d.get("medians", {}).get("worker", {})
    return [(m, medians.get(m.name)) for m, _ in peer_metrics({})]


def _killgap(d: dict[str, Any]) -> list[tuple[Metric, float | None]]:
    return [
        *(
            (Metric(f"kill -> next reset {p}", "ms", True), _get(d, "gap_ms", p))
            for p in ("p50", "p99", "max")
        ),
        (Metric("due in the gap: late p99", "ms", True), _get(d, "gap_late_ms", "p99")),
        (Metric("doubled", "", True), d.get("doubled")),
        (Metric("fencing tokens down", "", True), d.get("tokens_down")),
    ]


# poison and slowlink are left out: they run both commits themselves (--base).
SPECS: dict[str, Spec] = {
    "latency": Spec((), ("--quick",), _latency),
    "failover": Spec(("--rounds", "3"), ("--rounds", "2", "--ttls", "1000"), _failover),
    # The backend calibration measures no worker: skipped.
    "burst": Spec(
        ("--skip-calibration", "--in-flight", "32"),
        ("--skip-calibration", "--in-flight", "32", "--keys", "3000"),
        _burst,
    ),
    "idle": Spec(("--window", "20"), ("--window", "5"), _idle),
    "killgap": Spec(("--rounds", "10"), ("--quick",), _killgap),
    "scale": Spec((), ("--sizes", "1000", "10000", "--idle", "2"), _scale),
    "million": Spec(("--sizes", "100000"), ("--sizes", "20000"), _million),
    # 200k counters at the full rates for 2 minutes (the 1M / 5 min run: --args).
    "steady": Spec(("--counters", "200000", "--duration", "120"), ("--quick",), _steady),
    "gcpause": Spec((), ("--keys", "100"), _gcpause),
    "unrelated": Spec(("--window", "10"), ("--window", "5", "--rate", "5000"), _unrelated),
    # This worker's side only (BullMQ's does not change with the commit).
    "peer": Spec(
        ("--sides", "worker", "--rounds", "1"),
        ("--quick", "--sides", "worker", "--name", "peer"),
        _peer,
    ),
}


# --- running -----------------------------------------------------------------------------


def run_one(
    name: str, args: Sequence[str], code: WorkerCode, out_dir: Path, limit: float
) -> dict[str, Any] | None:
    """Run ``bench.<name>`` with ``code``'s workers; its JSON, or None if it failed."""
    env = {**os.environ, RESULTS_ENV: str(out_dir)}
    env.pop(CODE_ENV, None)
    if code.checkout is not None:
        env[CODE_ENV] = str(code.checkout)
    out_dir.mkdir(parents=True, exist_ok=True)
    log(f"compare: {name} {shlex.join(args)} with {code.label} ({code.commit})")
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", f"bench.{name}", *args],
            cwd=ROOT,
            env=env,
            timeout=limit,
            check=False,
        )
    except subprocess.TimeoutExpired:
        log(f"compare: {name} with {code.label} TIMED OUT after {limit:.0f} s")
        return None
    path = out_dir / f"{name}.json"
    if proc.returncode != 0 or not path.exists():
        log(f"compare: {name} with {code.label} FAILED (exit {proc.returncode})")
        return None
    log(f"compare: {name} with {code.label} done in {time.monotonic() - t0:.0f} s")
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _parse_overrides(items: Sequence[str]) -> dict[str, tuple[str, ...]]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in SPECS:
            raise SystemExit(f"--args {item!r}: expected NAME=ARGS with NAME in {list(SPECS)}")
        out[name] = tuple(shlex.split(value))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"benchmarks (default: all of {list(SPECS)})"
    )
    parser.add_argument(
        "--against",
        default=BASE_COMMIT,
        metavar="REV",
        help=f"the commit to compare with (default {BASE_COMMIT})",
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="smoke-sized runs")
    parser.add_argument(
        "--args",
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help="a benchmark's options instead of the usual ones (repeatable)",
    )
    parser.add_argument(
        "--keep-raw", type=Path, metavar="DIR", help="keep every run's own JSON under DIR"
    )
    args = parser.parse_args()
    names = args.names or list(SPECS)
    unknown = [n for n in names if n not in SPECS]
    if unknown:
        parser.error(f"not comparable: {unknown}; choose from {list(SPECS)}")
    overrides = _parse_overrides(args.args)
    bench_args = {
        n: overrides.get(n, SPECS[n].quick if args.quick else SPECS[n].args) for n in names
    }
    limits = {n: float(BENCHMARKS.get(n, 600)) * (0.5 if args.quick else 1.5) for n in names}

    values: dict[str, dict[str, list[Values]]] = {n: {"new": [], "old": []} for n in names}
    metrics: dict[str, dict[str, Metric]] = {n: {} for n in names}
    failed: list[str] = []
    t0 = time.monotonic()
    with contextlib.ExitStack() as stack:
        raw_dir = args.keep_raw or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-compare-"))
        )
        new = measured_code("new")
        old = stack.enter_context(code_at(args.against, "old"))
        for rnd in range(args.rounds):
            sides = (new, old) if rnd % 2 == 0 else (old, new)
            for name in names:
                for code in sides:
                    data = run_one(
                        name,
                        bench_args[name],
                        code,
                        raw_dir / f"{name}-{code.label}-{rnd}",
                        limits[name],
                    )
                    if data is None:
                        failed.append(f"{name} {code.label} round {rnd}")
                        continue
                    got = SPECS[name].metrics(data)
                    for m, _ in got:
                        metrics[name].setdefault(m.name, m)
                    values[name][code.label].append({m.name: v for m, v in got})
    rows = [
        row
        for n in names
        for row in compare_rows(n, list(metrics[n].values()), values[n]["new"], values[n]["old"])
    ]
    print(render_table(rows, new.commit, old.commit))
    _write(args, names, bench_args, new, old, rows, failed, time.monotonic() - t0)
    return 1 if failed else 0


def _write(
    args: argparse.Namespace,
    names: Sequence[str],
    bench_args: Mapping[str, Sequence[str]],
    new: WorkerCode,
    old: WorkerCode,
    rows: Sequence[Row],
    failed: Sequence[str],
    wall_s: float,
) -> None:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"compare-{args.against.replace('/', '_')}.json"
    payload = {
        "benchmark": "compare",
        "machine": machine_info(),
        "params": {
            "against": args.against,
            "rounds": args.rounds,
            "quick": args.quick,
            "benchmarks": {n: list(bench_args[n]) for n in names},
            "order": "round r: new, old if r is even, else old, new",
        },
        "new": attrs.asdict(new),
        "old": attrs.asdict(old),
        "wall_s": round(wall_s, 1),
        "failed_runs": list(failed),
        "rows": [
            {
                "benchmark": r.benchmark,
                "metric": r.metric.name,
                "unit": r.metric.unit,
                "lower_is_better": r.metric.lower_is_better,
                "new": list(r.new),
                "old": list(r.old),
                "new_median": r.new_median,
                "old_median": r.old_median,
                "ratio_new_over_old": None if r.ratio is None else round(r.ratio, 4),
                "verdict": r.verdict,
            }
            for r in rows
        ],
    }
    path.write_text(json.dumps(clean_json(payload), indent=2, default=str) + "\n")
    log(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
