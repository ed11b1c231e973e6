"""What the worker needs from Redis, as a protocol, and the values that cross it.

The real implementation is :class:`trio_counter_worker.redis_bridge.RedisBridge`; tests
that need deterministic time use a trio-native fake with the same methods.
"""

from __future__ import annotations

import math
from typing import Literal, Protocol

import attrs
import trio

from .lease_spec import Liveness, Renewal

__all__ = [
    "DeadlinePage",
    "FailingNote",
    "KeyOutcome",
    "LeaseView",
    "Message",
    "NotificationStatus",
    "PageStart",
    "PendingReset",
    "Store",
]


@attrs.frozen
class LeaseView:
    """Result of an acquire attempt: ours now, or who holds it and for how long."""

    acquired: bool
    epoch: int
    pttl_ms: int
    holder_replica: str = ""  # acquired: the replica it was stolen from, if it was
    liveness: Liveness = "off"  # the holder's, when not acquired (lease_spec)
    alive: str = ""  # the holder's liveness channel: name it as ``suspect`` to steal
    ready: bool = True  # False: our own liveness channel has no subscriber at Redis
    endpoint: str = ""  # where the holder sends resets, when not acquired ('' unknown)


@attrs.frozen
class PendingReset:
    """A reset decided in Redis and not yet confirmed by the backend. ``payload``: what
    the app gave its last ``tcw_touch`` of the episode, if anything."""

    reset_id: str
    key: str
    deadline_ms: int
    fencing_token: int
    payload: str | None = None

    @property
    def expired_at(self) -> float:
        return self.deadline_ms / 1000


@attrs.frozen
class PageStart:
    """Where a page of recorded deadlines starts: past deadline ``after`` (Redis ms; None:
    from the earliest). A page holds every key at its last deadline."""

    after: int | None = None


@attrs.frozen
class DeadlinePage:
    """Recorded deadlines, earliest first: (key, ms from when Redis read them)."""

    rows: list[tuple[str, int]]
    next: PageStart | None  # None: the last page of this read
    # Every deadline up to ``upto`` (Redis ms; None: all of them) is in this page or an
    # earlier one: a later read goes on from there. ``ahead_ms``: the same, as ms from
    # when Redis read them.
    upto: int | None = None
    ahead_ms: float = math.inf


@attrs.frozen
class FailingNote:
    """What is known of a reset the backend has not accepted yet: kept in Redis so that
    `status` shows it and the next leader carries the history on."""

    reset_id: str
    attempts: int
    failing_since: float  # Unix seconds of the first failed attempt
    last_error: str
    key: str = ""  # as shown to people (keyspace.shown_key)


@attrs.frozen
class KeyOutcome:
    """What Redis said about one counter key.

    ``alive``: it has a TTL, due in ``pttl_ms``; ``due``: it expired, claim it now;
    ``gone``: nothing to do (no TTL, deleted early, or not tracked); ``claimed``: the
    episode ended and ``reset`` is now pending, claimed at ``claimed_ms`` (Redis time);
    ``lives_again``: and the key was set again since, due in ``pttl_ms``.
    """

    key: str
    kind: Literal["alive", "due", "gone", "claimed"]
    pttl_ms: int = 0
    reset: PendingReset | None = None
    claimed_ms: int = 0
    lives_again: bool = False


@attrs.frozen
class NotificationStatus:
    """State of ``notify-keyspace-events`` after trying to enable what the worker needs."""

    ok: bool
    flags: str | None  # None: CONFIG GET was refused
    changed: bool = False
    missing: str = ""
    error: str | None = None


@attrs.frozen
class Message:
    """One pub/sub message: ``channel`` it arrived on and its ``data``."""

    channel: str
    data: str


# What a standby's watch of the leader saw (Store.wait_leader_gone).
Watched = Literal["gone", "free"]


class Store(Protocol):
    """Redis operations, each atomic and (where it matters) checked against the lease.

    Methods that need the lease raise :class:`LeaseLost` when ``holder`` does not hold it,
    and every method raises :class:`RedisUnavailable` when Redis cannot be reached.
    """

    async def acquire(
        self,
        holder: str,
        replica_id: str,
        ttl_ms: int,
        epoch_floor: int,
        alive: str = "",
        suspect: str = "",
        endpoint: str = "",
    ) -> LeaseView:
        """ACQUIRE (:func:`~trio_counter_worker.lease_spec.acquire`): ``alive`` is the
        caller's liveness channel ('' without), ``suspect`` the holder's channel the
        caller saw gone before, ``endpoint`` where the caller sends resets."""
        ...

    async def renew(self, holder: str, ttl_ms: int) -> Renewal: ...

    async def release(self, holder: str, replica_id: str) -> bool: ...

    async def wait_leader_gone(self, channel: str, every: float) -> Watched:
        """Return once Redis counts no subscriber of ``channel``, the holder's liveness
        channel ("gone": PUBSUB NUMSUB, as ACQUIRE counts them), or the lease key is gone
        ("free"), asking every ``every`` s: a standby's campaign wakes only then (or at a
        release announced). It decides nothing: ACQUIRE does."""
        ...

    async def track(self, holder: str, keys: list[str]) -> list[KeyOutcome]: ...

    async def claim(
        self,
        holder: str,
        keys: list[str],
        expired_after: list[int] | None = None,
        heard: bool = False,
    ) -> list[KeyOutcome]:
        """Decide each key at its deadline (:func:`trio_counter_worker.spec.claim`).
        ``expired_after``: Redis published `expired` for these keys, after these times
        (Redis ms, one per key), so each is an episode that ended unless it is the echo
        of a later claim. ``heard``: each report is an `expired` event the leader heard
        (it ends an episode even if the key is set again by now)."""
        ...

    async def mark_sent(self, holder: str, *reset_ids: str) -> None: ...

    async def pending(self) -> list[PendingReset]: ...

    async def note_failing(self, holder: str, notes: list[FailingNote]) -> None:
        """Record why pending resets are not delivered yet (ignored for resets no longer
        pending)."""
        ...

    async def failing(self) -> dict[str, FailingNote]: ...

    async def bury(self, holder: str, note: FailingNote) -> bool:
        """Move a pending reset that failed for RESET_GIVE_UP_AFTER to the dead letters;
        False if it was no longer pending."""
        ...

    async def hand_over(self, entries: list[str]) -> None:
        """Hand keys a former leadership could not decide to whoever leads
        (:func:`trio_counter_worker.spec.handed_entries`; no lease check)."""
        ...

    async def take_handed(self, holder: str, most: int) -> tuple[int, list[str]]:
        """Take (lease-checked) at most ``most`` handed-over entries: how many were
        dropped as stale, and those taken (:func:`trio_counter_worker.spec.take_handed`)."""
        ...

    async def tracked(
        self, holder: str, start: PageStart, within_ms: int | None = None
    ) -> DeadlinePage:
        """One page of the recorded deadlines (lease-checked), from ``start`` up to
        ``within_ms`` past Redis's clock (None: all of them)."""
        ...

    async def scan(self, pattern: str, cursor: int) -> tuple[int, list[str]]: ...

    async def ensure_notifications(self) -> NotificationStatus:
        """At each (re)synchronisation: make the connection ready (scripts loaded) and
        add the flags the worker needs to notify-keyspace-events, keeping the app's."""
        ...

    async def verify_notifications(self) -> NotificationStatus:
        """The same check of the flags, alone: cheap enough to repeat every second."""
        ...

    async def install_functions(self) -> str:
        """At each takeover: the touch library (:mod:`trio_counter_worker.functions`)
        loaded and this deployment registered; returns the library's version. Raises
        :class:`FunctionsUnavailable` where Redis has none or refuses them."""
        ...

    async def functions_gone(self) -> bool:
        """Whether the touch library loaded at the takeover is gone from Redis (a
        FUNCTION FLUSH): :func:`trio_counter_worker.functions.library_gone`."""
        ...

    async def memory_policy(self) -> str | None:
        """Redis's maxmemory-policy, or None where CONFIG is refused."""
        ...

    async def wait_until_reachable(self) -> None:
        """Return as soon as Redis answers (a PING); never raises for Redis being away."""
        ...

    async def listen(
        self,
        *,
        patterns: list[str],
        channels: list[str],
        send: trio.MemorySendChannel[list[Message]],
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Subscribe; started with Redis's time (ms) from before subscribing."""
        ...
