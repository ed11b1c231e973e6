"""`expired` events for keys with no usable recorded deadline, against a real redis-server.

An event is reported with the time it is known to have been published after (the start of
the subscription, or the last claim marker seen for the key): it ends an episode unless a
claim came later (then it is that claim's echo). See trio_counter_worker.spec.claim.
"""

from __future__ import annotations

import trio

from tests.support.bridge import bridge_on
from tests.support.redis_server import RedisServer
from tests.support.tracking import armed_and_tracked
from trio_counter_worker.redis_bridge import RedisBridge
from trio_counter_worker.store import KeyOutcome, PageStart

HOLDER = "me#1"


def _bridge(redis_server: RedisServer) -> RedisBridge:
    return bridge_on(redis_server, "c:*", lease_ttl_ms=5000)


async def test_reported_expiry_is_claimed_once_and_echoes_are_not(
    redis_server: RedisServer,
) -> None:
    bridge = _bridge(redis_server)
    try:
        with trio.fail_after(20):
            assert (await bridge.acquire(HOLDER, "me", 5000, 0)).acquired
            # Never tracked, already gone: without the report it is just "gone".
            (plain,) = await bridge.claim(HOLDER, ["c:unseen"])
            assert plain.kind == "gone"
            (first,) = await bridge.claim(HOLDER, ["c:unseen"], [0])
            assert first.kind == "claimed"
            assert first.claimed_ms > 0
            # Reported as published before that claim: its echo, one reset per expiry.
            (echo,) = await bridge.claim(HOLDER, ["c:unseen"], [first.claimed_ms - 1])
            assert echo.kind == "gone"

            # A tracked key claimed at its deadline: its own `expired` echo is ignored.
            def arm(ttl_ms: int) -> None:
                with redis_server.client() as c:
                    c.set("c:tracked", 1, px=ttl_ms)

            async def track() -> KeyOutcome:
                (outcome,) = await bridge.track(HOLDER, ["c:tracked"])
                return outcome

            _, tracked = await armed_and_tracked(arm, track)
            await trio.sleep(tracked.pttl_ms / 1000 + 0.05)  # past its deadline
            (due,) = await bridge.claim(HOLDER, ["c:tracked"])
            assert due.kind == "claimed"
            (echo2,) = await bridge.claim(HOLDER, ["c:tracked"], [due.claimed_ms - 1])
            assert echo2.kind == "gone"
            # A key alive again when a report of a possible expiry is read: tracked, not
            # reset (it may only have been re-armed) ...
            with redis_server.client() as c:
                c.set("c:back", 1, ex=60)
            (alive,) = await bridge.claim(HOLDER, ["c:back"], [0])
            assert alive.kind == "alive"
            assert len(await bridge.pending()) == 2
            # ... but an `expired` event heard ended an episode: the app set it again.
            (again,) = await bridge.claim(HOLDER, ["c:back"], [0], heard=True)
            assert again.kind == "claimed"
            assert again.lives_again
            assert 59_000 < again.pttl_ms <= 60_000
            assert again.reset is not None
            assert again.reset.deadline_ms == again.claimed_ms  # no deadline had passed
            with redis_server.client() as c:
                recorded = c.zscore(bridge.keys.deadlines, "c:back")
                assert recorded is not None
                assert recorded > again.claimed_ms + 59_000  # its new life, tracked
            assert len(await bridge.pending()) == 3
            # The same event heard again is that claim's: no second reset.
            (echo3,) = await bridge.claim(HOLDER, ["c:back"], [0], heard=True)
            assert echo3.kind == "alive"
    finally:
        await bridge.aclose()


async def test_an_expiry_after_a_claim_is_a_new_episode(redis_server: RedisServer) -> None:
    """The handoff miss: the key's last episode was claimed a moment ago (tombstone), the
    app set it again unseen and it expired; reported after that claim, it is a new
    episode, not an echo."""
    bridge = _bridge(redis_server)
    try:
        with trio.fail_after(10):
            assert (await bridge.acquire(HOLDER, "me", 5000, 0)).acquired
            (first,) = await bridge.claim(HOLDER, ["c:k"], [0])
            assert first.kind == "claimed"
            await trio.sleep(0.01)
            (second,) = await bridge.claim(HOLDER, ["c:k"], [first.claimed_ms])
            assert second.kind == "claimed"
            assert first.reset is not None
            assert second.reset is not None
            assert second.reset.reset_id != first.reset.reset_id
    finally:
        await bridge.aclose()


async def test_a_stale_future_deadline_does_not_hide_a_reported_expiry(
    redis_server: RedisServer,
) -> None:
    """Recorded deadline in 60 s; the app re-armed the key with 50 ms unseen (a handoff)
    and it expired: the report ends the episode when seen, and the stale deadline goes."""
    bridge = _bridge(redis_server)
    try:
        with trio.fail_after(10):
            assert (await bridge.acquire(HOLDER, "me", 5000, 0)).acquired
            with redis_server.client() as c:
                c.set("c:s", 1, ex=60)
                await bridge.track(HOLDER, ["c:s"])
                c.set("c:s", 1, px=50)
            await trio.sleep(0.1)
            (plain,) = await bridge.claim(HOLDER, ["c:s"])  # unreported: a delete
            assert plain.kind == "gone"
            with redis_server.client() as c:
                c.set("c:s", 1, ex=60)
                await bridge.track(HOLDER, ["c:s"])
                c.set("c:s", 1, px=50)
            await trio.sleep(0.1)
            (reported,) = await bridge.claim(HOLDER, ["c:s"], [0])
            assert reported.kind == "claimed"
            assert reported.reset is not None
            assert reported.reset.deadline_ms == reported.claimed_ms
            assert (await bridge.tracked(HOLDER, PageStart())).rows == []
    finally:
        await bridge.aclose()


async def test_a_payload_goes_with_its_episode_and_no_further(redis_server: RedisServer) -> None:
    """tcw_touch stores a payload beside the deadline: a claim carries it in the pending
    record and drops it; a key found gone (deleted early) drops it too."""
    bridge = _bridge(redis_server)
    payloads = bridge.keys.payloads
    try:
        with trio.fail_after(10):
            assert (await bridge.acquire(HOLDER, "me", 5000, 0)).acquired
            with redis_server.client() as c:
                c.hset(payloads, mapping={"c:p": b"room \xff7", "c:del": "x", "c:t": "y"})
                c.set("c:p", 1, px=1000)  # alive when tracked, however loaded the machine
                c.set("c:del", 1, ex=60)
                c.set("c:t", 1, ex=60)
            await bridge.track(HOLDER, ["c:p", "c:del", "c:t"])
            with redis_server.client() as c:
                c.delete("c:del", "c:t")
                while c.exists("c:p"):  # until it expires
                    await trio.sleep(0.02)
            (gone_t,) = await bridge.track(HOLDER, ["c:t"])
            claimed, gone = await bridge.claim(HOLDER, ["c:p", "c:del"])
            assert gone_t.kind == "gone"
            assert gone.kind == "gone"
            assert claimed.reset is not None
            assert claimed.reset.payload == "room \udcff7"
            assert (await bridge.pending())[0].payload == "room \udcff7"
            with redis_server.client() as c:
                assert c.hlen(payloads) == 0
    finally:
        await bridge.aclose()
