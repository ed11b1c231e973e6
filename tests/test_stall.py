"""A Redis stall (DEBUG SLEEP) past the socket timeout, in exact time.

A key set the instant a stall begins has no recorded deadline yet: the leader's look
(TRACK) waits behind the stall and fails at the socket timeout, so the leader
resynchronises. The key expires during the stall; Redis publishes `expired` on waking,
before the new subscription exists. Redis then has no trace of it (not in a scan, no
recorded deadline): only the leader's memory of having seen it set can reset it.

The fake store's ``debug_sleep`` orders this exactly (tests/fakes.py); bench/stall.py
shows it on a real Redis.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from tests.fakes import FakeStore
from tests.test_leader import Backend, Harness, start_worker, wait_until
from trio_counter_worker import spec

pytestmark = pytest.mark.fail_after(600)


@pytest.fixture
def harness() -> Harness:
    return Harness(FakeStore("c:*"), Backend())


async def test_a_key_set_as_a_stall_begins_and_expiring_during_it_is_reset(
    harness: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    store = harness.store
    async with trio.open_nursery() as nursery:
        await start_worker(nursery, harness)
        await trio.sleep(1.5)  # half a renewal after the last: the lease outlives the stall
        store.set_key("c:unseen", 1.7)
        store.debug_sleep(2.0)
        await wait_until(lambda: bool(harness.resets))
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    assert [e for _, e in harness.elected] == [1]  # one leadership: resynchronised only
    (reset,) = [r for _, r, _ in harness.resets]
    assert reset.key == "c:unseen"
    assert reset.deadline_ms == 3_500  # seen expired on waking: its true end is unknown
    assert not store.deadlines
    assert not store.pending_resets


async def test_a_key_deleted_before_the_stall_is_not_reset(
    harness: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    """Only what may have expired unheard is carried over: a key whose `del` came last
    before the stall is not, though its look waited behind the stall as well."""
    store = harness.store
    async with trio.open_nursery() as nursery:
        await start_worker(nursery, harness)
        await trio.sleep(1.5)
        store.set_key("c:gone", 1.7)
        store.delete_key("c:gone")
        store.set_key("c:kept", 0.5)
        store.debug_sleep(2.0)
        await wait_until(lambda: bool(harness.resets))
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    assert [r.key for _, r, _ in harness.resets] == ["c:kept"]


@pytest.mark.parametrize("replicas", [1, 2])
async def test_a_key_seen_before_a_stall_that_outlasts_the_lease_is_reset_once(
    harness: Harness, autojump_clock: trio.testing.MockClock, replicas: int
) -> None:
    """The stall outlasts the lease: the leader steps down with the key seen but not
    looked at, and cannot decide it (Redis is asleep). What it saw outlives its
    leadership: written to Redis once Redis answers, decided by whoever leads next."""
    store = harness.store
    async with trio.open_nursery() as nursery:
        for n in range(replicas):
            await start_worker(nursery, harness, replica_id=f"r{n}")
        await trio.sleep(1.5)
        store.set_key("c:unseen", 1.7)
        store.set_key("c:later", 9.0)  # set before the stall, expires well after it
        store.debug_sleep(5.0)
        with trio.fail_after(60):
            await wait_until(lambda: len(harness.resets) >= 2)
        await trio.sleep(30)
        nursery.cancel_scope.cancel()
    assert len(harness.elected) >= 2  # the lease was lost to the stall
    keys = sorted(r.key for _, r, _ in harness.resets)
    assert keys == ["c:later", "c:unseen"]
    assert not store.pending_resets
    assert not store.handed


async def test_a_worker_stopped_after_its_leadership_ends_still_hands_over(
    harness: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    """The stall outlasts the lease, and the replica is stopped (SIGTERM) just before
    Redis answers again: what it kept is written to Redis as it stops (Redis answering
    within the half second it tries), not lost with the process."""
    store = harness.store
    async with trio.open_nursery() as nursery:
        await start_worker(nursery, harness)
        await trio.sleep(1.5)
        store.set_key("c:unseen", 1.7)
        store.debug_sleep(5.0)
        await trio.sleep(4.8)  # Redis wakes 0.2 s after the stop
        nursery.cancel_scope.cancel()
    assert [r.key for _, r, _ in harness.resets] == []
    assert [spec.parse_handed(entry) for entry in store.handed] == [("c:unseen", -1, False)]


async def test_an_expiry_heard_before_a_stall_that_outlasts_the_lease_survives_a_re_arm(
    harness: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    """The leader hears the key expire, and Redis stalls before the claim: the stall
    outlasts the lease, so another leadership decides the key, by then set again by the
    app. The episode that ended is reset once all the same: the expiry was heard, and
    what was heard is handed over as heard, not as a possible expiry (which a key alive
    again would be taken for a re-arm of)."""
    store = harness.store
    async with trio.open_nursery() as nursery:
        await start_worker(nursery, harness)
        await trio.sleep(1.5)
        store.expire_unseen("c:k")  # heard: its claim is what waits behind the stall
        store.debug_sleep(5.0)
        await trio.sleep(4.0)
        store.set_key("c:k", 600)  # the app is active again before anyone decides it
        with trio.fail_after(60):
            await wait_until(lambda: bool(harness.resets))
        await trio.sleep(30)
        nursery.cancel_scope.cancel()
    assert len(harness.elected) >= 2  # the lease was lost to the stall
    assert [r.key for _, r, _ in harness.resets] == ["c:k"]
    assert "c:k" in store.keys  # alive again: its next episode is still to come
    assert not store.pending_resets
    assert not store.handed
