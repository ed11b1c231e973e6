"""Keyspace-notification names and flags: plain string logic, no I/O."""

from __future__ import annotations

# K: keyspace channels (one per key, so Redis filters by our pattern and unrelated keys
# cost the worker nothing); g: generic events (expire, del, rename, persist);
# $: string events (set); x: expired.
NEEDED_FLAGS = "Kg$x"
_ALL_ALIAS = "g$lshztxed"  # what "A" stands for


def missing_flags(current: str) -> str:
    """The flags from NEEDED_FLAGS that ``current`` does not already enable."""
    have = set(current)
    if "A" in have:
        have |= set(_ALL_ALIAS)
    return "".join(f for f in NEEDED_FLAGS if f not in have)


def merged_flags(current: str) -> str:
    """``current`` plus what is missing: never removes a flag the app relies on."""
    return current + missing_flags(current)


def keyspace_pattern(db: int, counter_key: str) -> str:
    """PSUBSCRIBE pattern for events on keys matching ``counter_key`` (a glob or a key)."""
    return f"__keyspace@{db}__:{counter_key}"


def key_from_channel(channel: str) -> str:
    """The key a ``__keyspace@<db>__:<key>`` channel is about."""
    return channel.split(":", 1)[1]


def enable_hint(missing: str | None) -> str:
    """What an operator must do when the worker cannot set the flags itself.

    ``missing`` is None when the current flags could not even be read.
    """
    if missing is None:
        state = (
            "The worker could not read notify-keyspace-events (CONFIG refused, as on "
            f"managed Redis). If it already includes {NEEDED_FLAGS!r}, all is well; if not, "
        )
    else:
        state = (
            f"Redis keyspace notifications lack the flags {missing!r} (need "
            f"{NEEDED_FLAGS!r}) and the worker could not set them (CONFIG refused, as on "
            "managed Redis): "
        )
    return (
        state + "enable them "
        f"yourself, e.g. `redis-cli CONFIG SET notify-keyspace-events {NEEDED_FLAGS}` merged "
        "with your current flags, an ElastiCache parameter group with "
        f"notify-keyspace-events={NEEDED_FLAGS}, or `heroku redis:keyspace-notifications "
        f"-c {NEEDED_FLAGS}`. Until then the worker rescans for keys every few seconds."
    )
