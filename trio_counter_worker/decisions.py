"""Counter keys waiting for a decision in Redis, merged per key: plain logic, no I/O.

Keyspace events and deadlines only say *which* keys to look at; the scripts read Redis's
current state. So a key re-armed a hundred times before the leader gets to it needs one
look, not a hundred, and several script calls may be in flight at once as long as no key
is in two of them (results are applied in the order they come back, and two answers for
one key could arrive in the wrong order). This is what lets the leader keep up with any
activity rate over a slow link: throughput is ``calls in flight * batch / round trip``.
"""

from __future__ import annotations

from typing import Literal

import attrs

__all__ = ["DecisionQueue", "Op", "Want"]

Op = Literal["track", "claim", "reported"]


@attrs.frozen
class Want:
    """What to ask Redis about a key. ``claim``: decide it as due (else only record its
    TTL); ``reported``: Redis said it expired, so no recorded deadline still means an
    episode ended. Asking more never gives a wrong answer: CLAIM on a live key records its
    TTL as TRACK does."""

    claim: bool = False
    reported: bool = False

    def __or__(self, other: Want) -> Want:
        return Want(self.claim or other.claim, self.reported or other.reported)


_WANTS: dict[Op, Want] = {
    "track": Want(),
    "claim": Want(claim=True),
    "reported": Want(claim=True, reported=True),
}


class DecisionQueue:
    """Keys to decide, one entry per key; deadlines first, then everything else in the
    order it came."""

    def __init__(self) -> None:
        self._due: dict[str, Want] = {}  # the timer's: on-time resets come first
        self._other: dict[str, Want] = {}  # from events and reconciles
        self._deciding: set[str] = set()

    def __len__(self) -> int:
        return len(self._due) + len(self._other)

    def __contains__(self, key: object) -> bool:
        return key in self._due or key in self._other or key in self._deciding

    def want(self, key: str, op: Op) -> None:
        """Ask for ``op`` on ``key``, merged with what is already asked."""
        wanted = _WANTS[op]
        queue = self._due if op == "claim" else self._other
        if key in self._due and queue is self._other:
            queue = self._due  # already due: keep its place, add what is asked
        other = self._other if queue is self._due else self._due
        if key in other:
            wanted = wanted | other.pop(key)
        queue[key] = queue.get(key, Want()) | wanted

    def take(self, limit: int) -> tuple[Want, list[str]] | None:
        """Up to ``limit`` keys that want the same call and are in no call now; they
        count as deciding until :meth:`done`."""
        for queue in (self._due, self._other):
            picked: list[str] = []
            kind: Want | None = None
            for key, wanted in queue.items():
                if key in self._deciding:
                    continue
                if kind is None:
                    kind = wanted
                if wanted == kind:
                    picked.append(key)
                    if len(picked) >= limit:
                        break
            if kind is not None:
                for key in picked:
                    del queue[key]
                self._deciding.update(picked)
                return kind, picked
        return None

    def done(self, keys: list[str]) -> None:
        """The call for ``keys`` has returned (or failed)."""
        self._deciding.difference_update(keys)

    def clear(self) -> None:
        """Forget everything (a resynchronisation starts from Redis's state)."""
        self._due.clear()
        self._other.clear()
        self._deciding.clear()
