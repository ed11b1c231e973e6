"""Which claimed reset to send next, and when to try a failed one again: plain logic.

A reset is claimed in Redis, then sent until the backend answers 2xx, then marked sent.
The outbox holds the leader's view of that path, with time passed in (``now`` in trio's
clock, ``wall`` in Unix seconds for what other replicas and operators read):

- fresh resets (never attempted by this leader) go first, oldest deadline first;
- every attempt starts on one of ``couriers`` (MAX_IN_FLIGHT) couriers. An attempt still
  in the air ``slow_after`` (0.1 s) after it began is *slow*: it moves to a pool of at
  most ``slow_slots`` slow attempts and its courier takes the next reset, while the
  request goes on to its answer or its timeout. So attempts the backend hangs on hold a
  courier 0.1 s, not RESET_TIMEOUT_MS, and a healthy reset is never held behind them
  while at most ``slow_slots`` of them hang at once; past that, the oldest slow
  candidate moves as soon as a slow attempt ends, and the others keep their couriers
  (nothing is abandoned: an attempt cut short could have been one about to succeed).
  Requests at once: at most ``couriers + slow_slots``, of which at most ``couriers``
  are younger than ``slow_after`` (:func:`requests_at_once`);
- a failed reset waits for its retry *outside* the couriers, and at most
  ``retry_slots`` couriers carry retries at once, so resets the backend keeps refusing
  never take every courier from the healthy ones;
- with ``give_up_after`` set, a reset failing for that long is declared dead (moved to
  the dead-letter record by the caller) instead of being tried again.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from typing import Literal

import attrs

from .store import PendingReset

__all__ = ["SLOW_AFTER", "Entry", "Outbox", "requests_at_once", "slow_pool"]

State = Literal["queued", "sending", "waiting", "sent"]

SLOW_AFTER = 0.1  # s in the air after which an attempt gives its courier back
_MIN_SLOW_SLOTS = 4  # so that MAX_IN_FLIGHT 1 still outlasts a few hanging resets


def slow_pool(max_in_flight: int) -> int:
    """How many slow attempts may be in the air besides the couriers' own."""
    return max(max_in_flight, _MIN_SLOW_SLOTS)


def requests_at_once(max_in_flight: int) -> int:
    """The most requests the backend sees at once (one connection each)."""
    return max_in_flight + slow_pool(max_in_flight)


@attrs.define
class Entry:
    """One reset in the outbox."""

    reset: PendingReset
    state: State = "queued"
    attempts: int = 0  # failed attempts so far, by any leader
    failing_since: float | None = None  # wall time of the first failure
    last_error: str = ""
    retry_at: float = 0.0  # trio time, while waiting
    retry: bool = False  # taken as a retry (counts against retry_slots while not slow)
    started: float = 0.0  # trio time the attempt in the air began
    slow: bool = False  # the attempt in the air holds a slow slot, not a courier


class Outbox:
    """Claimed resets not yet marked sent. See the module docstring."""

    def __init__(
        self,
        couriers: int,
        *,
        retry_slots: int | None = None,
        slow_slots: int | None = None,
        slow_after: float = SLOW_AFTER,
        give_up_after: float | None = None,
    ) -> None:
        if couriers < 1:
            raise ValueError("couriers must be at least 1")
        self.couriers = couriers
        # Retries use at most half the couriers: failing resets never starve fresh ones.
        self.retry_slots = max(1, couriers // 2) if retry_slots is None else retry_slots
        if self.retry_slots < 1:
            raise ValueError("retry_slots must be at least 1")
        self.slow_slots = slow_pool(couriers) if slow_slots is None else slow_slots
        self.slow_after = slow_after
        self.give_up_after = give_up_after
        self._entries: dict[str, Entry] = {}
        self._fresh: list[tuple[int, str]] = []  # (deadline_ms, reset_id)
        self._due: list[tuple[int, str]] = []  # retries whose time came, oldest deadline first
        self._waiting: list[tuple[float, str]] = []  # (retry_at, reset_id)
        # Attempts on a courier, oldest first (``now`` never goes back): reset_id → entry.
        self._on_couriers: OrderedDict[str, Entry] = OrderedDict()
        self._slow = 0
        self._retries_sending = 0  # retries on a courier

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, reset_id: object) -> bool:
        return reset_id in self._entries

    @property
    def in_air(self) -> tuple[int, int]:
        """Attempts in the air: (on couriers, slow)."""
        return len(self._on_couriers), self._slow

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

    def take(self, now: float) -> Entry | None:
        """The next reset to send at ``now``, or None: none while every courier is busy;
        fresh ones first, then due retries while a retry slot is free. Call
        :meth:`promote` first to move retries that came due."""
        if len(self._on_couriers) >= self.couriers:
            return None
        while self._fresh:
            _, reset_id = heapq.heappop(self._fresh)
            entry = self._entries.get(reset_id)
            if entry is not None and entry.state == "queued":
                return self._start(entry, now, retry=False)
        while self._due and self._retries_sending < self.retry_slots:
            _, reset_id = heapq.heappop(self._due)
            entry = self._entries.get(reset_id)
            if entry is not None and entry.state == "queued":
                self._retries_sending += 1
                return self._start(entry, now, retry=True)
        return None

    def _start(self, entry: Entry, now: float, *, retry: bool) -> Entry:
        entry.state, entry.retry, entry.started, entry.slow = "sending", retry, now, False
        self._on_couriers[entry.reset.reset_id] = entry
        return entry

    def slowdown(self, now: float) -> int:
        """Move attempts in the air ``slow_after`` or longer from their couriers to the
        slow pool, oldest first, while it has room; how many couriers that freed."""
        moved = 0
        while self._on_couriers and self._slow < self.slow_slots:
            reset_id, entry = next(iter(self._on_couriers.items()))
            if entry.started + self.slow_after > now:  # as next_slow_at: no float gap
                break
            del self._on_couriers[reset_id]
            self._slow += 1
            entry.slow = True
            if entry.retry:
                self._retries_sending -= 1
                entry.retry = False
            moved += 1
        return moved

    def next_slow_at(self) -> float:
        """When :meth:`slowdown` next has work (trio time): the oldest attempt on a
        courier turns slow then. inf if none is on a courier or the slow pool is full
        (a slow attempt ending makes room: ask again then)."""
        if not self._on_couriers or self._slow >= self.slow_slots:
            return math.inf
        entry = next(iter(self._on_couriers.values()))
        return entry.started + self.slow_after

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
        if entry is not None and entry.state == "sending":
            self._release(entry)

    def failing(self) -> list[Entry]:
        """Resets that have failed at least once and are not yet sent, oldest first."""
        rows = [e for e in self._entries.values() if e.attempts and e.state != "sent"]
        return sorted(rows, key=lambda e: e.reset.deadline_ms)

    def _finish(self, reset_id: str) -> Entry:
        entry = self._entries[reset_id]
        if entry.state != "sending":
            raise RuntimeError(f"reset {reset_id} was not being sent (state {entry.state})")
        self._release(entry)
        return entry

    def _release(self, entry: Entry) -> None:
        """The attempt in the air ended: free its courier or slow slot, and retry slot.
        Nothing if that was done (a reset declared dead is then removed)."""
        if entry.slow:
            self._slow -= 1
            entry.slow = False
        else:
            self._on_couriers.pop(entry.reset.reset_id, None)
        if entry.retry:
            self._retries_sending -= 1
            entry.retry = False
