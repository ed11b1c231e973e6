"""This worker beside BullMQ's debounce pattern, in one run, sides alternating.

The peer: a BullMQ delayed job per counter, added with ``delay`` and ``deduplication:
{id: <counter>, ttl: delay, extend: true, replace: true}`` (each activity pushes the job
back and replaces its data), ``removeOnComplete``; a BullMQ Worker at concurrency =
MAX_IN_FLIGHT POSTs the same request (headers and body fields) to the same
RecordingBackend. Its driver is bench/peer/driver.cjs; bullmq and ioredis are installed
with npm, at the pinned versions below, into a scratch folder (``$TCW_BENCH_NODE_DIR``,
default ``~/.cache/tcw-bench/bullmq-<version>``) the first time, never into the repo.

Per round, each side gets its own fresh redis-server and backend (bench/common.py's
``rig``); the sides alternate, worker first in even rounds and BullMQ first in odd ones,
so a drift of the machine's load weighs on both. On one rig per side:

- **idle**: a few counters due 100 ms apart; lateness = POST received - planned due;
- **burst**: N counters due within 1 s, armed ``LEAD_S`` ahead. Arming (from the first
  SET / add until Redis holds them all: the worker's deadline zset, BullMQ's delayed
  zset) gives Redis memory per armed counter (``used_memory`` delta / N) and commands
  per counter (``INFO commandstats`` deltas, commands run inside scripts included, the
  bench's own polls taken out); the drain (until every POST is in and nothing is left
  pending) gives CPU per reset (the worker processes' utime + stime / N), commands per
  reset, lateness and RSS;
- **steady**: ``counters`` counters, each armed every 10 s, for ``--steady`` s: 45 % of
  the arms with a short TTL (they expire), the rest outlasting the period (re-armed in
  time), the 1M steady run's mix; lateness of the expiries, missed and doubled against
  the plan, CPU per reset of the worker processes (re-arms included: this worker tracks
  each; a BullMQ worker never sees a re-arm, the producer's add script in Redis does that
  work) and of Redis.

Then **failover**, on a rig of its own per side: 2 processes (this worker also 3), 500
counters due over 10 s; 3 s in, the process that sent the last POST is SIGKILLed
(this worker: the leader; BullMQ: one of the two workers sharing the jobs). The longest
lateness, the gap kill -> next POST, missed (no POST within ``FAILOVER_CAP_S`` of the
last due) and doubled (two POSTs for a counter).

Every metric's median per side over the rounds and the ratio worker / BullMQ go to the
table and to bench/results/peer.json (``--quick``: peer-quick.json).

    .venv/bin/python -m bench.peer                 # 3 rounds, ~5 minutes on 2 cores
    .venv/bin/python -m bench.peer --quick         # 1 round, smaller, ~1 minute
    .venv/bin/python -m bench.peer --sides worker  # this worker only (bench/compare.py)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import attrs

from .common import (
    LONG_TTL_MS,
    ROOT,
    SECRET,
    SHORT_TTL_MS,
    PacedDriver,
    Rig,
    cpu_seconds,
    deadlines_key,
    fmt_ms,
    info,
    lease_holder,
    log,
    machine_busy_seconds,
    pending_key,
    rig,
    rss_mib,
    summarize,
    wait_leader_ready,
    wait_until,
    write_result,
)
from .comparison import Metric, Row, compare_rows, median, render_table

BULLMQ_VERSION = "6.7.6"
IOREDIS_VERSION = "5.11.1"
NODE_DIR_ENV = "TCW_BENCH_NODE_DIR"
DRIVER = ROOT / "bench" / "peer" / "driver.cjs"
MAX_IN_FLIGHT = 32
QUEUE_PREFIX = "bull:resets:"  # driver.cjs's queue, under BullMQ's default prefix

IDLE_KEYS, IDLE_GAP_MS = 20, 100
# A burst's first due, after arming starts: time to arm them all on a busy machine.
LEAD_S, LEAD_S_PER_COUNTER = 2.0, 0.0005
SPREAD_S = 1.0
STEADY_PERIOD_S = 10.0  # a counter is re-armed this often: a long TTL outlasts it
# The 1M steady run's mix (800 expiries and 1,000 re-arms a second): 45 % of the arms get
# a short TTL and expire before their counter's next arm, the rest are re-armed in time.
STEADY_SHORT_SHARE = 0.45
FAILOVER_KEYS, FAILOVER_SPREAD_S, KILL_AFTER_S = 500, 10.0, 3.0
FAILOVER_CAP_S = 8.0  # after the last due: a 3 s lease runs out well within it
DRAIN_CAP_S = 60.0
STEADY_GRACE_S = 5.0
READY_TIMEOUT = 60.0


# --- the pure parts (tests/test_bench_peer.py) -------------------------------------------


@attrs.frozen
class Arm:
    """One activity the bench sent: counter ``key`` armed at ``sent_ms`` to fall due at
    ``due_ms`` (both wall clock, ms)."""

    key: str
    sent_ms: int
    due_ms: int


def expected_resets(arms: Iterable[Arm], until_ms: int) -> set[tuple[str, int]]:
    """(key, due_ms) of every arm that should end in a reset due by ``until_ms``: one that
    no later arm of its key reached before it fell due."""
    by_key: dict[str, list[Arm]] = defaultdict(list)
    for a in arms:
        by_key[a.key].append(a)
    out = set()
    for key, seq in by_key.items():
        seq.sort(key=lambda a: a.sent_ms)
        for a, nxt in itertools.zip_longest(seq, seq[1:]):
            if a.due_ms <= until_ms and (nxt is None or nxt.sent_ms > a.due_ms):
                out.add((key, a.due_ms))
    return out


def command_deltas(
    before: Mapping[str, Any], after: Mapping[str, Any], own: Mapping[str, int]
) -> dict[str, int]:
    """Calls per command between two ``INFO commandstats`` readings, less ``own`` (the
    bench's own polls, by lower-case command name; INFO is always the bench's)."""
    out = {}
    for name, stat in after.items():
        if not name.startswith("cmdstat_"):
            continue
        cmd = name.removeprefix("cmdstat_")
        calls = int(stat["calls"]) - int(before.get(name, {"calls": 0})["calls"]) - own.get(cmd, 0)
        if calls and cmd != "info":
            out[cmd] = calls
    return dict(sorted(out.items()))


def lateness_ms(
    posts: Iterable[tuple[float, Mapping[str, Any]]], due_ms: Mapping[str, int]
) -> list[float]:
    """Per planned counter, first POST received - its planned due, in ms (``inf``: none)."""
    first: dict[str, float] = {}
    for at, body in posts:
        first.setdefault(str(body.get("key")), at)
    return [(first[k] * 1000 - d) if k in first else float("inf") for k, d in due_ms.items()]


def delivery_counts(
    got: Iterable[tuple[float, Mapping[str, Any]]], due_ms: Mapping[str, int]
) -> tuple[int, int, int]:
    """(missed, doubled, redelivered) among the planned counters: no POST; POSTs under two
    reset_ids (two resets); one reset_id POSTed again (a retry the backend dedupes, as
    after a sender died between its POST and marking it sent)."""
    ids: dict[str, Counter[str]] = defaultdict(Counter)
    for _, body in got:
        ids[str(body.get("key"))][str(body.get("reset_id"))] += 1
    missed = sum(1 for k in due_ms if not ids.get(k))
    doubled = sum(1 for k in due_ms if len(ids.get(k, ())) > 1)
    redelivered = sum(1 for k in due_ms if any(c > 1 for c in ids.get(k, Counter()).values()))
    return missed, doubled, redelivered


def episode(body: Mapping[str, Any]) -> tuple[str, int]:
    """(key, due_ms) of a reset POST's body, as :func:`expected_resets` names them."""
    return str(body.get("key")), round(float(body.get("expired_at", 0)) * 1000)


def episodes(got: Iterable[tuple[float, Mapping[str, Any]]]) -> set[tuple[str, int]]:
    return {episode(b) for _, b in got}


def side_metrics(sc: Mapping[str, Any]) -> list[tuple[Metric, float | None]]:
    """The figures of one side's round, as compare's metrics (lower is better)."""

    def get(*path: str) -> float | None:
        d: Any = sc
        for p in path:
            if not isinstance(d, Mapping) or p not in d:
                return None
            d = d[p]
        return float(d) if isinstance(d, int | float) else None

    rows: list[tuple[str, str, tuple[str, ...]]] = [
        ("idle: lateness p50", "ms", ("idle", "lateness_ms", "p50")),
        ("idle: lateness p99", "ms", ("idle", "lateness_ms", "p99")),
        ("burst: lateness p50", "ms", ("burst", "lateness_ms", "p50")),
        ("burst: lateness p99", "ms", ("burst", "lateness_ms", "p99")),
        ("burst: drain", "s", ("burst", "drain_s")),
        ("burst: CPU per reset", "ms", ("burst", "cpu_ms_per_reset")),
        ("burst: Redis CPU per reset", "ms", ("burst", "redis_cpu_ms_per_reset")),
        ("burst: RSS after", "MiB", ("burst", "rss_mib")),
        ("Redis memory per armed counter", "B", ("burst", "redis_bytes_per_counter")),
        ("Redis commands per counter armed", "", ("burst", "commands_per_counter")),
        ("Redis commands per reset", "", ("burst", "commands_per_reset")),
        ("steady: lateness p50", "ms", ("steady", "lateness_ms", "p50")),
        ("steady: lateness p99", "ms", ("steady", "lateness_ms", "p99")),
        ("steady: CPU per reset", "ms", ("steady", "cpu_ms_per_reset")),
        ("steady: Redis CPU per reset", "ms", ("steady", "redis_cpu_ms_per_reset")),
        ("steady: workers + Redis CPU per reset", "ms", ("steady", "with_redis_cpu_ms_per_reset")),
        ("steady: missed + doubled", "", ("steady", "missed_plus_doubled")),
    ]
    for n in (2, 3):
        tag = f"failover ({n}): "
        rows += [
            (tag + "longest lateness", "ms", (f"failover_{n}", "longest_lateness_ms")),
            (tag + "kill -> next POST", "ms", (f"failover_{n}", "kill_to_next_post_ms")),
            (tag + "missed + doubled", "", (f"failover_{n}", "missed_plus_doubled")),
        ]
    return [(Metric(name, unit, True), get(*path)) for name, unit, path in rows]


# --- BullMQ, installed on demand -----------------------------------------------------------


def node_modules() -> Path:
    """The scratch install of the pinned bullmq and ioredis (made with npm if missing)."""
    base = os.environ.get(NODE_DIR_ENV) or Path.home() / ".cache" / "tcw-bench"
    where = Path(base) / f"bullmq-{BULLMQ_VERSION}-ioredis-{IOREDIS_VERSION}"
    marker = where / "node_modules" / "bullmq" / "package.json"
    if marker.exists() and json.loads(marker.read_text())["version"] == BULLMQ_VERSION:
        return where / "node_modules"
    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        raise RuntimeError("the BullMQ side needs node and npm on PATH (or run --sides worker)")
    where.mkdir(parents=True, exist_ok=True)
    (where / "package.json").write_text('{"private": true}\n')
    log(f"installing bullmq@{BULLMQ_VERSION} ioredis@{IOREDIS_VERSION} into {where}")
    subprocess.run(
        [
            npm,
            "install",
            "--no-audit",
            "--no-fund",
            "--ignore-scripts",
            "--save-exact",
            f"bullmq@{BULLMQ_VERSION}",
            f"ioredis@{IOREDIS_VERSION}",
        ],
        cwd=where,
        check=True,
        capture_output=True,
        timeout=300,
    )
    return where / "node_modules"


# --- the two sides -------------------------------------------------------------------------


class Side:
    """What the scenarios need of a side: processes to measure, a way to arm counters, and
    Redis's view of armed and pending work. ``polls`` counts the bench's own commands."""

    name = ""

    def __init__(self, r: Rig) -> None:
        self.r = r
        self.polls: Counter[str] = Counter()

    def start(self, processes: int) -> None:
        raise NotImplementedError

    def pids(self) -> dict[str, int]:
        """Process id per replica / worker id, of the live ones."""
        raise NotImplementedError

    def kill(self, replica: str) -> None:
        raise NotImplementedError

    def arm(self, jobs: Sequence[tuple[str, int]], *, wait: bool) -> None:
        raise NotImplementedError

    def armed(self) -> int:
        raise NotImplementedError

    def idle(self) -> bool:
        """Nothing pending or in flight."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop what :meth:`start` started beyond the rig's own workers."""

    def producer_cpu_s(self) -> float:
        """CPU of a producer process of the side's own (BullMQ's: queue.add is its
        client's work); 0 when the bench's own client arms the counters."""
        return 0.0

    def cpu_s(self) -> float:
        return sum(cpu_seconds(p) for p in self.pids().values())

    def rss(self) -> float:
        return round(sum(rss_mib(p) for p in self.pids().values()), 2)


class WorkerSide(Side):
    """This worker: ``python -m trio_counter_worker run`` replicas; counters are SET with
    PXAT by the bench's own client."""

    name = "worker"

    def start(self, processes: int) -> None:
        self.procs = {f"r{i}": self.r.spawn(f"r{i}") for i in range(1, processes + 1)}
        wait_leader_ready(self.r)

    def pids(self) -> dict[str, int]:
        return {rid: w.pid for rid, w in self.procs.items() if w.alive}

    def kill(self, replica: str) -> None:
        self.procs[replica].kill()

    def arm(self, jobs: Sequence[tuple[str, int]], *, wait: bool) -> None:
        pipe = self.r.client.pipeline(transaction=False)
        for key, due in jobs:
            pipe.set(key, "1", pxat=due)
        pipe.execute()

    def armed(self) -> int:
        self.polls["zcard"] += 1
        return int(self.r.client.zcard(deadlines_key()))

    def idle(self) -> bool:
        self.polls["hlen"] += 1
        return int(self.r.client.hlen(pending_key())) == 0


class BullSide(Side):
    """BullMQ: ``processes`` Worker processes and one producer, all node driver.cjs."""

    name = "bullmq"

    def start(self, processes: int) -> None:
        env = {**os.environ, "NODE_PATH": str(node_modules())}
        port = self.r.server.port
        self.workers: dict[str, subprocess.Popen[str]] = {}
        self._logs: list[IO[str]] = []
        for i in range(1, processes + 1):
            cfg = {
                "port": port,
                "url": self.r.backend.url,
                "secret": SECRET,
                "concurrency": MAX_IN_FLIGHT,
                "id": f"w{i}",
            }
            self.workers[f"w{i}"] = self._node("worker", cfg, env, f"w{i}")
        self.producer = self._node("producer", {"port": port}, env, "producer", stdin=True)
        for proc in [*self.workers.values(), self.producer]:
            self._ready(proc)
        # The same proof as the worker side's probe: one job through the whole path.
        self.arm([("c:probe", int(time.time() * 1000) + 200)], wait=True)
        wait_until(lambda: self.r.backend.requests, 30, "the probe job's POST")
        wait_until(self.idle, 30, "the probe job to complete")
        self.r.backend.clear()

    def _node(
        self, role: str, cfg: dict[str, Any], env: dict[str, str], name: str, stdin: bool = False
    ) -> subprocess.Popen[str]:
        err = (self.r.tmp / f"{name}.err").open("w")
        self._logs.append(err)
        return subprocess.Popen(
            ["node", str(DRIVER), role, json.dumps(cfg)],
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=env,
        )

    def _ready(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()  # node prints "ready" or exits
        if line != "ready":
            raise RuntimeError(f"BullMQ driver not ready ({line!r}): see {self.r.tmp}/*.err")

    def pids(self) -> dict[str, int]:
        return {wid: p.pid for wid, p in self.workers.items() if p.poll() is None}

    def kill(self, replica: str) -> None:
        self.workers[replica].send_signal(signal.SIGKILL)
        self.workers[replica].wait()

    def arm(self, jobs: Sequence[tuple[str, int]], *, wait: bool) -> None:
        assert self.producer.stdin is not None
        assert self.producer.stdout is not None
        self.producer.stdin.write(json.dumps({"jobs": list(jobs), "ack": wait}) + "\n")
        self.producer.stdin.flush()
        if wait and not self.producer.stdout.readline():
            raise RuntimeError(f"BullMQ producer exited: see {self.r.tmp}/producer.err")

    def armed(self) -> int:
        self.polls["zcard"] += 1
        return int(self.r.client.zcard(QUEUE_PREFIX + "delayed"))

    def idle(self) -> bool:
        pipe = self.r.client.pipeline(transaction=False)
        for name in ("wait", "active"):
            pipe.llen(QUEUE_PREFIX + name)
        pipe.zcard(QUEUE_PREFIX + "delayed")
        self.polls.update({"llen": 2, "zcard": 1})
        return not any(pipe.execute())

    def producer_cpu_s(self) -> float:
        return cpu_seconds(self.producer.pid)

    def close(self) -> None:
        for proc in [*self.workers.values(), self.producer]:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()
        for f in self._logs:
            f.close()


SIDES: dict[str, type[Side]] = {"worker": WorkerSide, "bullmq": BullSide}


# --- scenarios -----------------------------------------------------------------------------


def now_ms() -> int:
    return int(time.time() * 1000)


def redis_cpu_s(r: Rig) -> float:
    return cpu_seconds(r.server.pid or 0)


def posts(r: Rig, since: int = 0) -> list[tuple[float, dict[str, Any]]]:
    return [(q.received_at, q.json or {}) for q in r.backend.requests[since:]]


def wait_posts(r: Rig, keys: Iterable[str], cap_s: float) -> None:
    """Until every one of ``keys`` has a POST, or ``cap_s`` s have passed."""
    want = set(keys)
    deadline = time.monotonic() + cap_s
    while time.monotonic() < deadline:
        if want <= {str(b.get("key")) for _, b in posts(r)}:
            return
        time.sleep(0.02)


def idle_scenario(side: Side) -> dict[str, Any]:
    r = side.r
    start = now_ms() + 500
    due = {f"c:idle{i}": start + i * IDLE_GAP_MS for i in range(IDLE_KEYS)}
    side.arm(list(due.items()), wait=True)
    wait_posts(r, due, IDLE_KEYS * IDLE_GAP_MS / 1000 + 10)
    out = {"keys": IDLE_KEYS, "lateness_ms": summarize(lateness_ms(posts(r), due))}
    r.backend.clear()
    return out


def burst_scenario(side: Side, n: int) -> dict[str, Any]:
    r = side.r
    client = r.client
    side.polls.clear()
    mem0 = int(info(client, "memory")["used_memory"])
    cmd0 = info(client, "commandstats")
    lead_s = LEAD_S + LEAD_S_PER_COUNTER * n
    first = now_ms() + int(lead_s * 1000)
    due = {f"c:{i}": first + i * int(SPREAD_S * 1000) // n for i in range(n)}
    t_arm = time.time()
    side.arm(list(due.items()), wait=True)
    # Armed: Redis holds every deadline; unless the first fell due before (then the
    # drain has begun and the figures below are flagged).
    wait_until(
        lambda: side.armed() >= n or time.time() * 1000 >= first,
        lead_s + 30,
        "every counter armed",
        poll=0.01,
    )
    armed_after_s = time.time() - t_arm
    mem1 = int(info(client, "memory")["used_memory"])
    cmd1 = info(client, "commandstats")
    arm_cmds = command_deltas(cmd0, cmd1, side.polls)
    side.polls.clear()
    cpu0, busy0, redis0 = side.cpu_s(), machine_busy_seconds(), redis_cpu_s(r)
    t0 = time.monotonic()
    wait_posts(r, due, LEAD_S + DRAIN_CAP_S)
    wait_until(side.idle, 30, "nothing pending after the burst", poll=0.01)
    wall = time.monotonic() - t0
    cpu = side.cpu_s() - cpu0
    busy = machine_busy_seconds() - busy0
    redis_cpu = redis_cpu_s(r) - redis0
    drain_cmds = command_deltas(cmd1, info(client, "commandstats"), side.polls)
    got = posts(r)
    missed, doubled, redelivered = delivery_counts(got, due)
    received = sorted(at for at, _ in got)
    out = {
        "counters": n,
        "armed_after_s": round(armed_after_s, 3),
        "lead_s": lead_s,
        "armed_before_first_due": armed_after_s < lead_s,
        "redis_bytes_per_counter": round((mem1 - mem0) / n, 1),
        "commands_per_counter": round(sum(arm_cmds.values()) / n, 2),
        "arm_commands": arm_cmds,
        "lateness_ms": summarize(lateness_ms(got, due)),
        "drain_s": round(received[-1] - first / 1000, 3) if received else None,
        "cpu_ms_per_reset": round(1000 * cpu / n, 3),
        "redis_cpu_ms_per_reset": round(1000 * redis_cpu / n, 3),
        "cpu_pct": round(100 * cpu / wall, 1),
        "machine_busy_pct": round(100 * busy / wall, 1),
        "commands_per_reset": round(sum(drain_cmds.values()) / n, 2),
        "drain_commands": drain_cmds,
        "rss_mib": side.rss(),
        "missed": missed,
        "doubled": doubled,
        "redelivered": redelivered,
    }
    r.backend.clear()
    return out


class Rearmer(PacedDriver):
    """Counter ``j % counters`` armed at item j: a short TTL (it expires) with
    STEADY_SHORT_SHARE, else one outlasting the period (re-armed in time)."""

    def __init__(self, side: Side, counters: int, duration: float, seed: int) -> None:
        rate = counters / STEADY_PERIOD_S
        super().__init__(
            "peer-rearmer", rate=rate, start=time.time() + 0.2, duration=duration, seed=seed
        )
        self.side, self.counters = side, counters
        self.arms: list[Arm] = []

    def drive(self) -> None:
        for now, items in self.ticks():
            sent = int(now * 1000)
            batch = [(f"c:s{j % self.counters}", sent + self._ttl_ms()) for j in items]
            self.side.arm(batch, wait=False)
            self.arms += [Arm(k, sent, d) for k, d in batch]

    def _ttl_ms(self) -> int:
        short = self._rng.random() < STEADY_SHORT_SHARE
        return self._rng.randint(*(SHORT_TTL_MS if short else LONG_TTL_MS))


def steady_scenario(side: Side, counters: int, duration: float, seed: int) -> dict[str, Any]:
    r = side.r
    driver = Rearmer(side, counters, duration, seed)
    cpu0, busy0, t0 = side.cpu_s(), machine_busy_seconds(), time.monotonic()
    redis0, producer0 = redis_cpu_s(r), side.producer_cpu_s()
    driver.start()
    driver.join(duration + 30)
    stop_ms = now_ms()
    expected = expected_resets(driver.arms, stop_ms)
    # The last of them fell due at the stop; a late one is counted missed, not waited for.
    deadline = time.monotonic() + STEADY_GRACE_S
    while time.monotonic() < deadline and not expected <= episodes(posts(r)):
        time.sleep(0.05)
    wall = time.monotonic() - t0
    cpu = side.cpu_s() - cpu0
    busy = machine_busy_seconds() - busy0
    redis_cpu = redis_cpu_s(r) - redis0
    got = [(at, b) for at, b in posts(r) if float(b.get("expired_at", 0)) * 1000 <= stop_ms]
    seen = Counter(episode(b) for _, b in got)
    lat = [at * 1000 - float(b["expired_at"]) * 1000 for at, b in got]
    missed = len(expected - set(seen))
    doubled = sum(1 for c in seen.values() if c > 1)
    return {
        "counters": counters,
        "arms_per_s": counters / STEADY_PERIOD_S,
        "duration_s": duration,
        "driver_error": repr(driver.error) if driver.error else None,
        "driver_behind_max_s": round(driver.behind_max_s, 3),
        "expected_resets": len(expected),
        "resets": len(got),
        "missed": missed,
        "doubled": doubled,
        "unexpected": len(set(seen) - expected),
        "missed_plus_doubled": missed + doubled,
        "lateness_ms": summarize(lat),
        "cpu_ms_per_reset": round(1000 * cpu / len(got), 3) if got else None,
        "redis_cpu_ms_per_reset": round(1000 * redis_cpu / len(got), 3) if got else None,
        "with_redis_cpu_ms_per_reset": (
            round(1000 * (cpu + redis_cpu) / len(got), 3) if got else None
        ),
        "producer_cpu_ms_per_reset": (
            round(1000 * (side.producer_cpu_s() - producer0) / len(got), 3) if got else None
        ),
        "cpu_pct": round(100 * cpu / wall, 1),
        "machine_busy_pct": round(100 * busy / wall, 1),
        "rss_mib": side.rss(),
    }


def failover_scenario(cls: type[Side], processes: int) -> dict[str, Any]:
    with rig(f"peer-failover-{cls.name}") as r:
        side = cls(r)
        try:
            side.start(processes)
            first = now_ms() + 1000
            step = int(FAILOVER_SPREAD_S * 1000) // FAILOVER_KEYS
            due = {f"c:f{i}": first + i * step for i in range(FAILOVER_KEYS)}
            side.arm(list(due.items()), wait=True)
            kill_at = first / 1000 + KILL_AFTER_S
            time.sleep(max(0.0, kill_at - time.time()))
            sent = posts(r)
            victim = str(sent[-1][1].get("replica_id")) if sent else next(iter(side.pids()))
            killed_at = time.time()
            side.kill(victim)
            wait_posts(r, due, max(due.values()) / 1000 - time.time() + FAILOVER_CAP_S)
        finally:
            side.close()
        got = posts(r)
        after = [at for at, b in got if at > killed_at and b.get("replica_id") != victim]
        lat = lateness_ms(got, due)
        missed, doubled, redelivered = delivery_counts(got, due)
        out: dict[str, Any] = {
            "processes": processes,
            "killed": victim,
            "leader_after": lease_holder(r.client) if cls is WorkerSide else None,
            "longest_lateness_ms": round(max((v for v in lat if v != float("inf")), default=0), 1),
            "kill_to_next_post_ms": round((min(after) - killed_at) * 1000, 1) if after else None,
            "missed": missed,
            "doubled": doubled,
            "redelivered": redelivered,
            "missed_plus_doubled": missed + doubled,
            "lateness_ms": summarize(lat),
        }
    log(
        f"  {cls.name} failover ({processes}): longest {fmt_ms(out['longest_lateness_ms'])}, "
        f"kill -> next POST {fmt_ms(out['kill_to_next_post_ms'])}, "
        f"missed {missed}, doubled {doubled}, redelivered {redelivered}"
    )
    return out


def run_side(cls: type[Side], p: argparse.Namespace, seed: int) -> dict[str, Any]:
    log(f"{cls.name}: idle, burst of {p.burst:,}, steady {p.counters:,} counters")
    with rig(f"peer-{cls.name}") as r:
        side = cls(r)
        try:
            side.start(1)
            out: dict[str, Any] = {
                "rss_mib_start": side.rss(),
                "idle": idle_scenario(side),
                "burst": burst_scenario(side, p.burst),
                "steady": steady_scenario(side, p.counters, p.steady, seed),
            }
        finally:
            side.close()
    b, s = out["burst"], out["steady"]
    log(
        f"  {cls.name}: idle p50 {fmt_ms(out['idle']['lateness_ms'].get('p50'))}; burst "
        f"p50 {fmt_ms(b['lateness_ms'].get('p50'))}, {b['cpu_ms_per_reset']} ms CPU/reset, "
        f"{b['redis_bytes_per_counter']} B/counter, {b['commands_per_counter']} cmds/counter, "
        f"{b['commands_per_reset']} cmds/reset; steady p50 "
        f"{fmt_ms(s['lateness_ms'].get('p50'))}, {s['cpu_ms_per_reset']} ms CPU/reset, "
        f"missed {s['missed']}, doubled {s['doubled']}"
    )
    for n in p.failover[cls.name]:
        out[f"failover_{n}"] = failover_scenario(cls, n)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--burst", type=int, default=10_000, help="counters due in 1 s")
    parser.add_argument("--counters", type=int, default=5_000, help="steady: counters")
    parser.add_argument("--steady", type=float, default=10.0, help="steady: seconds")
    parser.add_argument("--sides", nargs="+", choices=list(SIDES), default=list(SIDES))
    parser.add_argument("--quick", action="store_true", help="1 round, 2,000 / 2,000 / 6 s")
    parser.add_argument("--name", help="results file bench/results/NAME.json")
    p = parser.parse_args()
    if p.quick:
        p.rounds, p.burst, p.counters, p.steady = 1, 2_000, 2_000, 6.0
    p.failover = {"worker": (2,) if p.quick else (2, 3), "bullmq": (2,)}
    if "bullmq" in p.sides:
        node_modules()
    t0 = time.monotonic()
    busy0 = machine_busy_seconds()
    rounds: list[dict[str, Any]] = []
    for rnd in range(p.rounds):
        order = p.sides if rnd % 2 == 0 else p.sides[::-1]
        rounds.append({name: run_side(SIDES[name], p, seed=rnd) for name in order})
    wall = time.monotonic() - t0
    values = {s: [{m.name: v for m, v in side_metrics(rd[s])} for rd in rounds] for s in p.sides}
    metrics = [m for m, _ in side_metrics({})]
    rows: list[Row] = []
    if len(p.sides) == 2:
        rows = compare_rows("peer", metrics, values["worker"], values["bullmq"])
        print(render_table(rows, "this worker", f"BullMQ {BULLMQ_VERSION}"))
    write_result(
        p.name or ("peer-quick" if p.quick else "peer"),
        {
            "params": {
                "rounds": p.rounds,
                "order": "round r: worker, bullmq if r is even, else bullmq, worker",
                "sides": p.sides,
                "bullmq": BULLMQ_VERSION,
                "ioredis": IOREDIS_VERSION,
                "max_in_flight": MAX_IN_FLIGHT,
                "idle": {"keys": IDLE_KEYS, "gap_ms": IDLE_GAP_MS},
                "burst": {"counters": p.burst, "spread_s": SPREAD_S},
                "steady": {
                    "counters": p.counters,
                    "period_s": STEADY_PERIOD_S,
                    "duration_s": p.steady,
                },
                "failover": {
                    "keys": FAILOVER_KEYS,
                    "spread_s": FAILOVER_SPREAD_S,
                    "kill_after_s": KILL_AFTER_S,
                    "processes": p.failover,
                },
            },
            "wall_s": round(wall, 1),
            "machine_busy_pct": round(100 * (machine_busy_seconds() - busy0) / wall, 1),
            "medians": {s: {m.name: _median(values[s], m.name) for m in metrics} for s in p.sides},
            "rows": [
                {
                    "metric": r.metric.name,
                    "unit": r.metric.unit,
                    "worker": list(r.new),
                    "bullmq": list(r.old),
                    "worker_median": r.new_median,
                    "bullmq_median": r.old_median,
                    "ratio_worker_over_bullmq": None if r.ratio is None else round(r.ratio, 3),
                    "verdict": r.verdict,
                }
                for r in rows
            ],
            "rounds": rounds,
        },
    )


def _median(rows: Sequence[Mapping[str, float | None]], name: str) -> float | None:
    return median([row.get(name) for row in rows])


if __name__ == "__main__":
    main()
