"""Where the worker's rare 20-50 ms latency outliers come from: its own garbage collector.

Same setup as bench/latency.py (no other keys), but the worker runs under
bench/gc_probe.py, which logs every collection taking >= 1 ms and every full (gen 2)
one. ``--keys`` counter keys get deadlines 20 ms apart from 0.5 s on (300 keys: 6.5 s,
so any pause longer than 20 ms is bound to delay one); for each reset later than
``--slow-ms`` the benchmark looks for a collection that was running between the key's
deadline and the POST's arrival. A full collection stops the whole process (the GIL is
held), so the timer, the Redis threads and the HTTP client all wait for it.

    .venv/bin/python -m bench.gcpause [--keys 300]
"""

from __future__ import annotations

import argparse
import random
import time
from typing import Any

from .common import (
    fmt_ms,
    log,
    log_problems,
    rig,
    summarize,
    wait_leader_ready,
    write_result,
)

SPACING_MS = 20


def run(n_keys: int, slow_ms: float, seed: int) -> dict[str, Any]:
    log(f"gcpause: {n_keys} keys, worker under bench.gc_probe")
    with rig("gcpause") as r:
        gc_log = r.tmp / "gc.log"
        gc_log.touch()
        worker = r.spawn("leader", module="bench.gc_probe", extra_env={"GC_PROBE_OUT": str(gc_log)})
        wait_leader_ready(r)
        # Deadlines evenly spaced SPACING_MS apart (set in random order), so that any
        # pause longer than the spacing is bound to delay at least one reset.
        t_start = time.time()
        first = int(t_start * 1000) + 500
        order = list(range(n_keys))
        random.Random(seed).shuffle(order)
        deadlines: dict[str, int] = {}
        for i in order:
            key = f"c:{i}"
            deadlines[key] = first + i * SPACING_MS
            r.client.set(key, "1", pxat=deadlines[key])
        last = max(deadlines.values()) / 1000
        while time.time() < last + 10 and len(r.backend.requests) < n_keys:
            time.sleep(0.1)
        time.sleep(0.5)
        posts = {str((q.json or {}).get("key")): q.received_at for q in r.backend.requests}
        collections = []
        for line in gc_log.read_text().splitlines():
            end, gen, ms, collected = line.split()
            if float(end) >= t_start:
                collections.append(
                    {
                        "end": float(end),
                        "generation": int(gen),
                        "ms": float(ms),
                        "collected": int(collected),
                    }
                )
        problems = log_problems(worker)

    rows = []
    for key, dl_ms in deadlines.items():
        if key not in posts:
            continue
        dl, at = dl_ms / 1000, posts[key]
        row: dict[str, Any] = {"key": key, "latency_ms": round((at - dl) * 1000, 3)}
        if row["latency_ms"] > slow_ms:
            # A collection overlapping [deadline, POST arrival] delayed this reset.
            overlap = [c for c in collections if c["end"] - c["ms"] / 1000 <= at and c["end"] >= dl]
            row["gc_overlap"] = overlap
        rows.append(row)
    slow = [row for row in rows if "gc_overlap" in row]
    full = [c for c in collections if c["generation"] == 2]
    result: dict[str, Any] = {
        "keys": n_keys,
        "resets": len(rows),
        "latency_ms": summarize([row["latency_ms"] / 1000 for row in rows], 1000),
        "slow_threshold_ms": slow_ms,
        "slow_resets": slow,
        "slow_resets_with_gc_overlap": sum(1 for row in slow if row["gc_overlap"]),
        "full_collections": full,
        "full_collection_ms": summarize([c["ms"] / 1000 for c in full], 1000),
        "collections_over_1ms": len(collections),
        "log_problems": problems,
    }
    lat = result["latency_ms"]
    pauses = ", ".join(f"{c['ms']:.1f} ms" for c in full) or "none"
    log(
        f"  latency p50 {fmt_ms(lat.get('p50'))} p99 {fmt_ms(lat.get('p99'))} "
        f"max {fmt_ms(lat.get('max'))}; {len(slow)} resets > {slow_ms:.0f} ms, "
        f"{result['slow_resets_with_gc_overlap']} of them during a collection; "
        f"{len(full)} full collections ({pauses})"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=300)
    parser.add_argument("--slow-ms", type=float, default=12.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    result = run(args.keys, args.slow_ms, args.seed)
    problems = []
    if result["resets"] != args.keys:
        problems.append(f"{args.keys - result['resets']} resets missing")
    if result["log_problems"]:
        problems.append("worker logged warnings")
    write_result(
        "gcpause",
        {
            "params": {
                "keys": args.keys,
                "slow_ms": args.slow_ms,
                "seed": args.seed,
                "deadline_spacing_ms": SPACING_MS,
            },
            **result,
            "problems": problems,
        },
    )


if __name__ == "__main__":
    main()
