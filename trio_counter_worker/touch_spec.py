"""``tcw_touch`` and ``tcw_done`` as plain functions: the executable specification of the
Redis Functions library in :mod:`trio_counter_worker.functions`.

The library runs the same rules atomically inside Redis; this module states them as pure
functions of what it reads, with no I/O, reusing the worker's own per-key decision
(:func:`trio_counter_worker.spec.claim`) and reset ids. ``tests/test_functions.py`` runs
one table of cases through both on a real Redis 7 and requires the same outcomes.

The rules, per counter key and per deployment whose ``COUNTER_KEY`` matches it (the
registry maps each deployment's namespace to its pattern):

- an episode that ended unseen — a deadline is recorded, it has passed, and the key is
  gone — is claimed first, exactly as the leader's claim script would claim it: the same
  reset_id, pending record and tombstone. Re-arming the key must not merge two episodes;
- then ``tcw_touch`` sets the key with its TTL and records the new deadline, and
  ``tcw_done`` deletes the key and forgets its deadline: the app ended the episode
  itself, so no reset.

Keys and payloads are ``str`` carrying bytes as :mod:`trio_counter_worker.keyspace` does
(``surrogateescape``); times are Redis's clock, in ms since the Unix epoch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import attrs

from . import spec
from .glob import matches
from .keys import OWN_KEY_PREFIX
from .keyspace import key_bytes

__all__ = [
    "MAX_PAYLOAD_BYTES",
    "Claim",
    "Deployment",
    "Outcome",
    "TouchRefused",
    "done",
    "matching",
    "parse",
    "touch",
]

# The most a payload may hold. It is stored twice (the key's value and the payloads
# hash) and carried in the reset later: small, like a user or tenant id and a few fields.
MAX_PAYLOAD_BYTES = 4096
# A TTL of at most 15 digits (about 31,000 years) cannot overflow Redis's expiry.
MAX_TTL_DIGITS = 15

Function = Literal["tcw_touch", "tcw_done"]
USAGE: dict[Function, str] = {
    "tcw_touch": "FCALL tcw_touch 1 <key> <ttl_ms> [<payload>]",
    "tcw_done": "FCALL tcw_done 1 <key>",
}
# Error texts, shared with the Lua (printf-style, so both languages format them alike).
USAGE_ERROR = "%s: usage: %s"
TTL_ERROR = "tcw_touch: ttl_ms must be a positive integer of milliseconds, got '%s'"
PAYLOAD_ERROR = "tcw_touch: the payload is %d bytes, the most is %d"
OWN_KEY_ERROR = "%s: keys starting with '%s' are trio-counter-worker's own, not counters"
SHOWN_TTL_BYTES = 32  # how much of a refused ttl_ms the error repeats


class TouchRefused(ValueError):
    """The arguments are refused; the key is left as it was. The message is the
    library's error text (without Redis's ``ERR`` code)."""


@attrs.frozen
class Deployment:
    """What the library reads about one matching deployment."""

    namespace: str  # tcw:{<COUNTER_KEY>}
    deadline: int | None  # the key's recorded deadline (ZSCORE <ns>:deadlines key)
    fencing_token: int  # the lease's epoch if there is a lease, else <ns>:epoch, else 0


@attrs.frozen
class Claim:
    """An episode claimed by the call: the pending record the claim script would write."""

    namespace: str
    reset_id: str
    deadline_ms: int
    fencing_token: int
    claimed_ms: int


@attrs.frozen
class Outcome:
    """What a call does: the episodes it claims, then the key's new deadline in every
    matching namespace (``tcw_done``: none, the deadline is forgotten), the payload
    recorded (None: none), and the namespaces told on their ``:touched`` channel."""

    claims: tuple[Claim, ...]
    deadline: int | None
    payload: str | None
    namespaces: tuple[str, ...]


def matching(registry: Mapping[str, str], key: str) -> tuple[str, ...]:
    """The namespaces of the deployments whose COUNTER_KEY pattern matches ``key``
    (the registry maps namespace -> pattern), sorted."""
    return tuple(
        sorted(
            ns for ns, pattern in registry.items() if matches(key_bytes(pattern), key_bytes(key))
        )
    )


def parse(
    function: Function, keys: Sequence[str], args: Sequence[str]
) -> tuple[int | None, str | None]:
    """Check a call's keys and arguments: ``(ttl_ms, payload)`` for ``tcw_touch``,
    ``(None, None)`` for ``tcw_done``; TouchRefused otherwise, before anything changes."""
    most_args = 2 if function == "tcw_touch" else 0
    least_args = 1 if function == "tcw_touch" else 0
    if len(keys) != 1 or not least_args <= len(args) <= most_args:
        raise TouchRefused(USAGE_ERROR % (function, USAGE[function]))
    if key_bytes(keys[0]).startswith(OWN_KEY_PREFIX.encode()):
        raise TouchRefused(OWN_KEY_ERROR % (function, OWN_KEY_PREFIX))
    if function == "tcw_done":
        return None, None
    raw_ttl = key_bytes(args[0])
    if not raw_ttl.isdigit() or raw_ttl.startswith(b"0") or len(raw_ttl) > MAX_TTL_DIGITS:
        shown = raw_ttl[:SHOWN_TTL_BYTES].decode("utf-8", "surrogateescape")
        raise TouchRefused(TTL_ERROR % shown)
    payload = args[1] if len(args) == 2 else None
    if payload is not None and len(key_bytes(payload)) > MAX_PAYLOAD_BYTES:
        raise TouchRefused(PAYLOAD_ERROR % (len(key_bytes(payload)), MAX_PAYLOAD_BYTES))
    return int(raw_ttl), payload


def ended_unseen(key: str, pttl: int, deployment: Deployment, now: int) -> Claim | None:
    """The claim of the key's episode in ``deployment`` if it ended unseen: what the
    leader's claim script decides for the key at ``now`` with no reported expiry.
    ``pttl``: the key's PTTL read first (-2 gone: a due key expires on that read)."""
    seen = spec.Seen(pttl, now + pttl if pttl >= 0 else -1, deployment.deadline)
    verdict = spec.claim(seen, now)
    if verdict.kind != "claimed":
        return None
    assert verdict.deadline is not None
    return Claim(
        deployment.namespace,
        spec.reset_id(deployment.namespace, key, verdict.deadline),
        verdict.deadline,
        deployment.fencing_token,
        now,
    )


def touch(
    key: str,
    ttl_ms: int,
    payload: str | None,
    now: int,
    pttl: int,
    deployments: Sequence[Deployment],
) -> Outcome:
    """``tcw_touch``: claim what ended unseen, then SET the key (its value: the payload,
    or "1") with the TTL and record its deadline, now + ttl_ms, in every namespace."""
    return Outcome(
        _claims(key, pttl, deployments, now),
        now + ttl_ms,
        payload,
        tuple(d.namespace for d in deployments),
    )


def done(key: str, now: int, pttl: int, deployments: Sequence[Deployment]) -> Outcome:
    """``tcw_done``: claim what ended unseen, then DEL the key and forget its deadline
    and payload in every namespace: the episode the app ends itself has no reset."""
    return Outcome(
        _claims(key, pttl, deployments, now), None, None, tuple(d.namespace for d in deployments)
    )


def _claims(key: str, pttl: int, deployments: Sequence[Deployment], now: int) -> tuple[Claim, ...]:
    found = (ended_unseen(key, pttl, d, now) for d in deployments)
    return tuple(claim for claim in found if claim is not None)
