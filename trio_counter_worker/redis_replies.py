"""What comes back from Redis, read without a server: errors classified, replies parsed.

redis-py raises its own exceptions (and strips the error code from some messages, e.g.
OOM); :func:`translate` maps them onto the worker's (:mod:`trio_counter_worker.errors`)
by type where redis-py has one. The scripts answer JSON text (one parser for RESP2 and
RESP3); the functions below turn it into the values of :mod:`trio_counter_worker.store`.
Tested in ``tests/test_redis_replies.py`` with hand-made exceptions and replies.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any, TypeVar

import redis.exceptions as rexc

from .acl import is_permission_error
from .errors import LeaseLost, RedisRefused, RedisUnavailable
from .lease_spec import Liveness
from .store import DeadlinePage, FailingNote, KeyOutcome, LeaseView, PageStart, PendingReset

__all__ = [
    "deadline_page",
    "error_code",
    "note",
    "note_json",
    "numsub_count",
    "outcomes",
    "pending_record",
    "record",
    "reported_args",
    "translate",
    "translating",
]

T = TypeVar("T")

_TRANSIENT = ("BUSY", "LOADING", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "MOVED", "ASK")
_UNAVAILABLE = (rexc.ConnectionError, rexc.TimeoutError, rexc.BusyLoadingError, OSError)
_CLUSTER_TRANSIENT = (
    rexc.ClusterError,  # ClusterDownError, MasterDownError, "TTL exhausted"
    rexc.TryAgainError,
    rexc.AskError,  # MovedError too
    rexc.SlotNotCoveredError,
    rexc.RedisClusterUnreachableError,
)


def auth_failed(exc: BaseException) -> bool:
    if isinstance(exc, rexc.AuthenticationError | rexc.AuthenticationWrongNumberOfArgsError):
        return True
    text = str(exc)
    return isinstance(exc, rexc.ResponseError) and (
        text.startswith(("WRONGPASS", "NOAUTH")) or "AUTH" in text.split(" ", 2)[:2]
    )


def translate(exc: BaseException) -> BaseException:
    """Map redis-py errors onto ours, by type where redis-py has one (it strips the error
    code from some messages, e.g. OOM); anything else (a script bug) passes through."""
    if auth_failed(exc):
        return RedisRefused(
            "Redis authentication failed: check REDIS_PASSWORD (and the user in REDIS_URL)",
            "auth",
        )
    if "CERTIFICATE_VERIFY_FAILED" in str(exc):
        return RedisRefused(
            "Redis TLS certificate verification failed: set REDIS_CA_FILE to the CA that "
            "signed the server's certificate, and connect by a name the certificate lists",
            "tls",
        )
    if isinstance(exc, rexc.NoPermissionError) or (
        isinstance(exc, rexc.ResponseError) and is_permission_error(str(exc))
    ):
        return RedisRefused(
            f"Redis refused a command for lack of permission ({exc}): give the worker's "
            "Redis user the ACL rule in the README (section 'Redis permissions'; "
            "`trio-counter-worker check` prints it)",
            "permission",
        )
    code = error_code(exc)
    if isinstance(exc, rexc.OutOfMemoryError) or code == "OOM":
        return RedisRefused(
            "Redis is out of memory (maxmemory reached with a noeviction policy) and "
            "refuses writes: free memory or raise maxmemory; the worker catches up once "
            "writes succeed again",
            "oom",
        )
    if isinstance(exc, rexc.ResponseError) and "DB index is out of range" in str(exc):
        return RedisRefused(
            "REDIS_DB (or the /db of REDIS_URL) names a database this Redis does not have "
            "(`CONFIG GET databases` tells how many it has): choose one below that",
            "db",
        )
    if isinstance(exc, rexc.ReadOnlyError) or code == "READONLY":
        return RedisUnavailable("Redis is read-only (a replica?): waiting for a primary")
    if isinstance(exc, _CLUSTER_TRANSIENT) or (
        isinstance(exc, rexc.RedisClusterException)
        and str(exc).startswith(("All slots are not covered", "Redis Cluster cannot be connected"))
    ):
        # A cluster failing over or resharding: redis-py strips the error code from
        # these (a ClusterDownError reads "The cluster is down"), so tell them by type.
        return RedisUnavailable(
            f"Redis Cluster cannot serve the command for now: {type(exc).__name__}: {exc}"
        )
    if isinstance(exc, rexc.ResponseError) and (
        str(exc).startswith(_TRANSIENT) or code in _TRANSIENT
    ):
        # Redis is up but cannot serve us right now: wait it out, do not crash.
        return RedisUnavailable(f"Redis refused the command for now: {exc}")
    if isinstance(exc, _UNAVAILABLE):
        return RedisUnavailable(f"Redis unavailable: {type(exc).__name__}: {exc}")
    if isinstance(exc, ValueError) and "closed file" in str(exc):
        # redis-py reading a socket another thread closed (a pool disconnected under it)
        return RedisUnavailable("Redis connection closed while in use")
    return exc


def error_code(exc: BaseException) -> str | None:
    """The Redis error code of a failure inside a script, which redis-py (and Redis 6.2)
    pass on as a plain ResponseError: "Error running script ...: -OOM command not..."."""
    if not isinstance(exc, rexc.ResponseError):
        return None
    _, sep, rest = str(exc).rpartition(": -")
    return rest.split(" ", 1)[0] if sep else None


def numsub_count(reply: Any) -> int:
    """PUBSUB NUMSUB's answer for one channel, ``[channel, count]``: the count."""
    return int(reply[1])


def translating(fn: Callable[..., T], *args: Any) -> T:
    try:
        return fn(*args)
    except Exception as exc:
        translated = translate(exc)
        if translated is exc:
            raise
        raise translated from None


_LIVENESS: dict[object, Liveness] = {
    "alive": "alive",
    "gone": "gone",
    "unknown": "unknown",
}


def lease_view(raw: str) -> LeaseView:
    """ACQUIRE's answer. A liveness it does not know reads as "off": never a steal."""
    r = json.loads(raw)
    return LeaseView(
        acquired=bool(r["acquired"]),
        epoch=int(r.get("epoch") or 0),
        pttl_ms=int(r.get("pttl") or 0),
        holder_replica=str(r.get("replica") or ""),
        liveness=_LIVENESS.get(r.get("liveness"), "off"),
        alive=str(r.get("alive") or ""),
        ready=r.get("ready", True) is not False,
        endpoint=str(r.get("endpoint") or ""),
    )


def pending_record(raw: str) -> PendingReset:
    return record(json.loads(raw))


def record(r: dict[str, Any]) -> PendingReset:
    payload = r.get("payload")
    return PendingReset(
        reset_id=str(r["reset_id"]),
        key=str(r["key"]),
        deadline_ms=int(r["deadline_ms"]),
        fencing_token=int(r["fencing_token"]),
        payload=None if payload is None else str(payload),
    )


def note_json(note: FailingNote) -> str:
    return json.dumps(
        {
            "attempts": note.attempts,
            "since": note.failing_since,
            "error": note.last_error[:500],
            "key": note.key[:200],
        }
    )


def note(reset_id: str, raw: str) -> FailingNote:
    try:
        r = json.loads(raw)
        return FailingNote(
            reset_id, int(r["attempts"]), float(r["since"]), str(r["error"]), str(r.get("key", ""))
        )
    except (ValueError, KeyError, TypeError):
        return FailingNote(reset_id, 0, 0.0, "(unreadable note)")


def reported_args(
    keys: list[str], expired_after: list[int] | None, heard: bool = False
) -> list[str]:
    """Per key: '' (not reported) or the time Redis reported it expired after, after an
    'h' if the report is an `expired` event heard (scripts.CLAIM)."""
    if expired_after is None:
        return [""] * len(keys)
    if len(expired_after) != len(keys):
        raise ValueError("claim: one expired_after per key")
    mark = "h" if heard else ""
    return [f"{mark}{int(t)}" for t in expired_after]


def deadline_page(raw: str) -> DeadlinePage:
    """TRACKED's answer: a flat [key, deadline, ...] list, Redis's time, whether more
    pages follow (then from past the last deadline), how far the read has covered."""
    r = json.loads(raw)
    if not r["leader"]:
        raise LeaseLost("lease lost while reading deadlines")
    flat = r["rows"] if isinstance(r["rows"], list) else []  # cjson: {} when empty
    now = int(r["now"])
    keys = flat[0::2]
    deadlines = [int(float(d)) for d in flat[1::2]]
    more = bool(r.get("more")) and bool(deadlines)
    upto = None if r["upto"] == "+inf" else int(float(r["upto"]))
    return DeadlinePage(
        [(k, d - now) for k, d in zip(keys, deadlines, strict=True)],
        PageStart(deadlines[-1]) if more else None,
        upto,
        math.inf if upto is None else upto - now,
    )


def outcomes(raw: str, keys: list[str]) -> list[KeyOutcome]:
    """TRACK's and CLAIM's answer: one outcome per key, in order."""
    r = json.loads(raw)
    if not r["leader"]:
        raise LeaseLost("lease lost: Redis shows another holder")
    rows = r["keys"] if isinstance(r["keys"], list) else []
    out: list[KeyOutcome] = []
    claimed: list[tuple[int, str]] = []  # where, and the pending record as JSON text
    for key, row in zip(keys, rows, strict=True):
        if "claimed" in row:
            claimed.append((len(out), row["claimed"]))
            out.append(_UNDECODED)
        elif "p" in row:
            out.append(KeyOutcome(key, "alive", pttl_ms=int(row["p"])))
        elif row.get("due"):
            out.append(KeyOutcome(key, "due"))
        else:
            out.append(KeyOutcome(key, "gone"))
    # The records, JSON inside the JSON, decoded in one call, not one each (the call
    # costs more than the parsing).
    records = _json_list([text for _, text in claimed])
    for (i, _), rec in zip(claimed, records, strict=True):
        reset, row = record(rec), rows[i]
        out[i] = KeyOutcome(
            keys[i],
            "claimed",
            pttl_ms=int(row.get("p", 0)),
            reset=reset,
            claimed_ms=int(rec["claimed_ms"]),
            lives_again="p" in row,
        )
    return out


_UNDECODED = KeyOutcome("", "gone")  # a claimed row's place until its record is decoded


def _json_list(texts: list[str]) -> list[dict[str, Any]]:
    """Each of ``texts`` (a JSON object, as cjson writes it) decoded."""
    if not texts:
        return []
    decoded = json.loads("[" + ",".join(texts) + "]")
    if len(decoded) != len(texts) or not all(isinstance(d, dict) for d in decoded):
        raise ValueError("claim: a pending record that is not one JSON object")
    return decoded  # type: ignore[no-any-return]
