"""Fast takeover from a dead leader, under trio's autojump clock with the fake store.

Whole workers share one trio-native fake (its PUBSUB NUMSUB counts the listeners it
holds), so every takeover instant is exact. A dead leader is a lease whose liveness
channel nobody is subscribed to, as Redis leaves it within milliseconds of a SIGKILL.
The same rules run as Lua against a real Redis in test_lease_contract.py; real
processes are killed in test_replicas.py.
"""

from __future__ import annotations

import logging
from functools import partial

import attrs
import pytest
import trio
import trio.testing

from tests.fakes import FakeLease, FakeStore
from tests.test_leader import Backend, Harness, start_worker, wait_until
from trio_counter_worker import Hooks, lease_spec
from trio_counter_worker.store import Message

pytestmark = pytest.mark.fail_after(600)

DEAD_CHANNEL = "tcw:{c:*}:alive:dead#0:1"


@pytest.fixture
def harness() -> Harness:
    return Harness(FakeStore("c:*"), Backend())


def dead_leader(store: FakeStore, *, expires_at: float = 3.0, alive: str = DEAD_CHANNEL) -> None:
    """A lease held by a replica whose connection Redis has dropped (epoch 5)."""
    store.epoch = 5
    store.lease = FakeLease("dead#0", "dead", 5, round(expires_at * 1000), alive)


@attrs.define
class Deposable(Harness):
    deposed: list[tuple[float, int]] = attrs.Factory(list)

    def hooks(self) -> Hooks:
        return attrs.evolve(
            super().hooks(), on_deposed=lambda e: self.deposed.append((trio.current_time(), e))
        )


async def holder_subscribed(
    store: FakeStore, *, task_status: trio.TaskStatus[trio.CancelScope]
) -> None:
    """The dead leader's holder, alive until the scope it reports is cancelled (its
    connection dropped)."""
    send, _receive = trio.open_memory_channel[list[Message]](1)
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as inner:
            await inner.start(
                partial(store.listen, patterns=[], channels=[DEAD_CHANNEL], send=send)
            )
            task_status.started(scope)


async def elected_after_a_death_at_one_second(
    harness: Harness, lease_deleted: bool = False
) -> float:
    """A worker beside a live leader that dies at 1.0 s (its connection dropped, or its
    lease key deleted): when the worker was elected."""
    store = harness.store
    dead_leader(store)
    async with trio.open_nursery() as nursery:
        holder = await nursery.start(holder_subscribed, store)
        await start_worker(nursery, harness)
        await trio.sleep(1.0)
        assert not harness.elected
        if lease_deleted:
            store.lease = None
        else:
            holder.cancel()
        await wait_until(lambda: bool(harness.elected))
        nursery.cancel_scope.cancel()
    ((at, _),) = harness.elected
    return at


def acquires(store: FakeStore) -> int:
    return sum(op == "acquire" for _, op in store.calls)


def watches(store: FakeStore) -> int:
    return sum(op == "watch" for _, op in store.calls)


# -- the rules, synchronously --------------------------------------------------------


def _held(alive: str = "ch") -> lease_spec.LeaseRecord:
    return lease_spec.LeaseRecord("other#1", "other", 7, alive)


@pytest.mark.parametrize(
    ("lease", "mine", "suspect", "subs", "acquired", "liveness"),
    [
        (_held(), "me", "", {"me": 1}, False, "gone"),  # first look: only suspected
        (_held(), "me", "ch", {"me": 1}, True, "off"),  # seen gone twice: stolen
        (_held(), "me", "ch", {"me": 1, "ch": 1}, False, "alive"),  # alive: kept
        (_held(), "me", "ch", None, False, "unknown"),  # PUBSUB refused: the TTL decides
        (_held(""), "me", "ch", {"me": 1}, False, "off"),  # holder without liveness
        (_held(), "", "ch", {}, False, "off"),  # caller without liveness
        (_held(), "me", "old", {"me": 1}, False, "gone"),  # suspected another channel
        (_held(), "me", "ch", {}, False, "gone"),  # caller not seen: no steal
    ],
)
def test_acquire_rules(
    lease: lease_spec.LeaseRecord,
    mine: str,
    suspect: str,
    subs: dict[str, int] | None,
    acquired: bool,
    liveness: str,
) -> None:
    out = lease_spec.acquire(
        lease, 7, holder="me#1", replica="me", epoch_floor=0, mine=mine, suspect=suspect,
        subscribers=subs,
    )  # fmt: skip
    assert out.acquired is acquired
    if acquired:
        assert (out.epoch, out.taken_from, out.lease) == (
            8,
            "other",
            lease_spec.LeaseRecord("me#1", "me", 8, mine),
        )
    else:
        assert (out.liveness, out.lease, out.epoch_counter) == (liveness, lease, 7)


def test_a_replica_not_seen_subscribed_takes_no_lease() -> None:
    out = lease_spec.acquire(None, 3, holder="me#1", replica="me", epoch_floor=0, mine="me",
                             subscribers={})  # fmt: skip
    assert (out.acquired, out.ready, out.lease) == (False, False, None)
    ours = lease_spec.LeaseRecord("me#1", "me", 3, "old")
    kept = lease_spec.acquire(ours, 3, holder="me#1", replica="me", epoch_floor=0, mine="me",
                              subscribers={})  # fmt: skip
    assert (kept.acquired, kept.ready, kept.lease) == (False, False, ours)


def test_renew_rules() -> None:
    ours = lease_spec.LeaseRecord("me#1", "me", 3, "me")
    assert lease_spec.renew(ours, holder="me#1", subscribers={"me": 1}) == "renewed"
    assert lease_spec.renew(ours, holder="me#1", subscribers={}) == "unseen"
    assert lease_spec.renew(ours, holder="me#1", subscribers=None) == "renewed"
    assert lease_spec.renew(ours, holder="x#1", subscribers={"me": 1}) == "lost"
    assert lease_spec.renew(None, holder="me#1") == "lost"


# -- whole workers on the fake -------------------------------------------------------


async def test_a_dead_leader_is_replaced_after_two_looks_a_grace_apart(
    harness: Harness, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    dead_leader(harness.store)
    caplog.set_level(logging.INFO)
    async with trio.open_nursery() as nursery:
        await start_worker(nursery, harness)
        await wait_until(lambda: bool(harness.elected))
        nursery.cancel_scope.cancel()
    # Seen gone at 0.0, stolen at the 10 ms grace: not at the lease's 3.0 expiry.
    assert harness.elected == [(0.01, 6)]
    assert acquires(harness.store) == 2
    assert "taken over from dead: its connection to Redis is gone" in caplog.text


async def test_a_live_leader_is_left_alone_until_its_lease_expires(
    harness: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    store = harness.store
    dead_leader(store)
    async with trio.open_nursery() as nursery:
        # The holder's subscription is there: it is alive, however quiet.
        await nursery.start(holder_subscribed, store)
        await start_worker(nursery, harness)
        await wait_until(lambda: bool(harness.elected))
        nursery.cancel_scope.cancel()
    assert [(round(t, 6), e) for t, e in harness.elected] == [(3.0, 6)]
    # A standby's cost while a leader lives: one look (PUBSUB NUMSUB and PTTL, no
    # script) per TAKEOVER_CHECK_MS (25 ms); ACQUIRE at the start and at the lease's end.
    assert acquires(store) == 2
    assert watches(store) == 3.0 / 0.025 + 1


@pytest.mark.parametrize("how", ["connection dropped", "lease deleted"])
async def test_a_leader_that_dies_while_watched_is_replaced_within_a_check_and_a_grace(
    harness: Harness, autojump_clock: trio.testing.MockClock, how: str
) -> None:
    """The watch wakes the campaign: its subscription gone (a SIGKILL), or the lease key
    gone with no release announced (one the standby missed): not at the lease's end."""
    store = harness.store
    at = await elected_after_a_death_at_one_second(harness, how == "lease deleted")
    assert [e for _, e in harness.elected] == [6]
    # Seen at the next look (within 25 ms), then stolen after the 10 ms grace (a lease
    # deleted is taken at once).
    assert 1.0 < at <= 1.0 + 0.025 + (0.01 if how == "connection dropped" else 0.0) + 1e-9
    assert acquires(store) <= 3


@pytest.mark.parametrize("why", ["pubsub refused", "takeover off", "holder without liveness"])
async def test_without_liveness_failover_waits_for_the_lease(
    harness: Harness, autojump_clock: trio.testing.MockClock, why: str
) -> None:
    store = harness.store
    dead_leader(store, alive="" if why == "holder without liveness" else DEAD_CHANNEL)
    store.pubsub_refused = why == "pubsub refused"
    kw = {"takeover_check_ms": 0} if why == "takeover off" else {}
    async with trio.open_nursery() as nursery:
        await start_worker(nursery, harness, **kw)
        await wait_until(lambda: bool(harness.elected))
        nursery.cancel_scope.cancel()
    assert harness.elected == [(3.001, 6)]  # just past the lease's end
    assert acquires(store) == 2  # one look, then asleep until the lease runs out


async def test_a_leader_whose_subscription_drops_steps_down_at_once(
    harness: Harness, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    store = harness.store
    harness = Deposable(store, harness.backend)
    deposed = harness.deposed
    async with trio.open_nursery() as nursery:
        worker = await start_worker(nursery, harness)
        await wait_until(lambda: bool(harness.elected))
        await trio.sleep(1.5)  # between two renewals (every 1.0 s)
        assert worker.liveness.channel
        cut_at = trio.current_time()
        assert store.cut_subscriptions(worker.liveness.channel) == 1
        await wait_until(lambda: bool(deposed))
        await wait_until(lambda: len(harness.elected) == 2)
        nursery.cancel_scope.cancel()
    assert deposed[0] == (cut_at, 1)  # at once
    assert "liveness subscription to Redis dropped: stepping down at once" in caplog.text
    # Back as leader once subscribed again, under a new epoch: the lease was released.
    assert harness.elected[1][1] == 2
    assert store.lease is None or store.lease.alive != ""


async def test_renewal_fails_when_redis_no_longer_sees_the_leader(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A leader that missed its own subscription's drop learns it at its next renewal."""
    store = FakeStore("c:*")
    store.lease = FakeLease("me#1", "me", 1, 3000, "tcw:{c:*}:alive:me#1:1")
    assert await store.renew("me#1", 3000) == "unseen"
    assert store.lease.expires_ms == 3000  # not extended


async def test_a_watch_that_fails_oddly_falls_back_to_the_acquire_script(
    harness: Harness,
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An answer the watch cannot read: one WARNING, and the acquire script looks every
    TAKEOVER_CHECK_MS as before the watch existed, so a dead leader is still replaced
    within a check and a grace."""
    store = harness.store

    async def odd(channel: str, every: float) -> str:
        await trio.lowlevel.checkpoint()
        raise ValueError("invalid literal for int() with base 10: b'?'")

    monkeypatch.setattr(store, "wait_leader_gone", odd)
    at = await elected_after_a_death_at_one_second(harness)
    assert 1.0 < at <= 1.0 + 0.025 + 0.025 + 0.01 + 1e-9
    assert acquires(store) >= 1.0 / 0.025  # a look every check, as before the watch
    warned = [r for r in caplog.records if "watching the leader's liveness failed" in r.message]
    assert len(warned) == 1
