"""Poisoned resets: do resets the backend refuses or stalls on forever hold up the others?

One worker leads (MAX_IN_FLIGHT 32, RESET_TIMEOUT_MS 2000) against its own redis-server
and the RecordingBackend. Three scenarios:

- **A, no poison**: healthy counters ``c:h:i`` fall due at a steady rate (20/s for 20 s);
- **B, poisoned**: first 100 counters ``c:p:i``, all due at once, whose resets the backend
  refuses forever (even i: 404) or never answers (odd i: it holds the request until the
  worker's 2 s timeout); then, 7 s later (every poison reset has failed at least once,
  so each is a retry), the same healthy schedule as A;
- **C, poison burst**: the healthy schedule of A, with the same 100 poison counters all
  due at once halfway through it: their first attempts are fresh resets like the
  healthy ones, so this shows what a burst of new failing resets costs before they are
  known to fail.
- **D, hanging at 2** and **E, hanging at 32** (issue 21 item 4): MAX_IN_FLIGHT 2 with 3
  counters ``c:hang:i`` whose requests the backend never answers, or MAX_IN_FLIGHT 32
  with 40 of them, all due at once; the healthy schedule of A starts 0.3 s later, so
  healthy resets fall due while the hanging first attempts are in the air, then while
  their retries are (they hang too, every 2 s timeout and backoff). On 68e5110 the
  hanging attempts held the couriers until their timeout.
- **F** and **G**: the same with 20 hanging at MAX_IN_FLIGHT 2, 200 at 32: more than the
  couriers and the slow pool hold together (the oldest slow attempt is then abandoned).

Healthy latency = POST received at the backend - the key's deadline (``SET PXAT``, so the
deadline is exact). A healthy reset not received ``--cap`` s after the last deadline
never arrived (its latency is infinite, so percentiles can be "never").

Each run is made with the working tree's worker and with the base commit's (its package
checked out with ``git worktree add`` in a temp dir; the same settings), alternately in one
invocation: A new, A old, B new, B old, C new, C old (the next round starts with old),
a fresh Redis and backend for every run.

    .venv/bin/python -m bench.poison [--quick] [--rounds 1] [--scenarios A-clean ...]
    .venv/bin/python -m bench.poison --scenarios D-hang-at-2 E-hang-at-32 --rounds 2
        # against 68e5110; writes bench/results/poison-hanging.json
"""

from __future__ import annotations

import argparse
import contextlib
import re
import time
from collections import Counter
from typing import Any

from tests.support import Behaviour, Hang, Respond, by_key

from .common import (
    BASE_COMMIT,
    CpuWindow,
    WorkerCode,
    code_at,
    fmt_ms,
    log,
    log_problems,
    measured_code,
    ratio,
    rig,
    summarize,
    wait_leader_ready,
    write_result,
)

MAX_IN_FLIGHT = 32
RESET_TIMEOUT_MS = 2000
POISON = 100
POISON_LEAD_S = 1.0  # poison deadlines this far after they are set
HEALTHY_AFTER_S = 6.0  # healthy keys are set this long after the poison deadlines
HEALTHY_LEAD_S = 1.0  # first healthy deadline this far after they are set
TARGET_EXTRA_P99_MS = 5.0  # B's p99 within this of the same code's p99 in A
IN_AIR_S = RESET_TIMEOUT_MS / 1000 - 0.1
SCENARIOS = (
    "A-clean",
    "B-poisoned",
    "C-poison-burst",
    "D-hang-at-2",
    "E-hang-at-32",
    "F-hang-20-at-2",
    "G-hang-200-at-32",
)
# Hanging scenarios: (MAX_IN_FLIGHT, hanging counters). F and G hang more requests than
# the couriers and the slow pool hold together.
HANGING = {
    "D-hang-at-2": (2, 3),
    "E-hang-at-32": (32, 40),
    "F-hang-20-at-2": (2, 20),
    "G-hang-200-at-32": (32, 200),
}
HANG_LEAD_S = 0.3  # first healthy deadline this far after the hanging ones
BASE_HANGING = "68e5110"  # before slow attempts gave their couriers back


def poison_behaviours() -> dict[str, Behaviour]:
    """Even poison keys get 404, odd ones a hang until the worker gives up on the request."""
    return {f"c:p:{i}": Respond(404) if i % 2 == 0 else Hang(float("inf")) for i in range(POISON)}


def hanging_behaviours(n: int) -> dict[str, Behaviour]:
    """Keys whose every request hangs until the worker gives up on it."""
    return {f"c:hang:{i}": Hang(float("inf")) for i in range(n)}


def run_once(
    code: WorkerCode, scenario: str, rate: float, duration: float, cap: float
) -> dict[str, Any]:
    log(f"poison: {scenario}, {code.label} worker ({code.commit})")
    with rig(f"poison-{scenario}-{code.label}") as r:
        client, backend = r.client, r.backend
        max_in_flight, hanging = HANGING.get(scenario, (MAX_IN_FLIGHT, 0))
        behaviours = hanging_behaviours(hanging) if hanging else poison_behaviours()
        backend.behave(by_key(behaviours))
        worker = r.spawn(
            "leader",
            code=code,
            max_in_flight=max_in_flight,
            extra_env={"RESET_TIMEOUT_MS": str(RESET_TIMEOUT_MS)},
        )
        wait_leader_ready(r)
        cpu = CpuWindow(worker.pid).start()

        t0 = time.time()
        poison_ms = int((t0 + POISON_LEAD_S) * 1000)
        if scenario == "B-poisoned":
            pipe = client.pipeline(transaction=False)
            for key in behaviours:
                pipe.set(key, "1", pxat=poison_ms)
            pipe.execute()
            time.sleep(max(0.0, poison_ms / 1000 + HEALTHY_AFTER_S - time.time()))
        poison_seen = {q.key for q in backend.requests if q.key in behaviours}

        n = int(rate * duration)
        first_ms = int((time.time() + HEALTHY_LEAD_S) * 1000)
        deadlines = {f"c:h:{i}": first_ms + int(i * 1000 / rate) for i in range(n)}
        pipe = client.pipeline(transaction=False)
        if hanging:
            for key in behaviours:
                pipe.set(key, "1", pxat=first_ms - int(HANG_LEAD_S * 1000))
        for key, dl in deadlines.items():
            pipe.set(key, "1", pxat=dl)
        if scenario == "C-poison-burst":
            for key in behaviours:
                pipe.set(key, "1", pxat=first_ms + int(duration * 500))
        pipe.execute()
        last = max(deadlines.values()) / 1000
        while time.time() < last + cap:
            got = {q.key for q in backend.requests if q.key in deadlines}
            if len(got) >= n:
                break
            time.sleep(0.1)
        time.sleep(0.5)  # a late duplicate would show up here
        cpu_stats = cpu.stop()
        reqs = backend.requests

        first: dict[str, float] = {}
        per_key: Counter[str] = Counter()
        for q in reqs:
            if q.key in deadlines:
                per_key[q.key] += 1
                first.setdefault(q.key, q.received_at)
        lat = [first[k] - dl / 1000 if k in first else float("inf") for k, dl in deadlines.items()]
        window = (first_ms / 1000, last)
        poison_posts = [q for q in reqs if q.key in behaviours]
        in_window = [q for q in poison_posts if window[0] <= q.received_at <= window[1]]
        hangs = sorted(
            q.received_at for q in poison_posts if isinstance(behaviours[str(q.key)], Hang)
        )
        hangs_in_window = [t for t in hangs if window[0] <= t <= window[1]]
        problems = log_problems(worker, limit=100_000)
        poison_lines = [ln for ln in problems if re.search(r"'c:(p|hang):\d+'", ln)]
        other_lines = [ln for ln in problems if ln not in poison_lines]
        result: dict[str, Any] = {
            "scenario": scenario,
            "code": code.label,
            "commit": code.commit,
            "healthy": n,
            "healthy_arrived": len(first),
            "healthy_latency_ms": summarize(lat, 1000),
            "healthy_over_100ms": sum(1 for x in lat if x > 0.1),
            "healthy_over_500ms": sum(1 for x in lat if x > 0.5),
            "healthy_over_1s": sum(1 for x in lat if x > 1.0),
            "max_in_flight": max_in_flight,
            "healthy_duplicate_posts": sum(c - 1 for c in per_key.values()),
            "poison_keys": 0 if scenario == "A-clean" else len(behaviours),
            "poison_attempted_before_healthy": len(poison_seen),
            "poison_posts": len(poison_posts),
            "poison_posts_per_s_in_window": round(len(in_window) / (window[1] - window[0]), 2),
            # A hung request lasts until the worker gives up on it (RESET_TIMEOUT_MS), so
            # the most hung requests received within a little less than that were in the
            # air at once (over the run, and while the healthy deadlines fell).
            "poison_hangs_in_air_max": _max_in_window(hangs, IN_AIR_S),
            "poison_hangs_in_air_max_in_window": _max_in_window(hangs_in_window, IN_AIR_S),
            "worker_cpu": cpu_stats,
            "log_lines_about_poison": len(poison_lines),
            "log_problems_other": other_lines[:20],
        }
        s = result["healthy_latency_ms"]
        log(
            f"  healthy {len(first)}/{n}: p50 {fmt_ms(s.get('p50'))} p99 {fmt_ms(s.get('p99'))} "
            f"max {fmt_ms(s.get('max'))}, over 100 ms {result['healthy_over_100ms']}, over "
            f"1 s {result['healthy_over_1s']}; poison attempted before the healthy ones: "
            f"{len(poison_seen)}; poison POSTs/s meanwhile "
            f"{result['poison_posts_per_s_in_window']}; hangs in the air at most "
            f"{result['poison_hangs_in_air_max']} (while healthy ones fell due: "
            f"{result['poison_hangs_in_air_max_in_window']})"
        )
        return result


def _max_in_window(times: list[float], width: float) -> int:
    """Most of the sorted ``times`` within any ``width``-second window."""
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] <= t - width:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=20.0, help="healthy deadlines per s")
    parser.add_argument(
        "--duration", type=float, default=20.0, help="seconds over which the healthy deadlines fall"
    )
    parser.add_argument(
        "--cap",
        type=float,
        default=10.0,
        help="seconds after the last deadline to wait for healthy resets",
    )
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--base",
        help=f"the commit to compare with (default {BASE_COMMIT}; {BASE_HANGING} when only "
        "hanging scenarios run)",
    )
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 s, 5 s cap")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.cap = 8.0, 5.0
    if args.base is None:
        args.base = BASE_HANGING if set(args.scenarios) <= set(HANGING) else BASE_COMMIT
    runs: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        new = measured_code()
        old = stack.enter_context(code_at(args.base))
        for rnd in range(args.rounds):
            codes = (new, old) if rnd % 2 == 0 else (old, new)
            for scenario in args.scenarios:
                for code in codes:
                    run = run_once(code, scenario, args.rate, args.duration, args.cap)
                    run["round"] = rnd
                    runs.append(run)

    def p(code: str, scenario: str, stat: str) -> list[float | None]:
        return [
            run["healthy_latency_ms"].get(stat)
            for run in runs
            if run["code"] == code and run["scenario"] == scenario
        ]

    comparison: dict[str, Any] = {}
    for scenario in args.scenarios:
        for stat in ("p50", "p99", "max"):
            pairs = zip(p("new", scenario, stat), p("old", scenario, stat), strict=True)
            comparison[f"{scenario} {stat} new/old"] = [ratio(a, b) for a, b in pairs]
        for side in ("new", "old"):
            comparison[f"{scenario} {side}: healthy over 100 ms / 1 s"] = [
                (run["healthy_over_100ms"], run["healthy_over_1s"])
                for run in runs
                if run["code"] == side and run["scenario"] == scenario
            ]
    problems = []
    for run in runs:
        tag = f"{run['scenario']} {run['code']} round {run['round']}"
        if run["code"] != "new":
            continue
        if run["healthy_arrived"] < run["healthy"]:
            problems.append(
                f"{tag}: {run['healthy'] - run['healthy_arrived']} healthy resets never arrived"
            )
        if run["healthy_duplicate_posts"]:
            problems.append(f"{tag}: {run['healthy_duplicate_posts']} duplicate healthy POSTs")
        if run["log_problems_other"]:
            problems.append(f"{tag}: worker logged warnings not about poison keys")
        if run["scenario"] in HANGING and run["healthy_over_500ms"]:
            problems.append(f"{tag}: {run['healthy_over_500ms']} healthy resets over 500 ms late")
    for rnd in range(args.rounds if {"A-clean", "B-poisoned"} <= set(args.scenarios) else 0):
        clean_run, poisoned_run = (
            next(x for x in runs if x["code"] == "new" and x["round"] == rnd and x["scenario"] == s)
            for s in ("A-clean", "B-poisoned")
        )
        a = clean_run["healthy_latency_ms"].get("p99")
        b = poisoned_run["healthy_latency_ms"].get("p99")
        if a is None or b is None or b > a + TARGET_EXTRA_P99_MS:
            problems.append(f"round {rnd}: new code's poisoned p99 {b} ms vs clean {a} ms")
    write_result(
        # A run of the hanging scenarios alone keeps the other scenarios' results.
        "poison-hanging" if set(args.scenarios) <= set(HANGING) else "poison",
        {
            "params": {
                "max_in_flight": MAX_IN_FLIGHT,
                "hanging_max_in_flight_and_counters": HANGING,
                "reset_timeout_ms": RESET_TIMEOUT_MS,
                "poison": POISON,
                "poison_404": POISON // 2,
                "poison_hang": POISON // 2,
                "healthy_rate_per_s": args.rate,
                "healthy_duration_s": args.duration,
                "cap_s": args.cap,
                "rounds": args.rounds,
                "base_commit": old.commit,
                "healthy_after_poison_s": HEALTHY_AFTER_S,
            },
            "runs": runs,
            "ratios_new_over_old": comparison,
            "problems": problems,
        },
    )


if __name__ == "__main__":
    main()
