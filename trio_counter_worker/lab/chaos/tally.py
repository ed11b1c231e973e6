"""The count at the end of a run: the backend's requests matched to the episodes the
app caused, each one missed, doubled, stale or unexplained explained where a documented
limit explains it, and the figures per fault kind. Reads the record; changes nothing."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence

from ...delivery import safe_url
from ..backend import ResetPost
from ..simulator import MATCH_SLACK_MS, Episode, match_posts
from .driver import AppDriver
from .fleet import Fleet
from .killgap import kill_stats, measure_kills
from .options import FAILOVER_FAULTS, RESTART_FAULTS
from .record import Fault
from .report import (
    MAX_ERRORS,
    DoubledEpisode,
    FaultRecord,
    MissedEpisode,
    Report,
    Settings,
    SlowEpisode,
    StaleEpisode,
    UnexplainedReset,
    percentiles,
)
from .report import ms as _ms
from .stage import Stage
from .stats import fault_stats

__all__ = ["Tally"]


class Tally:
    def __init__(
        self, stage: Stage, fleet: Fleet, driver: AppDriver, kinds: Sequence[str], slow_run: bool
    ) -> None:
        self.stage = stage
        self.fleet = fleet
        self.driver = driver
        self.kinds = list(kinds)
        self.slow_run = slow_run
        self.episodes = driver.episodes
        self.by_key = driver.sim.by_key

    def no_leader_windows(self) -> list[tuple[float, float]]:
        """Wall-clock spans without a working leader: no lease held, or the fault until a
        leader was back (a frozen leader holds a lease and does nothing). A leader logs
        "reconciled" once its look at every key is queued; the looks take a few more
        round trips (``settle``), so a span ends that much after it."""
        settle = 0.02 + (5 * self.stage.opts.slow_ms / 1000 if "slow" in self.kinds else 0.0)
        spans = list(self.fleet.gaps)
        if self.fleet.gap_start is not None:
            spans.append((self.fleet.gap_start, time.time()))
        for f in self.stage.faults:
            if f.kind in FAILOVER_FAULTS and f.effect_end is not None:
                # until the new leader reconciled: before that it watches nothing
                since = f.restarted if f.kind in RESTART_FAULTS else f.fired
                since = f.fired if since is None else since  # a failover that never switched
                working = min(
                    (
                        at
                        for at, epoch in self.fleet.reconciles
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
        later = [x for x in self.by_key[e.key] if x.number > e.number]
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
        mine = [e for e in self.by_key.get(p.key, ()) if e.deadline_ms <= at_ms]
        if not mine:
            return None
        e = mine[-1]
        at = e.deadline + (at_ms - e.deadline_ms) / 1000  # this host's clock
        later = [x for x in self.by_key[p.key] if x.number > e.number]
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

    def report(self, started: float, elapsed: float) -> Report:
        """``started``: the run's start, wall clock; ``elapsed``: its length, seconds."""
        s, o, posts_all = self.stage, self.stage.opts, self.driver.posts
        matching = match_posts(self.episodes, posts_all, MATCH_SLACK_MS)
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
        sent: list[tuple[float, float]] = []  # (deadline, first request) per episode
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
            if posts:
                sent.append((e.deadline, min(p.received_at for p in posts)))
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
                        round(e.deadline - started, 3),
                        len(posts),
                        self.explain_missed(e, windows),
                    )
                )
            if len(ids) > 1:
                doubled.append(DoubledEpisode(e.number, e.key, e.deadline_ms, ids))
        per_id = Counter(p.reset_id for p in posts_all if p.delivered)
        kills = measure_kills((f for f in s.faults if f.kind == "kill"), posts_all, sent)
        faults = {
            kind: fault_stats(
                kind,
                s.faults,
                self.episodes,
                posts_all,
                latency,
                refused,
                kill_stats(kills),
                o,
                self.slow_run,
            )
            for kind in self.kinds
        }
        suspicious = [x for x in stale if x.why.startswith("not explained")]
        return Report(
            ok=not (missed or doubled or unexplained or suspicious) and bool(self.episodes),
            episodes=len(self.episodes),
            delivered=len(latency),
            missed=len(missed),
            doubled=len(doubled),
            duplicates=sum(n - 1 for n in per_id.values()),
            unexplained=len(unexplained),
            stale_expired_at=len(stale),
            seen_expired_at=seen,
            requests=len(posts_all),
            failed_attempts=sum(1 for p in posts_all if not p.delivered),
            rejected=s.ledger.rejected,
            truncated=s.backend.truncated,
            latency_ms=percentiles(latency.values()),
            faults=faults,
            fault_log=[_fault_record(f, started) for f in s.faults],
            missed_episodes=missed,
            doubled_episodes=doubled,
            stale_episodes=stale,
            slowest_episodes=[
                _slow_episode(self.episodes[n - 1], latency[n], first[n], started)
                for n in sorted(latency, key=lambda n: -latency[n])[:5]
            ],
            unexplained_resets=[
                UnexplainedReset(p.key, p.reset_id, p.expired_at, p.replica_id, p.status)
                for p in unexplained
            ],
            unexpected_exits=self.fleet.unexpected_exits,
            replica_errors=self.fleet.errors[:MAX_ERRORS],
            replica_error_count=len(self.fleet.errors),
            kill_gaps=[k.record(started) for k in kills],
            notes=s.notes,
            seed=o.seed,
            settings=Settings(
                replicas=o.replicas,
                duration=o.duration,
                fault_every=o.fault_every,
                faults=list(o.faults),
                counters=o.counters,
                ttl_ms=list(o.ttl_ms),
                lease_ms=o.lease_ms,
                redis=safe_url(s.url),
                proxied=self.fleet.proxied,
                poison_keys=o.poisoned_keys(),
                poison_seconds=o.poison_seconds,
                poison_status=o.poison_status,
                slow_ms=o.slow_ms,
                slow_for=o.slow_for,
                partition_seconds=o.partition,
                partition_target=o.partition_target,
            ),
            elapsed_s=round(elapsed, 1),
        )


def _fault_record(f: Fault, started: float) -> FaultRecord:
    return FaultRecord(
        f.number,
        f.kind,
        round(f.fired - started, 3),
        f.victim or None,
        None if f.failover is None else round(f.failover * 1000, 1),
        f.timed_out,
    )


def _slow_episode(e: Episode, latency: float, first: ResetPost, started: float) -> SlowEpisode:
    return SlowEpisode(
        e.number,
        e.key,
        e.deadline_ms,
        round(e.deadline - started, 3),
        round(latency * 1000, 1),
        first.replica_id,
        first.fencing_token,
    )
