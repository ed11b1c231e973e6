"""The per-key decision, as an executable specification of the Lua scripts.

Lua (:mod:`trio_counter_worker.scripts`) is the atomic truth at run time: it reads a
counter key's state and acts on it in one step. This module states the same rules as
plain functions of what the script reads, so they can be read in one place, tested
without Redis, and used by the fake store of the deterministic-time tests.
``tests/test_spec_contract.py`` runs one table of cases through both, on a real Redis,
and requires the same outcomes.

All times are Redis's clock, in ms since the Unix epoch.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import attrs

__all__ = [
    "DUE_SLACK_MS",
    "HANDED_FOR_MS",
    "STAMP_DIGITS",
    "TOMBSTONE_MS",
    "Seen",
    "Verdict",
    "claim",
    "handed_entries",
    "is_echo",
    "parse_handed",
    "reset_id",
    "take_handed",
    "track",
]

# How long a claim's tombstone lasts: an `expired` event that may have been published
# before a claim of the same key (so, possibly that claim's own echo) is recognised for
# this long. See :func:`is_echo`.
TOMBSTONE_MS = 60_000

# Digits of a Redis-ms time that messages and entries may carry: an int64 fits in 19.
STAMP_DIGITS = 19

# How long a key handed over by a former leader may wait to be decided, at most: once
# in the former leader's memory (until Redis takes it), once in Redis (until a leader
# takes it). A claim of the key made after it was seen keeps its tombstone for
# TOMBSTONE_MS, so both waits together must stay well within it: decided later, the
# handed key could be taken for a new episode and reset twice.
HANDED_FOR_MS = TOMBSTONE_MS // 3

# A recorded deadline this close to now counts as passed: Redis's expiry and TIME differ
# by clock granularity.
DUE_SLACK_MS = 5


def reset_id(namespace: str, key: str, deadline_ms: int) -> str:
    """The id of the inactivity episode of ``key`` that ended at ``deadline_ms``: the same
    whoever computes it (Lua: ``sha1hex(ns .. "\\n" .. key .. "\\n" .. deadline)``).
    Keys are the exact bytes of the name (``surrogateescape`` carries the invalid ones)."""
    episode = f"{namespace}\n{key}\n{deadline_ms:d}".encode("utf-8", "surrogateescape")
    return hashlib.sha1(episode, usedforsecurity=False).hexdigest()[:32]


@attrs.frozen
class Seen:
    """What a script reads about one counter key at ``now``, after touching it."""

    pttl: int  # PTTL after the touch: -2 gone (a due key expires on the touch), -1 no TTL
    expire_at: int = -1  # absolute expiry (PEXPIRETIME, or now + pttl) when pttl >= 0
    deadline: int | None = None  # the recorded deadline (ZSCORE deadlines)
    claimed_at: int | None = None  # the last claim of this key (ZSCORE claimed)


@attrs.frozen
class Verdict:
    """What to do with one key.

    ``alive``: record ``deadline`` (the key's expiry); ``due``: it expired, claim it now
    (a look only: nothing changes); ``gone``: forget the recorded deadline, no reset;
    ``claimed``: forget it and create the pending reset of the episode that ended at
    ``deadline``, with a tombstone at now; unless ``lives_until`` is set: the key was set
    again after that episode ended, and its new expiry is recorded instead.
    """

    kind: Literal["alive", "due", "gone", "claimed"]
    deadline: int | None = None
    lives_until: int | None = None


def is_due(deadline: int, now: int) -> bool:
    return deadline <= now + DUE_SLACK_MS


def track(seen: Seen, now: int) -> Verdict:
    """A key set, re-armed or found by a scan: record its deadline (TRACK)."""
    if seen.pttl >= 0:
        return Verdict("alive", seen.expire_at)
    if seen.pttl == -2 and seen.deadline is not None and is_due(seen.deadline, now):
        return Verdict("due")
    return Verdict("gone")


def is_echo(claimed_at: int | None, now: int, expired_after: int) -> bool:
    """An `expired` event known to follow every claim of its key made at or before
    ``expired_after`` may be the echo of a claim (the claim's touch expires the key and
    Redis publishes it) only if that claim came later. A claim publishes a marker on the
    leader's subscription, so the leader knows which claims an event follows; and a new
    subscription follows every claim made before it started."""
    return (
        claimed_at is not None and claimed_at >= now - TOMBSTONE_MS and claimed_at > expired_after
    )


def claim(seen: Seen, now: int, expired_after: int | None = None, heard: bool = False) -> Verdict:
    """A key at its recorded deadline, or reported expired (CLAIM).

    ``expired_after``: Redis published `expired` for this key after every claim of it
    made at or before this time (None: not reported). A reported expiry that is not an
    echo ends an episode even with no recorded deadline (set and expired before the
    leader read its TTL) or a stale one still in the future (re-armed with a shorter TTL
    unseen, across a handoff): it ends at the recorded deadline if that has passed, else
    when it was seen (now). ``heard``: the report is an `expired` event the leader heard
    (not a key that may have expired unheard): it ends an episode even if the key is
    set again by now, the app's next activity; the key's new life is recorded.
    """
    dl = seen.deadline
    if (
        expired_after is not None
        and (seen.pttl == -2 or heard)
        and not is_echo(seen.claimed_at, now, expired_after)
    ):
        ended = dl if dl is not None and is_due(dl, now) else now
        return Verdict("claimed", ended, seen.expire_at if seen.pttl >= 0 else None)
    if seen.pttl >= 0:
        return Verdict("alive", seen.expire_at)
    if dl is None or seen.pttl == -1 or not is_due(dl, now):
        return Verdict("gone")
    return Verdict("claimed", dl)


def handed_entries(key: str, after: int, heard: bool) -> list[str]:
    """A key handed over (HAND_OVER), with the `after` it is to be decided as reported
    with: ``"<after> <key>"``, and for an `expired` event that was heard, ``"h<after>
    <key>"`` as well: decided as heard, it ends an episode even if the key is set again
    by then (:func:`claim`). The plain entry goes with it for a replica of an earlier
    version, which drops the other (a rolling upgrade): it decides the key as before.
    The same key handed twice is two entries; deciding it twice is harmless (the first
    claim's tombstone makes the second an echo)."""
    plain = f"{after:d} {key}"
    return [plain, "h" + plain] if heard else [plain]


def parse_handed(entry: str) -> tuple[str, int, bool] | None:
    """The ``(key, after, heard)`` of an entry of :func:`handed_entries`; None for
    anything else (whoever may write the deployment's keys may write there: such an
    entry is dropped)."""
    heard = entry.startswith("h")
    stamp, sep, key = entry.removeprefix("h").partition(" ")
    digits = stamp.removeprefix("-")
    if not (sep and digits.isascii() and digits.isdigit() and len(digits) <= STAMP_DIGITS):
        return None
    return key, int(stamp), heard


def take_handed(handed: dict[str, int], now: int, most: int) -> tuple[int, list[str]]:
    """TAKE_HANDED on ``handed`` (entry -> when it was written, Redis ms): drop the
    entries written over HANDED_FOR_MS ago, then take (remove and return) at most
    ``most``, oldest first (ZRANGE's order: time, then the entry's bytes). Returns how
    many were dropped, and the entries taken."""
    old = [e for e, at in handed.items() if at < now - HANDED_FOR_MS]
    for entry in old:
        del handed[entry]
    order = sorted(handed.items(), key=lambda kv: (kv[1], kv[0].encode("utf-8", "surrogateescape")))
    taken = [entry for entry, _ in order[:most]]
    for entry in taken:
        del handed[entry]
    return len(old), taken
