"""Key names, keyspace-notification names and flags: plain string logic, no I/O.

Redis key names are bytes. The worker carries them as ``str`` decoded with
``surrogateescape`` (PEP 383, as ``os.fsdecode`` does): a name that is valid UTF-8 is its
ordinary text, and each byte that is not becomes a lone surrogate, so ``key_bytes`` gives
back the exact bytes. redis-py encodes and decodes with the same error handler
(``encoding_errors="surrogateescape"`` in the bridge), so a name round-trips exactly
through SCAN, pub/sub and the scripts.
"""

from __future__ import annotations

import base64

from .keys import OWN_KEY_PREFIX

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


def key_bytes(key: str) -> bytes:
    """The exact bytes of a key name as the worker carries it."""
    return key.encode("utf-8", "surrogateescape")


def wire_text(key: str) -> tuple[str, str | None]:
    """``(text, base64)`` for the reset body: a key name (or payload) as text, with any
    byte that is not UTF-8 replaced by U+FFFD, and the exact bytes in base64 only when
    that was needed."""
    raw = key_bytes(key)
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError:
        return raw.decode("utf-8", "replace"), base64.b64encode(raw).decode("ascii")


def shown_key(key: str) -> str:
    """A key for logs and terminals: valid text as it is, other bytes as ``\\xff``."""
    return key_bytes(key).decode("utf-8", "backslashreplace")


def is_own_key(key: str) -> bool:
    """A key of this or another deployment of the worker (lease, epoch, deadlines...)."""
    return key.startswith(OWN_KEY_PREFIX)


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


def eviction_warning(policy: str | None) -> str | None:
    """What to tell an operator whose Redis may evict the worker's own keys, or None."""
    if policy is None or not policy.startswith("allkeys-"):
        return None
    return (
        f"Redis maxmemory-policy is {policy}: under memory pressure Redis may evict the "
        "worker's own keys (pending resets, deadlines, the fencing-token counter) as well "
        "as counters, and evicted resets are lost. Give the worker a Redis (or a database "
        "on a Redis) of its own, or use noeviction or a volatile-* policy"
    )
