"""A key armed with a short TTL and tracked while it lives, on a host that may be slow."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from trio_counter_worker.store import KeyOutcome

__all__ = ["armed_and_tracked"]

T = TypeVar("T")


async def armed_and_tracked(
    arm: Callable[[int], T],
    track: Callable[[], Awaitable[KeyOutcome]],
    ttl_ms: int = 50,
) -> tuple[T, KeyOutcome]:
    """``arm(ttl)`` then ``track()``, until the track finds the key alive: a loaded host
    can take longer than a short TTL between the SET and the TRACK, and the key is then
    gone untracked, so it is armed again with a TTL five times as long (up to three
    times). Returns what ``arm`` returned and the ``alive`` outcome."""
    for attempt in range(4):
        armed = arm(ttl_ms * 5**attempt)
        outcome = await track()
        if outcome.kind == "alive":
            return armed, outcome
    raise AssertionError(
        f"the key expired before it was tracked, even with a TTL of {ttl_ms * 125} ms"
    )
