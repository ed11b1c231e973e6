"""Deadline bookkeeping for watched counter keys: plain logic, time passed in."""

from __future__ import annotations

import heapq
import itertools

__all__ = ["Schedule"]


class Schedule:
    """Each key's next deadline (in the caller's clock); the earliest one comes first.

    Setting a key again replaces its deadline. Stale heap entries are skipped lazily, so
    every operation is O(log n) and memory stays proportional to the live keys plus the
    updates not yet popped.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, str]] = []
        self._current: dict[str, int] = {}  # key -> sequence number of its live entry
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._current)

    def __contains__(self, key: object) -> bool:
        return key in self._current

    def set(self, key: str, deadline: float) -> None:
        seq = next(self._seq)
        self._current[key] = seq
        heapq.heappush(self._heap, (deadline, seq, key))
        if len(self._heap) > 2 * len(self._current) + 1024:
            self._compact()

    def remove(self, key: str) -> None:
        self._current.pop(key, None)

    def next_deadline(self) -> float | None:
        """The earliest live deadline, or None when nothing is scheduled."""
        self._drop_stale()
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float, limit: int | None = None) -> list[str]:
        """Remove and return keys whose deadline is at or before ``now``, earliest first."""
        due: list[str] = []
        while self._heap and (limit is None or len(due) < limit):
            self._drop_stale()
            if not self._heap or self._heap[0][0] > now:
                break
            _, _, key = heapq.heappop(self._heap)
            del self._current[key]
            due.append(key)
        return due

    def _drop_stale(self) -> None:
        heap, current = self._heap, self._current
        while heap and current.get(heap[0][2]) != heap[0][1]:
            heapq.heappop(heap)

    def _compact(self) -> None:
        self._heap = [e for e in self._heap if self._current.get(e[2]) == e[1]]
        heapq.heapify(self._heap)
