"""Unrelated churn: 20k keys/s that do not match COUNTER_KEY, set and expiring in the same
Redis, must not load the worker.

The leader watches ``c:*``. A loader sets ``u:<n>`` keys with 300-1000 ms TTLs at
``--rate`` keys/s (pipelines every 50 ms) for ``--window`` seconds, so Redis sets and
expires about that many unrelated keys per second. Meanwhile a few counters ``c:<n>``
expire. Compared with a quiet window of the same length: the leader's CPU, and the
counters' reset latency (TTL deadline -> POST received). The keyspace subscription is a
pattern on the counter keys, so Redis filters: no unrelated event reaches the worker.

    .venv/bin/python -m bench.unrelated [--rate 20000] [--window 15]
"""

from __future__ import annotations

import argparse
import random
import threading
import time
from typing import Any

from .common import (
    CpuWindow,
    Rig,
    info,
    log,
    log_problems,
    rig,
    summarize,
    wait_leader_ready,
    write_result,
)

COUNTERS_PER_WINDOW = 40


def _churn(r: Rig, rate: int, seconds: float, stop: threading.Event) -> int:
    rng = random.Random(7)
    tick, n = 0.05, 0
    per_tick = max(1, int(rate * tick))
    with r.server.client() as c:
        end = time.monotonic() + seconds
        while not stop.is_set() and (now := time.monotonic()) < end:
            pipe = c.pipeline(transaction=False)
            for _ in range(per_tick):
                pipe.set(f"u:{n}", "1", px=rng.randint(300, 1000))
                n += 1
            pipe.execute()
            time.sleep(max(0.0, tick - (time.monotonic() - now)))
    return n


def _window(r: Rig, leader_pid: int, seconds: float, rate: int) -> dict[str, Any]:
    stop = threading.Event()
    sent: list[int] = []
    loader = threading.Thread(
        target=lambda: sent.append(_churn(r, rate, seconds, stop)) if rate else None
    )
    expired0 = int(info(r.client, "stats")["expired_keys"])
    r.backend.clear()
    cpu = CpuWindow(leader_pid).start()
    loader.start()
    deadlines: dict[str, float] = {}
    t0 = time.time()
    for i in range(COUNTERS_PER_WINDOW):  # spread over the window
        key = f"c:{int(t0)}-{i}"
        ttl_ms = 200 + int(i * (seconds * 1000 - 1500) / COUNTERS_PER_WINDOW)
        before = time.time()
        r.client.set(key, "1", px=ttl_ms)
        deadlines[key] = (before + time.time()) / 2 + ttl_ms / 1000
    loader.join()
    stop.set()
    r.backend.wait_for(lambda q: len(q) >= len(deadlines), timeout=seconds + 10)
    usage = cpu.stop()
    latency = [
        (q.received_at - deadlines[q.json["key"]]) * 1000
        for q in r.backend.requests
        if q.json and q.json.get("key") in deadlines
    ]
    return {
        "unrelated_keys_set": sent[0] if sent else 0,
        "unrelated_rate_per_s": round((sent[0] if sent else 0) / seconds),
        "redis_expired_per_s": round(
            (int(info(r.client, "stats")["expired_keys"]) - expired0) / usage["wall_s"]
        ),
        "leader_cpu": usage,
        "counter_latency_ms": summarize(latency),
        "counters_reset": len(latency),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=int, default=20_000)
    ap.add_argument("--window", type=float, default=15.0)
    args = ap.parse_args()
    with rig("unrelated") as r:
        leader = r.spawn("leader")
        wait_leader_ready(r)
        log("quiet window")
        quiet = _window(r, leader.pid, args.window, 0)
        log(f"churn window: {args.rate} unrelated keys/s")
        churn = _window(r, leader.pid, args.window, args.rate)
        problems = log_problems(leader)
    result = {
        "benchmark": "unrelated",
        "params": vars(args),
        "quiet": quiet,
        "churn": churn,
        "log_problems": problems,
    }
    path = write_result("unrelated", result)
    for name, w in (("quiet", quiet), ("churn", churn)):
        lat = w["counter_latency_ms"]
        log(
            f"{name}: unrelated {w['unrelated_rate_per_s']}/s, Redis expired "
            f"{w['redis_expired_per_s']}/s, leader CPU {w['leader_cpu']['cpu_pct']} %, "
            f"counter latency p50 {lat['p50']} ms p99 {lat['p99']} ms "
            f"({w['counters_reset']}/{COUNTERS_PER_WINDOW})"
        )
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
