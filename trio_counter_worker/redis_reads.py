"""What the operator commands (`status`, `check`, `redeliver`) read from and ask of
Redis, beside :mod:`trio_counter_worker.ops`: through a bridge's client, in its thread,
with its error translation."""

from __future__ import annotations

import json
from typing import Any

import redis.exceptions as rexc

from .keys import REGISTRY
from .keyspace import shown_key
from .redis_bridge import RedisBridge, flags_of
from .redis_replies import note, pending_record
from .store import FailingNote

__all__ = ["probe", "redeliver", "status"]

_LISTED = 20  # `status` shows this many failing or dead resets, and counts the rest


async def status(bridge: RedisBridge) -> dict[str, Any]:
    """What `trio-counter-worker status` shows, read in one thread hop."""
    return await bridge.call(_status_sync, bridge)


def _status_sync(bridge: RedisBridge) -> dict[str, Any]:
    c, keys = bridge.client, bridge.keys
    pipe = c.pipeline(transaction=False)
    pipe.hgetall(keys.lease)
    pipe.pttl(keys.lease)
    pipe.hlen(keys.pending)
    pipe.zcard(keys.deadlines)
    pipe.zrange(keys.deadlines, 0, 0, withscores=True)
    pipe.time()
    pipe.get(keys.epoch)
    pipe.hgetall(keys.failing)
    pipe.hgetall(keys.dead)
    pipe.hlen(keys.payloads)
    (lease, pttl, pending, watched, first, (sec, usec), epoch, failing, dead, payloads) = (
        pipe.execute()
    )
    now_ms = int(sec) * 1000 + int(usec) // 1000
    nxt = None
    if first:
        key, score = first[0]
        nxt = {"key": shown_key(key), "in_ms": int(score) - now_ms}
    try:
        flags: str | None = flags_of(c)
    except rexc.ResponseError:
        flags = None
    return {
        "takeover": _takeover(c, lease.get("alive")) if lease else "-",
        "leader": lease.get("replica") or None,
        "leader_endpoint": lease.get("endpoint") or None,  # where it sends resets
        "fencing_token": int(lease["epoch"]) if lease.get("epoch") else None,
        "last_fencing_token": int(epoch) if epoch else 0,
        "lease_ms_left": int(pttl) if int(pttl) >= 0 else None,
        "pending_resets": int(pending),
        "watched_counters": int(watched),
        "next_deadline": nxt,
        "notify_keyspace_events": flags,
        "failing_resets": _listing([note(i, raw) for i, raw in failing.items()]),
        "dead_resets": _dead_listing(dead),
        "touch": {**_touch_library(c, keys.namespace), "payloads": int(payloads)},
    }


def _takeover(c: Any, alive: str | None) -> str:
    """How a standby would learn that the current leader died."""
    if not alive:
        return (
            "at the lease's end (the leader runs without liveness: TAKEOVER_CHECK_MS=0, "
            "Redis Cluster, or PUBSUB NUMSUB refused)"
        )
    try:
        rows: Any = c.pubsub_numsub(alive)
    except rexc.ResponseError:
        return "at the lease's end (PUBSUB NUMSUB refused: add +pubsub|numsub)"
    if rows and int(rows[0][1]) > 0:
        return "fast: the leader's connection is watched (TAKEOVER_CHECK_MS)"
    return "now: the leader's connection is gone, a standby is taking over"


async def probe(bridge: RedisBridge) -> dict[str, Any]:
    """What `trio-counter-worker check` needs: version, flags, whether CONFIG SET works,
    the eviction policy."""
    found = await bridge.call(_probe_sync, bridge.client)
    return found | {"policy": await bridge.memory_policy()}


def _probe_sync(c: Any) -> dict[str, Any]:
    c.ping()
    version = str(c.info("server").get("redis_version", "?"))
    try:
        flags = flags_of(c)
    except rexc.ResponseError as exc:
        return {"version": version, "flags": None, "can_set": False, "error": str(exc)}
    try:
        c.config_set("notify-keyspace-events", flags)  # a no-op write: is CONFIG SET allowed?
        can_set, error = True, None
    except rexc.ResponseError as exc:
        can_set, error = False, str(exc)
    return {"version": version, "flags": flags, "can_set": can_set, "error": error}


async def redeliver(bridge: RedisBridge, reset_ids: list[str]) -> int:
    """Operator command: dead resets back to pending (all of them with no ids)."""
    keys = bridge.keys
    return int(
        await bridge.script("REDELIVER", [keys.pending, keys.dead], [keys.redeliver, *reset_ids])
    )


def _listing(notes: list[FailingNote]) -> dict[str, Any]:
    notes.sort(key=lambda n: n.failing_since)
    return {
        "count": len(notes),
        "oldest": [
            {
                "reset_id": n.reset_id,
                "key": n.key,
                "attempts": n.attempts,
                "failing_since": n.failing_since,
                "last_error": n.last_error,
            }
            for n in notes[:_LISTED]
        ],
    }


def _dead_listing(rows: dict[str, str]) -> dict[str, Any]:
    out: list[dict[str, Any]] = []
    for reset_id, raw in rows.items():
        try:
            dead = json.loads(raw)
            record, why = pending_record(dead["record"]), note(reset_id, dead["note"])
            out.append(
                {
                    "reset_id": reset_id,
                    "key": shown_key(record.key),
                    "attempts": why.attempts,
                    "last_error": why.last_error,
                    "dead_at": int(dead["dead_ms"]) / 1000,
                }
            )
        except (ValueError, KeyError, TypeError):
            out.append({"reset_id": reset_id, "last_error": "(unreadable record)"})
    out.sort(key=lambda d: d.get("dead_at", 0))
    return {"count": len(out), "oldest": out[:_LISTED]}


def _touch_library(client: Any, namespace: str) -> dict[str, Any]:
    """The touch library's version on this Redis (None: not loaded, no Functions, or not
    allowed to ask) and whether the deployment is registered."""
    try:
        return {
            "library": str(client.fcall_ro("tcw_version", 0)),
            "registered": bool(client.hexists(REGISTRY, namespace)),
        }
    except rexc.ResponseError:
        return {"library": None, "registered": False}
