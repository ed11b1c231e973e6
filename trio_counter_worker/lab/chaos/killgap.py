"""Kill -> next reset: how long the resets stop when the leader is SIGKILLed.

Plain logic on what the run recorded (no I/O). For each kill: the time from the kill to
the first reset request the recording backend receives afterwards, from any replica but
the one killed (whatever it wrote before it died may still arrive); and the resets the
kill held up — due by that moment and not sent before the kill — with how late each was
sent (its deadline -> its first request).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import attrs

from ..backend import ResetPost
from .record import Fault
from .report import KillGap, KillStats, percentiles

__all__ = ["KillMeasure", "kill_stats", "measure_kills"]


@attrs.frozen
class KillMeasure:
    fault: Fault
    next_reset: ResetPost | None  # the first request after the kill, not from the victim
    first_due: float | None  # wall clock: the first deadline after the kill
    owed_late: list[float]  # seconds: each held-up reset's deadline -> first request

    @property
    def gap(self) -> float | None:
        """The kill -> the next reset request, seconds; None if none came."""
        return None if self.next_reset is None else self.next_reset.received_at - self.fault.fired

    def record(self, started: float) -> KillGap:
        """As the report shows it (``started``: the run's start, wall clock)."""
        f, gap, nxt = self.fault, self.gap, self.next_reset
        return KillGap(
            fault=f.number,
            at_s=round(f.fired - started, 3),
            victim=f.victim,
            gap_ms=None if gap is None else round(gap * 1000, 1),
            by=None if nxt is None else nxt.replica_id,
            first_due_ms=(
                None if self.first_due is None else round((self.first_due - f.fired) * 1000, 1)
            ),
            owed=len(self.owed_late),
            owed_late_ms=percentiles(self.owed_late),
        )


def measure_kills(
    kills: Iterable[Fault], posts: Sequence[ResetPost], first_sent: Sequence[tuple[float, float]]
) -> list[KillMeasure]:
    """One measure per kill. ``first_sent``: (deadline, first request received) of every
    episode that got a request, wall clock, like the kills' ``fired``."""
    out: list[KillMeasure] = []
    for f in kills:
        after = [p for p in posts if p.received_at >= f.fired and p.replica_id != f.victim]
        nxt = min(after, key=lambda p: p.received_at, default=None)
        owed: list[float] = []
        if nxt is not None:
            owed = [
                sent - deadline
                for deadline, sent in first_sent
                if deadline <= nxt.received_at and sent >= f.fired
            ]
        first_due = min((d for d, _ in first_sent if d >= f.fired), default=None)
        out.append(KillMeasure(f, nxt, first_due, owed))
    return out


def kill_stats(measures: Sequence[KillMeasure]) -> KillStats:
    """Over the kills: the gaps, every held-up reset's lateness, the kills with none."""
    gaps = [m.gap for m in measures if m.gap is not None]
    return KillStats(
        gap_ms=percentiles(gaps),
        owed_late_ms=percentiles(v for m in measures for v in m.owed_late),
        no_reset=len(measures) - len(gaps),
    )
