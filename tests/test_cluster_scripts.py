"""The Cluster decision scripts on a plain redis-server: facts in, decisions out.

On a cluster, a probe on the counter key's node produces facts (node time, PTTL,
expiry) that a lease-checked script applies in the worker's slot. These tests feed the
apply scripts hand-made facts, including stale ones arriving after newer ones.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from tests.support.redis_server import RedisServer
from trio_counter_worker import scripts
from trio_counter_worker.keys import Keys

KEYS = Keys("k:*")
NS = KEYS.namespace
LEASE, DEADLINES, PENDING, SEEN, CLAIMED = (
    KEYS.lease,
    KEYS.deadlines,
    KEYS.pending,
    KEYS.seen,
    KEYS.claimed,
)
HOLDER = "me#1"


@pytest.fixture
def r(redis_server: RedisServer) -> Iterator[redis.Redis]:
    with redis_server.client() as client:
        client.hset(LEASE, mapping={"holder": HOLDER, "replica": "me", "epoch": 3})
        client.pexpire(LEASE, 60_000)
        yield client


def track(r: redis.Redis, *facts: tuple[str, int, int, int]) -> list[dict[str, Any]]:
    script = r.register_script(scripts.APPLY_TRACK)
    flat = [v for f in facts for v in f]
    out = json.loads(script(keys=[LEASE, DEADLINES, SEEN], args=[HOLDER, *flat]))
    return list(out["keys"])


def claim(r: redis.Redis, *facts: tuple[str, int, int, int]) -> list[dict[str, Any]]:
    script = r.register_script(scripts.APPLY_CLAIM)
    flat = [v for f in facts for v in (*f, "")]  # each key's facts, not reported
    out = json.loads(
        script(keys=[LEASE, DEADLINES, PENDING, SEEN, CLAIMED], args=[HOLDER, NS, *flat])
    )
    return list(out["keys"])


def test_alive_then_expired_is_claimed(r: redis.Redis) -> None:
    assert track(r, ("k:1", 1000, 500, 1500)) == [{"p": 500}]
    assert r.zscore(DEADLINES, "k:1") == 1500
    (row,) = claim(r, ("k:1", 1501, -2, -1))
    record = json.loads(row["claimed"])
    assert record["deadline_ms"] == 1500
    assert record["fencing_token"] == 3
    assert r.hlen(PENDING) == 1
    assert r.zscore(DEADLINES, "k:1") is None


def test_stale_gone_facts_do_not_erase_a_newer_deadline(r: redis.Redis) -> None:
    track(r, ("k:1", 1000, 500, 1500))
    # Probe A at t=1501 saw the key gone; probe B at t=1502 saw it set again (D=2502).
    # B's facts are applied first; A's arrive late and must not erase D=2502.
    assert track(r, ("k:1", 1502, 1000, 2502)) == [{"p": 1000}]
    assert claim(r, ("k:1", 1501, -2, -1)) == [{"due": True}]  # stale: look again
    assert r.zscore(DEADLINES, "k:1") == 2502
    assert r.hlen(PENDING) == 0


def test_deleted_before_deadline_is_dropped_by_the_key_nodes_clock(r: redis.Redis) -> None:
    track(r, ("k:1", 1000, 5000, 6000))
    assert claim(r, ("k:1", 2000, -2, -1)) == [{"gone": True}]  # gone 4 s early: deleted
    assert r.zscore(DEADLINES, "k:1") is None
    assert r.hlen(PENDING) == 0


def test_not_the_holder_decides_nothing(r: redis.Redis) -> None:
    track(r, ("k:1", 1000, 500, 1500))
    r.hset(LEASE, "holder", "someone-else#2")
    script = r.register_script(scripts.APPLY_CLAIM)
    out = json.loads(
        script(
            keys=[LEASE, DEADLINES, PENDING, SEEN, CLAIMED],
            args=[HOLDER, NS, "0", "k:1", 1501, -2, -1],
        )
    )
    assert out == {"leader": False}
    assert r.hlen(PENDING) == 0
    assert r.zscore(DEADLINES, "k:1") == 1500


def test_seen_versions_are_pruned_after_an_hour(r: redis.Redis) -> None:
    track(r, ("k:old", 1000, 500, 1500))
    track(r, ("k:new", 1000 + 3_600_001, 500, 3_601_501))
    assert r.zscore(SEEN, "k:old") is None
    assert r.zscore(SEEN, "k:new") is not None
