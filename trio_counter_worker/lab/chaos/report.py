"""``chaos``'s report: what the run counted, as typed records; the table and the JSON.

:meth:`Report.to_json` is the ``--json`` object, its keys in the order of the fields.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any

import attrs

from .options import FLAGS_TTL_MS

__all__ = ["FaultStats", "KillGap", "KillStats", "Report", "format_report", "percentiles"]

Stats = dict[str, float] | None  # n / p50 / p99 / max in ms, None when there was nothing
MAX_ERRORS = 50  # replica ERROR lines kept in the report
SHOWN_ERRORS = 5  # ... and shown in the table


def percentiles(values: Iterable[float]) -> Stats:
    """p50 / p99 / max (nearest rank) of seconds, in ms; None when empty."""
    s = sorted(values)
    if not s:
        return None

    def rank(p: float) -> float:
        return s[max(0, math.ceil(p * len(s)) - 1)]

    return {
        "n": len(s),
        "p50": round(rank(0.5) * 1000, 1),
        "p99": round(rank(0.99) * 1000, 1),
        "max": round(s[-1] * 1000, 1),
    }


def ms(seconds: float | None) -> str:
    """``850 ms`` or ``1.25 s``; ``-`` for None."""
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.0f} ms" if abs(seconds) < 1 else f"{seconds:.2f} s"


def stats_text(stats: Stats) -> str:
    if stats is None:
        return "-"
    return " / ".join(ms(stats[p] / 1000) for p in ("p50", "p99", "max"))


# -- per fault kind ---------------------------------------------------------------------


@attrs.frozen
class FailoverStats:
    """Faults that take the leader away: the time until a new lease."""

    failover_ms: Stats
    timeouts: int


@attrs.frozen
class RedisStats:
    down_ms: Stats
    resync_ms: Stats  # restarted -> the leader's next "reconciled"


@attrs.frozen
class PoisonStats:
    status: int
    refused_keys: int
    refused_answers: int
    refused_episodes: int
    refused_latency_ms: Stats


@attrs.frozen
class FlagsStats:
    rewritten_to: list[str]
    restored: int
    sets_while_off: int
    restore_ms: Stats
    rescan_ms: Stats
    timeouts: int


@attrs.frozen
class SlowStats:
    slow_ms: int
    whole_run: bool
    probe_ms: Stats
    direct_ms: Stats


@attrs.frozen
class PartitionStats:
    target: str
    stepped_down: int
    stepped_down_ms: Stats
    standby_took_over: int


@attrs.frozen
class SwitchStats:
    """failover: SENTINEL FAILOVER -> the sentinels name the new master, and -> no
    worker connection is left on the old master."""

    switch_ms: Stats
    left_old_master_ms: Stats
    resync_ms: Stats  # the sentinels named the new master -> the leader's "reconciled"


@attrs.frozen
class KillStats:
    """kill: SIGKILL of the leader -> the next reset request the backend received, over
    the kills (see :class:`KillGap`)."""

    gap_ms: Stats
    owed_late_ms: Stats  # every kill's held-up resets together
    no_reset: int  # kills after which no reset came at all


Detail = (
    RedisStats | PoisonStats | FlagsStats | SlowStats | PartitionStats | SwitchStats | KillStats
)


@attrs.frozen
class FaultStats:
    """One fault kind over the run."""

    count: int
    affected_episodes: int  # delivered episodes due while such a fault lasted
    latency_ms: Stats  # theirs
    failover: FailoverStats | None = None
    detail: Detail | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "count": self.count,
            "affected_episodes": self.affected_episodes,
            "latency_ms": self.latency_ms,
        }
        for part in (self.failover, self.detail):
            if part is not None:
                out.update(attrs.asdict(part))
        return out


# -- episodes and requests --------------------------------------------------------------


@attrs.frozen
class MissedEpisode:
    episode: int
    key: str
    deadline_ms: int
    at_s: float  # the deadline, seconds into the run
    attempts: int
    why: str


@attrs.frozen
class DoubledEpisode:
    episode: int
    key: str
    deadline_ms: int
    reset_ids: list[str]


@attrs.frozen
class StaleEpisode:
    episode: int
    key: str
    deadline_ms: int
    expired_at_ms: int
    why: str


@attrs.frozen
class SlowEpisode:
    episode: int
    key: str
    deadline_ms: int
    at_s: float
    latency_ms: float
    by: str
    fencing_token: int


@attrs.frozen
class UnexplainedReset:
    key: str
    reset_id: str
    expired_at: float
    replica_id: str
    status: int


@attrs.frozen
class KillGap:
    """One SIGKILL of the leader, from the backend's side."""

    fault: int  # its number in the fault log
    at_s: float  # the kill, seconds into the run
    victim: str
    gap_ms: float | None  # the kill -> the first reset request received from another
    # replica; None: none came
    by: str | None  # the replica that sent it
    first_due_ms: float | None  # the kill -> the first deadline after it: a gap this long
    # would be no failover's fault
    owed: int  # resets the kill held up: due by the gap's end, not sent before the kill
    owed_late_ms: Stats  # their lateness: deadline -> first request


@attrs.frozen
class FaultRecord:
    n: int
    kind: str
    at_s: float
    victim: str | None
    failover_ms: float | None
    timed_out: bool


@attrs.frozen
class Settings:
    replicas: int
    duration: float
    fault_every: float
    faults: list[str]
    counters: int
    ttl_ms: list[int]
    lease_ms: int
    redis: str
    proxied: bool
    poison_keys: int
    poison_seconds: float
    poison_status: int
    slow_ms: int
    slow_for: float | None
    partition_seconds: float
    partition_target: str


@attrs.define
class Report:
    """Everything a run counted; ``ok`` if nothing was missed, doubled or unexplained."""

    ok: bool
    episodes: int
    delivered: int
    missed: int
    doubled: int
    duplicates: int  # 2xx answers beyond the first for one reset_id
    unexplained: int
    stale_expired_at: int
    # resets whose expired_at is when the leader saw the expiry: the key was set and
    # expired while no leader had reconciled yet (its `expired` event vouched for it)
    seen_expired_at: int
    requests: int
    failed_attempts: int
    rejected: int
    truncated: int
    latency_ms: Stats
    faults: dict[str, FaultStats]
    fault_log: list[FaultRecord]
    missed_episodes: list[MissedEpisode]
    doubled_episodes: list[DoubledEpisode]
    stale_episodes: list[StaleEpisode]
    slowest_episodes: list[SlowEpisode]
    unexplained_resets: list[UnexplainedReset]
    unexpected_exits: list[str]
    replica_errors: list[str]  # the first MAX_ERRORS
    replica_error_count: int  # all of them
    kill_gaps: list[KillGap]
    notes: list[str]
    seed: int
    settings: Settings
    elapsed_s: float
    logs: str | None = None  # the directory kept

    def to_json(self) -> dict[str, Any]:
        out = attrs.asdict(self, recurse=True)
        out["faults"] = {kind: f.to_json() for kind, f in self.faults.items()}
        return out

    def json_line(self) -> str:
        return json.dumps(self.to_json(), separators=(",", ":")) + "\n"


# -- the table --------------------------------------------------------------------------


def format_report(r: Report) -> str:
    def lat(stats: Stats) -> str:
        return stats_text(stats) + (f"  (n={int(stats['n'])})" if stats else "")

    rows = [
        ("episodes (keys left to expire)", str(r.episodes)),
        ("resets delivered (2xx)", str(r.delivered)),
        ("missed (no delivered reset)", str(r.missed)),
        ("doubled (two reset_ids, one episode)", str(r.doubled)),
        ("resets no episode explains", str(r.unexplained)),
        ("duplicate POSTs (2xx again, same id)", str(r.duplicates)),
        ("resets under a replaced deadline", str(r.stale_expired_at)),
        ("resets dated when the expiry was seen", str(r.seen_expired_at)),
        ("failed attempts (4xx, 5xx or hung)", f"{r.failed_attempts} of {r.requests} POSTs"),
        ("reset latency p50 / p99 / max", lat(r.latency_ms)),
    ]
    if r.rejected or r.truncated:
        rows.append(
            (
                "requests rejected / cut short",
                f"{r.rejected} (bad secret or body) / {r.truncated} (sender killed mid-request)",
            )
        )
    if r.unexpected_exits:
        rows.append(("replicas that exited unexpectedly", ", ".join(r.unexpected_exits)))
    if r.replica_error_count:
        rows.append(("replica ERROR log lines", str(r.replica_error_count)))
    width = max(len(name) for name, _ in rows)
    lines = ["", "summary", "-" * (width + 30)]
    lines += [f"  {name:<{width}}  {value}" for name, value in rows]
    if r.faults:
        lines += [
            "",
            f"  {'fault':<9} {'count':>5}  {'failover p50 / p99 / max':<28}"
            "latency of resets due meanwhile p50 / p99 / max",
        ]
        for kind, f in r.faults.items():
            failover = "(none)"
            if f.failover is not None:
                failover = stats_text(f.failover.failover_ms)
            timeouts = _timeouts(f)
            if timeouts:
                failover += f", {timeouts} timed out"
            latency = stats_text(f.latency_ms)
            if f.latency_ms:
                latency += f"  (n={f.affected_episodes})"
            lines.append(f"  {kind:<9} {f.count:>5}  {failover:<28}{latency}")
            if f.count:
                lines += [f"  {'':<9} {'':>5}  {text}" for text in _fault_details(f)]
    lines += _kill_lines(r.kill_gaps)
    lines += _error_lines(r.replica_errors[:SHOWN_ERRORS], r.replica_error_count, r.logs)
    for m in r.missed_episodes:
        lines.append(
            f"  missed: episode {m.episode} {m.key} deadline {m.deadline_ms} "
            f"(+{m.at_s:.2f} s), {m.attempts} attempt(s): {m.why}"
        )
    for d in r.doubled_episodes:
        lines.append(f"  doubled: episode {d.episode} {d.key}: {', '.join(d.reset_ids)}")
    for x in r.stale_episodes:
        lines.append(
            f"  replaced deadline: episode {x.episode} {x.key} deadline "
            f"{x.deadline_ms}, reset with expired_at {x.expired_at_ms}: {x.why}"
        )
    for u in r.unexplained_resets[:10]:
        lines.append(
            f"  unexplained: {u.key} expired_at {u.expired_at} reset_id "
            f"{u.reset_id} by {u.replica_id}"
        )
    for note in r.notes:
        lines.append(f"  note: {note}")
    if r.ok:
        lines.append(
            "result: OK — one reset per episode, none missed"
            + (f" ({r.duplicates} duplicate POST(s), same reset_id)" if r.duplicates else "")
        )
    else:
        lines.append(
            "result: FAILED — see the rows above" + ("" if r.episodes else " (no episodes ran)")
        )
    if r.logs:
        lines.append(f"logs kept in {r.logs}")
    return "\n".join(lines) + "\n"


def _kill_lines(gaps: list[KillGap]) -> list[str]:
    """One line per SIGKILL of the leader: how long the resets stopped."""
    lines = (
        ["  kill -> next reset sent (by another replica), per SIGKILL of the leader:"]
        if gaps
        else []
    )
    for g in gaps:
        if g.gap_ms is None:
            lines.append(
                f"    kill {g.fault} (+{g.at_s:.2f} s, {g.victim}): no reset came after it"
            )
            continue
        due = (
            "no deadline"
            if g.first_due_ms is None
            else f"the first due {ms(g.first_due_ms / 1000)}"
        )
        late = f", sent late p50 / p99 / max {stats_text(g.owed_late_ms)}" if g.owed_late_ms else ""
        lines.append(
            f"    kill {g.fault} (+{g.at_s:.2f} s, {g.victim}): next reset sent "
            f"{ms(g.gap_ms / 1000)} later by {g.by} ({due} after the kill); "
            f"{g.owed} reset(s) held up by it{late}"
        )
    return lines


def _error_lines(shown: list[str], total: int, logs: str | None) -> list[str]:
    """The first replica ERROR lines, and how many more there were."""
    lines = [f"  replica error: {line[:200]}" for line in shown]
    if total > len(shown):
        where = f"in {logs}" if logs else "in the replicas' logs (--keep keeps them)"
        lines.append(f"  ... and {total - len(shown)} more replica ERROR line(s) {where}")
    return lines


def _timeouts(f: FaultStats) -> int:
    if f.failover is not None:
        return f.failover.timeouts
    return f.detail.timeouts if isinstance(f.detail, FlagsStats) else 0


def _fault_details(f: FaultStats) -> list[str]:
    """The table's extra lines for one fault kind."""
    d = f.detail
    if isinstance(d, RedisStats):
        return [f"down {stats_text(d.down_ms)}; leader reconciled after {stats_text(d.resync_ms)}"]
    if isinstance(d, PoisonStats):
        return [
            f"{d.refused_answers} answers {d.status} to {d.refused_keys} key(s); "
            f"{d.refused_episodes} refused episode(s), latency "
            f"{stats_text(d.refused_latency_ms)} (the line above: the others)"
        ]
    if isinstance(d, FlagsStats):
        shown = ", ".join(repr(v) for v in d.rewritten_to)
        return [
            f"rewritten to {shown}; restored {d.restored} time(s) after "
            f"{stats_text(d.restore_ms)}; rescanned after {stats_text(d.rescan_ms)}"
            + (f"; {d.timeouts} timed out" if d.timeouts else ""),
            f"{d.sets_while_off} SET(s) made while the flags were off (TTL at least "
            f"{FLAGS_TTL_MS} ms)",
        ]
    if isinstance(d, SlowStats):
        span = "the whole run" if d.whole_run else "each fault"
        return [
            f"+{d.slow_ms} ms per round trip for {span}; a PING through a proxy "
            f"{stats_text(d.probe_ms)}, directly {stats_text(d.direct_ms)}"
        ]
    if isinstance(d, SwitchStats):
        return [
            f"the sentinels named the new master after {stats_text(d.switch_ms)}; the "
            f"workers had left the old one after {stats_text(d.left_old_master_ms)}; "
            f"leader reconciled {stats_text(d.resync_ms)} after the switch"
        ]
    if isinstance(d, KillStats):
        return [
            f"kill -> next reset sent {stats_text(d.gap_ms)}; the resets held up meanwhile "
            f"late {stats_text(d.owed_late_ms)}"
            + (f"; {d.no_reset} kill(s) with no reset after" if d.no_reset else "")
        ]
    if isinstance(d, PartitionStats):
        return [
            f"target {d.target}; the leader stepped down {d.stepped_down} time(s), "
            f"logged after {stats_text(d.stepped_down_ms)}; a standby took over "
            f"{d.standby_took_over} of {f.count}"
        ]
    return []
