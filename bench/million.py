"""Million: a leader and a standby watching up to 1,000,000 counters with 20-minute TTLs.

Per size N (default 1,000,000):

1. N keys ``c:i`` are loaded with ``SET c:i 1 PX 1200000`` through pipelines from the
   driver, before any worker runs (``used_memory`` before and after).
2. Replica r1 starts (LOG_LEVEL INFO, for its 'leader acquired' and 'reconciled: N
   counter keys tracked' lines); once it holds the lease, replica r2 starts as a standby.
   Measured: r1's reconcile (acquired -> reconciled, and -> the deadline zset holding N
   entries), its CPU seconds meanwhile, its RSS (and peak) then, the standby's RSS, and
   Redis's memory: ``used_memory`` added, and ``MEMORY USAGE`` of the deadline zset
   (``SAMPLES 0``: every element) divided by N.
3. Takeover: *ticks*, counters ``c:tick:j`` due every ``--tick-ms`` from the handoff
   until well past the expected reconcile, are set and recorded by r1; then r1
   gets SIGTERM (a graceful handoff: r2 holds the lease within milliseconds, so what
   follows is the new leader's own start-up). From the SIGTERM: when r2 holds the lease,
   its 'leader acquired' and 'reconciled' lines, its first reset, and its *first on-time
   reset* (the first tick POSTed within ``--on-time-ms`` of its deadline); how many ticks
   due after the SIGTERM were late (or never came), the latest one; r2's RSS then.

None of the N counters falls due during a run (20 minutes): only ticks and probes are
reset. All times are wall clock on one host.

    .venv/bin/python -m bench.million [--sizes 1000000] [--quick]
"""

from __future__ import annotations

import argparse
import signal
import time
from typing import Any

from .common import (
    CpuWindow,
    Rig,
    deadlines_key,
    info,
    lease_holder,
    line_time,
    load_keys,
    log,
    log_problems,
    peak_rss_mib,
    percentile,
    rig,
    rss_mib,
    wait_line,
    wait_until,
    write_result,
)

TTL_MS = 20 * 60 * 1000
RECONCILED = "reconciled: "
ACQUIRED = "leader acquired"


def _used_memory(r: Rig) -> int:
    return int(info(r.client, "memory")["used_memory"])


def run_size(n: int, args: argparse.Namespace) -> dict[str, Any]:
    log(f"million: {n:,} counters, TTL {TTL_MS // 60000} min")
    with rig(f"million-{n}") as r:
        client = r.client
        mem_empty = _used_memory(r)
        t = time.monotonic()
        load_keys(client, (f"c:{i}" for i in range(n)), ex=TTL_MS // 1000)
        load_s = time.monotonic() - t
        mem_keys = _used_memory(r)
        log(
            f"  loaded {n:,} keys in {load_s:.1f} s; used_memory +{(mem_keys - mem_empty) / n:.0f} "
            "B/key"
        )

        # --- the first leader's reconcile, and a standby ---------------------------------
        t_spawn = time.time()
        r1 = r.spawn("r1", log_level="INFO", lease_ttl_ms=args.lease_ms)
        cpu1 = CpuWindow(r1.pid).start()
        wait_until(lambda: lease_holder(client) == "r1", 60, "r1 to lead", poll=0.01)
        r2 = r.spawn("r2", log_level="INFO", lease_ttl_ms=args.lease_ms)
        zset_full_at = None
        deadline = time.time() + args.timeout
        while line_time(r1, RECONCILED) is None:
            if zset_full_at is None and int(client.zcard(deadlines_key())) >= n:
                zset_full_at = time.time()
            if not r1.alive or time.time() > deadline:
                raise RuntimeError(f"r1 did not reconcile\n{r1.output()[-3000:]}")
            time.sleep(0.05)
        if zset_full_at is None:
            zset_full_at = time.time()
        cpu_reconcile = cpu1.stop()
        t_acq1 = line_time(r1, ACQUIRED) or t_spawn
        t_rec1 = line_time(r1, RECONCILED) or time.time()
        rss1, rss1_peak = rss_mib(r1.pid), peak_rss_mib(r1.pid)
        time.sleep(args.settle)
        idle = CpuWindow(r1.pid).start()
        time.sleep(args.settle)
        idle_stats = idle.stop()
        rss1_settled, rss2 = rss_mib(r1.pid), rss_mib(r2.pid)
        mem_tracked = _used_memory(r)
        zset_bytes = int(client.memory_usage(deadlines_key(), samples=0) or 0)
        zcard = int(client.zcard(deadlines_key()))
        log(
            f"  r1 reconciled in {t_rec1 - t_acq1:.1f} s (zset full after "
            f"{zset_full_at - t_acq1:.1f} s), CPU {cpu_reconcile['cpu_s']:.1f} s; "
            f"RSS leader {rss1_settled} MiB (peak {rss1_peak}), standby {rss2} MiB; "
            f"zset {zset_bytes / max(zcard, 1):.0f} B/counter"
        )

        # --- takeover --------------------------------------------------------------------
        expected = max(t_rec1 - t_acq1, 1.0)
        window = args.tick_window or (2.5 * expected + 10)
        step = args.tick_ms / 1000
        t_sig_planned = time.time() + 2.0
        t_first = t_sig_planned + step  # the first tick falls due one step after the SIGTERM
        ticks = {f"c:tick:{j}": int((t_first + j * step) * 1000) for j in range(int(window / step))}
        load_keys(client, ticks, pxat=lambda j: ticks[f"c:tick:{j}"])
        last_tick = f"c:tick:{len(ticks) - 1}"
        wait_until(
            lambda: client.zscore(deadlines_key(), last_tick) is not None,
            30,
            "r1 to record the ticks' deadlines",
        )
        while time.time() < t_sig_planned:
            time.sleep(0.005)
        before = len(r.backend.requests)
        t_sig = time.time()
        r1.signal(signal.SIGTERM)
        t_lease = wait_until(
            lambda: time.time() if lease_holder(client) == "r2" else None,
            30,
            "r2 to take the lease",
            poll=0.001,
        )
        t_acq2 = wait_line(r2, ACQUIRED, 30)
        try:
            t_rec2: float | None = wait_line(r2, RECONCILED, args.takeover_timeout)
        except TimeoutError:
            t_rec2 = None  # reported as never: the benchmark goes on
        rss2_reconciled, rss2_peak = rss_mib(r2.pid), peak_rss_mib(r2.pid)
        wait_until(
            lambda: time.time() > max(ticks.values()) / 1000 + args.cap,
            args.cap + window + 60,
            "the last tick's cap",
            poll=0.1,
        )
        r1_exit = r1.wait(30)

        got: dict[str, float] = {}
        first_reset = None
        for q in r.backend.requests[before:]:
            key = str((q.json or {}).get("key"))
            if key in ticks:
                got.setdefault(key, q.received_at)
                if first_reset is None and q.received_at >= t_lease:
                    first_reset = q.received_at
        due_after = {k: dl / 1000 for k, dl in ticks.items() if dl / 1000 >= t_sig}
        late = {
            k: (got[k] - dl) * 1000 if k in got else float("inf") for k, dl in due_after.items()
        }
        on_time_ms = args.on_time_ms
        on_time = sorted(got[k] for k, lat in late.items() if lat <= on_time_ms)
        first_on_time = on_time[0] if on_time else None
        late_keys = [k for k, lat in late.items() if lat > on_time_ms]
        last_late_due = max((due_after[k] for k in late_keys), default=None)
        finite_late = [lat for lat in late.values() if lat != float("inf")]
        # Ticks due while the new leader reconciled (its acquired -> reconciled lines).
        during = [
            late[k]
            for k, dl in due_after.items()
            if dl >= t_acq2 and (t_rec2 is None or dl <= t_rec2)
        ]

        def since_sig(at: float | None) -> float | None:
            return None if at is None else round(at - t_sig, 3)

        takeover = {
            "signal": "SIGTERM",
            "lease_taken_s": since_sig(t_lease),
            "acquired_s": since_sig(t_acq2),
            "reconciled_s": since_sig(t_rec2),
            "acquired_to_reconciled_s": None if t_rec2 is None else round(t_rec2 - t_acq2, 3),
            "redis_unavailable_warnings": r2.output().count("Redis unavailable"),
            "first_reset_s": since_sig(first_reset),
            "first_on_time_reset_s": since_sig(first_on_time),
            "on_time_ms": on_time_ms,
            "ticks": len(due_after),
            "tick_ms": args.tick_ms,
            "ticks_late": len(late_keys),
            "ticks_never": sum(1 for lat in late.values() if lat == float("inf")),
            "last_late_tick_due_s": since_sig(last_late_due),
            "max_late_ms": round(max(finite_late), 1) if finite_late else None,
            "during_reconcile": {
                "ticks": len(during),
                "p50_ms": round(percentile(during, 50), 1) if during else None,
                "p99_ms": round(percentile(during, 99), 1) if during else None,
            },
            "duplicate_posts": (
                sum(
                    1
                    for q in r.backend.requests[before:]
                    if str((q.json or {}).get("key")) in ticks
                )
                - len(got)
            ),
            "rss_mib": rss2_reconciled,
            "rss_peak_mib": rss2_peak,
            "old_leader_exit": r1_exit,
        }
        log(
            f"  takeover: lease {takeover['lease_taken_s']} s, first reset "
            f"{takeover['first_reset_s']} s, first on-time reset "
            f"{takeover['first_on_time_reset_s']} s, reconciled {takeover['reconciled_s']} s "
            f"after the SIGTERM; {len(late_keys)}/{len(due_after)} ticks late (max "
            f"{takeover['max_late_ms']} ms; p99 {takeover['during_reconcile']['p99_ms']} ms while "
            f"it reconciled); new leader RSS {rss2_reconciled} MiB"
        )
        return {
            "counters": n,
            "ttl_ms": TTL_MS,
            "load_s": round(load_s, 2),
            "first_leader": {
                "spawn_to_acquired_s": round(t_acq1 - t_spawn, 3),
                "acquired_to_reconciled_s": round(t_rec1 - t_acq1, 3),
                "acquired_to_zset_full_s": round(zset_full_at - t_acq1, 3),
                "cpu_s_to_reconciled": cpu_reconcile["cpu_s"],
                "rss_mib_at_reconciled": rss1,
                "rss_mib": rss1_settled,
                "rss_peak_mib": rss1_peak,
                "idle_cpu_pct": idle_stats["cpu_pct"],
            },
            "standby": {"rss_mib": rss2},
            "takeover": takeover,
            "redis": {
                "used_memory_empty": mem_empty,
                "used_memory_keys": mem_keys,
                "used_memory_tracked": mem_tracked,
                "used_memory_per_key": round((mem_keys - mem_empty) / n, 1),
                "used_memory_added_per_counter": round((mem_tracked - mem_keys) / n, 1),
                "deadlines_zcard": zcard,
                "deadlines_zset_bytes": zset_bytes,
                "deadlines_zset_bytes_per_counter": round(zset_bytes / max(zcard, 1), 1),
            },
            "log_problems": {"r1": log_problems(r1), "r2": log_problems(r2)},
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--lease-ms", type=int, default=3000)
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="longest wait for a reconcile, seconds"
    )
    parser.add_argument(
        "--takeover-timeout",
        type=float,
        default=120.0,
        help="longest wait for the new leader's reconcile, seconds",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=3.0,
        help="seconds after reconcile before RSS is read, and the idle window",
    )
    parser.add_argument("--tick-ms", type=int, default=50)
    parser.add_argument(
        "--tick-window",
        type=float,
        default=0.0,
        help="seconds of ticks after the handoff (default: 2.5 x r1's reconcile + 10 s)",
    )
    parser.add_argument("--on-time-ms", type=float, default=50.0)
    parser.add_argument(
        "--cap",
        type=float,
        default=10.0,
        help="a tick not reset this long after the last one counts as never",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 20,000 counters")
    args = parser.parse_args()
    if args.quick:
        args.sizes = [20_000]
    runs = [run_size(n, args) for n in args.sizes]
    problems = []
    for run in runs:
        t = run["takeover"]
        if t["reconciled_s"] is None:
            problems.append(
                f"{run['counters']}: the new leader did not reconcile within "
                f"{args.takeover_timeout:.0f} s"
            )
        if t["ticks_never"] or t["duplicate_posts"]:
            problems.append(
                f"{run['counters']}: {t['ticks_never']} ticks never reset, "
                f"{t['duplicate_posts']} duplicate POSTs"
            )
        if any(run["log_problems"].values()):
            problems.append(f"{run['counters']}: a worker logged warnings")
    write_result(
        "million",
        {
            "params": {k: v for k, v in vars(args).items() if k != "quick"},
            "runs": runs,
            "problems": problems,
        },
    )


if __name__ == "__main__":
    main()
