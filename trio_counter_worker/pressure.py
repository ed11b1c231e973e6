"""Redis refusing writes for lack of memory, as the leader lives it: plain logic, no I/O.

Under ``maxmemory`` with ``maxmemory-policy noeviction``, Redis refuses the leader's
scripts (recording a deadline, claiming) with OOM while reads, and often the app's own
SETs, still succeed. Whatever the leader has seen by then (an event, a due deadline, a
reported expiry) is only in its memory: it is kept in the decision queue and tried
again until Redis accepts, one call at a time at a capped backoff. While Redis refuses,
at most ``limit`` keys are held; past that, new ones are let go and counted, and once
Redis accepts writes again the leader looks at every counter key (a reconcile) to find
what it let go.

One WARNING when Redis starts refusing, one line when it has accepted writes for
``quiet`` seconds; times are passed in (trio seconds). Tested in ``tests/test_pressure.py``.
"""

from __future__ import annotations

import math

import attrs

__all__ = ["HELD_MAX", "Pressure", "Relief"]

# Keys held while Redis refuses writes, at most (about 200 bytes each: ~40 MB). Far more
# than the counters a deployment sets during any outage it would sit out; past it, a
# reconcile finds the live ones again, and only keys already expired are lost.
HELD_MAX = 200_000


@attrs.frozen
class Relief:
    """A refusal ended: how long it lasted, calls refused, keys let go past the bound."""

    lasted: float
    refused: int
    dropped: int


class Pressure:
    """Whether Redis refuses the leader's writes, when to try again, what was let go."""

    def __init__(
        self, limit: int = HELD_MAX, first: float = 0.05, most: float = 0.5, quiet: float = 1.0
    ) -> None:
        self.limit = limit
        self._first = first
        self._most = most
        self._quiet = quiet
        self._delay = 0.0
        self.since: float | None = None  # the refusal under way (until it settles)
        self._last_refused = -math.inf
        self._retry_at = -math.inf  # the next call may go then; inf while one is out
        self._refused = 0
        self.dropped = 0  # keys let go during this refusal
        self._overflowed = False  # keys were let go: reconcile once writes are accepted
        self._said_dropped = False

    @property
    def refusing(self) -> bool:
        """Redis refused the last call: hold calls back (one at a time, at a backoff)."""
        return self._delay > 0

    def call_at(self) -> float:
        """When the next call may go: now (-inf) unless Redis is refusing."""
        return self._retry_at if self.refusing else -math.inf

    def sent(self) -> None:
        """A call went out while refusing: the next waits for its answer."""
        if self.refusing:
            self._retry_at = math.inf

    def refused(self, now: float) -> bool:
        """Redis refused a call (OOM). True when this starts a refusal (say so)."""
        self._refused += 1
        self._last_refused = now
        self._delay = min(self._most, self._delay * 2) if self._delay else self._first
        self._retry_at = now + self._delay
        if self.since is not None:
            return False
        self.since = now
        return True

    def accepted(self, now: float, wrote: bool = True) -> None:
        """A call succeeded: calls go at full speed again if it ``wrote`` (recorded a
        deadline or a claim). One that only read (keys gone, nothing to record) runs
        even while Redis refuses writes: it proves nothing; the next call goes at the
        backoff."""
        if wrote:
            self._delay = 0.0
            self._retry_at = -math.inf
        elif self.refusing:
            self._retry_at = now + self._delay

    def settles_at(self) -> float:
        """When a refusal that has stopped counts as over (inf: none to settle)."""
        if self.since is None or self.refusing:
            return math.inf
        return self._last_refused + self._quiet

    def settle(self, now: float) -> Relief | None:
        """The refusal, if it is over by ``now``: said once, then forgotten."""
        if now < self.settles_at():
            return None
        assert self.since is not None
        relief = Relief(now - self.since, self._refused, self.dropped)
        self.since = None
        self._refused = self.dropped = 0
        self._said_dropped = False
        return relief

    def admits(self, held: int) -> bool:
        """Whether one more key may be held, with ``held`` held: always, unless Redis
        refuses writes and the bound is reached (then the key is counted as let go)."""
        if self.since is None or held < self.limit:
            return True
        self.dropped += 1
        self._overflowed = True
        return False

    def first_drop(self) -> bool:
        """True once per refusal, when keys have begun to be let go (say so)."""
        if self.dropped == 0 or self._said_dropped:
            return False
        self._said_dropped = True
        return True

    def take_overflow(self) -> bool:
        """Whether keys were let go and Redis accepts writes again: reconcile (once)."""
        if not self._overflowed or self.refusing:
            return False
        self._overflowed = False
        return True
