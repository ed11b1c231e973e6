"""Deadline bookkeeping for watched counter keys: plain logic, time passed in."""

from __future__ import annotations

import heapq

__all__ = ["Schedule"]


class Schedule:
    """Each key's next deadline (in the caller's clock); the earliest one comes first.

    Setting a key again replaces its deadline. A re-arm moves a deadline later, and then
    adds nothing to the heap: the key's earlier entry, when it comes to the top, is put
    back at the key's deadline of the time. Only a deadline moved sooner adds an entry.
    So the heap holds about one entry per key, however often keys are re-armed (an entry
    per re-arm, kept until its old deadline, grew the leader's memory by ~1 MiB a minute
    at 1,000 re-arms/s); entries of removed keys are dropped as they come up, or all at
    once when they outnumber the live ones. Every operation is O(log n).

    Invariant: a scheduled key has an entry in the heap at its deadline or before it.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, str]] = []
        self._current: dict[str, float] = {}  # key -> its deadline

    def __len__(self) -> int:
        return len(self._current)

    def __contains__(self, key: object) -> bool:
        return key in self._current

    def set(self, key: str, deadline: float) -> None:
        before = self._current.get(key)
        self._current[key] = deadline
        if before is None or deadline < before:  # else its entry comes up in time
            heapq.heappush(self._heap, (deadline, key))
            if len(self._heap) > 2 * len(self._current) + 1024:
                self._compact()

    def remove(self, key: str) -> None:
        self._current.pop(key, None)

    def next_deadline(self) -> float | None:
        """The earliest live deadline, or None when nothing is scheduled."""
        self._settle()
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float, limit: int | None = None) -> list[str]:
        """Remove and return keys whose deadline is at or before ``now``, earliest first."""
        due: list[str] = []
        heap = self._heap
        while heap and (limit is None or len(due) < limit):
            self._settle()
            if not heap or heap[0][0] > now:
                break
            _, key = heapq.heappop(heap)
            del self._current[key]
            due.append(key)
        return due

    def _settle(self) -> None:
        """Bring the top entry to a live key's deadline: drop entries of removed keys,
        put a re-armed key's early entry back at its deadline."""
        heap, current = self._heap, self._current
        while heap:
            at, key = heap[0]
            deadline = current.get(key)
            if deadline == at:
                return
            if deadline is None:
                heapq.heappop(heap)
            else:
                heapq.heapreplace(heap, (deadline, key))

    def _compact(self) -> None:
        # One entry per live key, at its deadline: a key's other entries are surplus.
        self._heap = [(deadline, key) for key, deadline in self._current.items()]
        heapq.heapify(self._heap)
