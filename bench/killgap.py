"""Kill the leader: how long until resets flow again, and how late are the ones due meanwhile.

Three replicas on one Redis and one recording backend. Each round arms a stream of
counters (``--rate`` per second, deadlines spread from 1 s before to 2 s after the
planned kill, each with ``PXAT``), SIGKILLs the leader at the planned instant, waits for
every counter's reset, then spawns a replacement replica. From the backend's records:

- ``gap_ms``: kill -> the first request carrying a fencing token above the dead leader's
  (the new leader's first reset);
- ``gap_late_ms``: lateness (arrival - deadline) of the counters due between the kill and
  that first request, the ones that had nobody to send them;
- per run: missed (no request), doubled (two reset ids for one counter), and whether
  the fencing tokens the backend saw ever went down.

``--pending N`` also arms N counters due 100 ms before each kill, with a backend that
answers in 20-50 ms: thousands of resets in flight or pending when the leader dies.
``--counters N`` first loads N counters with a 1 h TTL and waits until the leader has
recorded them (a takeover then starts with a large deadlines zset).

    .venv/bin/python -m bench.killgap [--rounds 20] [--pending 5000] [--counters 1000000]
"""

from __future__ import annotations

import argparse
import random
import signal
import time
from collections import defaultdict
from typing import Any

from trio_counter_worker.lab.backend import Hang, Received, Respond

from .common import (
    Rig,
    deadlines_key,
    lease_holder,
    lease_key,
    load_keys,
    log,
    rig,
    summarize,
    wait_leader_ready,
    wait_until,
    write_result,
)
from .failover import Replicas

SPREAD_BEFORE, SPREAD_AFTER = 1.0, 2.0  # deadlines around each kill, seconds


def _token(q: Received) -> int:
    return int((q.json or {}).get("fencing_token") or 0)


def _arm(r: Rig, prefix: str, deadlines: list[float]) -> dict[str, float]:
    pipe = r.client.pipeline(transaction=False)
    armed = {}
    for i, at in enumerate(deadlines):
        key = f"c:{prefix}:{i}"
        pipe.set(key, "1", pxat=round(at * 1000))
        armed[key] = at
    pipe.execute()
    return armed


def one_kill(reps: Replicas, rnd: int, rate: float, pending: int) -> dict[str, Any]:
    r = reps.r
    leader = reps.wait_ready()
    epoch = int(str(r.client.hget(lease_key(), "epoch")))
    kill_at = time.time() + SPREAD_BEFORE + (1.5 if pending else 0.3)
    span = SPREAD_BEFORE + SPREAD_AFTER
    n = max(1, round(rate * span))
    stream = _arm(r, f"s{rnd}", [kill_at - SPREAD_BEFORE + span * i / n for i in range(n)])
    burst = _arm(r, f"p{rnd}", [kill_at - 0.1] * pending) if pending else {}
    armed = {**stream, **burst}
    if burst:
        # The scenario is resets claimed and in flight at the kill: the leader must have
        # recorded the burst's deadlines by then (a key it heard of but never recorded,
        # expired before the next leader looks, is a documented limit, not this bench's).
        wait_until(
            lambda: None not in r.client.zmscore(deadlines_key(), list(burst)),
            kill_at - time.time(),
            "the leader to record the burst's deadlines before the kill",
            poll=0.02,
        )
    time.sleep(max(0.0, kill_at - time.time()))
    t_kill = time.time()
    reps.live[leader].signal(signal.SIGKILL)
    try:
        wait_until(
            lambda: {(q.json or {}).get("key") for q in r.backend.requests} >= armed.keys(),
            60,
            "every armed counter's reset",
            poll=0.05,
        )
    except TimeoutError:
        seen = {(q.json or {}).get("key") for q in r.backend.requests}
        missing = sorted(armed.keys() - seen)
        log(f"  missing {len(missing)} of {len(armed)}: {missing[:5]}")
        raise
    reps.live[leader].wait(15)
    reps.retire(leader, reps.live[leader])
    reqs = [q for q in r.backend.requests if (q.json or {}).get("key") in armed]
    new = [q.received_at for q in reqs if _token(q) > epoch]
    first_new = min(new) if new else None
    arrivals: dict[str, float] = {}
    for q in reqs:
        key = str((q.json or {}).get("key"))
        arrivals[key] = min(arrivals.get(key, q.received_at), q.received_at)
    in_gap = [k for k, at in stream.items() if first_new and t_kill <= at <= first_new]
    row = {
        "victim": leader,
        "new_leader": lease_holder(r.client),
        "gap_ms": round((first_new - t_kill) * 1000, 1) if first_new else None,
        "gap_due": len(in_gap),
        "gap_late_ms": [round((arrivals[k] - stream[k]) * 1000, 1) for k in in_gap],
        "late_ms": [round((arrivals[k] - at) * 1000, 1) for k, at in stream.items()],
    }
    reps.spawn()
    return row


def audit(requests: list[Received]) -> dict[str, Any]:
    """Missed is counted per round; here: doubled reset ids, and tokens going down."""
    ids: dict[str, set[str]] = defaultdict(set)
    tokens_down = 0
    top = 0
    for q in sorted(requests, key=lambda q: q.received_at):
        body = q.json or {}
        ids[str(body.get("key"))].add(str(body.get("reset_id")))
        token = _token(q)
        tokens_down += token < top
        top = max(top, token)
    return {
        "doubled": sum(len(v) > 1 for v in ids.values()),
        "tokens_down": tokens_down,
        "requests": len(requests),
        "counters": len(ids),
    }


def run(rounds: int, rate: float, pending: int, counters: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    with rig("killgap") as r:
        if pending:
            # 20-50 ms per answer: a burst stays in flight long enough to be cut short.
            r.backend.behave(lambda _q: Hang(rng.uniform(0.02, 0.05), Respond()))
        reps = Replicas(r, 3000)
        for _ in range(3):
            reps.spawn()
        reps.wait_ready()
        wait_leader_ready(r)
        if counters:
            log(f"loading {counters:,} counters (1 h TTL)")
            load_keys(r.client, (f"c:big:{i}" for i in range(counters)), ex=3600)
            wait_until(
                lambda: r.client.zcard(deadlines_key()) >= counters,
                300,
                "the leader to record every counter",
                poll=0.5,
            )
        rows = []
        for rnd in range(rounds):
            rows.append(one_kill(reps, rnd, rate, pending))
            log(
                f"  kill {rnd + 1}/{rounds}: gap {rows[-1]['gap_ms']} ms, "
                f"{rows[-1]['gap_due']} due in it"
            )
        checked = audit(list(r.backend.requests))
        gap_late = [x for row in rows for x in row["gap_late_ms"]]
        late = [x for row in rows for x in row["late_ms"]]
        return {
            "settings": {
                "rounds": rounds,
                "rate": rate,
                "pending": pending,
                "counters": counters,
                "lease_ttl_ms": 3000,
                "replicas": 3,
            },
            "gap_ms": summarize([row["gap_ms"] for row in rows if row["gap_ms"] is not None]),
            "gap_late_ms": summarize(gap_late),
            "late_ms": summarize(late),
            "no_new_leader_reset": sum(row["gap_ms"] is None for row in rows),
            **checked,
            "problems": reps.problems[:20],
            "rounds_detail": [{k: v for k, v in row.items() if k != "late_ms"} for row in rows],
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--rate", type=float, default=100.0, help="counters due per second")
    parser.add_argument("--pending", type=int, default=0)
    parser.add_argument("--counters", type=int, default=0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="5 rounds")
    parser.add_argument("--name", default="killgap")
    args = parser.parse_args()
    rounds = 5 if args.quick else args.rounds
    result = run(rounds, args.rate, args.pending, args.counters, args.seed)
    log(
        f"kill -> first new-leader reset: p50 {result['gap_ms'].get('p50')} ms, "
        f"p99 {result['gap_ms'].get('p99')} ms, max {result['gap_ms'].get('max')} ms; "
        f"due in the gap: p99 {result['gap_late_ms'].get('p99')} ms late; "
        f"doubled {result['doubled']}, tokens down {result['tokens_down']}"
    )
    write_result(args.name, result)


if __name__ == "__main__":
    main()
