"""The demo's count and its closing summary: what the backend received, matched to the
inactivity episodes the demo caused, and how long each failover took.

:class:`Tally` is filled in as the demo runs (:mod:`.demo` narrates as it goes);
:meth:`Tally.summary` renders the table it ends with and says whether it passed.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from typing import Literal

import attrs

from .backend import ResetPost
from .simulator import Episode

__all__ = ["Fault", "Tally", "ms", "took"]


@attrs.define
class Fault:
    """A signal the demo sends to the leader at ``at`` seconds, and what came of it."""

    kind: Literal["SIGKILL", "SIGTERM"]
    at: float  # seconds after the start
    fired_wall: float = 0.0
    victim: str = ""  # "-": skipped, no leader to hit
    waited: bool = False
    next_reset: float | None = None  # SIGKILL: seconds from the kill to the next reset sent
    next_due: float = 0.0  # ... and from the kill to when that reset's counter fell due

    @property
    def hit(self) -> bool:
        """It was sent to a leader (not pending, not skipped)."""
        return self.victim not in ("", "-")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if abs(seconds) < 1 else f"{seconds:.2f} s"


def took(seconds: float) -> str:
    """A failover time: seconds, or ms when that would read 0.0x s."""
    return f"{seconds * 1000:.0f} ms" if seconds < 0.1 else f"{seconds:.2f} s"


def kill_gap(fault: Fault) -> str:
    """The kill -> next reset gap, and when that counter fell due: a gap that only
    waited for the next counter to fall due says nothing of the takeover."""
    if fault.next_reset is None:
        return "none came"
    if fault.next_due <= 0:
        return f"{took(fault.next_reset)} (due before the kill)"
    return f"{took(fault.next_reset)} (due {took(fault.next_due)} after it)"


@attrs.define
class Tally:
    """What the demo saw, for its summary."""

    reset_ids: defaultdict[int, list[str]] = attrs.field(
        factory=lambda: defaultdict(list)
    )  # episode -> its resets
    posts: list[ResetPost] = attrs.field(factory=list)
    unexpected: list[ResetPost] = attrs.field(factory=list)  # resets no episode explains
    latencies: list[float] = attrs.field(factory=list)  # seconds from expiry to reset
    failovers: dict[str, list[float]] = attrs.field(factory=lambda: {"SIGKILL": [], "SIGTERM": []})
    unexpected_exits: int = 0
    # Resets of touched counters' episodes: whether each carried the payload it was
    # touched with. None: no counter was touched (no Functions).
    touch_resets: list[bool] | None = None

    def summary(
        self, episodes: Sequence[Episode], faults: Sequence[Fault], rejected: int, t0_wall: float
    ) -> tuple[str, bool]:
        """The summary's text, and whether the demo failed (an episode missed or
        doubled, a reset no episode explains, or no episode at all)."""
        missed = [e for e in episodes if not self.reset_ids[e.number]]
        doubled = [e for e in episodes if len(self.reset_ids[e.number]) > 1]
        duplicates = sum(1 for p in self.posts if p.duplicate)
        received = len({p.reset_id for p in self.posts})

        def times(kind: str) -> str:
            values = self.failovers[kind]
            return ", ".join(took(v) for v in values) if values else "(not run)"

        killed = [f for f in faults if f.kind == "SIGKILL" and f.hit]
        gaps = ", ".join(kill_gap(f) for f in killed)
        if self.latencies:
            lat = f"{ms(statistics.median(self.latencies))} / {ms(max(self.latencies))}"
        else:
            lat = "-"
        rows = [
            ("episodes (expiries the demo caused)", str(len(episodes))),
            ("resets received (distinct reset_ids)", str(received)),
            ("missed (episodes without a reset)", str(len(missed))),
            ("doubled (episodes with two reset_ids)", str(len(doubled))),
            ("resets no episode explains", str(len(self.unexpected))),
            ("duplicate POSTs (same reset_id again)", str(duplicates)),
            ("rejected POSTs (bad secret/body)", str(rejected)),
            ("failover after SIGKILL", times("SIGKILL")),
            ("SIGKILL -> next reset sent", gaps or "(not run)"),
            ("handoff after SIGTERM", times("SIGTERM")),
            ("reset latency after expiry p50 / max", lat),
        ]
        if self.touch_resets is None:
            carried = "(not run: no Functions)"
        else:
            carried = f"{sum(self.touch_resets)} of {len(self.touch_resets)}"
        rows.insert(5, ("touch resets with their payload", carried))
        if self.unexpected_exits:
            rows.append(("replicas that exited unexpectedly", str(self.unexpected_exits)))
        width = max(len(name) for name, _ in rows)
        lines = ["", "summary", "-" * (width + 14)]
        lines += [f"  {name:<{width}}  {value}" for name, value in rows]
        for e in missed:
            lines.append(
                f"  missed: episode {e.number}, {e.key} expiring at "
                f"{e.deadline_ms / 1000 - t0_wall:.2f}s"
            )
        for e in doubled:
            lines.append(
                f"  doubled: episode {e.number}, {e.key}: {', '.join(self.reset_ids[e.number])}"
            )
        lost_payloads = self.touch_resets is not None and not all(self.touch_resets)
        failed = bool(missed or doubled or self.unexpected or lost_payloads or not episodes)
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
        return "\n".join(lines) + "\n", failed
