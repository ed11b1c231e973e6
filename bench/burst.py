"""Burst: 10,000 counters expiring within one second.

One worker (the leader) watches ``c:*``. 10,000 keys are set through one pipeline with
``PXAT`` deadlines spread evenly over one second, starting ~3 s ahead (so the worker has
tracked them all before the first one is due). Measured, per MAX_IN_FLIGHT:

- drain time: first deadline -> last POST received (and last deadline -> last POST),
  and how long after the last POST the last reset is marked sent in Redis;
- throughput: resets/s between the first and the last POST;
- latency per reset (receive time - expired_at), which here is mostly queueing;
- correctness: every key exactly one reset_id, no duplicate POST, nothing left pending.

The backend is the RecordingBackend (ThreadingHTTPServer, in this process). Its own
ceiling is measured first by bench/http_load.py, another process with the worker's HTTP
stack (trio + httpx) at the same concurrency, so a slow backend cannot pass for a slow
worker: with socketserver's defaults (listen backlog 5, Nagle on) and with the settings
every benchmark uses (backlog 1024, TCP_NODELAY; see bench/common.py), and at several
concurrencies and keep-alive pool sizes.

    .venv/bin/python -m bench.burst [--keys 10000] [--in-flight 8 32 128 1000]
    .venv/bin/python -m bench.burst --skip-calibration --in-flight 32 --profile DIR

``--profile DIR`` samples the leader with py-spy (``pip install py-spy``; attaching needs
ptrace rights over the worker) from just before the pipeline until the burst is drained,
and writes DIR/burst-<MAX_IN_FLIGHT>.txt (collapsed stacks: open it with speedscope or
flamegraph.pl); the top functions by self time go into the JSON (``profile``). The
sampling costs the leader some CPU: compare throughput without it.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from trio_counter_worker.lab.backend import Hang

from .common import (
    ROOT,
    STOCK_BACKEND,
    TUNED_BACKEND,
    BackendTuning,
    CpuWindow,
    backend_running,
    cpu_seconds,
    deadlines_key,
    fmt_ms,
    info,
    log,
    log_problems,
    machine_busy_seconds,
    pending_key,
    rig,
    rss_mib,
    summarize,
    threads,
    time_wait_sockets,
    wait_leader_ready,
    write_result,
)

LEAD_S = 3.0  # first deadline this far after the pipeline is sent
SPREAD_S = 1.0
DRAIN_TIMEOUT = 90.0  # after the first deadline
CALIBRATION_TIMEOUT = 120.0


def calibrate_backend(
    n: int, concurrency: int, tuning: BackendTuning, keepalive: int | None = None
) -> dict[str, Any]:
    """POST ``n`` reset-shaped requests to a fresh RecordingBackend (with ``tuning``)
    from a separate process using the worker's HTTP stack, ``concurrency`` at a time
    (with httpx's keep-alive pool raised to ``keepalive`` if given)."""
    extra = ["--keepalive", str(keepalive)] if keepalive else []
    with backend_running(tuning) as backend:
        t0 = time.perf_counter()
        cpu0 = time.process_time()
        child0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.http_load",
                backend.url,
                str(n),
                str(concurrency),
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=CALIBRATION_TIMEOUT,
            check=True,
            cwd=ROOT,
        )
        backend_cpu = time.process_time() - cpu0
        wall = time.perf_counter() - t0
        child1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        client_cpu = (child1.ru_utime + child1.ru_stime) - (child0.ru_utime + child0.ru_stime)
        result: dict[str, Any] = json.loads(out.stdout)
        result["backend_received"] = len(backend.requests)
        result["connections_closed"] = time_wait_sockets(backend.port)
    result["backend"] = tuning.label
    result["backend_cpu_pct"] = round(100 * backend_cpu / wall, 1)
    result["client_cpu_pct"] = round(100 * client_cpu / wall, 1)
    result["client_cpu_ms_per_request"] = round(1000 * client_cpu / result["requests"], 3)
    return result


PROFILE_RATE = 250  # py-spy samples per second


def profile_top(lines: Iterable[str], n: int = 25) -> dict[str, Any]:
    """From py-spy's collapsed stacks (``frame;frame;...;leaf count`` per line, thread
    frames first): the ``n`` functions with the most samples as the innermost Python frame
    (self) and, for the same functions, as any frame (total), as % of all samples."""
    self_counts: Counter[str] = Counter()
    total_counts: Counter[str] = Counter()
    samples = 0
    for line in lines:
        stack, _, count_text = line.rstrip().rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if not f.startswith(("thread (", "process "))]
        if not frames:
            continue
        samples += count
        self_counts[_function(frames[-1])] += count
        for name in {_function(f) for f in frames}:
            total_counts[name] += count
    return {
        "samples": samples,
        "top_self": [
            {
                "function": name,
                "self_pct": round(100 * c / samples, 1),
                "total_pct": round(100 * total_counts[name] / samples, 1),
            }
            for name, c in self_counts.most_common(n)
        ],
    }


def _function(frame: str) -> str:
    """'send (httpx/_client.py:123)' -> 'send (httpx/_client.py)': one entry per function."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})" if where else name


def start_profile(pid: int, out: Path, gil: bool = False) -> subprocess.Popen[bytes]:
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        raise RuntimeError("--profile needs py-spy: .venv/bin/pip install py-spy")
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [
            spy,
            "record",
            "--pid",
            str(pid),
            "--rate",
            str(PROFILE_RATE),
            "--format",
            "raw",
            "--threads",
            "--nonblocking",
            # Only the thread holding the GIL: on a busy machine a thread waiting for a
            # core (after a send woke the backend, say) otherwise counts as working.
            *(["--gil"] if gil else []),
            "--output",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(1.0)  # attach
    if proc.poll() is not None:
        raise RuntimeError(f"py-spy exited: {proc.stderr.read().decode() if proc.stderr else ''}")
    return proc


def stop_profile(proc: subprocess.Popen[bytes], out: Path) -> dict[str, Any]:
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    top = profile_top(out.read_text().splitlines()) if out.exists() else {"samples": 0}
    return {"file": str(out), "rate_per_s": PROFILE_RATE, **top}


def run_burst(
    n_keys: int,
    max_in_flight: int,
    profile_dir: Path | None = None,
    backend_s: float = 0.0,
    gil: bool = False,
) -> dict[str, Any]:
    slow = f", backend answering in {backend_s * 1000:.0f} ms" if backend_s else ""
    log(f"burst: {n_keys} keys within {SPREAD_S:.0f} s, MAX_IN_FLIGHT={max_in_flight}{slow}")
    with rig(f"burst-{max_in_flight}") as r:
        client = r.client
        if backend_s:
            r.backend.behave(lambda _: Hang(backend_s))
        worker = r.spawn("leader", max_in_flight=max_in_flight)
        wait_leader_ready(r)
        rss_before = rss_mib(worker.pid)
        profile_out = profile_dir / f"burst-{max_in_flight}.txt" if profile_dir else None
        spy = start_profile(worker.pid, profile_out, gil) if profile_out else None

        first_ms = int((time.time() + LEAD_S) * 1000)
        deadlines = {
            f"c:{i}": first_ms + (i * int(SPREAD_S * 1000)) // n_keys for i in range(n_keys)
        }
        cpu_track = CpuWindow(worker.pid).start()
        t_set = time.time()
        pipe = client.pipeline(transaction=False)
        for key, dl in deadlines.items():
            pipe.set(key, "1", pxat=dl)
        pipe.execute()
        set_s = time.time() - t_set
        # When the worker has recorded every deadline (its TRACK script writes the zset).
        tracked_at = None
        while time.time() < first_ms / 1000:
            zcard: Any = client.zcard(deadlines_key())
            if int(zcard) >= n_keys and tracked_at is None:
                tracked_at = time.time()
            time.sleep(0.01)
        track_cpu = cpu_track.stop()
        log(
            f"  pipeline of {n_keys} SETs took {set_s * 1000:.0f} ms; tracked "
            + (
                f"{(tracked_at - t_set) * 1000:.0f} ms after the pipeline was sent"
                if tracked_at
                else "NOT all before the first deadline"
            )
        )

        stats0 = info(client, "everything")
        cpu = CpuWindow(worker.pid).start()
        redis_pid = r.server.pid or 0
        redis_cpu0 = cpu_seconds(redis_pid)
        busy0 = machine_busy_seconds()
        backend_cpu0 = time.process_time()
        max_threads = threads(worker.pid)
        t_first = first_ms / 1000
        while time.time() < t_first + DRAIN_TIMEOUT:
            if len(r.backend.requests) >= n_keys:
                break
            max_threads = max(max_threads, threads(worker.pid))
            time.sleep(0.05)
        drained_at = time.monotonic()
        # The worker marks each reset sent (one Redis script call) after its POST; those
        # calls may trail the POSTs. The window ends when nothing is pending any more.
        pending_clear_s = None
        while time.monotonic() < drained_at + 30:
            pending_now: Any = client.hlen(pending_key())
            if int(pending_now) == 0:
                pending_clear_s = round(time.monotonic() - drained_at, 3)
                break
            time.sleep(0.01)
        cpu_stats = cpu.stop()
        profile = stop_profile(spy, profile_out) if spy and profile_out else None
        backend_cpu = time.process_time() - backend_cpu0
        others_cpu = (
            (machine_busy_seconds() - busy0)
            - cpu_stats["cpu_s"]
            - backend_cpu
            - (cpu_seconds(redis_pid) - redis_cpu0)
        )
        stats1 = info(client, "everything")
        redis_calls = {
            k.removeprefix("cmdstat_"): int(v["calls"]) - int(stats0.get(k, {"calls": 0})["calls"])
            for k, v in stats1.items()
            if k.startswith("cmdstat_") and k not in ("cmdstat_info", "cmdstat_zcard")
        }
        redis_cpu = sum(
            float(stats1[k]) - float(stats0[k]) for k in ("used_cpu_sys", "used_cpu_user")
        )
        time.sleep(2.0)  # late duplicates would show up here
        rss_after = rss_mib(worker.pid)
        closed = time_wait_sockets(r.backend.port)

        reqs = r.backend.requests
        bodies = [(q.received_at, q.json or {}) for q in reqs]
        per_key = Counter(str(b.get("key")) for _, b in bodies)
        ids_per_key: dict[str, set[str]] = {}
        for _, b in bodies:
            ids_per_key.setdefault(str(b.get("key")), set()).add(str(b.get("reset_id")))
        first_post: dict[str, tuple[float, dict[str, Any]]] = {}
        for at, b in bodies:
            first_post.setdefault(str(b.get("key")), (at, b))
        lat = [
            at - float(b["expired_at"])
            for at, b in first_post.values()
            if str(b.get("key")) in deadlines
        ]
        received = sorted(at for at, _ in bodies)
        missing = [k for k in deadlines if k not in per_key]
        pending: Any = client.hlen(pending_key())
        left: Any = client.zcard(deadlines_key())
        last_deadline = max(deadlines.values()) / 1000
        result: dict[str, Any] = {
            "keys": n_keys,
            "max_in_flight": max_in_flight,
            "backend_ms": backend_s * 1000,
            "pipeline_set_ms": round(set_s * 1000, 1),
            "all_tracked_after_ms": round((tracked_at - t_set) * 1000, 1) if tracked_at else None,
            "posts": len(reqs),
            "distinct_keys": len(per_key),
            "distinct_reset_ids": len({str(b.get("reset_id")) for _, b in bodies}),
            "missing_keys": len(missing),
            "missing_examples": missing[:10],
            "keys_with_duplicate_posts": sum(1 for c in per_key.values() if c > 1),
            "keys_with_several_reset_ids": sum(1 for s in ids_per_key.values() if len(s) > 1),
            "unexpected_keys": sorted(k for k in per_key if k not in deadlines)[:10],
            "pending_left": int(pending),
            "deadlines_left": int(left),
            "expired_at_mismatch": sum(
                1
                for _, b in first_post.values()
                if str(b.get("key")) in deadlines
                and abs(float(b["expired_at"]) * 1000 - deadlines[str(b["key"])]) > 1
            ),
            "latency_ms": summarize(lat, 1000),
            "track_cpu": track_cpu,
            "burst_cpu": cpu_stats,
            "burst_cpu_ms_per_reset": round(1000 * cpu_stats["cpu_s"] / n_keys, 3),
            "burst_sys_ms_per_reset": round(1000 * cpu_stats["sys_s"] / n_keys, 3),
            "pending_cleared_after_last_post_s": pending_clear_s,
            # CPU used by everything else on the machine meanwhile (noise indicator).
            "other_processes_cpu_pct": round(100 * others_cpu / cpu_stats["wall_s"], 1),
            "backend_cpu_pct": round(100 * backend_cpu / cpu_stats["wall_s"], 1),
            "redis_cpu_pct": round(100 * redis_cpu / cpu_stats["wall_s"], 1),
            # Commands Redis ran during the drain (commandstats; includes those run inside
            # the worker's Lua scripts).
            "redis_calls": {k: n for k, n in sorted(redis_calls.items()) if n},
            "connections_closed": closed,
            "rss_mib": {"before": rss_before, "after": rss_after},
            "max_threads": max_threads,
            "log_problems": log_problems(worker),
        }
        if profile:
            result["profile"] = profile
        if received:
            result["first_post_after_first_deadline_ms"] = round((received[0] - t_first) * 1000, 1)
            result["drain_s"] = round(received[-1] - t_first, 3)
            result["last_post_after_last_deadline_s"] = round(received[-1] - last_deadline, 3)
            span = received[-1] - received[0]
            result["resets_per_s"] = round(len(received) / span, 1) if span > 0 else None
        log(
            f"  drain {result.get('drain_s')} s, {result.get('resets_per_s')} resets/s, "
            f"latency p50 {fmt_ms(result['latency_ms'].get('p50'))} "
            f"p99 {fmt_ms(result['latency_ms'].get('p99'))}; "
            f"{result['distinct_keys']}/{n_keys} keys, {result['posts']} POSTs, "
            f"{result['missing_keys']} missing"
        )
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--in-flight", type=int, nargs="+", default=[8, 32, 128, 1000])
    parser.add_argument("--skip-calibration", action="store_true")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="sample the leader with py-spy into DIR (see above)",
    )
    parser.add_argument(
        "--profile-gil",
        action="store_true",
        help="with --profile: sample only the thread holding the GIL (Python's own CPU)",
    )
    parser.add_argument(
        "--backend-ms",
        type=float,
        default=0.0,
        help="the backend answers each POST this long after it came (a slow backend: "
        "resets/s should then reach MAX_IN_FLIGHT / this, by Little's law)",
    )
    parser.add_argument("--name", default="burst", help="results file bench/results/NAME.json")
    args = parser.parse_args()
    calibration = []
    n_cal = args.keys * 3 // 10
    # (backend, concurrency, keep-alive pool or None for httpx's default, requests)
    plan: list[tuple[BackendTuning, int, int | None, int]] = [
        (STOCK_BACKEND, 1, None, 200),  # one connection, back to back: the Nagle stall
        (STOCK_BACKEND, 32, None, n_cal),
        (STOCK_BACKEND, 128, None, n_cal),
        *((TUNED_BACKEND, c, None, n_cal) for c in (1, 8, 32, 128)),
        (TUNED_BACKEND, 32, 32, n_cal),
        (TUNED_BACKEND, 128, 128, n_cal),
    ]
    for tuning, c, keepalive, n in [] if args.skip_calibration else plan:
        cal = calibrate_backend(n, c, tuning, keepalive)
        log(
            f"backend ({tuning.label}), {c} concurrent requests from another process "
            f"(keep-alive pool {cal['keepalive_pool']}): {cal['req_per_s']} req/s, "
            f"errors {cal['errors']}, {cal['connections_closed']} connections closed, "
            f"client {cal['client_cpu_ms_per_request']} ms CPU/request"
        )
        calibration.append(cal)
    runs = [
        run_burst(args.keys, m, args.profile, args.backend_ms / 1000, args.profile_gil)
        for m in args.in_flight
    ]
    problems = []
    for run in runs:
        tag = f"MAX_IN_FLIGHT {run['max_in_flight']}"
        if run["missing_keys"] or run["distinct_keys"] != args.keys:
            problems.append(f"{tag}: {run['missing_keys']} keys got no reset")
        if run["keys_with_duplicate_posts"] or run["keys_with_several_reset_ids"]:
            problems.append(f"{tag}: duplicate POSTs or several reset_ids for one key")
        if run["pending_left"] or run["deadlines_left"]:
            problems.append(f"{tag}: pending/deadlines left in Redis")
        if run["log_problems"]:
            problems.append(f"{tag}: worker logged warnings")
    write_result(
        args.name,
        {
            "params": {
                "keys": args.keys,
                "spread_s": SPREAD_S,
                "lead_s": LEAD_S,
                "in_flight": args.in_flight,
            },
            "backend_calibration": calibration,
            "runs": runs,
            "problems": problems,
        },
    )


if __name__ == "__main__":
    main()
