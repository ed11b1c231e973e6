"""Steady state (issue #14): 1M counters, 1,000 re-arms/s and ~800 expiries/s for 5 minutes.

Target: every expiry reset once, deadline -> POST p99 <= 50 ms, the leader's RSS flat.

1. N keys ``c:i`` are loaded (``SET c:i 1 PXAT <deadline>``, pipelines of 10,000, from
   the driver) before any worker runs, with deadlines uniform over
   [T0, T0 + N / expiries]: about ``--expiries`` fall due per second from T0, when the
   measured window opens (1,250 s of them at 1M and 800/s: only the first ``--duration``
   s fall within the run). T0 is ``--warmup`` s after the load starts (default:
   5 s + 45 s per million counters, enough for the load and the first reconcile).
2. Replica r1 starts (LOG_LEVEL INFO, the worker's default, for its 'reconciled' line;
   it also logs a line per reset sent, as a deployment does); with ``--standby`` r2
   stands by. Once r1 has reconciled, a probe key proves the path (its POST is not
   kept), and the window waits for T0.
3. From T0 for ``--duration`` s, a driver thread (``common.paced``, one pipeline per
   millisecond tick) re-arms ``--rearms`` keys per second, each chosen at random among
   keys not due within ``--horizon`` s (60: a re-arm never races its key's expiry), with
   ``SET c:i 1 PX <ttl>`` and a new deadline drawn as the load drew them, uniform over
   [max(now + horizon, T0), T0 + N / expiries]: re-armed keys stay uniform over the far
   range, so the expiry rate stays as loaded. A key that expires stays expired.
4. Meanwhile, every 5 s: the leader's RSS, its CPU (utime + stime from /proc) and
   Redis's (``used_cpu_sys + used_cpu_user``) over the interval. After the window,
   the resets of keys due in it are waited for (``--cap`` s past T0 + duration).

Measured: every key whose (last) deadline falls within [T0, T0 + duration] is an expiry
and must get one POST: **missed** (none within ``--cap`` s of the window's end: lost, or
later than that), **doubled** (two reset_ids), duplicate POSTs of one reset_id,
**stale** (a POST whose ``expired_at`` is not its key's last deadline: a re-armed key
reset for its old one), **early** (a POST received before the key's deadline).
**Latency** = POST received - the deadline the driver set: exact for loaded keys (PXAT);
for re-armed keys (PX) the driver's time just before sending the pipeline + TTL, which
can only be earlier than Redis's deadline, so their latency is over-, never
under-stated; as a cross-check also POST received - ``expired_at`` (the worker's own
record, from Redis). Leader RSS per 5 s (first / last / max, least-squares slope in
MiB/min over the window, its second half, and from 65 s on: the leader remembers each
claim for the tombstone's minute, so it grows with the claim rate for the first minute
of expiries and is judged flat, a slope ~ 0, only after it), leader CPU (% of a core, ms
per reset: it includes the work for the re-arms, a TRACK call each), Redis CPU, resets/s
achieved, and per 5 s the expiries due and their latency p50/p99.

    .venv/bin/python -m bench.steady [--counters 1000000] [--duration 300] [--rearms 1000]
    .venv/bin/python -m bench.steady --quick      # 50,000 counters, 200/s + 200/s, 30 s
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import random
import statistics
import time
from array import array
from collections import defaultdict
from typing import Any

import attrs
import redis

from tests.support import WorkerProcess
from trio_counter_worker.spec import TOMBSTONE_MS

from .common import (
    CpuWindow,
    PacedDriver,
    Rig,
    cpu_seconds,
    deadlines_key,
    fmt_ms,
    info,
    lease_holder,
    load_keys,
    log,
    log_problems,
    machine_busy_seconds,
    peak_rss_mib,
    rig,
    rss_mib,
    summarize,
    wait_leader_ready,
    wait_line,
    wait_until,
    write_result,
)

RECONCILED = "reconciled: "
SAMPLE_S = 5.0
MATCH_MS = 1000  # a POST's expired_at this close to its key's last deadline is its reset
TARGET_P99_MS = 50.0
RSS_SLOPE_LIMIT = 1.0  # MiB/min: above it, RSS is not called flat
# The leader remembers each claim (and its marker) for the tombstone's life, so its RSS
# grows with the claim rate for the first TOMBSTONE_MS of expiries and then stays: RSS is
# judged flat or not on the samples from SETTLED_S into the window on.
SETTLED_S = TOMBSTONE_MS / 1000 + SAMPLE_S
FULL = {"counters": 1_000_000, "expiries": 800.0, "rearms": 1000.0, "duration": 300.0}
QUICK = {"counters": 50_000, "expiries": 200.0, "rearms": 200.0, "duration": 30.0}
MAX_PICKS = 1000  # random draws per re-arm before giving up (no key far enough out)


# --- the app -------------------------------------------------------------------------------


class Rearmer(PacedDriver):
    """Re-arms ``rate`` keys a second from ``start`` for ``duration`` s: each a random key
    not due within ``horizon_ms``, to a deadline uniform over [max(now + horizon, lo),
    hi]. ``deadlines`` (ms, per key index) is kept up to date: the driver's record of
    each key's last deadline."""

    def __init__(
        self,
        client: redis.Redis,
        deadlines: array[int],
        *,
        rate: float,
        start: float,
        duration: float,
        horizon_ms: int,
        lo_ms: int,
        hi_ms: int,
        seed: int,
    ) -> None:
        super().__init__("rearmer", rate=rate, start=start, duration=duration, seed=seed)
        self._client = client
        self._deadlines = deadlines
        self._horizon_ms = horizon_ms
        self._lo_ms, self._hi_ms = lo_ms, hi_ms
        self.rearmed: set[int] = set()  # keys re-armed at least once
        self.rearms = 0
        self.skipped = 0  # no key far enough out found
        self.pipelines = 0

    def close(self) -> None:
        self._client.close()

    def _pick(self, now_ms: int) -> int | None:
        d, n, rng = self._deadlines, len(self._deadlines), self._rng
        for _ in range(MAX_PICKS):
            i = rng.randrange(n)
            if d[i] > now_ms + self._horizon_ms:
                return i
        return None

    def drive(self) -> None:
        d, rng = self._deadlines, self._rng
        for now, due in self.ticks(poll=0.0005):
            now_ms = int(now * 1000)
            lo = max(now_ms + self._horizon_ms, self._lo_ms)
            pipe = self._client.pipeline(transaction=False)
            for _ in due:
                i = self._pick(now_ms)
                if i is None or lo >= self._hi_ms:
                    self.skipped += 1
                    continue
                deadline = rng.randint(lo, self._hi_ms)
                pipe.set(f"c:{i}", "1", px=deadline - now_ms)
                d[i] = deadline
                self.rearmed.add(i)
                self.rearms += 1
            pipe.execute()
            self.pipelines += 1


# --- sampling --------------------------------------------------------------------------------


@attrs.define
class Sample:
    t: float  # time.time()
    rss_mib: float
    leader_cpu_s: float
    redis_cpu_s: float
    busy_s: float


def _redis_cpu(client: redis.Redis) -> float:
    raw = info(client, "cpu")
    return float(raw["used_cpu_sys"]) + float(raw["used_cpu_user"])


def _sample(r: Rig, leader: WorkerProcess) -> Sample:
    return Sample(
        time.time(),
        rss_mib(leader.pid),
        cpu_seconds(leader.pid),
        _redis_cpu(r.client),
        machine_busy_seconds(),
    )


def slope_mib_per_min(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (time s, RSS MiB) points, in MiB per minute."""
    if len(points) < 3:
        return None
    xs = [t / 60 for t, _ in points]
    ys = [v for _, v in points]
    if len(set(xs)) < 2:
        return None
    return round(statistics.linear_regression(xs, ys).slope, 3)


# --- the POSTs -------------------------------------------------------------------------------


@attrs.define
class Resets:
    """The POSTs seen so far, per key index (the probe and other keys apart)."""

    done: int = 0  # requests consumed
    per_key: dict[int, list[tuple[str, float, float]]] = attrs.Factory(
        lambda: defaultdict(list)
    )  # index -> [(reset_id, expired_at, received_at)]
    other: list[dict[str, Any]] = attrs.Factory(list)

    def update(self, r: Rig) -> None:
        reqs = r.backend.requests
        for q in reqs[self.done :]:
            body = q.json or {}
            key = str(body.get("key"))
            idx = key[2:] if key.startswith("c:") else ""
            if not idx.isdigit():
                self.other.append({"key": key, "received_at": q.received_at})
                continue
            self.per_key[int(idx)].append(
                (str(body.get("reset_id")), float(body.get("expired_at", 0)), q.received_at)
            )
        self.done = len(reqs)


# --- one run -------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    n, rate_e = args.counters, args.expiries
    span_s = n / rate_e
    log(
        f"steady: {n:,} counters, ~{rate_e:g} expiries/s (deadlines over {span_s:.0f} s), "
        f"{args.rearms:g} re-arms/s, {args.duration:g} s window after a {args.warmup:.0f} s "
        "warm-up"
    )
    with rig("steady") as r:
        client = r.client
        mem_empty = int(info(client, "memory")["used_memory"])
        t_load = time.time()
        t0 = t_load + args.warmup
        t0_ms, hi_ms = int(t0 * 1000), int((t0 + span_s) * 1000)
        rng = random.Random(args.seed)
        deadlines = array("q", (rng.randint(t0_ms, hi_ms) for _ in range(n)))
        load_keys(client, (f"c:{i}" for i in range(n)), pxat=lambda i: deadlines[i])
        load_s = time.time() - t_load
        log(f"  loaded {n:,} keys in {load_s:.1f} s; the window opens in {t0 - time.time():.1f} s")

        t_spawn = time.time()
        r1 = r.spawn("r1", log_level=args.log_level, lease_ttl_ms=args.lease_ms)
        cpu_reconcile = CpuWindow(r1.pid).start()
        wait_until(lambda: lease_holder(client) == "r1", 60, "r1 to lead", poll=0.01)
        r2 = (
            r.spawn("r2", log_level=args.log_level, lease_ttl_ms=args.lease_ms)
            if args.standby
            else None
        )
        if args.log_level.upper() in ("INFO", "DEBUG"):
            t_rec = wait_line(r1, RECONCILED, args.timeout)
        else:  # no 'reconciled' line: the deadline zset full stands for it (see million)
            t_rec = wait_until(
                lambda: time.time() if int(client.zcard(deadlines_key())) >= n else None,
                args.timeout,
                "every deadline recorded",
                poll=0.05,
            )
        reconcile = cpu_reconcile.stop()
        rss_reconciled = rss_mib(r1.pid)
        wait_leader_ready(r, timeout=60)
        t_ready = time.time()
        zcard = int(client.zcard(deadlines_key()))
        slack = t0 - t_ready
        log(
            f"  r1 reconciled {t_rec - t_spawn:.1f} s after its start ({reconcile['cpu_s']:.1f} "
            f"s CPU), RSS {rss_reconciled} MiB, {zcard:,} deadlines recorded; ready "
            f"{slack:.1f} s before the window"
        )
        idle = CpuWindow(r1.pid).start() if slack > 1.0 else None
        rearmer = Rearmer(
            r.server.client(),
            deadlines,
            rate=args.rearms,
            start=t0,
            duration=args.duration,
            horizon_ms=int(args.horizon * 1000),
            lo_ms=t0_ms,
            hi_ms=hi_ms,
            seed=args.seed + 1,
        )
        # This process hosts the recording backend and the driver: its full garbage
        # collections (30-40 ms after the load, ~250 ms late in a 1M run, every ~55 s)
        # stalled both, which showed as the worker's p99 spikes ~a minute apart. None
        # in the window; what the load left is frozen out of the final one.
        gc.freeze()
        gc.disable()
        rearmer.start()
        time.sleep(max(0.0, t0 - time.time()))
        idle_stats = idle.stop() if idle is not None else None
        driver_cpu0 = cpu_seconds(os.getpid())
        samples = [_sample(r, r1)]
        t_end = t0 + args.duration
        next_at = t0 + SAMPLE_S
        while next_at <= t_end + 0.5:
            time.sleep(max(0.0, next_at - time.time()))
            samples.append(_sample(r, r1))
            if not r1.alive:
                raise RuntimeError(f"the leader exited\n{r1.output()[-3000:]}")
            next_at += SAMPLE_S
        rearmer.join(30)
        rearmer.close()
        if rearmer.error is not None:
            raise RuntimeError("the re-arm driver failed") from rearmer.error
        driver_cpu_s = cpu_seconds(os.getpid()) - driver_cpu0

        # The expiries of the window: keys whose last deadline fell within it.
        end_ms = int(t_end * 1000)
        due = [i for i, dl in enumerate(deadlines) if t0_ms <= dl <= end_ms]
        resets = Resets()
        give_up = t_end + args.cap
        while time.time() < give_up:
            resets.update(r)
            if all(i in resets.per_key for i in due):
                time.sleep(1.0)  # late duplicates would show up here
                resets.update(r)
                break
            time.sleep(0.5)
        gc.enable()
        holder = lease_holder(client)
        rss_end, rss_peak = rss_mib(r1.pid), peak_rss_mib(r1.pid)
        standby_rss = rss_mib(r2.pid) if r2 is not None and r2.alive else None
        mem_end = int(info(client, "memory")["used_memory"])
        workers = {"r1": r1} | ({"r2": r2} if r2 is not None else {})
        problems_logged = {rid: log_problems(w) for rid, w in workers.items()}

    return _report(
        args,
        deadlines=deadlines,
        due=due,
        resets=resets,
        rearmer=rearmer,
        samples=samples,
        t0=t0,
        t_end=t_end,
        extra={
            "load_s": round(load_s, 2),
            "warmup_s": args.warmup,
            "leader_ready_before_window_s": round(slack, 3),
            "first_leader": {
                "spawn_to_reconciled_s": round(t_rec - t_spawn, 3),
                "cpu_s_to_reconciled": reconcile["cpu_s"],
                "rss_mib_at_reconciled": rss_reconciled,
                "deadlines_recorded_at_ready": zcard,
                "idle_cpu_pct_before_window": idle_stats["cpu_pct"] if idle_stats else None,
                "rss_mib_at_end": rss_end,
                "rss_peak_mib": rss_peak,
                "lease_holder_at_end": holder,
            },
            "standby": {"rss_mib_at_end": standby_rss} if args.standby else None,
            "redis_used_memory": {"empty": mem_empty, "end": mem_end},
            "driver_cpu_pct": round(100 * driver_cpu_s / (samples[-1].t - samples[0].t), 1),
            "log_problems": problems_logged,
        },
    )


def _report(
    args: argparse.Namespace,
    *,
    deadlines: array[int],
    due: list[int],
    resets: Resets,
    rearmer: Rearmer,
    samples: list[Sample],
    t0: float,
    t_end: float,
    extra: dict[str, Any],
) -> dict[str, Any]:
    # Every POST of a numbered key: its episode is the key's last deadline, or none.
    stale: list[dict[str, Any]] = []
    early = 0
    duplicate_posts = 0
    for i, posts in resets.per_key.items():
        dl = deadlines[i] if 0 <= i < len(deadlines) else None
        for reset_id, expired_at, received_at in posts:
            if dl is None or abs(expired_at * 1000 - dl) > MATCH_MS:
                stale.append(
                    {
                        "key": f"c:{i}",
                        "expired_at": expired_at,
                        "deadline": None if dl is None else dl / 1000,
                        "received_at": received_at,
                        "reset_id": reset_id,
                        "rearmed": i in rearmer.rearmed,
                    }
                )
            elif received_at * 1000 < dl:
                early += 1
        ids = {p[0] for p in posts}
        duplicate_posts += len(posts) - len(ids)

    lat: list[float] = []
    lat_expired_at: list[float] = []
    lat_rearmed: list[float] = []
    recorded_vs_driver: list[float] = []  # expired_at - the driver's deadline, re-armed keys
    missed: list[int] = []
    doubled = 0
    first_post: dict[int, float] = {}
    for i in due:
        due_s = deadlines[i] / 1000
        posts = [p for p in resets.per_key.get(i, []) if abs(p[1] - due_s) * 1000 <= MATCH_MS]
        if not posts:
            missed.append(i)
            lat.append(float("inf"))
            continue
        first = min(posts, key=lambda p: p[2])
        first_post[i] = first[2]
        doubled += len({p[0] for p in posts}) > 1
        lat.append(first[2] - due_s)
        lat_expired_at.append(first[2] - first[1])
        if i in rearmer.rearmed:
            lat_rearmed.append(first[2] - due_s)
            recorded_vs_driver.append(first[1] - due_s)

    window = samples[-1].t - samples[0].t
    posted_in_window = sum(1 for at in first_post.values() if t0 <= at <= t_end)
    s0, s1 = samples[0], samples[-1]
    leader_cpu_s = s1.leader_cpu_s - s0.leader_cpu_s
    redis_cpu_s = s1.redis_cpu_s - s0.redis_cpu_s
    rss_points = [(s.t - t0, s.rss_mib) for s in samples]
    half = [(t, v) for t, v in rss_points if t >= args.duration / 2]
    settled = [(t, v) for t, v in rss_points if t >= SETTLED_S]
    rss = {
        "samples": [[round(t, 1), v] for t, v in rss_points],
        "first": s0.rss_mib,
        "last": s1.rss_mib,
        "max": max(s.rss_mib for s in samples),
        "slope_mib_per_min": slope_mib_per_min(rss_points),
        "slope_second_half_mib_per_min": slope_mib_per_min(half),
        # From SETTLED_S on: the leader's per-claim memory has reached its size by then.
        "slope_settled_mib_per_min": slope_mib_per_min(settled),
    }
    per_reset = 1000 / posted_in_window if posted_in_window else None

    timeline = []
    by_bucket: dict[int, list[float]] = defaultdict(list)
    for i, v in zip(due, lat, strict=True):
        by_bucket[int((deadlines[i] / 1000 - t0) // SAMPLE_S)].append(v)
    for k, (a, b) in enumerate(itertools.pairwise(samples)):
        dt = b.t - a.t
        s = summarize(by_bucket.get(k, []), 1000)
        timeline.append(
            {
                "from_s": round(a.t - t0, 1),
                "rss_mib": b.rss_mib,
                "leader_cpu_pct": round(100 * (b.leader_cpu_s - a.leader_cpu_s) / dt, 1),
                "redis_cpu_pct": round(100 * (b.redis_cpu_s - a.redis_cpu_s) / dt, 1),
                "machine_busy_pct": round(100 * (b.busy_s - a.busy_s) / dt, 1),
                "due": s["n"],
                "p50_ms": s.get("p50"),
                "p99_ms": s.get("p99"),
                "max_ms": s.get("max"),
            }
        )

    result: dict[str, Any] = {
        "counters": args.counters,
        "window_s": round(window, 3),
        **extra,
        "rearms": {
            "done": rearmer.rearms,
            "per_s": round(rearmer.rearms / args.duration, 1),
            "skipped_no_far_key": rearmer.skipped,
            "keys_rearmed": len(rearmer.rearmed),
            "pipelines": rearmer.pipelines,
            "behind_schedule_max_ms": round(rearmer.behind_max_s * 1000, 1),
        },
        "resets": {
            "expiries_in_window": len(due),
            "expiries_per_s": round(len(due) / args.duration, 1),
            "expiries_of_rearmed_keys": len(lat_rearmed)
            + sum(i in rearmer.rearmed for i in missed),
            "posted": len(first_post),
            "resets_per_s_in_window": round(posted_in_window / window, 1),
            # Expiries of the window without a POST when it closed: the backlog then.
            "unreset_at_window_end": sum(1 for i in due if first_post.get(i, t_end + 1) > t_end),
            "missed": len(missed),
            "missed_examples": [(f"c:{i}", deadlines[i]) for i in missed[:5]],
            "doubled": doubled,
            "duplicate_posts": duplicate_posts,
            "stale_posts": len(stale),
            "stale_examples": stale[:5],
            "early_posts": early,
            "other_posts": len(resets.other),
            "posts_total": sum(len(p) for p in resets.per_key.values()),
            "latency_ms": summarize(lat, 1000),
            "latency_vs_expired_at_ms": summarize(lat_expired_at, 1000),
            "latency_rearmed_keys_ms": summarize(lat_rearmed, 1000),
            "expired_at_minus_driver_deadline_rearmed_ms": summarize(recorded_vs_driver, 1000),
        },
        "leader": {
            "rss_mib": rss,
            "cpu_s": round(leader_cpu_s, 3),
            "cpu_pct": round(100 * leader_cpu_s / window, 2),
            "cpu_ms_per_reset": round(leader_cpu_s * per_reset, 3) if per_reset else None,
            "cpu_ms_per_event": round(
                1000 * leader_cpu_s / max(1, posted_in_window + rearmer.rearms), 3
            ),
        },
        "redis": {
            "cpu_pct": round(100 * redis_cpu_s / window, 2),
            "cpu_ms_per_reset": round(redis_cpu_s * per_reset, 3) if per_reset else None,
        },
        "machine_busy_pct_of_one_core": round(100 * (s1.busy_s - s0.busy_s) / window, 1),
        "timeline": timeline,
    }
    res, led = result["resets"], result["leader"]
    log(
        f"  {res['expiries_in_window']} expiries in {window:.0f} s ({res['expiries_per_s']}/s), "
        f"{rearmer.rearms} re-arms: {res['missed']} missed, {res['doubled']} doubled, "
        f"{res['stale_posts']} stale, {res['early_posts']} early; latency p50 "
        f"{fmt_ms(res['latency_ms'].get('p50'))} p99 {fmt_ms(res['latency_ms'].get('p99'))} "
        f"max {fmt_ms(res['latency_ms'].get('max'))}"
    )
    log(
        f"  leader RSS {rss['first']} -> {rss['last']} MiB (max {rss['max']}, slope "
        f"{rss['slope_mib_per_min']} MiB/min; from {SETTLED_S:.0f} s on "
        f"{rss['slope_settled_mib_per_min']}), CPU {led['cpu_pct']} % of a core "
        f"({led['cpu_ms_per_reset']} ms per reset); Redis CPU {result['redis']['cpu_pct']} %"
    )
    return result


def _problems(run: dict[str, Any]) -> list[str]:
    problems = []
    res = run["resets"]
    if res["missed"] or res["doubled"] or res["stale_posts"] or res["early_posts"]:
        problems.append(
            f"{res['missed']} missed, {res['doubled']} doubled, {res['stale_posts']} stale, "
            f"{res['early_posts']} early"
        )
    if res["resets_per_s_in_window"] < 0.95 * res["expiries_per_s"]:
        problems.append(
            f"the leader fell behind: {res['resets_per_s_in_window']} resets/s for "
            f"{res['expiries_per_s']} expiries/s, {res['unreset_at_window_end']} not reset when "
            "the window closed"
        )
    p99 = res["latency_ms"].get("p99")
    if p99 is None or p99 > TARGET_P99_MS:
        problems.append(f"reset latency p99 {p99} ms > {TARGET_P99_MS:.0f} ms")
    slope = run["leader"]["rss_mib"]["slope_settled_mib_per_min"]
    if slope is not None and slope > RSS_SLOPE_LIMIT:
        problems.append(
            f"leader RSS grew {slope} MiB/min after {SETTLED_S:.0f} s (> {RSS_SLOPE_LIMIT} MiB/min)"
        )
    if run["leader_ready_before_window_s"] < 0:
        problems.append(
            f"the leader was ready {-run['leader_ready_before_window_s']:.1f} s after the "
            "window opened: raise --warmup"
        )
    if run["first_leader"]["lease_holder_at_end"] != "r1":
        problems.append(f"the lease moved to {run['first_leader']['lease_holder_at_end']}")
    if run["rearms"]["skipped_no_far_key"]:
        problems.append(
            f"{run['rearms']['skipped_no_far_key']} re-arms found no key far enough out"
        )
    if run["rearms"]["behind_schedule_max_ms"] > 100:
        problems.append(
            f"the re-arm driver fell {run['rearms']['behind_schedule_max_ms']} ms behind"
        )
    if any(run["log_problems"].values()):
        problems.append("a worker logged warnings")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counters", type=int, help="default 1,000,000")
    parser.add_argument("--expiries", type=float, help="expiries per s, as loaded (default 800)")
    parser.add_argument("--rearms", type=float, help="re-arms per s (default 1,000)")
    parser.add_argument("--duration", type=float, help="measured window, s (default 300)")
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="s from the load's start to the window (default 5 + 45 per million counters)",
    )
    parser.add_argument(
        "--horizon", type=float, default=60.0, help="re-arm only keys due later than this, s"
    )
    parser.add_argument(
        "--cap", type=float, default=10.0, help="s after the window to wait for its resets"
    )
    parser.add_argument("--standby", action="store_true", help="run a standby replica too")
    parser.add_argument("--log-level", default="INFO", help="the workers' LOG_LEVEL")
    parser.add_argument("--lease-ms", type=int, default=3000)
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="longest wait for the reconcile, s"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--name", default="steady", help="results go to bench/results/<name>.json")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 50,000 counters, 200 expiries/s, 200 re-arms/s, 30 s (options given win)",
    )
    args = parser.parse_args()
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:  # an option given wins over the preset
            setattr(args, name, value)
    if args.warmup is None:
        args.warmup = 5.0 + 45.0 * args.counters / 1_000_000
    if args.counters / args.expiries < args.duration + args.horizon:
        parser.error("counters / expiries (the deadlines' span, s) must exceed duration + horizon")
    t_start = time.monotonic()
    result = run(args)
    write_result(
        args.name,
        {
            "params": {
                **{k: v for k, v in vars(args).items() if k != "name"},
                "sample_s": SAMPLE_S,
                "match_ms": MATCH_MS,
                "target_p99_ms": TARGET_P99_MS,
                "rss_slope_limit_mib_per_min": RSS_SLOPE_LIMIT,
            },
            "elapsed_s": round(time.monotonic() - t_start, 1),
            "run": result,
            "problems": _problems(result),
        },
    )


if __name__ == "__main__":
    main()
