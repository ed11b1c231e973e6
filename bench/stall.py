"""A Redis stall (DEBUG SLEEP) while counters are set: missed and doubled resets per run.

Two replicas on one Redis and one recording backend. Each run sets counters at
``--rate`` per second (TTL 0.5-2 s) for a few seconds; in the middle, the "app" sets
``--edge`` more counters in one round trip and, the moment they are acknowledged, another
connection sends ``DEBUG SLEEP``: keys set at the instant the stall begins, whose leader
cannot look at them before it, and which expire during it (the race of issue #21, item
3, made certain instead of 1 in 2,100). Every counter must then be reset exactly once.
Runs the working tree and ``--base`` (default 68e5110) the same way.

    .venv/bin/python -m bench.stall [--runs 5] [--sleeps 2 5] [--base 68e5110]
"""

from __future__ import annotations

import argparse
import random
import threading
import time
from collections import defaultdict
from typing import Any

from .common import (
    PacedDriver,
    Rig,
    WorkerCode,
    code_at,
    log,
    measured_code,
    rig,
    wait_leader_ready,
    write_result,
)

TTL_MS = (500, 2000)
DRIVE_S = 6.0  # the stall starts DRIVE_S / 3 into it


class _Setter(PacedDriver):
    def __init__(self, r: Rig, prefix: str, rate: float, start: float, seed: int) -> None:
        super().__init__("setter", rate=rate, start=start, duration=DRIVE_S, seed=seed)
        self._r = r
        self._prefix = prefix
        self.keys: list[str] = []

    def drive(self) -> None:
        with self._r.server.client() as c:
            for _, due in self.ticks():
                for i in due:
                    key = f"c:{self._prefix}:{i}"
                    c.set(key, "1", px=self._rng.randint(*TTL_MS))
                    self.keys.append(key)


def one_run(r: Rig, run: int, sleep_s: float, rate: float, edge: int) -> dict[str, Any]:
    wait_leader_ready(r)
    prefix = f"s{sleep_s:g}r{run}"
    setter = _Setter(r, prefix, rate, time.time() + 0.2, seed=run)
    setter.start()
    time.sleep(0.2 + DRIVE_S / 3)
    edge_keys = [f"c:{prefix}:edge{i}" for i in range(edge)]
    rng = random.Random(run)
    with r.server.client() as app, r.server.client() as operator:
        pipe = app.pipeline(transaction=False)
        for key in edge_keys:
            pipe.set(key, "1", px=rng.randint(TTL_MS[0], min(TTL_MS[1], round(sleep_s * 900))))
        stalled = threading.Thread(
            target=operator.execute_command, args=("DEBUG", "SLEEP", sleep_s)
        )
        pipe.execute()  # acknowledged: the stall begins now
        stalled.start()
        stalled.join()
    setter.join()
    if setter.error is not None:
        raise setter.error
    armed = set(setter.keys) | set(edge_keys)
    deadline = time.time() + TTL_MS[1] / 1000 + 15
    while time.time() < deadline:
        if armed <= {q.json["key"] for q in r.backend.requests if q.json}:
            break
        time.sleep(0.1)
    ids: dict[str, set[str]] = defaultdict(set)
    for q in r.backend.requests:
        if q.json and q.json.get("key") in armed:
            ids[q.json["key"]].add(q.json["reset_id"])
    missed = sorted(armed - set(ids))
    return {
        "sleep_s": sleep_s,
        "armed": len(armed),
        "edge": edge,
        "missed": len(missed),
        "missed_edge": len(set(missed) & set(edge_keys)),
        "doubled": sum(len(v) > 1 for v in ids.values()),
        "missed_keys": missed[:10],
    }


def measure(code: WorkerCode, sleeps: list[float], runs: int, rate: float, edge: int) -> list[Any]:
    out = []
    for sleep_s in sleeps:
        with rig("stall", ["--enable-debug-command", "yes"]) as r:
            for rid in ("r1", "r2"):
                r.spawn(rid, code=code)
            for run in range(runs):
                res = one_run(r, run, sleep_s, rate, edge)
                log(f"{code.label} DEBUG SLEEP {sleep_s:g} run {run}: {res}")
                out.append(res)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--sleeps", type=float, nargs="+", default=[2.0, 5.0])
    ap.add_argument("--rate", type=float, default=50.0)
    ap.add_argument("--edge", type=int, default=5)
    ap.add_argument("--base", default="68e5110")
    a = ap.parse_args()
    new = measure(measured_code(), a.sleeps, a.runs, a.rate, a.edge)
    with code_at(a.base) as base:
        old = measure(base, a.sleeps, a.runs, a.rate, a.edge)
    result = {"new": new, "old": old, "base": a.base}
    for label, rows in (("new", new), ("old", old)):
        for s in a.sleeps:
            mine = [x for x in rows if x["sleep_s"] == s]
            log(
                f"{label} SLEEP {s:g}: missed per run {[x['missed'] for x in mine]}, "
                f"doubled {[x['doubled'] for x in mine]}, armed {sum(x['armed'] for x in mine)}"
            )
    write_result("stall", result)


if __name__ == "__main__":
    main()
