"""Redis refusing writes for lack of memory: the pure part (:mod:`.pressure` and the
leader's state), synchronous and property-based; the deciders with a store that
refuses, under the autojump clock; and a real noeviction Redis held full while an app
sets counters.
"""

from __future__ import annotations

import itertools
import logging
import math
import random

import hypothesis.strategies as st
import pytest
import trio
import trio.testing
from hypothesis import given, settings

from tests.fakes import FakeStore
from tests.support.backend import RecordingBackend
from tests.support.deciders import deciding
from tests.support.in_process import leading, lone_replica, reconciled
from tests.support.redis_server import RedisServer
from trio_counter_worker.errors import RedisRefused
from trio_counter_worker.keys import Keys
from trio_counter_worker.leader_state import LeaderState
from trio_counter_worker.pressure import Pressure
from trio_counter_worker.store import KeyOutcome, Message

KEYS = Keys("c:*")
OOM = RedisRefused("Redis is out of memory", "oom")


def test_calls_back_off_one_at_a_time_while_refused_and_go_at_once_when_accepted() -> None:
    p = Pressure(first=0.1, most=0.4, quiet=1.0)
    assert p.call_at() == -math.inf
    assert p.refused(10.0)  # starts a refusal: said once
    assert p.call_at() == pytest.approx(10.1)
    p.sent()
    assert p.call_at() == math.inf  # the probe is out: nothing else goes
    assert not p.refused(10.2)
    assert p.call_at() == pytest.approx(10.4)
    assert not p.refused(10.5)
    assert not p.refused(11.0)
    assert p.call_at() == pytest.approx(11.4)  # capped
    p.accepted(11.5, wrote=False)  # a read-only success proves nothing
    assert p.refusing
    assert p.call_at() == pytest.approx(11.9)
    p.accepted(12.0)
    assert not p.refusing
    assert p.call_at() == -math.inf
    assert p.settles_at() == pytest.approx(12.0)  # a quiet second after the last refusal
    assert p.settle(11.9) is None
    relief = p.settle(12.0)
    assert relief is not None
    assert (relief.lasted, relief.refused, relief.dropped) == (2.0, 4, 0)
    assert p.settle(13.0) is None  # said once
    assert p.refused(20.0)  # a new refusal is said again


def test_past_the_bound_keys_are_let_go_said_once_and_reconciled_after() -> None:
    p = Pressure(limit=2)
    assert p.admits(5)  # no refusal: no bound
    p.refused(0.0)
    assert p.admits(1)
    assert not p.admits(2)
    assert not p.admits(2)
    assert p.first_drop()
    assert not p.first_drop()
    assert not p.take_overflow()  # not while Redis still refuses
    p.accepted(1.0)
    assert p.take_overflow()
    assert not p.take_overflow()
    relief = p.settle(5.0)
    assert relief is not None
    assert relief.dropped == 2


def expired(key: str) -> Message:
    return Message(f"__keyspace@0__:{key}", "expired")


def set_event(key: str) -> Message:
    return Message(f"__keyspace@0__:{key}", "set")


# One step: ("set"|"expired", key), ("due", key: a deadline the timer held),
# ("refuse", n) / ("accept", n): a call for up to n keys refused or decided.
_KEY = st.sampled_from([f"c:{i}" for i in range(12)])
_STEP = st.one_of(
    st.tuples(st.sampled_from(["set", "expired", "due"]), _KEY),
    st.tuples(st.sampled_from(["refuse", "accept"]), st.integers(1, 5)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_STEP, max_size=60), st.integers(1, 8))
def test_any_interleaving_of_refusals_and_events_loses_nothing_within_the_bound(
    steps: list[tuple[str, object]], limit: int
) -> None:
    """Every key seen is decided once Redis accepts, with what was asked of it (an
    `expired` event stays a reported claim), unless it was let go past the bound, and
    then a reconcile is asked for; while refusing, what is held never grows past the
    bound."""
    s = LeaderState(KEYS, pressure=Pressure(limit=limit))
    s.resubscribed(1_000)
    owed: dict[str, bool] = {}  # key -> reported (an expiry only the event vouches for)
    now = 0.0

    def decide(n: int) -> bool:
        taken = s.take(n)
        if taken is None:
            return False
        s.done(taken, True)
        s.pressure.accepted(now)
        for i, key in enumerate(taken.keys):
            reported = taken.expired_after is not None and taken.expired_after[i] > 0
            assert reported or not owed.pop(key), key
            owed.pop(key, None)
        return True

    for kind, arg in steps:
        now += 0.1
        if kind == "accept":
            assert isinstance(arg, int)
            decide(arg)
        elif kind == "refuse":
            assert isinstance(arg, int)
            if (taken := s.take(arg)) is not None:
                s.done(taken, True)
                s.put_back(taken)
                s.pressure.refused(now)
        else:
            assert isinstance(arg, str)
            before, held = s.pressure.dropped, s.held
            if kind == "due":
                s.want([arg], "claim")
            else:
                s.on_events([expired(arg) if kind == "expired" else set_event(arg)])
            if s.pressure.dropped == before:
                owed[arg] = owed.get(arg, False) or kind == "expired"
            if s.pressure.since is not None:
                assert s.held <= max(limit, held)
    dropped = s.pressure.dropped > 0
    while decide(100):  # Redis accepts again
        pass
    assert owed == {}
    assert s.pressure.take_overflow() == dropped


class RefusingStore(FakeStore):
    """A FakeStore that refuses every script call with OOM while ``full``."""

    full = False
    refused = 0

    async def track(self, holder: str, keys: list[str]) -> list[KeyOutcome]:
        await trio.lowlevel.checkpoint()
        if self.full:
            self.refused += 1
            raise OOM
        return await super().track(holder, keys)

    async def claim(
        self,
        holder: str,
        keys: list[str],
        expired_after: list[int] | None = None,
        heard: bool = False,
    ) -> list[KeyOutcome]:
        await trio.lowlevel.checkpoint()
        if self.full:
            self.refused += 1
            raise OOM
        return await super().claim(holder, keys, expired_after, heard)


async def test_a_key_seen_while_redis_refuses_is_reset_once_it_accepts(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trio_counter_worker")
    store = RefusingStore("c:*")
    state, deciders, delivered, _ = await deciding(store)
    store.full = True
    store.set_key("c:1", 2.0)  # the app's SET went through; the leader's TRACK will not
    async with trio.open_nursery() as nursery:
        nursery.start_soon(deciders.run)
        state.want(["c:1"], "track")
        deciders.queued()
        await trio.sleep(10.0)  # the key expires meanwhile
        refused = store.refused
        assert 10 < refused < 60  # tried again, at a backoff, not in a loop
        state.on_events([expired("c:1")])  # the `expired` event the leader heard
        deciders.queued()
        await trio.sleep(1.0)
        assert delivered == []
        store.full = False
        await trio.sleep(0.6)  # at most the capped backoff
        assert [r.key for r, _ in delivered] == ["c:1"]
        await trio.sleep(2.0)
        nursery.cancel_scope.cancel()
    lines = [r.getMessage() for r in caplog.records]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "maxmemory" in warnings[0].getMessage()
    assert sum("accepts the leader's writes again" in line for line in lines) == 1


async def test_counters_set_while_redis_is_full_are_all_reset_once(
    redis_server: RedisServer, backend: RecordingBackend, caplog: pytest.LogCaptureFixture
) -> None:
    """maxmemory-policy noeviction held full for 5 s, the app setting 10 counters a
    second throughout (each SET let through, the leader's writes refused around it),
    then memory freed: every counter is reset, once."""
    caplog.set_level(logging.INFO, logger="trio_counter_worker")
    cfg = lone_replica(redis_server, backend, lease_ttl_ms=2000)
    rng = random.Random(21)
    set_during: list[str] = []
    with trio.fail_after(20), redis_server.client() as c:
        c.config_set("maxmemory-policy", "noeviction")
        async with leading(cfg):
            await reconciled(caplog)
            c.config_set("maxmemory", 1)  # full: every write that may grow memory refused
            for i in range(50):
                # The app's SET gets in while memory dips (keys expiring elsewhere).
                c.config_set("maxmemory", 0)
                c.set(f"c:{i}", 1, px=rng.randint(300, 1500))
                c.config_set("maxmemory", 1)
                set_during.append(f"c:{i}")
                await trio.sleep(0.1)
            assert "refuses the leader's writes for lack of memory" in caplog.text
            assert backend.requests == [] or len(backend.requests) < len(set_during)
            c.config_set("maxmemory", 0)
            await backend.wait_for_count_async(len(set_during), timeout=30)  # loaded: >10 s seen
            while "accepts the leader's writes again" not in caplog.text:
                await trio.sleep(0.01)
            await trio.sleep(0.5)  # a second reset of any counter would come by now
    reset = [r.json["key"] for r in backend.requests if r.json is not None]
    assert sorted(reset) == sorted(set_during)  # each once: 0 missed, none twice
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "maxmemory" in warnings[0]
    # One WARNING per spell of refusals, one line when it ends: they alternate (a loaded
    # machine may let a leader's write through the app's own window, ending a spell).
    spells = [
        "refused" if "refuses the leader's writes" in m else "accepted"
        for m in (r.getMessage() for r in caplog.records)
        if "refuses the leader's writes" in m or "accepts the leader's writes again" in m
    ]
    assert spells[0] == "refused", spells
    assert spells[-1] == "accepted", spells
    assert all(a != b for a, b in itertools.pairwise(spells)), spells
