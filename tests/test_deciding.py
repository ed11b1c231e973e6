"""The deciding side alone: the call limits as plain logic (synchronous), and the
deciders through their interface (keys queued in the state in, claimed resets out to
``deliver``) under trio's autojump clock with the fake store.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from tests.fakes import FakeStore
from tests.support.deciders import deciding
from trio_counter_worker.decisions import CallLimits
from trio_counter_worker.errors import LeaseLost
from trio_counter_worker.leader_state import EARLY
from trio_counter_worker.store import KeyOutcome

pytestmark = pytest.mark.fail_after(600)


def test_small_calls_of_a_kind_are_limited_but_a_full_batch_always_goes() -> None:
    calls = CallLimits(batch=10, looks=3, small=2)
    assert calls.allowed(1) == (True, True)
    calls.started(True, 1)
    calls.started(True, 9)
    assert calls.allowed(1) == (False, True)  # two small claims in flight
    assert calls.allowed(10) == (True, True)  # a full batch waits for nothing
    calls.finished(True, 9)
    assert calls.allowed(1) == (True, True)


def test_looks_in_flight_are_capped_whatever_their_size() -> None:
    calls = CallLimits(batch=10, looks=2, small=4)
    calls.started(False, 10)
    calls.started(False, 10)
    assert calls.allowed(100) == (True, False)  # claims still go: they come first
    calls.finished(False, 10)
    assert calls.allowed(1) == (True, True)  # full looks do not count as small


class PoisonStore(FakeStore):
    """A store whose scripts fail unexpectedly on keys named *bad*."""

    async def track(self, holder: str, keys: list[str]) -> list[KeyOutcome]:
        if any("bad" in k for k in keys):
            await trio.lowlevel.checkpoint()
            raise ValueError("cannot decode")
        return await super().track(holder, keys)


async def test_a_tracked_key_is_claimed_at_its_deadline_and_handed_to_deliver(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = FakeStore("c:*")
    state, deciders, delivered, _ = await deciding(store)
    store.set_key("c:1", 2.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(deciders.run)
        state.want(["c:1"], "track")
        deciders.queued()
        await trio.sleep(2.0 + EARLY / 2)
        assert delivered == []  # not before its deadline
        await trio.sleep(EARLY)
        nursery.cancel_scope.cancel()
    [(reset, history)] = delivered
    assert (reset.key, history) == ("c:1", None)
    assert reset.reset_id in store.pending_resets


async def test_a_key_that_fails_alone_is_set_aside_and_the_others_decided(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = PoisonStore("c:*")
    state, deciders, _, metrics = await deciding(store)
    keys = ["c:1", "c:2", "c:bad", "c:3"]
    for key in keys:
        store.set_key(key, 30.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(deciders.run)
        state.want(keys, "track")
        deciders.queued()
        await deciders.wait_for_room(0)
        while "c:bad" not in state.quarantine or len(store.deadlines) < 3:
            await trio.sleep(0.001)
        nursery.cancel_scope.cancel()
    assert sorted(store.deadlines) == ["c:1", "c:2", "c:3"]
    assert state.quarantine.keys == {"c:bad": "ValueError: cannot decode"}
    assert metrics.registry.get_sample_value("tcw_quarantined_total") == 1.0
    assert [k in state.schedule for k in keys] == [True, True, False, True]


async def test_losing_the_lease_is_raised_not_set_aside(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = FakeStore("c:*")
    state, deciders, _, _ = await deciding(store)
    store.set_key("c:1", 30.0)
    store.lease = None
    state.want(["c:1"], "track")
    with pytest.RaisesGroup(pytest.RaisesExc(LeaseLost), flatten_subgroups=True):
        await deciders.run()
    assert "c:1" not in state.quarantine
