"""Touch vs plain SET (issue #13): what 1,000 activities a second cost the leader and Redis.

The app (the driver, on loopback, default user) marks activity on 10,000 keys ``c:i``,
1,000 times a second, round robin (each key re-armed every 10 s), in one of three ways:

- ``set``: ``SET c:i 1 PX <ttl>``; the leader learns of it from keyspace notifications
  (it sets ``notify-keyspace-events`` itself) and runs its TRACK script;
- ``touch``: ``FCALL tcw_touch 1 c:i <ttl>``; the function records the deadline and
  publishes the key on ``tcw:{c:*}:touched``; notifications stay on, as the leader sets
  them;
- ``touch-nonotify``: the same FCALL with ``notify-keyspace-events ""``. The worker's
  Redis user lacks ``+config|set`` (an ACL, as on managed Redis services that fix the
  flags), so the leader cannot turn them back on: it says so (ERROR) and falls back to
  what it does without notifications, a rescan every 5 s, while it hears of touched
  keys on the channel.

95 % of activities carry a TTL of 10.5-13 s (re-armed in time: no episode), 5 % one of
0.5-4 s (the key expires before its next activity: an episode and a reset, ~50 a
second). Before the measured window every key is armed once (TTL 30 s) by the same
method and the leader has recorded all 10,000 deadlines, so the window is steady state.
Every worker uses an ACL user (``acl_rule`` of the README, plus the registry and
``+fcall_ro +function|load`` so the leader can install the library at takeover); only
``touch-nonotify`` drops ``+config|set``.

Measured over the window (the app's ``--duration`` seconds), per variant:

- **leader CPU**: utime + stime of the leader process from ``/proc/<pid>/stat``, as % of
  a core and as CPU ms per 1,000 activities;
- **Redis commands**: ``INFO commandstats`` and ``total_commands_processed`` deltas
  (the driver's own two INFO calls taken out). Redis counts the commands a script or
  function runs too, so the table splits round trips (the app's SET/FCALL, the worker's
  EVALSHA, SCAN, CONFIG GET, ...) from commands run inside scripts and functions;
- **Redis CPU**: ``used_cpu_sys + used_cpu_user`` deltas (all of Redis's work: the app's
  commands, the functions, the worker's scripts, publishing notifications);
- the leader's ``tcw_activity_events_total{source}`` (notification / touch messages it
  received, from its ``/metrics``), network bytes out of Redis;
- **resets**: each episode (an activity whose deadline passed before the key's next
  one) must get one POST: missed (none within ``--cap`` s), doubled, stale POSTs, and
  latency POST received - ``expired_at`` (the deadline Redis recorded: the same clock).

After the window the app ends every key not due within 1 s (``DEL``, or
``FCALL tcw_done``) so the run ends without a burst of 10,000 expiries, and the
episodes left are waited for.

Variants alternate within one invocation, a fresh Redis, backend and leader for every
run, the order reversed in odd rounds (set, touch, touch-nonotify, then
touch-nonotify, touch, set): ratios touch/set are taken within each round.

    .venv/bin/python -m bench.touch [--quick] [--duration 25] [--rounds 2]
    .venv/bin/python -m bench.touch --variants set touch --rounds 4 --name touch-4rounds
"""

from __future__ import annotations

import argparse
import bisect
import re
import secrets
import time
from collections import defaultdict
from typing import Any

import attrs
import httpx
import redis

from tests.support import WorkerProcess
from trio_counter_worker import functions, keys
from trio_counter_worker.acl import acl_rule
from trio_counter_worker.lab.servers import free_port

from .common import (
    LONG_TTL_MS,
    SECRET,
    SHORT_SHARE,
    SHORT_TTL_MS,
    CpuWindow,
    PacedDriver,
    Rig,
    deadlines_key,
    draw_ttl_ms,
    fmt_ms,
    info,
    lease_holder,
    log,
    log_problems,
    machine_busy_seconds,
    numpat,
    ratio,
    rig,
    summarize,
    wait_until,
    write_result,
)

COUNTER_KEY = "c:*"
NAMESPACE = functions.namespace_of(COUNTER_KEY)
SEED_TTL_MS = 30_000  # the arming pass before the window: outlives the first re-arm
SEED_CHUNK = 1000
DELETE_AFTER_S = 1.0  # at the end, keys due later than this are ended by the app
LEASE_TTL_MS = 3000
# Commands that only run inside the worker's scripts or the tcw functions in these runs
# (commandstats counts them too); everything else is a round trip. The app's own SETs
# (set variant) are counted apart: ``set`` also runs inside scripts and functions.
INNER = {
    "time",
    "hget",
    "hgetall",
    "pexpire",
    "pexpiretime",
    "pttl",
    "incr",
    "set",
    "del",
    "hset",
    "publish",
    "zadd",
    "zscore",
    "zrem",
    "hsetnx",
    "hdel",
    "zrange",
    "get",
    "hexists",
    "hkeys",
    "zremrangebyscore",
}
# The ERROR a leader logs when it may not turn notifications back on (touch-nonotify).
EXPECTED_NONOTIFY = re.compile(r"notify-keyspace-events|keyspace notifications", re.I)


@attrs.frozen
class Variant:
    name: str
    touch: bool  # FCALL tcw_touch (else SET PX)
    notifications: bool  # the leader may set notify-keyspace-events


VARIANTS = {
    "set": Variant("set", touch=False, notifications=True),
    "touch": Variant("touch", touch=True, notifications=True),
    "touch-nonotify": Variant("touch-nonotify", touch=True, notifications=False),
}


# --- the app ----------------------------------------------------------------------------


@attrs.define
class Activity:
    key: str
    at: float  # time.time() just before the pipeline holding it was sent
    deadline_ms: int  # tcw_touch's answer; for SET, at + ttl (within one pipeline's time)


def mark(pipe: Any, variant: Variant, key: str, ttl_ms: int) -> None:
    """One activity, the variant's way, into ``pipe``."""
    if variant.touch:
        pipe.fcall("tcw_touch", 1, key, ttl_ms)
    else:
        pipe.set(key, "1", px=ttl_ms)


def end(pipe: Any, variant: Variant, key: str) -> None:
    """The app ends a key's episode: no reset."""
    if variant.touch:
        pipe.fcall("tcw_done", 1, key)
    else:
        pipe.delete(key)


class App(PacedDriver):
    """``rate`` activities a second over ``keys`` keys, round robin in a shuffled order,
    from ``start`` for ``duration`` s, pipelined every millisecond tick."""

    def __init__(
        self,
        port: int,
        variant: Variant,
        keys: int,
        rate: float,
        start: float,
        duration: float,
        seed: int,
    ) -> None:
        super().__init__("app", rate=rate, start=start, duration=duration, seed=seed)
        self._port = port
        self._variant = variant
        self._keys = keys
        self.activities: list[Activity] = []
        self.unmatched = 0  # tcw_touch answers matching no deployment (must stay 0)
        self.claimed_by_touch = 0  # episodes tcw_touch found ended unseen and claimed
        self.pipelines = 0

    def drive(self) -> None:
        order = list(range(self._keys))
        self._rng.shuffle(order)
        client = redis.Redis(port=self._port, decode_responses=True)
        try:
            for now, due in self.ticks(poll=0.0005):
                pipe = client.pipeline(transaction=False)
                batch = []
                for i in due:
                    ttl = draw_ttl_ms(self._rng)
                    key = f"c:{order[i % self._keys]}"
                    mark(pipe, self._variant, key, ttl)
                    batch.append((key, ttl))
                replies = pipe.execute()
                self.pipelines += 1
                for (key, ttl), reply in zip(batch, replies, strict=True):
                    if self._variant.touch:
                        deadline, matched, claimed = (int(x) for x in reply)
                        self.unmatched += matched != 1
                        self.claimed_by_touch += claimed
                    else:
                        deadline = int(now * 1000) + ttl
                    self.activities.append(Activity(key, now, deadline))
        finally:
            client.close()


# --- the rig for one variant -------------------------------------------------------------


def worker_user(r: Rig, variant: Variant) -> str:
    """An ACL user for the worker; ``+config|set`` only if the variant allows
    notifications. Returns its password."""
    password = secrets.token_hex(8)
    rule = acl_rule(COUNTER_KEY, NAMESPACE, 0).split()
    if not variant.notifications:
        rule = [part for part in rule if part != "+config|set"]
    rule += [f"~{keys.REGISTRY}", "+fcall_ro", "+function|load"]
    r.client.execute_command("ACL", "SETUSER", "worker", "reset", "on", f">{password}", *rule)
    return password


def spawn(r: Rig, replica_id: str, password: str, health_port: int) -> WorkerProcess:
    env = {
        "REDIS_URL": f"redis://worker:{password}@127.0.0.1:{r.server.port}/0",
        "RESET_ENDPOINT_URL": r.backend.url,
        "RESET_SECRET": SECRET,
        "COUNTER_KEY": COUNTER_KEY,
        "LEASE_TTL_MS": str(LEASE_TTL_MS),
        "REPLICA_ID": replica_id,
        "LOG_LEVEL": "WARNING",
        "HEALTH_PORT": str(health_port),
        "HEALTH_HOST": "127.0.0.1",
    }
    worker = WorkerProcess(env, r.tmp / f"{replica_id}.log")
    worker.start()
    r.workers.append(worker)
    return worker


def metrics(port: int) -> dict[str, float]:
    """The leader's counters this benchmark reads, from its /metrics."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        for name in (
            "tcw_activity_events_total",
            "tcw_reset_attempts_total",
            "tcw_decision_backlog",
        ):
            if line.startswith(name):
                labels, _, value = line.partition(" ")
                out[labels] = float(value)
    return out


def wait_ready(r: Rig, variant: Variant) -> str:
    """A leader, subscribed, the library loaded and this deployment registered; then one
    probe key marked the variant's way must come back as a POST (not kept)."""
    leader = wait_until(lambda: lease_holder(r.client, COUNTER_KEY), 30, "a leader")
    wait_until(lambda: numpat(r.client) >= 1, 30, "the leader's keyspace subscription")
    wait_until(
        lambda: r.client.hget(keys.REGISTRY, NAMESPACE),
        30,
        "the leader's registration of the deployment",
    )
    pipe = r.client.pipeline(transaction=False)
    mark(pipe, variant, "c:probe", 200)
    pipe.execute()
    wait_until(
        lambda: any((q.json or {}).get("key") == "c:probe" for q in r.backend.requests),
        30,
        "the probe's reset",
        poll=0.01,
    )
    r.backend.clear()
    return leader


def arm_all(r: Rig, variant: Variant, keys: int) -> None:
    """Mark every key once (TTL SEED_TTL_MS), then wait until the leader has recorded
    every deadline: the window then starts in steady state."""
    for lo in range(0, keys, SEED_CHUNK):
        pipe = r.client.pipeline(transaction=False)
        for i in range(lo, min(keys, lo + SEED_CHUNK)):
            mark(pipe, variant, f"c:{i}", SEED_TTL_MS)
        pipe.execute()
    wait_until(
        lambda: int(r.client.zcard(deadlines_key(COUNTER_KEY))) >= keys,
        60,
        "every deadline recorded",
        poll=0.05,
    )


def snapshot(r: Rig, health_port: int) -> dict[str, Any]:
    raw = info(r.client, "everything")
    return {
        "t": time.monotonic(),
        "calls": {
            k.removeprefix("cmdstat_"): int(v["calls"])
            for k, v in raw.items()
            if k.startswith("cmdstat_")
        },
        "total": int(raw["total_commands_processed"]),
        "net_out": int(raw["total_net_output_bytes"]),
        "redis_cpu": float(raw["used_cpu_sys"]) + float(raw["used_cpu_user"]),
        "busy": machine_busy_seconds(),
        "metrics": metrics(health_port),
    }


# --- one run -----------------------------------------------------------------------------


@attrs.define
class Episode:
    key: str
    at: float
    deadline_ms: int
    reset_ids: set[str] = attrs.Factory(set)
    posts: int = 0
    first_post: float | None = None
    expired_at: float | None = None


def run_once(variant: Variant, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    log(f"touch: variant {variant.name}")
    with rig(f"touch-{variant.name}") as r:
        r.client.config_set("notify-keyspace-events", "")
        if variant.touch:  # as an operator would (install-functions); the leader checks
            functions.install(r.client, COUNTER_KEY)
        password = worker_user(r, variant)
        health_port = free_port()
        leader = spawn(r, "leader", password, health_port)
        standby = spawn(r, "standby", password, free_port()) if args.standby else None
        wait_ready(r, variant)
        if lease_holder(r.client, COUNTER_KEY) != "leader":
            raise RuntimeError("the standby took the lease first: rerun")
        arm_all(r, variant, args.keys)
        time.sleep(1.0)
        return _measure(r, variant, leader, standby, health_port, args, seed)


def _measure(
    r: Rig,
    variant: Variant,
    leader: WorkerProcess,
    standby: WorkerProcess | None,
    health_port: int,
    args: argparse.Namespace,
    seed: int,
) -> dict[str, Any]:
    start = time.time() + 0.3
    app = App(r.server.port, variant, args.keys, args.rate, start, args.duration, seed)
    app.start()
    time.sleep(max(0.0, start - time.time()))
    cpu = CpuWindow(leader.pid).start()
    standby_cpu = CpuWindow(standby.pid).start() if standby is not None else None
    before = snapshot(r, health_port)
    time.sleep(max(0.0, start + args.duration - time.time()))
    app.join(30)
    after = snapshot(r, health_port)
    leader_cpu = cpu.stop()
    standby_cpu_stats = standby_cpu.stop() if standby_cpu is not None else None
    if app.error is not None:
        raise RuntimeError(f"the app failed: {app.error!r}")
    stop = time.time()
    n = len(app.activities)

    # End every key not due within DELETE_AFTER_S, then wait for the episodes left.
    last: dict[str, Activity] = {}
    for a in app.activities:
        last[a.key] = a
    doomed = [k for k, a in last.items() if a.deadline_ms / 1000 > stop + DELETE_AFTER_S]
    ended_at = time.time()
    pipe = r.client.pipeline(transaction=False)
    for k in doomed:
        end(pipe, variant, k)
    pipe.execute()
    episodes = _episodes(app.activities, set(doomed), ended_at)
    due_last = max((e.deadline_ms / 1000 for e in episodes), default=stop)
    wait_until(
        lambda: _posted(r, episodes) or time.time() > due_last + args.cap,
        due_last - time.time() + args.cap + 5,
        "the last resets",
        poll=0.1,
    )
    stale = _match(episodes, r.backend.requests)
    window = after["t"] - before["t"]
    per_k = 1000 / n if n else float("nan")

    calls = {cmd: c - before["calls"].get(cmd, 0) for cmd, c in after["calls"].items()}
    calls = {cmd: c for cmd, c in calls.items() if c}
    # The driver's INFO that opened the window (one that closes it counts only after).
    calls["info"] = calls.get("info", 0) - 1
    calls = {cmd: c for cmd, c in calls.items() if c}
    total = after["total"] - before["total"] - 1
    app_round_trips = n
    inner = sum(c for cmd, c in calls.items() if cmd in INNER)
    if not variant.touch:
        inner -= n  # the app's SETs are round trips, counted apart
    worker_round_trips = total - inner - app_round_trips
    m0, m1 = before["metrics"], after["metrics"]
    events = {
        label: m1.get(label, 0) - m0.get(label, 0)
        for label in m1
        if label.startswith("tcw_activity_events_total")
    }

    lat = [
        (e.first_post - e.expired_at) if e.first_post is not None and e.expired_at else float("inf")
        for e in episodes
    ]
    deadline_error = [
        abs(e.expired_at * 1000 - e.deadline_ms) for e in episodes if e.expired_at is not None
    ]
    problems = {"leader": log_problems(leader, limit=40)}
    if standby is not None:
        problems["standby"] = log_problems(standby, limit=40)
    expected = (
        {
            rid: [ln for ln in lines if EXPECTED_NONOTIFY.search(ln)]
            for rid, lines in problems.items()
        }
        if not variant.notifications
        else {}
    )
    unexpected = {
        rid: [ln for ln in lines if not (expected and EXPECTED_NONOTIFY.search(ln))]
        for rid, lines in problems.items()
    }
    flags = r.client.config_get("notify-keyspace-events").get("notify-keyspace-events")
    result: dict[str, Any] = {
        "variant": variant.name,
        "activities": n,
        "activity_rate_per_s": round(n / window, 1),
        "window_s": round(window, 3),
        "app_behind_schedule_max_ms": round(app.behind_max_s * 1000, 1),
        "app_pipelines": app.pipelines,
        "notify_keyspace_events_at_end": flags,
        "leader_cpu": {
            **leader_cpu,
            "cpu_ms_per_1000_activities": round(leader_cpu["cpu_s"] * 1000 * per_k, 2),
        },
        "standby_cpu": standby_cpu_stats,
        "redis": {
            "cpu_pct": round(100 * (after["redis_cpu"] - before["redis_cpu"]) / window, 2),
            "cpu_ms_per_1000_activities": round(
                (after["redis_cpu"] - before["redis_cpu"]) * 1000 * per_k, 2
            ),
            "commands_total": total,
            "commands_per_1000_activities": round(total * per_k, 1),
            "round_trips_per_1000_activities": {
                "app": round(app_round_trips * per_k, 1),
                "worker": round(worker_round_trips * per_k, 1),
            },
            "inside_scripts_and_functions_per_1000_activities": round(inner * per_k, 1),
            "calls_per_1000_activities": {
                cmd: round(c * per_k, 1) for cmd, c in sorted(calls.items())
            },
            "net_out_bytes_per_activity": round((after["net_out"] - before["net_out"]) / n, 1),
        },
        "leader_heard": events,
        "machine_busy_pct_of_one_core": round(100 * (after["busy"] - before["busy"]) / window, 1),
        "resets": {
            "episodes": len(episodes),
            "missed": sum(1 for e in episodes if e.first_post is None),
            "doubled": sum(1 for e in episodes if len(e.reset_ids) > 1),
            "duplicate_posts": sum(e.posts - len(e.reset_ids) for e in episodes if e.posts),
            "stale_posts": len(stale),
            "stale_examples": stale[:5],
            "claimed_by_tcw_touch": app.claimed_by_touch,
            "latency_ms": summarize(lat, 1000),
            "expired_at_vs_app_deadline_max_ms": round(max(deadline_error, default=0.0), 1),
        },
        "keys_ended_by_app": len(doomed),
        "unmatched_touches": app.unmatched,
        "log_problems": unexpected,
        "expected_log_lines": expected,
    }
    res = result["resets"]
    log(
        f"  {n} activities in {window:.1f} s: leader CPU {leader_cpu['cpu_pct']} % "
        f"({result['leader_cpu']['cpu_ms_per_1000_activities']} ms/1k), Redis CPU "
        f"{result['redis']['cpu_pct']} %, {result['redis']['commands_per_1000_activities']} "
        f"commands/1k; {res['episodes']} episodes, {res['missed']} missed, latency p50 "
        f"{fmt_ms(res['latency_ms'].get('p50'))} p99 {fmt_ms(res['latency_ms'].get('p99'))}"
    )
    return result


def _episodes(activities: list[Activity], ended: set[str], ended_at: float) -> list[Episode]:
    """An activity whose deadline passed before the key's next activity (or the app's
    end of it) is an episode."""
    per: dict[str, list[Activity]] = defaultdict(list)
    for a in activities:
        per[a.key].append(a)
    out = []
    for key, acts in per.items():
        for i, a in enumerate(acts):
            nxt = (
                acts[i + 1].at
                if i + 1 < len(acts)
                else (ended_at if key in ended else float("inf"))
            )
            if a.deadline_ms / 1000 < nxt:
                out.append(Episode(key, a.at, a.deadline_ms))
    return out


def _posted(r: Rig, episodes: list[Episode]) -> bool:
    """As many POSTs as episodes (the probe's was cleared)."""
    return len(r.backend.requests) >= len(episodes)


def _match(episodes: list[Episode], requests: list[Any]) -> list[dict[str, Any]]:
    """Attribute each POST to the episode of its key whose activity came last before its
    expired_at; POSTs fitting none are returned (stale)."""
    per: dict[str, list[Episode]] = defaultdict(list)
    for e in sorted(episodes, key=lambda e: e.at):
        per[e.key].append(e)
    stale = []
    for q in requests:
        body = q.json or {}
        key, expired = str(body.get("key")), float(body.get("expired_at", 0))
        if key == "c:probe":
            continue
        eps = per.get(key, [])
        i = bisect.bisect_right([e.at for e in eps], expired) - 1
        e = eps[i] if i >= 0 else None
        if e is None or abs(expired * 1000 - e.deadline_ms) > 1000:
            stale.append({"key": key, "expired_at": expired, "received_at": q.received_at})
            continue
        e.reset_ids.add(str(body.get("reset_id")))
        e.posts += 1
        if e.first_post is None or q.received_at < e.first_post:
            e.first_post, e.expired_at = q.received_at, expired
    return stale


# --- the whole benchmark -----------------------------------------------------------------

# What the table compares, and where it is in a run.
COMPARED = {
    "leader CPU %": ("leader_cpu", "cpu_pct"),
    "leader CPU ms / 1k": ("leader_cpu", "cpu_ms_per_1000_activities"),
    "Redis CPU %": ("redis", "cpu_pct"),
    "Redis commands / 1k": ("redis", "commands_per_1000_activities"),
    "reset p50 ms": ("resets", "latency_ms", "p50"),
    "reset p99 ms": ("resets", "latency_ms", "p99"),
}


def _dig(run: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = run
    for name in path:
        value = value.get(name) if isinstance(value, dict) else None
    return value


def _ratios(runs: list[dict[str, Any]]) -> dict[str, dict[str, list[float | None]]]:
    """Within each round, every variant over ``set``: {variant: {what: [per round]}}."""
    out: dict[str, dict[str, list[float | None]]] = {}
    for rnd in sorted({run["round"] for run in runs}):
        these = {run["variant"]: run for run in runs if run["round"] == rnd}
        base = these.get("set")
        if base is None:
            continue
        for name, run in these.items():
            if name == "set":
                continue
            for what, path in COMPARED.items():
                out.setdefault(f"{name}/set", {}).setdefault(what, []).append(
                    ratio(_dig(run, path), _dig(base, path))
                )
    return out


def _means(runs: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for name in dict.fromkeys(run["variant"] for run in runs):
        these = [run for run in runs if run["variant"] == name]
        row: dict[str, float | None] = {}
        for what, path in COMPARED.items():
            values = [v for v in (_dig(run, path) for run in these) if v is not None]
            row[what] = round(sum(values) / len(values), 2) if values else None
        out[name] = row
    return out


def _problems(runs: list[dict[str, Any]]) -> list[str]:
    problems = []
    for run in runs:
        tag = f"{run['variant']} round {run['round']}"
        res = run["resets"]
        if res["missed"] or res["doubled"] or res["stale_posts"]:
            problems.append(
                f"{tag}: {res['missed']} missed, {res['doubled']} doubled, "
                f"{res['stale_posts']} stale"
            )
        if run["unmatched_touches"]:
            problems.append(f"{tag}: {run['unmatched_touches']} touches matched no deployment")
        if any(run["log_problems"].values()):
            problems.append(f"{tag}: a worker logged warnings")
        if run["app_behind_schedule_max_ms"] > 100:
            problems.append(
                f"{tag}: the app fell {run['app_behind_schedule_max_ms']} ms behind its schedule"
            )
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=1000.0, help="activities per s")
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument(
        "--duration",
        type=float,
        default=25.0,
        help="seconds of activity per run (the measured window)",
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument(
        "--cap", type=float, default=5.0, help="seconds after the last deadline to wait for resets"
    )
    parser.add_argument("--standby", action="store_true", help="run a standby too")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--name", default="touch", help="results go to bench/results/<name>.json (default touch)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 8 s per variant, one round"
    )
    args = parser.parse_args()
    if args.quick:
        args.duration, args.rounds = 8.0, 1
    if args.keys / args.rate >= LONG_TTL_MS[0] / 1000:
        parser.error(
            f"keys / rate (a key's re-arm period) must be under the long TTL ({LONG_TTL_MS[0]} ms)"
        )
    t0 = time.monotonic()
    runs: list[dict[str, Any]] = []
    for rnd in range(args.rounds):
        order = args.variants if rnd % 2 == 0 else list(reversed(args.variants))
        for name in order:
            run = run_once(VARIANTS[name], args, args.seed + rnd)
            run["round"] = rnd
            runs.append(run)
    means, ratios = _means(runs), _ratios(runs)
    for name, row in means.items():
        log(f"{name}: {row}")
    for name, row in ratios.items():
        log(f"{name}: {row}")
    write_result(
        args.name,
        {
            "params": {
                "rate_per_s": args.rate,
                "keys": args.keys,
                "duration_s": args.duration,
                "rounds": args.rounds,
                "variants": args.variants,
                "cap_s": args.cap,
                "standby": args.standby,
                "seed": args.seed,
                "short_ttl_ms": SHORT_TTL_MS,
                "long_ttl_ms": LONG_TTL_MS,
                "short_share": SHORT_SHARE,
                "seed_ttl_ms": SEED_TTL_MS,
                "lease_ttl_ms": LEASE_TTL_MS,
            },
            "elapsed_s": round(time.monotonic() - t0, 1),
            "runs": runs,
            "means": means,
            "ratios_over_set": ratios,
            "problems": _problems(runs),
        },
    )


if __name__ == "__main__":
    main()
