"""``chaos`` options: the command line, its checks, and the fault kinds it knows."""

from __future__ import annotations

import argparse
import math
import random
from collections.abc import Sequence
from typing import Literal

import attrs

__all__ = ["DEFAULT_FAULTS", "FAULT_KINDS", "PROG", "Options", "parse_options"]

PROG = "trio-counter-worker chaos"
FAULT_KINDS = (
    "kill",
    "term",
    "stop",
    "redis",
    "http5xx",
    "httphang",
    "poison",
    "flags",
    "slow",
    "partition",
    "failover",
)
DEFAULT_FAULTS = FAULT_KINDS[:-1]  # failover needs --topology sentinel: asked for by name
LEADER_FAULTS = frozenset({"kill", "term", "stop"})
RESTART_FAULTS = frozenset({"redis", "failover"})  # Redis itself changes under the workers
FAILOVER_FAULTS = LEADER_FAULTS | RESTART_FAULTS | {"partition"}
SENTINEL_SKIPS = frozenset({"redis", "slow", "partition"})  # not with --topology sentinel
PROXY_FAULTS = frozenset({"slow", "partition"})  # the replicas reach Redis through proxies

RESET_TIMEOUT_MS = 1000  # the replicas' request timeout: httphang holds requests longer
HTTP_FAULT_SECONDS = 1.0  # how long the backend fails or hangs
HANG_HOLD = RESET_TIMEOUT_MS / 1000 + 0.5  # each hung request is held this long
FREEZE_LEASES = 1.6  # SIGSTOP for this many lease TTLs: past the lease
TTL_MARGIN_MS = 250  # the shortest TTL must exceed the lease by this much (see --ttl-ms)
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
MAX_PARTITION_SECONDS = 60.0
RECONNECT_CAP = 5.0  # a standby's reconnect backoff grows to this (retry.Backoff)


@attrs.frozen
class Options:
    replicas: int = 3
    duration: float = 30.0
    fault_every: float = 3.0
    faults: tuple[str, ...] = DEFAULT_FAULTS
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
    topology: Literal["single", "sentinel"] = "single"

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
faults (--faults, comma-separated; default all but failover):
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
  failover  SENTINEL FAILOVER (with --topology sentinel only): once the replica has every
            write (WAIT), the sentinels promote it; the app holds its writes until they
            name the new master, then writes there. Reported: fault -> the sentinels name
            the new master, -> no worker connection is left on the old master
  With slow or partition among the faults, each replica reaches Redis through a loopback
  TCP proxy of its own, started here (a redis:// URL is needed: with rediss:// or
  unix:// both are skipped); the app and this command reach Redis directly.
  Faults come one at a time, in rounds: the first opens with kill, term, stop (so a
  short run covers them), the rest and later rounds are shuffled. Each waits until a
  leader has taken over and reconciled after the previous one (stacked failovers would
  make one gap longer than the TTLs allow for: keys living wholly inside a gap are a
  documented limit, not a finding).

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
  kill gap    kill: the SIGKILL -> the first reset request the backend received
              from another replica, per kill and p50 / p99 / max over the kills; and
              the resets it held up (due by then, not sent before the kill): how late
              each was sent
  failover    fault -> a new lease (higher fencing token); for redis: restarted ->
              the lease renewed or taken again; for failover: the sentinels named the
              new master -> the same
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
    p.add_argument(
        "--replicas", type=int, default=3, metavar="N", help="replica processes (default 3)"
    )
    p.add_argument(
        "--duration",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long the app is active and faults are injected (default 30)",
    )
    p.add_argument(
        "--fault-every",
        type=float,
        default=3.0,
        metavar="SECONDS",
        help="one fault this often (default 3.0)",
    )
    p.add_argument(
        "--faults",
        default=",".join(DEFAULT_FAULTS),
        metavar="KINDS",
        help=f"comma-separated, from {','.join(FAULT_KINDS)}, or none (default all but failover)",
    )
    p.add_argument(
        "--counters",
        type=int,
        default=20,
        metavar="N",
        help="distinct counter keys cycling through episodes (default 20)",
    )
    p.add_argument(
        "--ttl-ms",
        default="1500:3000",
        metavar="MIN:MAX",
        help="TTL range of each SET, ms; MIN must be at least the lease + "
        f"{TTL_MARGIN_MS} ms (default 1500:3000)",
    )
    p.add_argument(
        "--lease-ms",
        type=int,
        default=1000,
        metavar="MS",
        help="the replicas' LEASE_TTL_MS, 500-5000 (default 1000)",
    )
    p.add_argument(
        "--redis-url",
        metavar="URL",
        help="use this Redis instead of starting one (keys under a unique "
        "chaos-<random>: prefix, deleted afterwards; no redis fault)",
    )
    p.add_argument(
        "--poison-keys",
        default="25%",
        metavar="N|P%",
        help="poison: how many counter keys are refused, a count or a share (default 25%%)",
    )
    p.add_argument(
        "--poison-seconds",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help=f"poison: how long they are refused, at most {MAX_POISON_SECONDS:g} (default 2)",
    )
    p.add_argument(
        "--poison-status",
        type=int,
        default=404,
        metavar="CODE",
        help="poison: the 4xx status answered (default 404)",
    )
    p.add_argument(
        "--slow-ms",
        type=int,
        default=50,
        metavar="MS",
        help="slow: latency added to each Redis round trip, ms, at most half the "
        "lease (default 50)",
    )
    p.add_argument(
        "--slow-for",
        default="3",
        metavar="SECONDS|run",
        help="slow: how long each slow fault lasts, s, or run: the whole run (default 3)",
    )
    p.add_argument(
        "--partition-seconds",
        type=float,
        metavar="SECONDS",
        help="partition: how long Redis traffic is blackholed, s, at least the "
        f"lease, at most {MAX_PARTITION_SECONDS:g} (default twice the lease)",
    )
    p.add_argument(
        "--partition-target",
        choices=("leader", "all"),
        default="leader",
        help="partition: cut off the leader only, or every replica (default leader)",
    )
    p.add_argument(
        "--topology",
        choices=("single", "sentinel"),
        default="single",
        help="single: one redis-server; sentinel: a master, a replica and three "
        "sentinels, the replicas configured through REDIS_SENTINELS (default "
        "single)",
    )
    p.add_argument("--seed", type=int, help="random seed (default: random, printed)")
    p.add_argument(
        "--json", action="store_true", help="print only one JSON object, on the last line of stdout"
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the temp directory (replica logs, Redis files) and print it",
    )
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
        parser.error(
            f"--faults: unknown {', '.join(unknown)}; choose from "
            f"{', '.join(FAULT_KINDS)} (or none)"
        )
    if a.topology == "sentinel" and a.redis_url:
        parser.error("--topology sentinel starts its own servers: leave out --redis-url")
    if "failover" in kinds and a.topology != "sentinel":
        parser.error("--faults failover needs --topology sentinel")
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
        parser.error(
            f"--poison-keys must be a count of keys (1 or more) or a share such as "
            f"25%, got {a.poison_keys!r}"
        )
    if not 0 < a.poison_seconds <= MAX_POISON_SECONDS:
        parser.error(
            f"--poison-seconds must be more than 0 and at most "
            f"{MAX_POISON_SECONDS:g}, got {a.poison_seconds:g}"
        )
    if not 400 <= a.poison_status <= 499:
        parser.error(f"--poison-status must be a 4xx status, got {a.poison_status}")
    if not 1 <= a.slow_ms <= a.lease_ms // 2:
        parser.error(
            f"--slow-ms must be between 1 and half the lease ({a.lease_ms // 2} ms), "
            f"got {a.slow_ms}: beyond that every renewal risks the step-down "
            "deadline, which is a different test"
        )
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
        parser.error(
            f"--partition-seconds must be at least the lease ({a.lease_ms / 1000:g} s: "
            "a shorter one need not make the leader step down) and at most "
            f"{MAX_PARTITION_SECONDS:g}, got {partition:g}"
        )
    seed = a.seed if a.seed is not None else random.SystemRandom().randrange(1, 1_000_000)
    opts = Options(
        replicas=a.replicas,
        duration=a.duration,
        fault_every=a.fault_every,
        faults=tuple(dict.fromkeys(kinds)),
        counters=a.counters,
        ttl_ms=(low, high),
        lease_ms=a.lease_ms,
        redis_url=a.redis_url,
        seed=seed,
        json=a.json,
        keep=a.keep,
        poison_count=count,
        poison_share=share,
        poison_seconds=a.poison_seconds,
        poison_status=a.poison_status,
        slow_ms=a.slow_ms,
        slow_for=slow_for,
        partition_seconds=partition,
        partition_target=a.partition_target,
        topology=a.topology,
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
