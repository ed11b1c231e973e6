"""The contract: the Lua scripts and their Python specification decide alike.

One table of cases (what a script reads about a key: PTTL, recorded deadline, tombstone,
and whether and after when Redis reported it expired) goes through the Lua on a real
redis-server and through :mod:`trio_counter_worker.spec`; the outcomes must be the same,
down to the reset_id and what is left recorded.

- The Cluster apply scripts take their facts (time, PTTL, expiry) as arguments, so every
  case runs through them exactly, including deadlines within the due slack.
- CLAIM and TRACK read Redis's own clock and the key itself: the cases run with margins
  of a second around every boundary, and the expected outcome is computed at the time the
  script reports.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
import redis

from tests.support.redis_server import RedisServer
from trio_counter_worker import scripts, spec
from trio_counter_worker.keys import Keys

KEYS = Keys("k:*")
NS = KEYS.namespace
LEASE, DEADLINES, PENDING, SEEN, CLAIMED, PAYLOADS = (
    KEYS.lease,
    KEYS.deadlines,
    KEYS.pending,
    KEYS.seen,
    KEYS.claimed,
    KEYS.payloads,
)
PAYLOAD = "room 7"  # CLAIM and TRACK: every case's key was touched with one
HOLDER = "me#1"
EPOCH = 3
NOW = 1_800_000_000_000  # the facts' time in the apply cases


@attrs.frozen
class Case:
    """Offsets from the script's now (ms), or None."""

    pttl: int  # -2, -1, or a TTL
    deadline: int | None
    claimed: int | None
    after: int | None
    heard: bool = False  # the report is an `expired` event heard

    def reported(self, now: int) -> str:
        """The script's argument for the report."""
        if self.after is None:
            return ""
        return ("h" if self.heard else "") + str(now + self.after)

    def decide(self, seen_at: int, now: int) -> spec.Verdict:
        after = None if self.after is None else seen_at + self.after
        return spec.claim(self.seen(seen_at), now, after, self.heard)

    def seen(self, now: int) -> spec.Seen:
        return spec.Seen(
            self.pttl,
            now + self.pttl if self.pttl >= 0 else -1,
            None if self.deadline is None else now + self.deadline,
            None if self.claimed is None else now + self.claimed,
        )


def cases(slack: bool) -> list[Case]:
    deadlines: list[int | None] = [None, -1_000, 10_000]
    if slack:  # exact time only: at, and just inside and outside the due slack
        deadlines += [0, spec.DUE_SLACK_MS, spec.DUE_SLACK_MS + 1]
    return [
        Case(pttl, deadline, claimed, after, heard)
        for pttl, deadline, claimed, after, heard in itertools.product(
            [-2, -1, 5_000],
            deadlines,
            [None, -1_000, -spec.TOMBSTONE_MS - 1_000],
            [None, -2_000, -500, -1_000],  # -1_000: after the claim's own marker
            [False, True],
        )
        if not (heard and after is None)
    ]


@pytest.fixture
def r(redis_server: RedisServer) -> Iterator[redis.Redis]:
    with redis_server.client() as client:
        client.hset(LEASE, mapping={"holder": HOLDER, "replica": "me", "epoch": EPOCH})
        client.pexpire(LEASE, 600_000)
        yield client


def expected(verdict: spec.Verdict, key: str, now: int) -> dict[str, Any]:
    """The script's answer row and what it leaves recorded, as the spec says."""
    if verdict.kind == "claimed":
        assert verdict.deadline is not None
        return {
            "kind": "claimed",
            "deadline_ms": verdict.deadline,
            "reset_id": spec.reset_id(NS, key, verdict.deadline),
            "claimed_ms": now,
            "fencing_token": EPOCH,
            "recorded": verdict.lives_until,  # set again: its new life recorded
            "tombstone": now,
        }
    return {
        "kind": verdict.kind,
        "recorded": verdict.deadline if verdict.kind == "alive" else "unchanged",
    }


def actual(
    r: redis.Redis,
    row: dict[str, Any],
    key: str,
    before: float | None,
    tombstone_before: float | None,
    prune_below: int | None = None,
) -> dict[str, Any]:
    """What the script answered and left; a claim script also drops tombstones older
    than ``prune_below``."""
    if tombstone_before is not None and prune_below is not None and tombstone_before < prune_below:
        tombstone_before = None
    recorded = r.zscore(DEADLINES, key)
    if "claimed" in row:
        rec = json.loads(row["claimed"])
        assert r.hexists(PENDING, rec["reset_id"])
        assert ("p" in row) == (recorded is not None), "set again: answered and recorded"
        return {
            "kind": "claimed",
            "deadline_ms": rec["deadline_ms"],
            "reset_id": rec["reset_id"],
            "claimed_ms": rec["claimed_ms"],
            "fencing_token": rec["fencing_token"],
            "recorded": recorded,
            "tombstone": r.zscore(CLAIMED, key),
        }
    assert r.zscore(CLAIMED, key) == tombstone_before, "only a claim moves the tombstone"
    kind = "alive" if "p" in row else "due" if row.get("due") else "gone"
    if kind == "gone":
        assert recorded is None, "gone: no deadline stays recorded"
        return {"kind": kind, "recorded": "unchanged"}
    return {"kind": kind, "recorded": "unchanged" if recorded == before else recorded}


def _arrange(r: redis.Redis, key: str, case: Case, now: int) -> tuple[float | None, float | None]:
    if case.deadline is not None:
        r.zadd(DEADLINES, {key: now + case.deadline})
    if case.claimed is not None:
        r.zadd(CLAIMED, {key: now + case.claimed})
    return r.zscore(DEADLINES, key), r.zscore(CLAIMED, key)


def test_apply_claim_is_spec_claim(r: redis.Redis) -> None:
    apply_claim = r.register_script(scripts.APPLY_CLAIM)
    for n, case in enumerate(cases(slack=True)):
        key = f"k:{n}"
        before, tombstone = _arrange(r, key, case, NOW)
        seen = case.seen(NOW)
        raw = apply_claim(
            keys=[LEASE, DEADLINES, PENDING, SEEN, CLAIMED],
            args=[HOLDER, NS, key, NOW, seen.pttl, seen.expire_at, case.reported(NOW)],
        )
        (row,) = json.loads(raw)["keys"]
        want = case.decide(NOW, NOW)
        got = actual(r, row, key, before, tombstone, NOW - spec.TOMBSTONE_MS)
        assert got == expected(want, key, NOW), case


def test_apply_track_is_spec_track(r: redis.Redis) -> None:
    apply_track = r.register_script(scripts.APPLY_TRACK)
    for n, case in enumerate(c for c in cases(slack=True) if c.claimed is None and c.after is None):
        key = f"k:{n}"
        before, tombstone = _arrange(r, key, case, NOW)
        seen = case.seen(NOW)
        raw = apply_track(
            keys=[LEASE, DEADLINES, SEEN], args=[HOLDER, key, NOW, seen.pttl, seen.expire_at]
        )
        (row,) = json.loads(raw)["keys"]
        got = actual(r, row, key, before, tombstone)
        assert got == expected(spec.track(seen, NOW), key, NOW), case


def _redis_now(r: redis.Redis) -> int:
    seconds, micros = r.time()
    return int(seconds) * 1000 + int(micros) // 1000


def _set_key(r: redis.Redis, key: str, pttl: int) -> None:
    if pttl == -1:
        r.set(key, 1)
    elif pttl >= 0:
        r.set(key, 1, px=pttl)


def test_claim_is_spec_claim(r: redis.Redis) -> None:
    """CLAIM itself, on keys that really are alive, without a TTL, or gone."""
    claim = r.register_script(scripts.CLAIM)
    for n, case in enumerate(cases(slack=False)):
        key = f"k:{n}"
        now = _redis_now(r)
        _set_key(r, key, case.pttl)
        before, tombstone = _arrange(r, key, case, now)
        r.hset(PAYLOADS, key, PAYLOAD)
        raw = json.loads(
            claim(
                keys=[LEASE, DEADLINES, PENDING, CLAIMED, PAYLOADS, key],
                args=[HOLDER, NS, "", case.reported(now)],
            )
        )
        at = int(raw["now"])  # the script's own now: the spec decides at the same time
        (row,) = raw["keys"]
        want = case.decide(now, at)
        got = actual(r, row, key, before, tombstone, at - spec.TOMBSTONE_MS)
        # The payload goes with a claimed episode, is dropped with a gone one.
        assert r.hget(PAYLOADS, key) == (PAYLOAD if want.kind in ("alive", "due") else None)
        if want.kind == "claimed":
            assert json.loads(row["claimed"])["payload"] == PAYLOAD, case
        if want.kind == "alive" or want.lives_until is not None:
            # the expiry Redis holds: set between now and the claim
            assert now + case.pttl - 2 <= got["recorded"] <= at + case.pttl, case
            if want.kind == "alive":
                assert got["kind"] == "alive", case
                continue
            want = attrs.evolve(want, lives_until=got["recorded"])
        assert got == expected(want, key, at), case


def test_track_is_spec_track(r: redis.Redis) -> None:
    track = r.register_script(scripts.TRACK)
    for n, case in enumerate(
        c for c in cases(slack=False) if c.claimed is None and c.after is None
    ):
        key = f"k:{n}"
        now = _redis_now(r)
        _set_key(r, key, case.pttl)
        before, tombstone = _arrange(r, key, case, now)
        r.hset(PAYLOADS, key, PAYLOAD)
        raw = json.loads(track(keys=[LEASE, DEADLINES, PAYLOADS, key], args=[HOLDER]))
        (row,) = raw["keys"]
        want = spec.track(case.seen(now), int(raw["now"]))
        got = actual(r, row, key, before, tombstone)
        assert r.hget(PAYLOADS, key) == (None if want.kind == "gone" else PAYLOAD), case
        if want.kind == "alive":  # the expiry Redis holds: set between now and the track
            assert got["kind"] == "alive", case
            assert now + case.pttl - 2 <= got["recorded"] <= int(raw["now"]) + case.pttl, case
            continue
        assert got == expected(want, key, int(raw["now"])), case


def test_markers_follow_claims(r: redis.Redis, redis_server: RedisServer) -> None:
    """A claim publishes "<claimed_ms> <key>" on the marker channel; the key's `expired`
    echo comes before it on the same subscription."""
    r.config_set("notify-keyspace-events", "Kx")
    with redis_server.client() as sub_client:
        sub = sub_client.pubsub()
        sub.psubscribe("__keyspace@0__:k:*")
        sub.subscribe(KEYS.claims)
        for _ in range(2):
            sub.get_message(timeout=1)
        r.set("k:m", 1, px=1)
        r.zadd(DEADLINES, {"k:m": _redis_now(r)})
        time.sleep(0.01)  # the TTL runs out; the claim's touch (or Redis) expires it
        raw = json.loads(
            r.register_script(scripts.CLAIM)(
                keys=[LEASE, DEADLINES, PENDING, CLAIMED, PAYLOADS, "k:m"],
                args=[HOLDER, NS, KEYS.claims, ""],
            )
        )
        (row,) = raw["keys"]
        claimed_ms = json.loads(row["claimed"])["claimed_ms"]
        got = [sub.get_message(timeout=1) for _ in range(2)]
        sub.close()
    assert [m["data"] for m in got if m] == ["expired", f"{claimed_ms} k:m"]
