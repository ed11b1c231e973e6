"""The figures for one fault kind: the latency of the resets due while such a fault
lasted, the failover time where the kind takes the leader away, and what the kind
measures of its own (:data:`~.report.Detail`)."""

from __future__ import annotations

from collections.abc import Sequence

from ..backend import ResetPost
from ..simulator import Episode
from .options import FAILOVER_FAULTS, Options
from .record import Fault
from .report import (
    Detail,
    FailoverStats,
    FaultStats,
    FlagsStats,
    KillStats,
    PartitionStats,
    PoisonStats,
    RedisStats,
    SlowStats,
    Stats,
    SwitchStats,
    percentiles,
)

__all__ = ["fault_stats"]


def fault_stats(
    kind: str,
    faults: Sequence[Fault],
    episodes: Sequence[Episode],
    posts: Sequence[ResetPost],
    latency: dict[int, float],
    refused: set[int],
    kills: KillStats,
    opts: Options,
    slow_run: bool,
) -> FaultStats:
    """One fault kind: the latency of the episodes due while such a fault lasted (not
    those a poison refused: apart), and what the kind measures."""
    mine = [f for f in faults if f.kind == kind]
    affected = [
        latency[e.number]
        for e in episodes
        if e.number in latency
        and any(f.effect_end is not None and f.fired <= e.deadline <= f.effect_end for f in mine)
        and e.number not in refused
    ]
    failover: FailoverStats | None = None
    if kind in FAILOVER_FAULTS:
        failover = FailoverStats(
            percentiles(f.failover for f in mine if f.failover is not None),
            sum(1 for f in mine if f.timed_out),
        )
    detail = _detail(kind, mine, posts, latency, refused, kills, opts, slow_run)
    return FaultStats(len(mine), len(affected), percentiles(affected), failover, detail)


def _resync(mine: list[Fault]) -> Stats:
    """Redis restarted (or switched) -> the leader's next "reconciled" log line."""
    return percentiles(
        f.resynced - f.restarted for f in mine if f.resynced is not None and f.restarted is not None
    )


def _detail(
    kind: str,
    mine: list[Fault],
    posts: Sequence[ResetPost],
    latency: dict[int, float],
    refused: set[int],
    kills: KillStats,
    opts: Options,
    slow_run: bool,
) -> Detail | None:
    if kind == "kill":
        return kills
    if kind == "redis":
        return RedisStats(
            percentiles(f.down for f in mine if f.down is not None),
            _resync(mine),
        )
    if kind == "poison":
        return PoisonStats(
            opts.poison_status,
            sum(len(f.keys) for f in mine),
            sum(1 for p in posts if 400 <= p.status <= 499),
            len(refused),
            percentiles(latency[n] for n in refused if n in latency),
        )
    if kind == "flags":
        return FlagsStats(
            [f.flags[1] for f in mine],
            sum(1 for f in mine if f.restored is not None),
            sum(f.blind_sets for f in mine),
            percentiles(f.restored - f.fired for f in mine if f.restored is not None),
            percentiles(f.resynced - f.fired for f in mine if f.resynced is not None),
            sum(1 for f in mine if f.timed_out),
        )
    if kind == "slow":
        return SlowStats(
            opts.slow_ms,
            slow_run,
            percentiles(f.probe[0] for f in mine if f.probe),
            percentiles(f.probe[1] for f in mine if f.probe),
        )
    if kind == "failover":
        return SwitchStats(
            percentiles(f.restarted - f.fired for f in mine if f.restarted is not None),
            percentiles(f.left - f.fired for f in mine if f.left is not None),
            _resync(mine),
        )
    if kind == "partition":
        return PartitionStats(
            opts.partition_target,
            sum(1 for f in mine if f.stepped_down is not None),
            percentiles(f.stepped_down - f.fired for f in mine if f.stepped_down is not None),
            sum(1 for f in mine if f.successor and f.successor != f.victim),
        )
    return None
