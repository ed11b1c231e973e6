"""Scale: memory and CPU of the leader watching 1k, 10k and 100k counters.

Per size N: N keys ``c:i`` with a 1 h TTL are loaded (pipelines) before the worker
starts, so its reconcile (SCAN + TRACK script + reading the deadline zset) has to pick
them all up. Then:

1. reconcile time: the worker's own log line 'reconciled: N counter keys tracked'
   (this benchmark runs the worker with LOG_LEVEL=INFO for that line; it logs nothing
   per key) minus the 'leader acquired' line; also the time until the deadline zset
   ``tcw:{c:*}:deadlines`` holds N entries, polled every 10 ms. RSS and CPU then;
2. idle with N tracked keys (``--idle`` s): CPU %;
3. live events: all N keys SET again (TTL 2 h) through pipelines while the worker runs;
   time until the zset shows every new deadline (all N events tracked), CPU used, the
   largest pub/sub output buffer Redis held for the worker (CLIENT LIST omem, sampled),
   and RSS afterwards;
4. idle again: CPU %.

Probes (short-lived counters that must each get exactly one reset): one with a 300 ms
TTL set as soon as the leader has subscribed (so while it reconciles), and two (300 ms
and 3 s) set right after the mass re-arm, behind its burst of keyspace events.

    .venv/bin/python -m bench.scale [--sizes 1000 10000 100000]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from .common import (
    CpuWindow,
    deadlines_key,
    info,
    lease_key,
    load_keys,
    log,
    log_problems,
    log_time,
    numpat,
    rig,
    rss_mib,
    threads,
    wait_until,
    write_result,
)

KEY_TTL_S = 3600
RESET_TTL_S = 7200
PROBE_TTL_MS = 300
TIMEOUT = 180.0


def _set_probe(client: Any, key: str, ttl_ms: int) -> int:
    """SET key with a deadline ttl_ms from now (PXAT); return the deadline in ms."""
    deadline = int(time.time() * 1000) + ttl_ms
    client.set(key, "1", pxat=deadline)
    return deadline


def _pubsub_omem(client: Any) -> int:
    rows: Any = client.client_list(_type="pubsub")
    return max((int(row.get("omem", 0)) for row in rows), default=0)


def _line_with(text: str, needle: str) -> str | None:
    return next((ln for ln in text.splitlines() if needle in ln), None)


def run_size(n: int, idle_s: float) -> dict[str, Any]:
    log(f"scale: {n} counters")
    with rig(f"scale-{n}") as r:
        client = r.client
        t = time.monotonic()
        load_keys(client, (f"c:{i}" for i in range(n)), ex=KEY_TTL_S)
        load_s = time.monotonic() - t
        mem_keys = int(info(client, "memory")["used_memory"])

        t_spawn = time.time()
        worker = r.spawn("leader", log_level="INFO")
        # Probe: a short-lived counter set as soon as the leader has subscribed, i.e.
        # while it reconciles. It must get its reset like any other.
        wait_until(lambda: numpat(client) >= 1, 30, "the keyspace subscription", poll=0.001)
        probes = {
            "c:probe:during-reconcile": (
                _set_probe(client, "c:probe:during-reconcile", PROBE_TTL_MS),
                PROBE_TTL_MS,
            )
        }
        # The count may include the probe, if the SCAN saw it alive.
        needle = "reconciled: "
        zset_full_at = None
        while True:
            if zset_full_at is None:
                zcard: Any = client.zcard(deadlines_key())
                if int(zcard) >= n:
                    zset_full_at = time.time()
            text = worker.output()
            if needle in text:
                break
            if not worker.alive or time.time() - t_spawn > TIMEOUT:
                raise RuntimeError(f"no {needle!r} line\n{text[-3000:]}")
            time.sleep(0.01)
        rss_reconciled = rss_mib(worker.pid)
        cpu_reconciled = CpuWindow(worker.pid).start().cpu0
        acquired_line = _line_with(text, "leader acquired")
        reconciled_line = _line_with(text, needle)
        reconciled_count = (
            int(reconciled_line.split(needle)[1].split()[0]) if reconciled_line else 0
        )
        if acquired_line is None or reconciled_line is None:
            raise RuntimeError(f"log lines missing\n{text[-3000:]}")
        t_acquired, t_reconciled = log_time(acquired_line), log_time(reconciled_line)
        since: Any = client.hget(lease_key(), "since_ms")
        mem_tracked = int(info(client, "memory")["used_memory"])
        log(f"  reconciled {n} keys in {t_reconciled - t_acquired:.2f} s; RSS {rss_reconciled} MiB")

        time.sleep(1.0)
        idle1 = CpuWindow(worker.pid).start()
        time.sleep(idle_s)
        idle1_stats = idle1.stop()

        # Live: every key set again with a new TTL; the worker must track each event.
        cpu_live = CpuWindow(worker.pid).start()
        t_live = time.time()
        load_keys(client, (f"c:{i}" for i in range(n)), ex=RESET_TTL_S)
        set_s = time.time() - t_live
        # Probes: short-lived counters set right behind the burst of keyspace events.
        for name, ttl_ms in (
            ("c:probe:after-rearm", PROBE_TTL_MS),
            ("c:probe:after-rearm-3s", 3000),
        ):
            probes[name] = (_set_probe(client, name, ttl_ms), ttl_ms)
        threshold = (time.time() + (KEY_TTL_S + RESET_TTL_S) / 2) * 1000
        max_omem = 0
        live_done_at = None
        while time.time() - t_live < TIMEOUT:
            max_omem = max(max_omem, _pubsub_omem(client))
            moved: Any = client.zcount(deadlines_key(), threshold, "+inf")
            if int(moved) >= n:
                live_done_at = time.time()
                break
            time.sleep(0.02)
        live_stats = cpu_live.stop()
        rss_live = rss_mib(worker.pid)
        mem_live = int(info(client, "memory")["used_memory"])
        log(
            "  live events: "
            + (
                f"{n} re-armed keys tracked in {live_done_at - t_live:.2f} s"
                if live_done_at
                else "NOT all tracked in time"
            )
        )

        time.sleep(1.0)
        idle2 = CpuWindow(worker.pid).start()
        time.sleep(idle_s)
        idle2_stats = idle2.stop()
        total: Any = client.zcard(deadlines_key())
        last_probe = max(deadline for deadline, _ in probes.values()) / 1000
        while time.time() < last_probe + 2:
            time.sleep(0.1)
        resets: dict[str, list[float]] = {}
        for req in r.backend.requests:
            body = req.json or {}
            resets.setdefault(str(body.get("key")), []).append(req.received_at)
        probe_results = {
            name: {
                "ttl_ms": ttl_ms,
                "resets": len(resets.get(name, [])),
                "late_ms": (
                    round((min(resets[name]) - deadline / 1000) * 1000, 1)
                    if name in resets
                    else None
                ),
            }
            for name, (deadline, ttl_ms) in probes.items()
        }
        log(
            "  probes: "
            + "; ".join(
                f"{name}: "
                + (f"reset {p['late_ms']} ms after its deadline" if p["resets"] else "NO RESET")
                for name, p in probe_results.items()
            )
        )
        return {
            "counters": n,
            "load_keys_s": round(load_s, 3),
            "reconcile": {
                "keys_reported": reconciled_count,
                "spawn_to_acquired_s": round(t_acquired - t_spawn, 3),
                "acquired_to_reconciled_s": round(t_reconciled - t_acquired, 3),
                "acquired_to_zset_full_s": (
                    round(zset_full_at - int(since) / 1000, 3) if zset_full_at and since else None
                ),
                "spawn_to_reconciled_s": round(t_reconciled - t_spawn, 3),
                "worker_cpu_s_at_reconciled": round(cpu_reconciled, 3),
                "rss_mib": rss_reconciled,
                "threads": threads(worker.pid),
            },
            "idle_after_reconcile": idle1_stats,
            "live_events": {
                "pipeline_set_s": round(set_s, 3),
                "all_tracked_after_s": round(live_done_at - t_live, 3) if live_done_at else None,
                "rearms_per_s": (round(n / (live_done_at - t_live), 1) if live_done_at else None),
                "cpu": live_stats,
                "max_pubsub_omem_bytes": max_omem,
                "rss_mib": rss_live,
            },
            "idle_after_live": idle2_stats,
            "deadlines_zset_end": int(total),
            "redis_used_memory_bytes": {
                "keys_loaded": mem_keys,
                "after_reconcile": mem_tracked,
                "after_live": mem_live,
            },
            "short_ttl_probes": probe_results,
            "unexpected_resets": sum(len(v) for k, v in resets.items() if k not in probes),
            "log_problems": log_problems(worker),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--idle", type=float, default=5.0, help="idle window, seconds")
    args = parser.parse_args()
    runs = [run_size(n, args.idle) for n in args.sizes]
    problems = []
    for run in runs:
        if run["log_problems"]:
            problems.append(f"{run['counters']}: worker logged warnings")
        if run["live_events"]["all_tracked_after_s"] is None:
            problems.append(f"{run['counters']}: live re-arms not all tracked")
        if run["unexpected_resets"]:
            problems.append(f"{run['counters']}: {run['unexpected_resets']} unexpected resets")
        for name, probe in run["short_ttl_probes"].items():
            if probe["resets"] != 1:
                problems.append(
                    f"{run['counters']} counters: {name} (TTL {probe['ttl_ms']} ms) "
                    f"got {probe['resets']} resets"
                )
            elif probe["late_ms"] is not None and probe["late_ms"] > 50:
                problems.append(
                    f"{run['counters']} counters: {name} reset "
                    f"{probe['late_ms']} ms after its deadline"
                )
    write_result(
        "scale",
        {
            "params": {
                "sizes": args.sizes,
                "idle_s": args.idle,
                "key_ttl_s": KEY_TTL_S,
                "rearm_ttl_s": RESET_TTL_S,
                "log_level": "INFO",
            },
            "runs": runs,
            "problems": problems,
        },
    )


if __name__ == "__main__":
    main()
