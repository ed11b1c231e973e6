"""Which claimed reset to send next, and when to try a failed one again: plain logic.

A reset is claimed in Redis, then sent until the backend answers 2xx, then marked sent.
The outbox holds the leader's view of that path, with time passed in (``now`` in trio's
clock, ``wall`` in Unix seconds for what other replicas and operators read):

- fresh resets (never attempted by this leader) go first, oldest deadline first;
- every attempt starts on one of ``couriers`` (MAX_IN_FLIGHT) couriers. An attempt still
  in the air :meth:`slow_after` after it began is *slow*: it moves to a pool of at most
  ``slow_slots`` slow attempts and its courier takes the next reset, while the request
  goes on to its answer or its timeout. So attempts the backend hangs on hold a courier
  ``SLOW_AFTER`` (0.1 s) at most — less against a backend that answers fast:
  ``_SLOW_FACTOR`` times the p90 of its recent answers, at least ``SLOW_MIN`` — not
  RESET_TIMEOUT_MS, and a healthy reset is not held behind them.
  When the slow pool is full and a fresh reset waits for a courier, the oldest slow attempt
  is *abandoned* to make room (the caller cancels it; it fails and is retried like a
  timeout, under the same reset_id) once it has been in the air :meth:`abandon_after`:
  at least ``ABANDON_MIN`` and ``_ABANDON_FACTOR`` times the p90 of the recent
  successful attempts. However many resets hang, a healthy one then waits for a courier
  about that long per pool's worth of hanging resets due before it (0.25 s while the
  backend answers the others within 60 ms); a backend slow for everyone (its p90 long)
  is never cut short. The worker holds at most ``couriers + slow_slots`` requests at
  once, at most ``couriers`` of them younger than ``slow_after``
  (:func:`requests_at_once`); a backend that does not notice a closed connection may
  still be working on abandoned ones;
- a failed reset waits for its retry *outside* the couriers, and at most
  ``retry_slots`` couriers carry retries at once, so resets the backend keeps refusing
  never take every courier from the healthy ones;
- with ``give_up_after`` set, a reset failing for that long is declared dead (moved to
  the dead-letter record by the caller) instead of being tried again.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections import OrderedDict, deque
from typing import Literal

import attrs

from .store import PendingReset

__all__ = [
    "ABANDON_MIN",
    "SLOW_AFTER",
    "SLOW_MIN",
    "Entry",
    "Outbox",
    "requests_at_once",
    "slow_pool",
]

State = Literal["queued", "sending", "waiting", "sent"]

SLOW_AFTER = 0.1  # s in the air after which an attempt gives its courier back, at most
SLOW_MIN = 0.02  # and at least: against a backend that answers in a few ms
_SLOW_FACTOR = 4  # times the p90 of recent successful attempts, between the two
_MIN_SLOW_SLOTS = 4  # so that MAX_IN_FLIGHT 1 still outlasts a few hanging resets
# A slow attempt is abandoned for room only past ABANDON_MIN and _ABANDON_FACTOR times
# the p90 of the last _RECENT successful attempts (ABANDON_UNKNOWN before any succeeded).
ABANDON_MIN = 0.25
_ABANDON_FACTOR = 4
_ABANDON_UNKNOWN = 1.0
_RECENT = 64


def p90_of_sorted(data: list[float]) -> float:
    """The 90th percentile of ``data`` (sorted, not empty), as
    ``statistics.quantiles(data, n=10)[-1]`` gives it (its "exclusive" method, the same
    arithmetic), or its one value."""
    size = len(data)
    if size == 1:
        return data[0]
    # statistics.quantiles, exclusive method, for i = 9 of n = 10.
    m = size + 1
    j = min(max(9 * m // 10, 1), size - 1)
    delta = 9 * m - j * 10
    return (data[j - 1] * (10 - delta) + data[j] * delta) / 10


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
        slow_after: float | None = None,
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
        self._slow_after_fixed = slow_after  # None: from the backend's recent answers
        self.give_up_after = give_up_after
        self._entries: dict[str, Entry] = {}
        self._fresh: list[tuple[int, str]] = []  # (deadline_ms, reset_id)
        self._due: list[tuple[int, str]] = []  # retries whose time came, oldest deadline first
        self._waiting: list[tuple[float, str]] = []  # (retry_at, reset_id)
        # Attempts on a courier, oldest first (``now`` never goes back): reset_id → entry.
        self._on_couriers: OrderedDict[str, Entry] = OrderedDict()
        self._slow: OrderedDict[str, Entry] = OrderedDict()  # slow attempts, oldest first
        self._retries_sending = 0  # retries on a courier
        self._abandoned: list[str] = []  # slow attempts to cut short (take_abandoned)
        self._recent: deque[float] = deque(maxlen=_RECENT)  # successful attempts' times
        self._ranked: list[float] = []  # the same, sorted: p90 without a sort per success
        # slow_after() and abandon_after(), until _recent changes: (slow, abandon).
        self._times: tuple[float, float] | None = None
        self._failing = 0  # entries that failed at least once and are not sent

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, reset_id: object) -> bool:
        return reset_id in self._entries

    @property
    def in_air(self) -> tuple[int, int]:
        """Attempts in the air: (on couriers, slow)."""
        return len(self._on_couriers), len(self._slow)

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
        self._failing += attempts > 0
        heapq.heappush(self._fresh, (reset.deadline_ms, reset.reset_id))
        return True

    def take(self, now: float) -> Entry | None:
        """The next reset to send at ``now``, or None: none while every courier is busy;
        fresh ones first, then due retries while a retry slot is free. Call
        :meth:`promote` first to move retries that came due."""
        if len(self._on_couriers) >= self.couriers:
            return None
        if (entry := self._queued_top(self._fresh)) is not None:
            heapq.heappop(self._fresh)
            return self._start(entry, now, retry=False)
        if (
            self._retries_sending < self.retry_slots
            and (entry := self._queued_top(self._due)) is not None
        ):
            heapq.heappop(self._due)
            self._retries_sending += 1
            return self._start(entry, now, retry=True)
        return None

    def _queued_top(self, heap: list[tuple[int, str]]) -> Entry | None:
        """The queued entry at the top of ``heap`` (left there), dropping the stale ones
        above it (sent, removed or taken since)."""
        while heap:
            entry = self._entries.get(heap[0][1])
            if entry is not None and entry.state == "queued":
                return entry
            heapq.heappop(heap)
        return None

    def _start(self, entry: Entry, now: float, *, retry: bool) -> Entry:
        entry.state, entry.retry, entry.started, entry.slow = "sending", retry, now, False
        self._on_couriers[entry.reset.reset_id] = entry
        return entry

    def slowdown(self, now: float) -> int:
        """Move attempts in the air ``slow_after`` or longer from their couriers to the
        slow pool, oldest first, abandoning the oldest slow attempt for room where it may
        be (:meth:`take_abandoned` names them); how many couriers that freed."""
        moved = 0
        while self._on_couriers:
            reset_id, entry = next(iter(self._on_couriers.items()))
            if entry.started + self.slow_after() > now:  # as next_slow_at: no float gap
                break
            if len(self._slow) >= self.slow_slots and not (
                self._fresh_waits() and self._abandon_oldest(now)
            ):
                break
            del self._on_couriers[reset_id]
            self._slow[reset_id] = entry
            entry.slow = True
            if entry.retry:
                self._retries_sending -= 1
                entry.retry = False
            moved += 1
        return moved

    def _abandon_oldest(self, now: float) -> bool:
        """Free a slow slot by abandoning the oldest slow attempt, if it may be."""
        if not self._slow:
            return False
        reset_id, entry = next(iter(self._slow.items()))
        if entry.started + self.abandon_after() > now:
            return False
        del self._slow[reset_id]
        entry.slow = False
        self._abandoned.append(reset_id)
        return True

    def _fresh_waits(self) -> bool:
        """Whether a fresh reset waits for a courier. Only then is an attempt abandoned
        for room: not for retries, so the attempts cut short are at most as many as the
        fresh resets (hanging ones retry at their timeout's and backoff's pace)."""
        return self._queued_top(self._fresh) is not None

    def slow_after(self) -> float:
        """How long an attempt holds its courier before it turns slow (see the module)."""
        if self._slow_after_fixed is not None:
            return self._slow_after_fixed
        return self._backend_times()[0]

    def abandon_after(self) -> float:
        """How long a slow attempt must have been in the air before it may be abandoned
        for room: far longer than the backend takes to answer the others."""
        return self._backend_times()[1]

    def _backend_times(self) -> tuple[float, float]:
        """(slow after, abandon after), from the p90 of the recent successful attempts;
        computed again after new successes only."""
        if self._times is None:
            if not self._ranked:
                return SLOW_AFTER, _ABANDON_UNKNOWN
            p90 = p90_of_sorted(self._ranked)
            self._times = (
                min(SLOW_AFTER, max(SLOW_MIN, _SLOW_FACTOR * p90)),
                max(ABANDON_MIN, _ABANDON_FACTOR * p90),
            )
        return self._times

    def take_abandoned(self) -> list[str]:
        """The reset_ids of attempts :meth:`slowdown` abandoned, once: cancel them (they
        then fail as any attempt that got no answer)."""
        abandoned, self._abandoned = self._abandoned, []
        return abandoned

    def next_slow_at(self) -> float:
        """When :meth:`slowdown` next has work (trio time): the oldest attempt on a
        courier turns slow then, or, the slow pool being full, when the oldest slow
        attempt may be abandoned; inf if none is on a courier."""
        if not self._on_couriers:
            return math.inf
        entry = next(iter(self._on_couriers.values()))
        at = entry.started + self.slow_after()
        if len(self._slow) >= self.slow_slots:
            if not self._slow or not self._fresh_waits():
                return math.inf  # ask again when a slow attempt ends or a reset comes
            oldest = next(iter(self._slow.values()))
            at = max(at, oldest.started + self.abandon_after())
        return at

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

    def succeeded(self, reset_id: str, now: float | None = None) -> Entry:
        """The backend took it: it waits to be marked sent. ``now``: its attempt's time
        counts towards :meth:`abandon_after`."""
        entry = self._finish(reset_id)
        entry.state = "sent"
        self._failing -= entry.attempts > 0
        if now is not None:
            took = now - entry.started
            recent, ranked = self._recent, self._ranked
            if len(recent) == _RECENT:  # the oldest leaves the window
                del ranked[bisect.bisect_left(ranked, recent[0])]
            recent.append(took)
            bisect.insort(ranked, took)
            self._times = None
        return entry

    def failed(
        self, reset_id: str, *, now: float, wall: float, delay: float, error: str
    ) -> Literal["retry", "dead"]:
        """Record a failed attempt. "dead": it has failed for ``give_up_after`` and must go
        to the dead letters (then :meth:`remove` it); "retry": it waits ``delay`` s."""
        entry = self._finish(reset_id)
        self._failing += entry.attempts == 0
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
        if entry is None:
            return
        if entry.state == "sending":
            self._release(entry)
        self._failing -= entry.attempts > 0 and entry.state != "sent"

    @property
    def failing_count(self) -> int:
        """How many :meth:`failing` lists, without listing them: a failure's metric must
        not cost a pass over every reset (200,000 pending behind a refusing backend)."""
        return self._failing

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
            del self._slow[entry.reset.reset_id]
            entry.slow = False
        else:  # on a courier, or abandoned (in neither)
            self._on_couriers.pop(entry.reset.reset_id, None)
        if entry.retry:
            self._retries_sending -= 1
            entry.retry = False
