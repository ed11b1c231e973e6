"""Reset latency of the worker vs. Redis's own expiry lag, side by side in one Redis.

Per scenario (0, 10k, 100k OTHER keys carrying a 1 h TTL):

- one worker (the leader) watches ``c:*``; ~200 keys ``c:i`` get TTLs spread over
  0.5-5 s. Worker latency = backend receive time - ``expired_at`` of the POST body
  (the key's TTL deadline, Redis's clock; same host, so the same clock as ours);
- a bare reference subscriber (a redis-py thread on ``__keyevent@0__:expired``)
  records when Redis itself publishes the expiry of ~200 keys ``ref:i`` that nothing
  touches, TTLs from the same distribution. Reference latency = event time - deadline.

Keys are set with ``SET k 1 PXAT <deadline>``, so the deadline is exact (set time +
TTL, to the millisecond) and identical to what the worker reads with PEXPIRETIME.
Reference events that have not arrived ``--cap`` seconds after the last deadline are
counted as never arrived (their percentiles print as "never").

    .venv/bin/python -m bench.latency [--quick]
"""

from __future__ import annotations

import argparse
import random
import threading
import time
from collections import defaultdict
from typing import Any

from trio_counter_worker.lab.servers import RedisServer

from .common import (
    CpuWindow,
    Rig,
    fmt_ms,
    info,
    load_keys,
    log,
    log_problems,
    rig,
    summarize,
    wait_leader_ready,
    write_result,
)

EXPIRED_CHANNEL = "__keyevent@0__:expired"
WORKER_TIMEOUT = 15.0  # after the last deadline: how long to wait for the worker's POSTs
TARGET_P99_MS = 50.0


class ExpirySubscriber(threading.Thread):
    """A bare redis-py subscriber: records when Redis publishes each key's ``expired``."""

    def __init__(self, server: RedisServer) -> None:
        super().__init__(name="reference-subscriber", daemon=True)
        self._server = server
        self.events: dict[str, float] = {}  # key -> time.time() of its first event
        self.duplicates = 0
        self.ready = threading.Event()
        self._stop_flag = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        client = self._server.client()
        pubsub = client.pubsub()  # type: ignore[no-untyped-call, unused-ignore]
        try:
            pubsub.subscribe(EXPIRED_CHANNEL)
            while not self._stop_flag.is_set():
                msg = pubsub.get_message(timeout=0.05)
                now = time.time()
                if msg is None:
                    continue
                if msg["type"] == "subscribe":
                    self.ready.set()
                elif msg["type"] == "message":
                    key = str(msg["data"])
                    with self._lock:
                        if key in self.events:
                            self.duplicates += 1
                        else:
                            self.events[key] = now
        finally:
            pubsub.close()
            client.close()

    def count(self, prefix: str) -> int:
        with self._lock:
            return sum(1 for k in self.events if k.startswith(prefix))

    def stop(self) -> None:
        self._stop_flag.set()
        self.join(5)


def _merge_flags(current: str, needed: str) -> str:
    return current + "".join(f for f in needed if f not in current)


def run_scenario(n_other: int, n_keys: int, cap: float, seed: int) -> dict[str, Any]:
    log(f"latency: scenario with {n_other} other TTL keys")
    with rig(f"latency-{n_other}") as r:
        return _scenario(r, n_other, n_keys, cap, seed)


def _scenario(r: Rig, n_other: int, n_keys: int, cap: float, seed: int) -> dict[str, Any]:
    client = r.client
    # The reference needs E (keyevent channels) and x (expired); the worker adds K g $ x.
    current: Any = client.config_get("notify-keyspace-events")
    flags = _merge_flags(str(current.get("notify-keyspace-events", "")), "KEg$x")
    client.config_set("notify-keyspace-events", flags)

    t = time.monotonic()
    load_keys(client, (f"other:{i}" for i in range(n_other)), ex=3600)
    load_s = time.monotonic() - t
    log(f"  loaded {n_other} other keys in {load_s:.2f} s")

    sub = ExpirySubscriber(r.server)
    sub.start()
    if not sub.ready.wait(10):
        raise RuntimeError("reference subscriber did not subscribe")

    worker = r.spawn("leader")
    wait_leader_ready(r)
    stats_before = info(client, "stats")
    cpu = CpuWindow(worker.pid).start()

    # Interleave worker keys and reference keys; TTLs drawn from the same distribution.
    rng = random.Random(seed)
    deadlines: dict[str, int] = {}
    for i in range(n_keys):
        for prefix in ("c:", "ref:"):
            key = f"{prefix}{i}"
            ttl_ms = rng.randint(500, 5000)
            deadline_ms = int(time.time() * 1000) + ttl_ms
            client.set(key, "1", pxat=deadline_ms)
            deadlines[key] = deadline_ms
    last_deadline = max(deadlines.values()) / 1000
    log(
        f"  set {n_keys} worker keys and {n_keys} reference keys; last deadline in "
        f"{last_deadline - time.time():.1f} s"
    )

    worker_done_by = last_deadline + WORKER_TIMEOUT
    ref_done_by = last_deadline + cap
    while True:
        now = time.time()
        worker_done = len(r.backend.requests) >= n_keys or now >= worker_done_by
        ref_done = sub.count("ref:") >= n_keys or now >= ref_done_by
        if worker_done and ref_done:
            break
        time.sleep(0.1)
    time.sleep(0.5)  # a late duplicate POST would show up here
    cpu_stats = cpu.stop()
    sub.stop()
    stats_after = info(client, "stats")

    # -- worker ------------------------------------------------------------------------
    posts: dict[str, list[tuple[float, dict[str, Any]]]] = defaultdict(list)
    for req in r.backend.requests:
        body = req.json or {}
        posts[str(body.get("key"))].append((req.received_at, body))
    worker_lat: list[float] = []
    expired_at_err: list[float] = []
    for key, reqs in posts.items():
        if key not in deadlines:
            continue
        received_at, body = min(reqs, key=lambda x: x[0])
        worker_lat.append(received_at - float(body["expired_at"]))
        expired_at_err.append(float(body["expired_at"]) - deadlines[key] / 1000)
    c_keys = [k for k in deadlines if k.startswith("c:")]
    missing_resets = sorted(k for k in c_keys if k not in posts)
    extra_posts = sum(len(v) - 1 for k, v in posts.items() if k in deadlines)
    reset_ids = {str(b.get("reset_id")) for v in posts.values() for _, b in v}
    unexpected = sorted(k for k in posts if k not in deadlines)

    # -- reference, and the worker's own touches as Redis published them ---------------
    ref_lat: list[float] = []
    touch_lat: list[float] = []
    post_after_touch: list[float] = []
    worker_rows: list[dict[str, Any]] = []
    for key, deadline_ms in deadlines.items():
        at = sub.events.get(key)
        if key.startswith("ref:"):
            ref_lat.append(at - deadline_ms / 1000 if at is not None else float("inf"))
            continue
        if at is not None:
            touch_lat.append(at - deadline_ms / 1000)
        first = min(posts[key], key=lambda x: x[0])[0] if key in posts else None
        if at is not None and first is not None:
            post_after_touch.append(first - at)
        worker_rows.append(
            {
                "key": key,
                "deadline_ms": deadline_ms,
                "touched_ms": round((at - deadline_ms / 1000) * 1000, 3) if at else None,
                "posted_ms": round((first - deadline_ms / 1000) * 1000, 3) if first else None,
            }
        )

    keyspace = info(client, "keyspace").get("db0", {})
    result: dict[str, Any] = {
        "other_keys": n_other,
        "load_other_keys_s": round(load_s, 3),
        "keys_per_side": n_keys,
        "cap_after_last_deadline_s": cap,
        "worker": {
            "latency_ms": summarize(worker_lat, 1000),
            "resets_received": len(worker_lat),
            "missing_resets": missing_resets,
            "duplicate_posts": extra_posts,
            "distinct_reset_ids": len(reset_ids),
            "unexpected_keys": unexpected,
            "expired_at_minus_deadline_ms": summarize(expired_at_err, 1000),
            "cpu": cpu_stats,
            "log_problems": log_problems(worker),
        },
        "reference": {
            "latency_ms": summarize(ref_lat, 1000),
            "latency_ms_arrived_only": summarize([x for x in ref_lat if x != float("inf")], 1000),
            "never_arrived": sum(1 for x in ref_lat if x == float("inf")),
            "duplicate_events": sub.duplicates,
        },
        # The worker's claim touches the key: Redis publishes its `expired` then. Splits
        # the worker's latency into deadline -> touch and touch -> POST received.
        "worker_keys_expired_event_ms": summarize(touch_lat, 1000),
        "worker_post_after_expired_event_ms": summarize(post_after_touch, 1000),
        "redis": {
            "expired_keys": int(stats_after["expired_keys"]) - int(stats_before["expired_keys"]),
            "keyspace_end": keyspace,
        },
        "raw": {
            "worker_latency_ms": sorted(round(x * 1000, 3) for x in worker_lat),
            "worker_keys": sorted(worker_rows, key=lambda row: row["deadline_ms"]),
            "reference_latency_ms": sorted(
                round(x * 1000, 3) for x in ref_lat if x != float("inf")
            ),
        },
    }
    w, ref = result["worker"]["latency_ms"], result["reference"]["latency_ms"]
    log(
        f"  worker    p50 {fmt_ms(w.get('p50'))} p99 {fmt_ms(w.get('p99'))} "
        f"max {fmt_ms(w.get('max'))} ({len(worker_lat)}/{n_keys} resets)"
    )
    log(
        f"  reference p50 {fmt_ms(ref.get('p50'))} p99 {fmt_ms(ref.get('p99'))} "
        f"max {fmt_ms(ref.get('max'))} ({ref['arrived']}/{n_keys} events within {cap:.0f} s)"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=200, help="keys per side (default 200)")
    parser.add_argument(
        "--cap",
        type=float,
        default=60.0,
        help="seconds after the last deadline to wait for Redis's own events",
    )
    parser.add_argument("--others", type=int, nargs="+", default=[0, 10_000, 100_000])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="smoke run: 40 keys, 10 s cap")
    args = parser.parse_args()
    if args.quick:
        args.keys, args.cap = 40, 10.0
    scenarios = [run_scenario(n, args.keys, args.cap, args.seed) for n in args.others]
    problems = []
    for s in scenarios:
        w = s["worker"]
        p99 = w["latency_ms"].get("p99")
        if p99 is None or p99 > TARGET_P99_MS:
            problems.append(f"{s['other_keys']} other keys: worker p99 {p99} ms > target")
        if w["missing_resets"] or w["duplicate_posts"] or w["unexpected_keys"]:
            problems.append(f"{s['other_keys']} other keys: missing/duplicate/unexpected resets")
        if w["log_problems"]:
            problems.append(f"{s['other_keys']} other keys: worker logged warnings")
    write_result(
        "latency",
        {
            "params": {
                "keys_per_side": args.keys,
                "cap_s": args.cap,
                "seed": args.seed,
                "ttl_range_ms": [500, 5000],
                "target_p99_ms": TARGET_P99_MS,
            },
            "scenarios": scenarios,
            "problems": problems,
        },
    )


if __name__ == "__main__":
    main()
