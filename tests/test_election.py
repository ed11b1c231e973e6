"""Election timing under trio's autojump clock, against the trio-native fake store.

Times are asserted exactly: with MockClock(autojump_threshold=0) nothing advances the
clock but sleeps, so every renewal and step-down happens at a computed instant.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from tests.fakes import FakeLease, FakeStore
from trio_counter_worker.election import Elector, LeaseTiming
from trio_counter_worker.errors import LeaseLost
from trio_counter_worker.metrics import Metrics

pytestmark = pytest.mark.fail_after(600)  # autojump: a hang fails at once

TTL = 3.0  # renew every 1.0 s, retry every 0.3 s, step down 2.7 s after a renewal was sent


def elector(store: FakeStore, name: str) -> Elector:
    return Elector(store, LeaseTiming(TTL), holder=f"{name}#1", replica_id=name)


def renew_times(store: FakeStore) -> list[float]:
    return [round(t, 6) for t, op in store.calls if op == "renew"]


async def test_acquire_free_lease(autojump_clock: trio.testing.MockClock) -> None:
    store = FakeStore()
    lease = await elector(store, "a").acquire()
    assert lease.epoch == 1
    assert trio.current_time() == 0.0
    assert lease.step_down_at == 2.7
    assert store.lease is not None
    assert store.lease.replica == "a"


async def test_leader_renews_every_third_of_the_ttl(autojump_clock: trio.testing.MockClock) -> None:
    store = FakeStore()
    a = elector(store, "a")
    lease = await a.acquire()
    with trio.move_on_after(3.5):
        await a.hold(lease)
    assert renew_times(store) == [1.0, 2.0, 3.0]
    assert lease.step_down_at == 3.0 + 2.7


async def test_steps_down_on_local_deadline_when_redis_is_down(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = FakeStore()
    a = elector(store, "a")
    lease = await a.acquire()

    async def outage() -> None:
        await trio.sleep(0.5)
        store.down = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(outage)
        with pytest.raises(LeaseLost, match="could not renew"):
            await a.hold(lease)
    # Attempts at 1.0, then every 0.3 s; stepped down at 2.7, before Redis's 3.0 expiry.
    assert renew_times(store) == [1.0, 1.3, 1.6, 1.9, 2.2, 2.5]
    assert trio.current_time() == 2.7
    assert store.lease is not None
    assert store.lease.expires_ms == 3000


async def test_steps_down_on_local_deadline_when_renewal_hangs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = FakeStore()
    a = elector(store, "a")
    lease = await a.acquire()
    store.renew_hangs = True
    with pytest.raises(LeaseLost):
        await a.hold(lease)
    assert trio.current_time() == 2.7


async def test_steps_down_at_once_when_renewal_shows_another_holder(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = FakeStore()
    a = elector(store, "a")
    lease = await a.acquire()
    await trio.sleep(0.5)
    store.lease = FakeLease("intruder#1", "intruder", 99, 10_000)
    with pytest.raises(LeaseLost, match="another holder"):
        await a.hold(lease)
    assert trio.current_time() == 1.0


async def test_standby_takes_over_when_a_crashed_leader_lease_expires(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = FakeStore()
    a, b = elector(store, "a"), elector(store, "b")
    await a.acquire()  # and then "crashes": never renews
    await trio.sleep(0.5)
    lease = await b.acquire()
    # b read pttl 2.5 s at 0.5 and slept exactly that long (+1 ms).
    assert trio.current_time() == 3.001
    assert lease.epoch == 2


async def test_release_hands_over_at_once(autojump_clock: trio.testing.MockClock) -> None:
    store = FakeStore()
    a, b = elector(store, "a"), elector(store, "b")
    await a.acquire()
    acquired_at: list[float] = []

    async def standby() -> None:
        await b.acquire()
        acquired_at.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(standby)
        await trio.sleep(1.25)
        assert await a.release()
        b.notify_released()  # what the worker's release watcher does on the announcement
    assert acquired_at == [1.25]
    assert not await a.release()  # compare-and-delete: no longer ours


async def test_epoch_grows_across_leaders(autojump_clock: trio.testing.MockClock) -> None:
    store = FakeStore()
    epochs = []
    for name in "abc":
        e = elector(store, name)
        epochs.append((await e.acquire()).epoch)
        assert await e.release()
    assert epochs == [1, 2, 3]


async def test_epoch_never_goes_back_after_redis_loses_data(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = FakeStore()
    a = elector(store, "a")
    a.epoch_seen = 0
    for _ in range(5):
        await a.acquire()
        await a.release()
    store.epoch = 0  # Redis restarted without persistence
    store.lease = None
    assert (await a.acquire()).epoch == 6


async def test_standby_polls_once_per_lease_period(autojump_clock: trio.testing.MockClock) -> None:
    store = FakeStore()
    a, b = elector(store, "a"), elector(store, "b")
    lease = await a.acquire()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.hold, lease)
        nursery.start_soon(b.acquire)
        await trio.sleep(30)
        nursery.cancel_scope.cancel()
    standby_calls = [t for t, op in store.calls if op == "acquire"][1:]
    # One look per lease TTL (3 s), never a busy loop.
    assert 9 <= len(standby_calls) <= 11


async def test_waits_while_redis_is_unreachable(autojump_clock: trio.testing.MockClock) -> None:
    store = FakeStore()
    store.down = True

    async def recover() -> None:
        await trio.sleep(4)
        store.down = False

    async with trio.open_nursery() as nursery:
        nursery.start_soon(recover)
        lease = await elector(store, "a").acquire()
    attempts = [t for t, op in store.calls if op == "acquire"]
    assert lease.epoch == 1
    assert attempts[-1] >= 4
    assert 4 <= len(attempts) <= 12  # backoff, not a busy loop


async def test_campaigns_again_as_soon_as_redis_answers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A long outage grows the backoff to seconds; a standby must not sleep it out once
    Redis is back (a promoted replica), while nobody leads."""
    store = FakeStore()
    store.down = True

    async def recover() -> None:
        await trio.sleep(20)
        store.down = False

    async with trio.open_nursery() as nursery:
        nursery.start_soon(recover)
        await elector(store, "a").acquire()
        acquired_at = trio.current_time()
    # The backoff is at its 5 s cap by then; back in at most the 0.3 s floor plus one
    # 0.1 s reachability poll.
    assert 20 < acquired_at <= 20.4 + 1e-6
    attempts = [t for t, op in store.calls if op == "acquire"]
    assert len(attempts) <= 15  # still a backoff while Redis is away, not a busy loop


async def test_a_standby_says_once_that_the_leader_sends_resets_elsewhere(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Two deployments sharing COUNTER_KEY on one Redis are one election: each gets
    resets only while it leads. A standby that sees the leader's endpoint differ says so
    (once per leader and endpoint) and keeps a gauge at 1 while it lasts."""
    store = FakeStore()
    metrics = Metrics()
    a = Elector(store, LeaseTiming(TTL), "a#1", "a", endpoint="https://a.example/reset")
    b = Elector(store, LeaseTiming(TTL), "b#1", "b", metrics, endpoint="https://b.example/reset")
    await a.acquire()
    for _ in range(2):
        with trio.move_on_after(0.5):
            await b.acquire()
    said = [r.getMessage() for r in caplog.records if "sends its resets to" in r.getMessage()]
    assert said == [
        "replica 'a' leads this deployment and sends its resets to "
        "'https://a.example/reset', this replica to 'https://b.example/reset': replicas that "
        "share COUNTER_KEY (and REDIS_DB) on one Redis are one deployment, and only the "
        "leader's RESET_ENDPOINT_URL gets resets; give them the same RESET_ENDPOINT_URL, or "
        "each deployment its own COUNTER_KEY"
    ]
    assert metrics.leader_endpoint_differs._value.get() == 1
    same = Elector(store, LeaseTiming(TTL), "c#1", "c", metrics, endpoint="https://a.example/reset")
    with trio.move_on_after(0.5):
        await same.acquire()
    assert metrics.leader_endpoint_differs._value.get() == 0
    assert len([r for r in caplog.records if "sends its resets to" in r.getMessage()]) == 1


async def test_a_leader_of_an_earlier_version_names_no_endpoint_and_is_not_compared(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    store = FakeStore()
    store.lease = FakeLease("old#1", "old", 3, 10_000)  # no endpoint recorded
    b = Elector(store, LeaseTiming(TTL), "b#1", "b", endpoint="https://b.example/reset")
    with trio.move_on_after(0.5):
        await b.acquire()
    assert "sends its resets to" not in caplog.text
