"""Failover time: how long after the leader dies (SIGKILL) or is stopped (SIGTERM) another
replica holds the lease.

Three replicas (COUNTER_KEY ``c:*``) per lease TTL (1000 and 3000 ms). Each round waits
until all three are up (subscribed to the release channel) plus a random delay within
one renewal period (so the kill lands at a random point of the renewal cycle), reads the
leader from the lease hash ``tcw:{c:*}:lease`` field ``replica``, sends the signal and
polls the lease every 1 ms until another replica holds it. The victim is reaped and a
fresh replica spawned before the next round, so there are always three.

Two measures per round: ``poll_ms`` (signal -> first poll showing a new holder) and
``since_ms`` (signal -> the ``since_ms`` the new holder's acquire script wrote, Redis's
clock: immune to the polling interval). For SIGKILL, ``lease_left_ms`` is the PTTL the
lease still had when the signal was sent: nobody may take over before it runs out, so
``poll_ms - lease_left_ms`` is the standbys' reaction time after expiry.

    .venv/bin/python -m bench.failover [--rounds 5] [--ttls 1000 3000]
"""

from __future__ import annotations

import argparse
import itertools
import random
import signal
import time
from typing import Any

from tests.support import WorkerProcess

from .common import (
    Rig,
    fmt_ms,
    lease_holder,
    lease_key,
    log,
    log_problems,
    numsub,
    release_channel,
    rig,
    summarize,
    wait_until,
    write_result,
)

POLL = 0.001


class Replicas:
    """Three live replicas on one rig; spawns replacements with fresh REPLICA_IDs."""

    def __init__(self, r: Rig, ttl_ms: int) -> None:
        self.r = r
        self.ttl_ms = ttl_ms
        self.live: dict[str, WorkerProcess] = {}
        self._ids = itertools.count(1)
        self.problems: list[str] = []

    def spawn(self) -> None:
        rid = f"r{next(self._ids)}"
        self.live[rid] = self.r.spawn(rid, lease_ttl_ms=self.ttl_ms)

    def wait_ready(self, timeout: float = 30.0) -> str:
        """All live replicas listen for releases and one of them leads; return its id."""
        client = self.r.client
        wait_until(
            lambda: numsub(client, release_channel()) >= len(self.live),
            timeout,
            "all replicas to subscribe to the release channel",
        )
        return wait_until(lambda: lease_holder(client), timeout, "a leader")

    def retire(self, rid: str, worker: WorkerProcess) -> None:
        self.problems += [f"{rid}: {line}" for line in log_problems(worker)]
        del self.live[rid]


def one_fault(reps: Replicas, sig: signal.Signals, rng: random.Random) -> dict[str, Any]:
    client = reps.r.client
    ttl = reps.ttl_ms / 1000
    reps.wait_ready()
    time.sleep(0.2 + rng.uniform(0, ttl / 3))  # random phase in the renewal cycle
    leader = reps.wait_ready()
    victim = reps.live[leader]
    epoch_before = int(str(client.hget(lease_key(), "epoch")))
    left: Any = client.pttl(lease_key())
    t_wall = time.time()
    t0 = time.perf_counter()
    victim.signal(sig)
    new_holder: str | None = None
    deadline = t0 + 3 * ttl + 10
    while time.perf_counter() < deadline:
        holder = lease_holder(client)
        if holder and holder != leader:
            new_holder = holder
            break
        time.sleep(POLL)
    t1 = time.perf_counter()
    lease: Any = client.hgetall(lease_key())
    exit_code = victim.wait(15)
    exit_s = time.perf_counter() - t0
    reps.retire(leader, victim)
    row: dict[str, Any] = {
        "signal": sig.name,
        "victim": leader,
        "new_leader": new_holder,
        "poll_ms": round((t1 - t0) * 1000, 2) if new_holder else None,
        "since_ms": (
            round(int(lease["since_ms"]) - t_wall * 1000, 2)
            if new_holder and lease.get("since_ms")
            else None
        ),
        "lease_left_ms": int(left),
        "epoch_before": epoch_before,
        "epoch_after": int(lease.get("epoch", 0)) if lease else None,
        "victim_exit_code": exit_code,
        "victim_exit_s": round(exit_s, 3),
    }
    if sig == signal.SIGKILL and row["poll_ms"] is not None:
        row["after_expiry_ms"] = round(row["poll_ms"] - row["lease_left_ms"], 2)
    reps.spawn()
    return row


def run_ttl(ttl_ms: int, rounds: int, rng: random.Random) -> dict[str, Any]:
    log(f"failover: LEASE_TTL_MS={ttl_ms}")
    with rig(f"failover-{ttl_ms}") as r:
        reps = Replicas(r, ttl_ms)
        for _ in range(3):
            reps.spawn()
        reps.wait_ready()
        out: dict[str, Any] = {"lease_ttl_ms": ttl_ms}
        for sig in (signal.SIGKILL, signal.SIGTERM):
            rows = [one_fault(reps, sig, rng) for _ in range(rounds)]
            times = [row["poll_ms"] for row in rows if row["poll_ms"] is not None]
            kind: dict[str, Any] = {
                "rounds": rows,
                "failed_rounds": sum(1 for row in rows if row["poll_ms"] is None),
                "poll_ms": summarize([t / 1000 for t in times], 1000),
                "since_ms": summarize(
                    [row["since_ms"] / 1000 for row in rows if row["since_ms"] is not None],
                    1000,
                ),
                "max_over_ttl": round(max(times) / ttl_ms, 3) if times else None,
            }
            if sig == signal.SIGKILL:
                kind["after_expiry_ms"] = summarize(
                    [row["after_expiry_ms"] / 1000 for row in rows if "after_expiry_ms" in row],
                    1000,
                )
                kind["lease_left_ms"] = summarize(
                    [row["lease_left_ms"] / 1000 for row in rows], 1000
                )
            out[sig.name] = kind
            s = kind["poll_ms"]
            log(
                f"  {sig.name}: p50 {fmt_ms(s.get('p50'))} max {fmt_ms(s.get('max'))} "
                f"(lease {ttl_ms} ms)"
            )
        for rid, w in reps.live.items():
            out.setdefault("survivor_log_problems", []).extend(
                f"{rid}: {line}" for line in log_problems(w)
            )
        out["retired_log_problems"] = reps.problems
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ttls", type=int, nargs="+", default=[1000, 3000])
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    results = [run_ttl(ttl, args.rounds, rng) for ttl in args.ttls]
    problems: list[str] = []
    for res in results:
        for kind in ("SIGKILL", "SIGTERM"):
            for row in res[kind]["rounds"]:
                if row["poll_ms"] is None:
                    problems.append(f"lease {res['lease_ttl_ms']}: {kind}: no new leader")
                elif kind == "SIGKILL" and row["poll_ms"] > res["lease_ttl_ms"] * 1.1:
                    problems.append(
                        f"lease {res['lease_ttl_ms']}: SIGKILL failover took "
                        f"{row['poll_ms']} ms > 1.1 x lease TTL"
                    )
                if kind == "SIGTERM" and row["victim_exit_code"] != 0:
                    problems.append(
                        f"lease {res['lease_ttl_ms']}: SIGTERM exit code {row['victim_exit_code']}"
                    )
    write_result(
        "failover",
        {
            "params": {
                "rounds": args.rounds,
                "ttls_ms": args.ttls,
                "poll_s": POLL,
                "seed": args.seed,
                "replicas": 3,
            },
            "results": results,
            "problems": problems,
        },
    )


if __name__ == "__main__":
    main()
