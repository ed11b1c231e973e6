"""Which claimed reset to send next, and when to try a failed one again: plain logic.

A reset is claimed in Redis, then sent until the backend answers 2xx, then marked sent.
The outbox holds the leader's view of that path, with time passed in (``now`` in trio's
clock, ``wall`` in Unix seconds for what other replicas and operators read):

- fresh resets (never attempted by this leader) go first, oldest deadline first;
- a failed reset waits for its retry *outside* the couriers: MAX_IN_FLIGHT bounds
  requests in the air, not resets being retried, and at most ``retry_slots`` of those
  requests are retries, so resets the backend keeps refusing or stalling on never
  take every courier from the healthy ones;
- with ``give_up_after`` set, a reset failing for that long is declared dead (moved to
  the dead-letter record by the caller) instead of being tried again.
"""

from __future__ import annotations

import heapq
import math
from typing import Literal

import attrs

from .store import PendingReset

__all__ = ["Entry", "Outbox"]

State = Literal["queued", "sending", "waiting", "sent"]


@attrs.define
class Entry:
    """One reset in the outbox."""

    reset: PendingReset
    state: State = "queued"
    attempts: int = 0  # failed attempts so far, by any leader
    failing_since: float | None = None  # wall time of the first failure
    last_error: str = ""
    retry_at: float = 0.0  # trio time, while waiting
    retry: bool = False  # taken as a retry (counts against retry_slots)


class Outbox:
    """Claimed resets not yet marked sent. See the module docstring."""

    def __init__(self, retry_slots: int, give_up_after: float | None = None) -> None:
        if retry_slots < 1:
            raise ValueError("retry_slots must be at least 1")
        self.retry_slots = retry_slots
        self.give_up_after = give_up_after
        self._entries: dict[str, Entry] = {}
        self._fresh: list[tuple[int, str]] = []  # (deadline_ms, reset_id)
        self._due: list[tuple[int, str]] = []  # retries whose time came, oldest deadline first
        self._waiting: list[tuple[float, str]] = []  # (retry_at, reset_id)
        self._retries_sending = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, reset_id: object) -> bool:
        return reset_id in self._entries

    def add(
        self,
        reset: PendingReset,
        *,
        attempts: int = 0,
        failing_since: float | None = None,
        last_error: str = "",
    ) -> bool:
        """Queue ``reset`` unless it is already here; its failure history (from an earlier
        leader) carries over. True if it was added."""
        if reset.reset_id in self._entries:
            return False
        self._entries[reset.reset_id] = Entry(
            reset, attempts=attempts, failing_since=failing_since, last_error=last_error
        )
        heapq.heappush(self._fresh, (reset.deadline_ms, reset.reset_id))
        return True

    def take(self) -> Entry | None:
        """The next reset to send, or None: fresh ones first, then due retries while a
        retry slot is free. Call :meth:`promote` first to move retries that came due."""
        while self._fresh:
            _, reset_id = heapq.heappop(self._fresh)
            entry = self._entries.get(reset_id)
            if entry is not None and entry.state == "queued":
                entry.state, entry.retry = "sending", False
                return entry
        while self._due and self._retries_sending < self.retry_slots:
            _, reset_id = heapq.heappop(self._due)
            entry = self._entries.get(reset_id)
            if entry is not None and entry.state == "queued":
                entry.state, entry.retry = "sending", True
                self._retries_sending += 1
                return entry
        return None

    def promote(self, now: float) -> int:
        """Move failed resets whose retry time has come to the due queue; how many."""
        moved = 0
        while self._waiting and self._waiting[0][0] <= now:
            _, reset_id = heapq.heappop(self._waiting)
            entry = self._entries.get(reset_id)
            if entry is not None and entry.state == "waiting":
                entry.state = "queued"
                heapq.heappush(self._due, (entry.reset.deadline_ms, reset_id))
                moved += 1
        return moved

    def next_retry_at(self) -> float:
        """When the earliest waiting retry comes due (trio time); inf if none waits."""
        while self._waiting:
            retry_at, reset_id = self._waiting[0]
            entry = self._entries.get(reset_id)
            if entry is not None and entry.state == "waiting" and entry.retry_at == retry_at:
                return retry_at
            heapq.heappop(self._waiting)
        return math.inf

    def succeeded(self, reset_id: str) -> Entry:
        """The backend took it: it waits to be marked sent."""
        entry = self._finish(reset_id)
        entry.state = "sent"
        return entry

    def failed(
        self, reset_id: str, *, now: float, wall: float, delay: float, error: str
    ) -> Literal["retry", "dead"]:
        """Record a failed attempt. "dead": it has failed for ``give_up_after`` and must go
        to the dead letters (then :meth:`remove` it); "retry": it waits ``delay`` s."""
        entry = self._finish(reset_id)
        entry.attempts += 1
        entry.last_error = error
        if entry.failing_since is None:
            entry.failing_since = wall
        if self.give_up_after is not None and wall - entry.failing_since >= self.give_up_after:
            return "dead"
        entry.state = "waiting"
        entry.retry_at = now + delay
        heapq.heappush(self._waiting, (entry.retry_at, reset_id))
        return "retry"

    def remove(self, reset_id: str) -> None:
        """Forget a reset: marked sent, dead, or set aside."""
        entry = self._entries.pop(reset_id, None)
        if entry is not None and entry.state == "sending" and entry.retry:
            self._retries_sending -= 1

    def failing(self) -> list[Entry]:
        """Resets that have failed at least once and are not yet sent, oldest first."""
        rows = [e for e in self._entries.values() if e.attempts and e.state != "sent"]
        return sorted(rows, key=lambda e: e.reset.deadline_ms)

    def _finish(self, reset_id: str) -> Entry:
        entry = self._entries[reset_id]
        if entry.state != "sending":
            raise RuntimeError(f"reset {reset_id} was not being sent (state {entry.state})")
        if entry.retry:
            self._retries_sending -= 1
            entry.retry = False
        return entry
