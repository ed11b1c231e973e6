"""What a chaos run records as it goes: one :class:`Fault` per injected fault (plain
data, no I/O), and the run's one error."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import attrs

from ..errors import LabError

__all__ = ["ChaosError", "Fault", "log_time"]


class ChaosError(LabError):
    """The run could not go on; the message says why."""


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
    restored: float | None = None  # flags: wall clock of the leader's line that put them back
    blind_sets: int = 0  # flags: SETs made before that line was read
    probe: tuple[float, float] | None = None  # slow: PING through a proxy, and directly (s)
    targets: tuple[str, ...] = ()  # partition: the replicas cut off
    stepped_down: float | None = None  # partition: the victim's "leader lost" line
    successor: str = ""  # partition: the replica that took the lease
    left: float | None = None  # failover: wall clock, no worker connection on the old master


def log_time(record: dict[str, Any]) -> float | None:
    """A replica's JSON log record's ``ts``, wall clock; None if it has none."""
    try:
        return datetime.fromisoformat(str(record["ts"])).timestamp()
    except (KeyError, ValueError):
        return None
