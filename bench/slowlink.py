"""Slow link: does the leader keep up when Redis is a round trip of 50 ms away?

The worker reaches Redis through a FaultProxy (``trio_counter_worker.lab.faultproxy``;
run as its own process, so it shares no interpreter with the driver), forwarding as is (+0 ms) or
delaying every chunk 25 ms each way (+50 ms per round trip). The app (the driver)
writes to Redis directly, on loopback:

- 1,000 ``SET c:i 1 PXAT <deadline>`` per second over 10,000 keys, each key re-armed
  every 10 s; 95 % of SETs carry a TTL of 10.5-13 s (re-armed in time: no episode), 5 %
  one of 0.5-4 s (the key expires before its next SET: one episode, ~50 a second);
- after ``--duration`` s the app stops and deletes every key not due within 1 s (a
  delete is no episode); the episodes left still count.

From the app's SETs, each key's episodes are known exactly: a SET whose deadline passes
before the key's next SET (or delete). From the backend's POSTs: **missed** (an episode
with no POST within ``--cap`` s), **doubled** (two reset_ids for one episode),
**stale** (a POST for no episode: a key re-armed or deleted in time), duplicate POSTs of
one reset_id, and **reset latency** (POST received - deadline). **Deadline recorded**
lag: for every 10th SET, a driver thread polls ``ZSCORE tcw:{c:*}:deadlines <key>``
(every ~2 ms, directly) until it shows that SET's deadline; never recorded before the
deadline counts as infinite. During the +50 ms runs a second replica stands by and the
leader gets SIGTERM halfway: the episodes and samples around the handoff are reported
apart as well as in the totals.

Each run is made with the working tree's worker and with the base commit's (checked out
with ``git worktree add`` in a temp dir; the same settings), alternately in one
invocation, a fresh Redis, proxy and backend for every run: +0 new, +0 old, +50 new,
+50 old (the next round starts with old).

    .venv/bin/python -m bench.slowlink [--quick] [--duration 30] [--rounds 1]
    .venv/bin/python -m bench.slowlink --codes new --one-way-ms 25 --log-level INFO \
        --keep-logs /tmp/slowlink-logs     # one variant, with the workers' logs kept
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import math
import shutil
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs

from tests.support import WorkerProcess
from trio_counter_worker.lab.faultproxy import FaultProxy
from trio_counter_worker.lab.servers import RedisServer

from .common import (
    BASE_COMMIT,
    LONG_TTL_MS,
    ROOT,
    SHORT_SHARE,
    SHORT_TTL_MS,
    CpuWindow,
    PacedDriver,
    Rig,
    WorkerCode,
    code_at,
    cpu_seconds,
    deadlines_key,
    draw_ttl_ms,
    fmt_ms,
    info,
    lease_holder,
    log,
    log_problems,
    machine_busy_seconds,
    measured_code,
    numsub,
    ratio,
    release_channel,
    rig,
    summarize,
    wait_leader_ready,
    wait_until,
    write_result,
)

SAMPLE_EVERY = 10
AMBIGUOUS_S = 0.05  # a next SET this close to the deadline: expired or not, undecidable
DELETE_AFTER_S = 1.0  # at the end, keys due later than this are deleted
HANDOFF_WINDOW_S = (-1.0, 5.0)  # around the SIGTERM (after: from the takeover)
LAG_POLL_S = 0.002
CONN_SAMPLE_S = 0.5
TARGET_P99_MS_BASE = 50.0  # reset latency p99 target: 50 ms + 3 round trips


# --- the proxy, in a process of its own ------------------------------------------------


def serve_proxy(target_port: int, one_way_ms: float) -> None:
    """Proxy to Redis on ``target_port`` until stdin closes; print the port first."""
    with FaultProxy("127.0.0.1", target_port) as proxy:
        if one_way_ms:
            proxy.delay(one_way_ms / 1000)
        print(proxy.port, flush=True)
        sys.stdin.read()


@contextlib.contextmanager
def proxy_process(target_port: int, one_way_ms: float) -> Iterator[tuple[int, int]]:
    """A FaultProxy process in front of Redis: yields (its port, its pid)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.slowlink",
            "--serve-proxy",
            str(target_port),
            "--one-way-ms",
            str(one_way_ms),
        ],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        yield int(proc.stdout.readline()), proc.pid
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- the app and the observers ---------------------------------------------------------


@attrs.define
class SetRecord:
    key: str
    at: float  # time.time() just before the pipeline holding it was sent
    deadline_ms: int


class App(PacedDriver):
    """SETs at ``rate`` per second over ``keys`` keys, round robin, from ``start`` for
    ``duration`` s; every SAMPLE_EVERY-th SET is handed to ``watcher``."""

    def __init__(
        self,
        server: RedisServer,
        keys: int,
        rate: float,
        start: float,
        duration: float,
        seed: int,
        watcher: DeadlineWatcher,
    ) -> None:
        super().__init__("app", rate=rate, start=start, duration=duration, seed=seed)
        self._server = server
        self._keys = keys
        self._watcher = watcher
        self.sets: list[SetRecord] = []

    def drive(self) -> None:
        order = list(range(self._keys))
        self._rng.shuffle(order)
        client = self._server.client()
        try:
            for now, due in self.ticks():
                pipe = client.pipeline(transaction=False)
                batch = []
                for i in due:
                    ttl = draw_ttl_ms(self._rng)
                    rec = SetRecord(f"c:{order[i % self._keys]}", now, int(now * 1000) + ttl)
                    pipe.set(rec.key, "1", pxat=rec.deadline_ms)
                    batch.append((i, rec))
                pipe.execute()
                for i, rec in batch:
                    self.sets.append(rec)
                    if i % SAMPLE_EVERY == 0:
                        self._watcher.add(rec)
        finally:
            client.close()


class DeadlineWatcher(threading.Thread):
    """Polls the deadline zset for sampled SETs until each shows its deadline; also
    samples the pub/sub clients' output buffers."""

    def __init__(self, server: RedisServer) -> None:
        super().__init__(name="deadline-watcher", daemon=True)
        self._server = server
        self._lock = threading.Lock()
        self._pending: dict[str, SetRecord] = {}
        self.lags: list[tuple[float, float]] = []  # (set at, lag s; inf: never recorded)
        self.superseded = 0
        self.polls = 0
        self.omem_max = 0  # bytes, any pub/sub client
        self.pubsub_clients: set[int] = set()  # client ids seen (a new id: a reconnect)
        self._stop_flag = threading.Event()
        self.error: BaseException | None = None

    def add(self, rec: SetRecord) -> None:
        with self._lock:
            old = self._pending.get(rec.key)
            if old is not None:
                self.superseded += 1
                self.lags.append((old.at, float("inf")))
            self._pending[rec.key] = rec

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:
            self.error = exc

    def _run(self) -> None:
        client = self._server.client()
        key = deadlines_key()
        next_conn_sample = 0.0
        try:
            while not self._stop_flag.is_set():
                with self._lock:
                    pending = list(self._pending.values())
                if pending:
                    pipe = client.pipeline(transaction=False)
                    for rec in pending:
                        pipe.zscore(key, rec.key)
                    scores = pipe.execute()
                    now = time.time()
                    self.polls += 1
                    with self._lock:
                        for rec, score in zip(pending, scores, strict=True):
                            if self._pending.get(rec.key) is not rec:
                                continue
                            if score is not None and int(score) == rec.deadline_ms:
                                self.lags.append((rec.at, now - rec.at))
                            elif now * 1000 >= rec.deadline_ms:
                                self.lags.append((rec.at, float("inf")))
                            else:
                                continue
                            del self._pending[rec.key]
                if time.monotonic() >= next_conn_sample:
                    next_conn_sample = time.monotonic() + CONN_SAMPLE_S
                    rows: Any = client.client_list(_type="pubsub")
                    for row in rows:
                        self.omem_max = max(self.omem_max, int(row.get("omem", 0)))
                        self.pubsub_clients.add(int(row["id"]))
                time.sleep(LAG_POLL_S)
        finally:
            client.close()

    def stop(self) -> None:
        self._stop_flag.set()
        self.join(5)


# --- one run -----------------------------------------------------------------------------


@attrs.define
class Episode:
    """A SET whose deadline passed before the key's next SET or delete: the key expired."""

    key: str
    set_at: float
    deadline_ms: int
    tail: bool  # due after the app stopped
    reset_ids: set[str] = attrs.Factory(set)
    posts: int = 0
    first_post: float | None = None
    early: bool = False  # a POST's expired_at came before the deadline (by > 1 ms)


@attrs.define
class Handoff:
    victim: str
    term_at: float
    takeover_at: float | None = None
    new_leader: str | None = None
    victim_exit: int | None = None


def run_once(
    code: WorkerCode, one_way_ms: float, handoff: bool, args: argparse.Namespace, seed: int
) -> dict[str, Any]:
    rtt = 2 * one_way_ms
    log(
        f"slowlink: +{rtt:.0f} ms RTT, {code.label} worker ({code.commit})"
        + (", SIGTERM handoff halfway" if handoff else "")
    )
    with (
        rig(f"slowlink-{rtt:.0f}-{code.label}") as r,
        proxy_process(r.server.port, one_way_ms) as (proxy_port, proxy_pid),
    ):
        env = {"REDIS_PORT": str(proxy_port)}
        workers = {"r1": r.spawn("r1", code=code, log_level=args.log_level, extra_env=env)}
        leader = wait_leader_ready(r, timeout=60)
        if handoff:
            workers["r2"] = r.spawn("r2", code=code, log_level=args.log_level, extra_env=env)
            wait_until(
                lambda: numsub(r.client, release_channel()) >= 2,
                60,
                "the standby's subscription to the release channel",
            )
        try:
            return _measure(r, code, rtt, workers, leader, proxy_pid, handoff, args, seed)
        finally:
            if args.keep_logs is not None:
                dest = args.keep_logs / f"{rtt:.0f}ms-{code.label}"
                dest.mkdir(parents=True, exist_ok=True)
                for path in r.tmp.glob("*.log"):
                    shutil.copy(path, dest / path.name)


def _measure(
    r: Rig,
    code: WorkerCode,
    rtt: float,
    workers: dict[str, WorkerProcess],
    leader: str,
    proxy_pid: int,
    handoff: bool,
    args: argparse.Namespace,
    seed: int,
) -> dict[str, Any]:
    watcher = DeadlineWatcher(r.server)
    watcher.start()
    start = time.time() + 0.5
    app = App(r.server, args.keys, args.rate, start, args.duration, seed, watcher)
    cpu = {rid: CpuWindow(w.pid).start() for rid, w in workers.items()}
    proxy_cpu0, busy0, t0 = cpu_seconds(proxy_pid), machine_busy_seconds(), time.monotonic()
    calls0 = _script_calls(r)
    app.start()
    switch: Handoff | None = None
    if handoff:
        time.sleep(max(0.0, start + args.duration / 2 - time.time()))
        switch = _handoff(r, workers, leader)
    app.join()
    if app.error is not None:
        raise RuntimeError("the app thread failed") from app.error
    stop = time.time()

    # The end: delete every key not due within DELETE_AFTER_S (no episode).
    latest: dict[str, SetRecord] = {}
    for rec in app.sets:
        latest[rec.key] = rec
    now_ms = time.time() * 1000
    doomed = [k for k, rec in latest.items() if rec.deadline_ms > now_ms + DELETE_AFTER_S * 1000]
    deleted_at = time.time()
    pipe = r.client.pipeline(transaction=False)
    for k in doomed:
        pipe.delete(k)
    pipe.execute()
    histories, ambiguous = _histories(app.sets, set(doomed), deleted_at, stop)
    episodes = sorted(
        (e for h in histories.values() for e in h.episodes if e is not None),
        key=lambda e: e.deadline_ms,
    )
    last = max((e.deadline_ms for e in episodes), default=0) / 1000

    def arrived() -> int:
        keys = {q.key for q in r.backend.requests}
        return sum(1 for e in episodes if e.key in keys)

    while time.time() < last + args.cap and arrived() < len(episodes):
        time.sleep(0.2)
    time.sleep(1.0)  # late duplicates would show up here
    watcher.stop()
    if watcher.error is not None:
        raise RuntimeError("the watcher thread failed") from watcher.error
    wall = time.monotonic() - t0
    script_calls = _script_calls(r) - calls0
    cpu_stats = {rid: c.stop() for rid, c in cpu.items() if workers[rid].alive}
    proxy_cpu_pct = round(100 * (cpu_seconds(proxy_pid) - proxy_cpu0) / wall, 1)
    busy_pct = round(100 * (machine_busy_seconds() - busy0) / wall, 1)

    stale = _match(histories, r.backend.requests)
    causes: dict[str, int] = defaultdict(int)
    for row in stale:
        causes[row["cause"]] += 1
    window = None
    if switch is not None:
        end = switch.takeover_at if switch.takeover_at is not None else switch.term_at
        window = (switch.term_at + HANDOFF_WINDOW_S[0], end + HANDOFF_WINDOW_S[1])

    def near(t: float) -> bool:
        return window is not None and window[0] <= t <= window[1]

    steady = [e for e in episodes if not e.tail and not near(e.deadline_ms / 1000)]
    around = [e for e in episodes if not e.tail and near(e.deadline_ms / 1000)]
    tail = [e for e in episodes if e.tail]
    lags_steady = [lag for at, lag in watcher.lags if not near(at)]
    lags_around = [lag for at, lag in watcher.lags if near(at)]
    result: dict[str, Any] = {
        "code": code.label,
        "commit": code.commit,
        "rtt_ms": rtt,
        "sets": len(app.sets),
        "set_rate_per_s": round(len(app.sets) / args.duration, 1),
        "app_behind_schedule_max_ms": round(app.behind_max_s * 1000, 1),
        "keys_deleted_at_end": len(doomed),
        "ambiguous_sets": ambiguous,
        "episodes": _tally(episodes),
        "steady": _tally(steady),
        "handoff_window": _tally(around) if switch is not None else None,
        "tail": _tally(tail),
        "missed_detail": _missed_detail(
            episodes, histories, switch.term_at if switch is not None else start
        ),
        "stale_posts": len(stale),
        "stale_by_cause": dict(causes),
        "stale_examples": stale[:10],
        "deadline_recorded_lag_ms": summarize(lags_steady, 1000),
        "deadline_recorded_lag_ms_handoff_window": (
            summarize(lags_around, 1000) if switch is not None else None
        ),
        "lag_samples_superseded": watcher.superseded,
        "lag_polls_per_s": round(watcher.polls / wall, 1),
        "pubsub_omem_max_bytes": watcher.omem_max,
        "pubsub_client_ids_seen": len(watcher.pubsub_clients),
        "handoff": attrs.asdict(switch) if switch is not None else None,
        # The slowest resets around the handoff: (deadline - SIGTERM, latency), in s.
        "handoff_slowest": sorted(
            (
                (
                    round(e.deadline_ms / 1000 - switch.term_at, 3),
                    round(e.first_post - e.deadline_ms / 1000, 3) if e.first_post else None,
                )
                for e in around
            ),
            key=lambda x: -math.inf if x[1] is None else -x[1],
        )[:10]
        if switch is not None
        else None,
        # Deadline recorded lag over the run: per 5 s of SETs, p50 / p99 / never, in ms.
        "deadline_recorded_lag_by_5s": _buckets(watcher.lags, start, 5.0),
        "worker_cpu": cpu_stats,
        "proxy_cpu_pct": proxy_cpu_pct,
        "worker_script_calls_per_s": round(script_calls / wall, 1),
        "machine_busy_pct_of_one_core": busy_pct,
        "log_problems": {rid: log_problems(w, limit=30) for rid, w in workers.items()},
    }
    s, lag = result["steady"], result["deadline_recorded_lag_ms"]
    log(
        f"  {len(app.sets)} SETs, {len(episodes)} episodes: {result['episodes']['missed']} "
        f"missed, {result['episodes']['doubled']} doubled, {len(stale)} stale; steady "
        f"reset latency p50 {fmt_ms(s['latency_ms'].get('p50'))} p99 "
        f"{fmt_ms(s['latency_ms'].get('p99'))} max {fmt_ms(s['latency_ms'].get('max'))}; "
        f"deadline recorded p50 {fmt_ms(lag.get('p50'))} p99 {fmt_ms(lag.get('p99'))}"
    )
    if switch is not None and result["handoff_window"] is not None:
        h = result["handoff_window"]
        log(
            f"  handoff: new leader {switch.new_leader} after "
            f"{fmt_ms(((switch.takeover_at or switch.term_at) - switch.term_at) * 1000)}; "
            f"{h['n']} episodes around it, {h['missed']} missed, {h['doubled']} doubled, "
            f"latency max {fmt_ms(h['latency_ms'].get('max'))}"
        )
    return result


def _missed_detail(
    episodes: list[Episode], histories: dict[str, History], origin: float
) -> list[dict[str, Any]]:
    """The first missed episodes, with the key's SET before the episode's: times in s
    from ``origin`` (the SIGTERM if there was a handoff, else the first SET)."""
    rows = []
    for e in (e for e in episodes if e.first_post is None):
        h = histories[e.key]
        i = h.set_times.index(e.set_at)
        row: dict[str, Any] = {
            "key": e.key,
            "set": round(e.set_at - origin, 3),
            "deadline": round(e.deadline_ms / 1000 - origin, 3),
        }
        if i > 0:
            prev = h.sets[i - 1]
            row["previous_set"] = round(prev.at - origin, 3)
            row["previous_deadline"] = round(prev.deadline_ms / 1000 - origin, 3)
        rows.append(row)
        if len(rows) == 10:
            break
    return rows


def _script_calls(r: Rig) -> int:
    """EVALSHA + EVAL calls Redis has served (the workers' scripts)."""
    stats = info(r.client, "commandstats")
    return sum(
        int(stats.get(k, {"calls": 0})["calls"]) for k in ("cmdstat_evalsha", "cmdstat_eval")
    )


def _buckets(lags: list[tuple[float, float]], start: float, width: float) -> list[dict[str, Any]]:
    per: dict[int, list[float]] = defaultdict(list)
    for at, lag in lags:
        per[int((at - start) // width)].append(lag)
    rows = []
    for b in sorted(per):
        s = summarize(per[b], 1000)
        rows.append(
            {
                "from_s": b * width,
                "n": s["n"],
                "p50": s.get("p50"),
                "p99": s.get("p99"),
                "never": s["n"] - s["arrived"],
            }
        )
    return rows


def _handoff(r: Rig, workers: dict[str, WorkerProcess], leader: str) -> Handoff:
    victim = lease_holder(r.client) or leader
    switch = Handoff(victim, time.time())
    workers[victim].terminate()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        holder = lease_holder(r.client)
        if holder is not None and holder != victim:
            switch.takeover_at, switch.new_leader = time.time(), holder
            break
        time.sleep(0.001)
    with contextlib.suppress(AssertionError):
        switch.victim_exit = workers[victim].wait(15)
    return switch


@attrs.define
class History:
    """Every SET of one key, in order, each with its episode if it ended in one."""

    set_times: list[float] = attrs.Factory(list)
    sets: list[SetRecord] = attrs.Factory(list)
    episodes: list[Episode | None] = attrs.Factory(list)
    deleted: bool = False


def _histories(
    sets: list[SetRecord], deleted: set[str], deleted_at: float, stop: float
) -> tuple[dict[str, History], int]:
    """Each key's SETs and episodes; how many SETs were too close to call."""
    out: dict[str, History] = defaultdict(History)
    for rec in sets:
        h = out[rec.key]
        h.set_times.append(rec.at)
        h.sets.append(rec)
    ambiguous = 0
    for key, h in out.items():
        h.deleted = key in deleted
        for i, rec in enumerate(h.sets):
            if i + 1 < len(h.sets):
                nxt = h.sets[i + 1].at
            else:
                nxt = deleted_at if h.deleted else float("inf")
            due = rec.deadline_ms / 1000
            episode = None
            if nxt > due + AMBIGUOUS_S:
                episode = Episode(key, rec.at, rec.deadline_ms, tail=due > stop)
            elif nxt >= due - AMBIGUOUS_S:
                ambiguous += 1
            h.episodes.append(episode)
    return out, ambiguous


def _match(histories: dict[str, History], requests: list[Any]) -> list[dict[str, Any]]:
    """Attribute each POST to an episode: the one of the key's last SET before the POST's
    expired_at (the episode is that SET's, whatever expired_at says: a leader that had
    not seen the SET yet may claim it under the previous deadline). A POST fits no
    episode when that SET was re-armed or deleted in time, or there is none: those are
    returned, each with why."""
    stale: list[dict[str, Any]] = []
    for q in requests:
        body = q.json or {}
        key = str(body.get("key"))
        if key == "c:probe":
            continue
        expired = float(body.get("expired_at", 0))
        h = histories.get(key)
        i = bisect.bisect_right(h.set_times, expired + 0.001) - 1 if h is not None else -1
        e = h.episodes[i] if h is not None and i >= 0 else None
        if h is None or e is None:
            if h is None or i < 0:
                cause = "before the key's first SET"
            elif h.deleted and i == len(h.sets) - 1:
                cause = "deleted by the app before its deadline"
            else:
                cause = "re-armed before its deadline"
            row = {
                "key": key,
                "expired_at": body.get("expired_at"),
                "received_at": q.received_at,
                "reset_id": body.get("reset_id"),
                "cause": cause,
            }
            if h is not None and len(stale) < 10:
                row["sets_around"] = [
                    (round(rec.at, 3), rec.deadline_ms)
                    for rec in h.sets
                    if abs(rec.at - expired) < 15
                ]
            stale.append(row)
            continue
        e.reset_ids.add(str(body.get("reset_id")))
        e.posts += 1
        if e.first_post is None or q.received_at < e.first_post:
            e.first_post = q.received_at
        e.early = e.early or expired * 1000 < e.deadline_ms - 1
    return stale


def _tally(episodes: list[Episode]) -> dict[str, Any]:
    lat = [
        (e.first_post - e.deadline_ms / 1000) if e.first_post is not None else float("inf")
        for e in episodes
    ]
    missed = [e for e in episodes if e.first_post is None]
    return {
        "n": len(episodes),
        "missed": len(missed),
        "missed_examples": [(e.key, e.deadline_ms) for e in missed[:5]],
        "doubled": sum(1 for e in episodes if len(e.reset_ids) > 1),
        "duplicate_posts": sum(e.posts - len(e.reset_ids) for e in episodes),
        # Claimed under an earlier deadline by a leader that had not seen the last SET.
        "expired_at_early": sum(1 for e in episodes if e.early),
        "latency_ms": summarize(lat, 1000),
    }


# --- main ----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=1000.0, help="app SETs per s")
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of SETs per run")
    parser.add_argument(
        "--one-way-ms",
        type=float,
        nargs="+",
        default=[0.0, 25.0],
        help="proxy delay each way (default 0 and 25: +0 and +50 ms RTT)",
    )
    parser.add_argument(
        "--cap", type=float, default=10.0, help="seconds after the last deadline to wait for resets"
    )
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--base", default=BASE_COMMIT, help="the commit to compare with")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--codes",
        nargs="+",
        choices=["new", "old"],
        default=["new", "old"],
        help="which workers to run (default both, alternately)",
    )
    parser.add_argument(
        "--no-handoff", action="store_true", help="no standby and no SIGTERM in the delayed runs"
    )
    parser.add_argument("--log-level", default="WARNING", help="the workers' LOG_LEVEL")
    parser.add_argument(
        "--keep-logs",
        type=Path,
        metavar="DIR",
        help="copy the workers' logs to DIR/<rtt>ms-<code>/",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 15 s of SETs")
    parser.add_argument("--serve-proxy", type=int, metavar="REDIS_PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_proxy is not None:
        serve_proxy(args.serve_proxy, args.one_way_ms[0])
        return
    if args.quick:
        args.duration = 15.0
    if args.keys / args.rate >= LONG_TTL_MS[0] / 1000:
        parser.error(
            f"keys / rate (a key's re-arm period) must be under the long TTL ({LONG_TTL_MS[0]} ms)"
        )
    runs: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        new = measured_code()
        old = stack.enter_context(code_at(args.base))
        for rnd in range(args.rounds):
            codes = [
                c for c in ((new, old) if rnd % 2 == 0 else (old, new)) if c.label in args.codes
            ]
            for one_way in args.one_way_ms:
                for code in codes:
                    run = run_once(
                        code, one_way, one_way > 0 and not args.no_handoff, args, args.seed + rnd
                    )
                    run["round"] = rnd
                    runs.append(run)
    write_result(
        "slowlink",
        {
            "params": {
                "rate_per_s": args.rate,
                "keys": args.keys,
                "duration_s": args.duration,
                "one_way_ms": args.one_way_ms,
                "cap_s": args.cap,
                "rounds": args.rounds,
                "base_commit": old.commit,
                "seed": args.seed,
                "short_ttl_ms": SHORT_TTL_MS,
                "long_ttl_ms": LONG_TTL_MS,
                "short_share": SHORT_SHARE,
                "lag_sample_every": SAMPLE_EVERY,
                "handoff_window_s": HANDOFF_WINDOW_S,
            },
            "runs": runs,
            "ratios_new_over_old": _ratios(runs),
            "problems": _problems(runs),
        },
    )


def _ratios(runs: list[dict[str, Any]]) -> dict[str, list[float | None]]:
    out: dict[str, list[float | None]] = {}
    for rtt in sorted({run["rtt_ms"] for run in runs}):
        for rnd in sorted({run["round"] for run in runs}):
            pair = {
                run["code"]: run for run in runs if run["rtt_ms"] == rtt and run["round"] == rnd
            }
            if set(pair) != {"new", "old"}:
                continue
            for what, path in (
                ("reset p50", ("steady", "latency_ms", "p50")),
                ("reset p99", ("steady", "latency_ms", "p99")),
                ("recorded p50", ("deadline_recorded_lag_ms", "p50")),
                ("recorded p99", ("deadline_recorded_lag_ms", "p99")),
                ("missed", ("episodes", "missed")),
            ):
                out.setdefault(f"+{rtt:.0f} ms {what} new/old", []).append(
                    ratio(_dig(pair["new"], path), _dig(pair["old"], path))
                )
    return out


def _dig(run: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = run
    for name in path:
        value = value.get(name) if isinstance(value, dict) else None
    return value


def _problems(runs: list[dict[str, Any]]) -> list[str]:
    problems = []
    for run in runs:
        if run["code"] != "new":
            continue
        tag = f"+{run['rtt_ms']:.0f} ms round {run['round']}"
        e = run["episodes"]
        if e["missed"] or e["doubled"] or run["stale_posts"]:
            problems.append(
                f"{tag}: {e['missed']} missed, {e['doubled']} doubled, {run['stale_posts']} stale"
            )
        p99 = run["steady"]["latency_ms"].get("p99")
        target = TARGET_P99_MS_BASE + 3 * run["rtt_ms"]
        if p99 is None or p99 > target:
            problems.append(f"{tag}: reset latency p99 {p99} ms > {target:.0f} ms")
        if any(run["log_problems"].values()):
            problems.append(f"{tag}: a worker logged warnings")
    return problems


if __name__ == "__main__":
    main()
