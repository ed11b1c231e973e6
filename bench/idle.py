"""Idle cost: what a leader and its standbys cost while there are no counters at all.

Two phases of ``--window`` seconds each (default 30 s), default lease (3000 ms):

A. the leader alone;  B. the leader plus two standbys.

Redis load comes from ``INFO`` deltas over each window (commandstats, total commands,
network bytes, Redis's own CPU); the leader's share is phase A, each standby's is
(B - A) / 2. ``commandstats`` counts the commands a Lua script runs as well, so the
table separates the commands clients send (EVALSHA, PING, ...; ``round_trips_per_s``,
named before pipelines: a pipeline of two commands counts two) from commands run inside
the worker's scripts (HGET, PEXPIRE, PTTL, ...). Worker CPU (utime + stime from
/proc/<pid>/stat, all threads) and RSS (VmRSS) are read per process; CLIENT LIST shows
the connections each phase holds open.

    .venv/bin/python -m bench.idle [--window 30]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from tests.support import WorkerProcess

from .common import (
    CpuWindow,
    Rig,
    info,
    lease_holder,
    log,
    log_problems,
    numpat,
    numsub,
    release_channel,
    rig,
    rss_mib,
    threads,
    wait_until,
    write_result,
)

SETTLE_S = 3.0
LEASE_TTL_MS = 3000
# Commands the worker's Lua scripts run (counted by commandstats too, but not round trips).
SCRIPT_INNER = {
    "time",
    "hget",
    "pexpire",
    "pexpiretime",
    "pttl",
    "incr",
    "set",
    "del",
    "hset",
    "publish",
    "zadd",
    "zscore",
    "zrem",
    "hsetnx",
    "hdel",
    "zrange",
}


def _snapshot(client: Any) -> dict[str, Any]:
    """One INFO call: commandstats, stats and cpu together (it counts as one INFO)."""
    raw = info(client, "everything")
    calls = {
        k.removeprefix("cmdstat_"): int(v["calls"])
        for k, v in raw.items()
        if k.startswith("cmdstat_")
    }
    return {
        "calls": calls,
        "total_commands": int(raw["total_commands_processed"]),
        "net_in": int(raw["total_net_input_bytes"]),
        "net_out": int(raw["total_net_output_bytes"]),
        "redis_cpu": float(raw["used_cpu_sys"]) + float(raw["used_cpu_user"]),
    }


def _clients(client: Any) -> list[dict[str, Any]]:
    rows: Any = client.client_list()
    return [
        {
            "cmd": row.get("cmd"),
            "sub": int(row.get("sub", 0)),
            "psub": int(row.get("psub", 0)),
            "age": int(row.get("age", 0)),
            "idle": int(row.get("idle", 0)),
        }
        for row in rows
    ]


def measure(r: Rig, procs: dict[str, WorkerProcess], window: float) -> dict[str, Any]:
    cpus = {name: CpuWindow(w.pid).start() for name, w in procs.items()}
    before = _snapshot(r.client)
    t0 = time.monotonic()
    time.sleep(window)
    after = _snapshot(r.client)
    wall = time.monotonic() - t0
    calls = {
        cmd: n - before["calls"].get(cmd, 0)
        for cmd, n in after["calls"].items()
        if n - before["calls"].get(cmd, 0) and cmd != "info"
    }
    own = after["calls"].get("info", 0) - before["calls"].get("info", 0)  # our INFO
    total = after["total_commands"] - before["total_commands"] - own
    round_trips = sum(n for cmd, n in calls.items() if cmd not in SCRIPT_INNER)
    clients = [c for c in _clients(r.client) if c["cmd"] != "client|list"]
    return {
        "wall_s": round(wall, 3),
        "commands_per_s": round(total / wall, 3),
        "round_trips_per_s": round(round_trips / wall, 3),
        "calls_per_s": {cmd: round(n / wall, 3) for cmd, n in sorted(calls.items())},
        "net_in_bytes_per_s": round((after["net_in"] - before["net_in"]) / wall, 1),
        "net_out_bytes_per_s": round((after["net_out"] - before["net_out"]) / wall, 1),
        "redis_cpu_pct": round(100 * (after["redis_cpu"] - before["redis_cpu"]) / wall, 3),
        "processes": {
            name: {**cpus[name].stop(), "rss_mib": rss_mib(w.pid), "threads": threads(w.pid)}
            for name, w in procs.items()
        },
        "redis_connections": {
            "total": len(clients),
            "pubsub": sum(1 for c in clients if c["sub"] or c["psub"]),
            "normal": sum(1 for c in clients if not (c["sub"] or c["psub"])),
            "commands_last_seen": sorted({str(c["cmd"]) for c in clients}),
        },
    }


def run(window: float) -> dict[str, Any]:
    with rig("idle") as r:
        procs = {"leader": r.spawn("leader", lease_ttl_ms=LEASE_TTL_MS)}
        wait_until(lambda: lease_holder(r.client), 30, "a leader")
        wait_until(lambda: numpat(r.client) >= 1, 30, "the keyspace subscription")
        time.sleep(SETTLE_S)
        log(f"idle: phase A (leader alone) for {window:.0f} s")
        phase_a = measure(r, procs, window)
        procs["standby-1"] = r.spawn("standby-1", lease_ttl_ms=LEASE_TTL_MS)
        procs["standby-2"] = r.spawn("standby-2", lease_ttl_ms=LEASE_TTL_MS)
        wait_until(lambda: numsub(r.client, release_channel()) >= 3, 30, "the standbys")
        time.sleep(SETTLE_S)
        log(f"idle: phase B (leader + 2 standbys) for {window:.0f} s")
        phase_b = measure(r, procs, window)
        holder = lease_holder(r.client)
        problems = {name: log_problems(w) for name, w in procs.items()}

    def per_standby(key: str) -> float:
        return round((float(phase_b[key]) - float(phase_a[key])) / 2, 3)

    attribution = {
        "leader": {
            "commands_per_s": phase_a["commands_per_s"],
            "round_trips_per_s": phase_a["round_trips_per_s"],
            "cpu_pct": phase_a["processes"]["leader"]["cpu_pct"],
            "rss_mib": phase_a["processes"]["leader"]["rss_mib"],
        },
        "standby": {
            "commands_per_s": per_standby("commands_per_s"),
            "round_trips_per_s": per_standby("round_trips_per_s"),
            "cpu_pct": round(
                (
                    phase_b["processes"]["standby-1"]["cpu_pct"]
                    + phase_b["processes"]["standby-2"]["cpu_pct"]
                )
                / 2,
                3,
            ),
            "rss_mib": round(
                (
                    phase_b["processes"]["standby-1"]["rss_mib"]
                    + phase_b["processes"]["standby-2"]["rss_mib"]
                )
                / 2,
                2,
            ),
        },
    }
    log(f"  leader: {attribution['leader']}")
    log(f"  standby: {attribution['standby']}")
    return {
        "phase_a_leader_only": phase_a,
        "phase_b_leader_and_2_standbys": phase_b,
        "attribution": attribution,
        "leader_at_end": holder,
        "log_problems": problems,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--window", type=float, default=30.0)
    args = parser.parse_args()
    result = run(args.window)
    problems = [f"{n}: {line}" for n, lines in result["log_problems"].items() for line in lines]
    if result["leader_at_end"] != "leader":
        problems.append(f"leadership moved during the idle run: {result['leader_at_end']}")
    write_result(
        "idle",
        {
            "params": {"window_s": args.window, "lease_ttl_ms": LEASE_TTL_MS, "settle_s": SETTLE_S},
            **result,
            "problems": problems,
        },
    )


if __name__ == "__main__":
    main()
