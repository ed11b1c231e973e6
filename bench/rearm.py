"""A bulk re-arm at Redis's default pubsub limits: does the leader's subscription hold?

Two replicas on one Redis left at its default ``client-output-buffer-limit pubsub 32mb 8mb
60`` (set explicitly). The app arms ``--counters`` counters (TTL 1 h) as fast as
``--clients`` connections pipelining ``PIPELINE`` SETs each can, twice (a first arm,
then a re-arm: ~2 events per SET), while short counters (TTL 0.5-2 s) are set at
``--rate`` per second throughout. Measured: how fast the app armed, the largest output
buffer Redis held for a pubsub client (CLIENT LIST omem, sampled every 10 ms), whether
Redis closed the leader's subscription (the worker's log, and INFO stats where Redis
counts it, 7.2+), and every short counter reset once, with its lateness (issue #21, item
5: at 256kb limits this closed the subscription 4 times and lost a reset).

    .venv/bin/python -m bench.rearm [--counters 200000] [--clients 4] [--base REV]
"""

from __future__ import annotations

import argparse
import threading
import time
from collections import defaultdict
from contextlib import nullcontext
from typing import Any

from .common import (
    PacedDriver,
    Rig,
    WorkerCode,
    code_at,
    info,
    log,
    measured_code,
    rig,
    summarize,
    wait_leader_ready,
    write_result,
)

PIPELINE = 1_000
SHORT_TTL_MS = (500, 2000)
DEFAULT_LIMIT = "pubsub 32mb 8mb 60"
_CLOSED = ("client-output-buffer-limit", "Connection closed by server")  # new, old log


class _Shorts(PacedDriver):
    """Short counters at a steady rate, each SET's deadline noted (from just before the SET:
    Redis's clock is this host's, the same machine)."""

    def __init__(self, r: Rig, rate: float, duration: float) -> None:
        super().__init__("shorts", rate=rate, start=time.time(), duration=duration, seed=1)
        self._r = r
        self.due: dict[str, float] = {}
        self.stop = threading.Event()

    def drive(self) -> None:
        with self._r.server.client() as c:
            for _, due in self.ticks():
                if self.stop.is_set():
                    return
                for i in due:
                    ttl = self._rng.randint(*SHORT_TTL_MS)
                    sent = time.time()  # before: lateness is overstated, never understated
                    c.set(f"c:short:{i}", "1", px=ttl)
                    self.due[f"c:short:{i}"] = sent + ttl / 1000


def _arm(r: Rig, counters: int, clients: int) -> float:
    """SET every bulk counter, ``clients`` connections at once; the wall time it took."""

    def part(n: int) -> None:
        with r.server.client() as c:
            pipe = c.pipeline(transaction=False)
            for i in range(n, counters, clients):
                pipe.set(f"c:bulk:{i}", "1", ex=3600)
                if len(pipe) >= PIPELINE:
                    pipe.execute()
            pipe.execute()

    threads = [threading.Thread(target=part, args=(n,)) for n in range(clients)]
    t0 = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.time() - t0


def one(code: WorkerCode, counters: int, clients: int, rate: float) -> dict[str, Any]:
    with rig("rearm") as r:
        r.client.config_set("client-output-buffer-limit", DEFAULT_LIMIT)
        for rid in ("r1", "r2"):
            r.spawn(rid, code=code)
        wait_leader_ready(r)
        closed_before = info(r.client, "stats").get("client_output_buffer_limit_disconnections")
        omem = [0]
        sampling = threading.Event()

        def sample() -> None:
            with r.server.client() as c:
                while not sampling.is_set():
                    rows: Any = c.client_list(_type="pubsub")
                    omem[0] = max([omem[0], *(int(row.get("omem", 0)) for row in rows)])
                    time.sleep(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        arms = []
        shorts = _Shorts(r, rate, duration=3600)
        shorts.start()
        for _ in range(2):
            arms.append(_arm(r, counters, clients))
        shorts.stop.set()
        shorts.join(timeout=5)
        sampling.set()
        sampler.join()
        due = dict(shorts.due)
        deadline = max(due.values(), default=time.time()) + 15
        while time.time() < deadline:
            if set(due) <= {q.json["key"] for q in r.backend.requests if q.json}:
                break
            time.sleep(0.1)
        first: dict[str, float] = {}
        ids: dict[str, set[str]] = defaultdict(set)
        for q in r.backend.requests:
            key = (q.json or {}).get("key")
            if key in due:
                ids[key].add(q.json["reset_id"])
                first.setdefault(key, q.received_at)
        late = [first[k] - d for k, d in due.items() if k in first]
        closed_after = info(r.client, "stats").get("client_output_buffer_limit_disconnections")
        logs = "".join(w.output() for w in r.workers)
        return {
            "code": code.commit,
            "counters": counters,
            "clients": clients,
            "arm_s": [round(a, 2) for a in arms],
            "sets_per_s": [round(counters / a) for a in arms],
            "max_pubsub_omem_mib": round(omem[0] / 2**20, 2),
            "closed_in_log": sum(logs.count(n) for n in _CLOSED),
            "closed_by_redis": (
                None if closed_before is None else int(closed_after) - int(closed_before)
            ),
            "shorts": len(due),
            "missed": len(set(due) - set(first)),
            "doubled": sum(len(v) > 1 for v in ids.values()),
            "late_ms": summarize(late, 1000),
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counters", type=int, default=200_000)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rate", type=float, default=100.0, help="short counters per second")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--base", default=None, help="also run this commit's worker, alternating")
    a = ap.parse_args()
    rows: list[dict[str, Any]] = []
    with code_at(a.base) if a.base else nullcontext() as base:
        for run in range(a.runs):
            sides = [measured_code()] + ([base] if base else [])
            for code in sides if run % 2 == 0 else sides[::-1]:
                row = one(code, a.counters, a.clients, a.rate) | {"label": code.label}
                log(f"{code.label}: {row}")
                rows.append(row)
    write_result("rearm", {"runs": rows, "base": a.base})


if __name__ == "__main__":
    main()
