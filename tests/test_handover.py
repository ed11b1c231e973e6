"""Keys a leadership could not decide, handed to the next leader (handover.py).

The carry is plain logic (times passed in); the leader's side (``LeaderState.adopt``)
likewise; HAND_OVER and TAKE_HANDED are held to ``spec.take_handed`` on a real Redis.
The whole path, a stall that outlasts the lease, runs in tests/test_stall.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fakes import FakeStore
from tests.support.redis_server import RedisServer
from trio_counter_worker import scripts, spec
from trio_counter_worker.handover import Handover
from trio_counter_worker.keys import HANDED_HINT, Keys
from trio_counter_worker.leader_state import LeaderState
from trio_counter_worker.store import Message

KEYS = Keys("c:*")
HOLDER = "me#1"


# -- the carry -----------------------------------------------------------------------


def test_kept_keys_are_written_once_and_forgotten() -> None:
    h = Handover()
    h.keep([("c:a", 5, False), ("c:b", 7, False)], now=0.0)
    assert h.due(1.0) == [("c:a", 5, False), ("c:b", 7, False)]
    h.written([("c:a", 5, False), ("c:b", 7, False)])
    assert len(h) == 0


async def test_flush_writes_what_is_kept_and_forgets_it() -> None:
    store = FakeStore("c:*")
    h = Handover()
    h.keep([("c:a", 5, False), ("c:b", -1, False)], now=trio.current_time())
    await h.flush(store)
    assert {spec.parse_handed(e) for e in store.handed} == {("c:a", 5, False), ("c:b", -1, False)}
    assert len(h) == 0


async def test_flush_lets_go_and_says_so_when_redis_does_not_take_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = FakeStore("c:*")
    store.down = True
    h = Handover()
    h.keep([("c:a", 5, False)], now=trio.current_time())
    await h.flush(store)
    assert len(h) == 0
    assert store.handed == {}
    assert "1 key(s) seen by this replica's last leadership could not be handed over" in (
        caplog.text
    )


def test_a_key_decided_by_the_leader_is_not_handed_over() -> None:
    h = Handover()
    h.keep([("c:a", 5, False), ("c:b", 7, False)], now=0.0)
    h.decided(["c:a"])
    assert h.due(0.0) == [("c:b", 7, False)]


def test_a_key_kept_again_meanwhile_stays_with_its_later_time() -> None:
    h = Handover()
    h.keep([("c:a", 5, False)], now=0.0)
    batch = h.due(1.0)
    h.keep([("c:a", 9, False)], now=1.0)  # a later leadership let it go again while writing
    h.written(batch)
    assert h.due(2.0) == [("c:a", 9, False)]


def test_a_heard_expiry_stays_heard_while_kept() -> None:
    """Kept again at the same time unheard (another report of the same sighting), it
    stays heard; a later report replaces it (latest_report)."""
    h = Handover()
    h.keep([("c:a", 5, True), ("c:b", 5, True)], now=0.0)
    h.keep([("c:a", 5, False), ("c:b", 9, False)], now=1.0)
    assert h.due(2.0) == [("c:a", 5, True), ("c:b", 9, False)]


def test_a_key_heard_meanwhile_is_not_forgotten_when_its_unheard_report_is_written() -> None:
    h = Handover()
    h.keep([("c:a", 5, False)], now=0.0)
    batch = h.due(1.0)
    h.keep([("c:a", 5, True)], now=1.0)
    h.written(batch)
    assert h.due(2.0) == [("c:a", 5, True)]
    h.written(h.due(2.0))
    assert len(h) == 0


async def test_a_heard_expiry_is_written_as_both_entries() -> None:
    store = FakeStore("c:*")
    h = Handover()
    h.keep([("c:a", 5, True)], now=trio.current_time())
    await h.flush(store)
    assert sorted(store.handed) == ["5 c:a", "h5 c:a"]


def test_past_the_bound_keys_are_let_go_and_counted() -> None:
    h = Handover(limit=2)
    h.keep([("c:a", 1, False), ("c:b", 1, False), ("c:c", 1, False)], now=0.0)
    h.keep([("c:a", 2, False)], now=0.0)  # one already kept still updates
    assert h.due(0.0) == [("c:a", 2, False), ("c:b", 1, False)]
    assert h.dropped == 1


def test_a_key_kept_too_long_is_let_go() -> None:
    """Past HANDED_FOR_MS a claim made meanwhile may have lost its tombstone: deciding the
    key then could reset it twice. Aged from its first sighting, not the last."""
    keep_for = spec.HANDED_FOR_MS / 1000
    h = Handover()
    h.keep([("c:old", 1, False)], now=0.0)
    h.keep([("c:old", 2, False), ("c:new", 2, False)], now=keep_for)
    assert h.due(keep_for + 0.001) == [("c:new", 2, False)]
    assert h.dropped == 1


# -- the leader's side ---------------------------------------------------------------


def test_the_leader_takes_only_counter_keys_entries() -> None:
    s = LeaderState(KEYS)
    s.resubscribed(1_000)
    entries = ["900 c:a", "-1 c:b", "x c:c", "900 other", "900", "900 tcw:{c:*}:lease", "9 c:a"]
    assert s.adopt(entries) == 2  # c:a (twice: one key), c:b
    taken = s.take(10, looks=False)
    assert taken is not None
    assert taken.claim
    afters = dict(zip(taken.keys, taken.expired_after or [], strict=True))
    assert afters == {"c:a": 900, "c:b": -1}  # the later time of the two


def test_the_leader_decides_a_heard_entry_as_heard_and_counts_its_key_once() -> None:
    s = LeaderState(KEYS)
    s.resubscribed(1_000)
    assert s.adopt([*spec.handed_entries("c:a", 900, True), "900 c:b"]) == 2
    taken = s.take(10, looks=False)
    assert taken is not None
    assert (taken.keys, taken.expired_after, taken.heard) == (["c:a"], [900], True)
    taken = s.take(10, looks=False)
    assert taken is not None
    assert (taken.keys, taken.expired_after, taken.heard) == (["c:b"], [900], False)


def test_the_hint_is_told_from_a_redelivery() -> None:
    s = LeaderState(KEYS)
    heard = s.on_events([Message(KEYS.redeliver, HANDED_HINT)])
    assert heard.handed
    assert not heard.redeliver
    heard = s.on_events([Message(KEYS.redeliver, "3")])
    assert heard.redeliver
    assert not heard.handed


@given(key=st.text(max_size=30), after=st.integers(-(10**18), 10**18), heard=st.booleans())
def test_entries_read_back_as_written(key: str, after: int, heard: bool) -> None:
    back = {spec.parse_handed(e) for e in spec.handed_entries(key, after, heard)}
    assert back == {(key, after, False), (key, after, heard)}


def test_a_heard_expiry_is_handed_over_in_the_earlier_format_as_well() -> None:
    """A replica of an earlier version reads ``"<after> <key>"`` only (and drops the
    heard entry as foreign): during a rolling upgrade it decides the key as before."""
    assert spec.handed_entries("c:a", 5, True) == ["5 c:a", "h5 c:a"]
    assert spec.handed_entries("c:a", -1, False) == ["-1 c:a"]


@pytest.mark.parametrize("entry", ["h", "h c:a", "hh5 c:a", "hx c:a", "5h c:a", "H5 c:a"])
def test_what_is_not_an_entry_is_dropped(entry: str) -> None:
    assert spec.parse_handed(entry) is None


# -- the scripts, held to the spec ---------------------------------------------------


@pytest.fixture
def r(redis_server: RedisServer) -> Iterator[redis.Redis]:
    with redis_server.client() as client:
        client.hset(KEYS.lease, mapping={"holder": HOLDER, "replica": "me", "epoch": 1})
        client.pexpire(KEYS.lease, 600_000)
        yield client


def _now(r: redis.Redis) -> int:
    seconds, micros = r.time()
    return int(seconds) * 1000 + int(micros) // 1000


def test_take_handed_is_spec_take_handed(r: redis.Redis) -> None:
    """Entries written at times on both sides of HANDED_FOR_MS (margins of 5 s), some
    at the same time; taken in pages: the same dropped, taken and left as the spec."""
    now = _now(r)
    stale, fresh = now - spec.HANDED_FOR_MS - 5_000, now - spec.HANDED_FOR_MS + 5_000
    written = {f"{n} c:{n}": (stale if n % 3 == 0 else fresh + n % 2) for n in range(12)}
    r.zadd(KEYS.handed, written)
    model = dict(written)
    take = r.register_script(scripts.TAKE_HANDED)
    for most in (3, 100):
        dropped, taken = take(keys=[KEYS.lease, KEYS.handed], args=[HOLDER, most])
        assert (dropped, taken) == spec.take_handed(model, now, most)
    assert r.zcard(KEYS.handed) == 0
    assert not model


def test_take_handed_needs_the_lease(r: redis.Redis) -> None:
    r.zadd(KEYS.handed, {"1 c:a": _now(r)})
    take = r.register_script(scripts.TAKE_HANDED)
    assert take(keys=[KEYS.lease, KEYS.handed], args=["someone else", 10]) == -1
    assert r.zcard(KEYS.handed) == 1


def test_hand_over_writes_at_redis_time_and_says_so(
    r: redis.Redis, redis_server: RedisServer
) -> None:
    with redis_server.client() as sub_client:
        sub = sub_client.pubsub(ignore_subscribe_messages=True)
        sub.subscribe(KEYS.redeliver)
        before = _now(r)
        hand_over = r.register_script(scripts.HAND_OVER)
        entries = [*spec.handed_entries("c:a", 5, True), *spec.handed_entries("c:\x00b", -1, False)]
        assert hand_over(keys=[KEYS.handed], args=[KEYS.redeliver, *entries]) == 3
        rows: list[tuple[str, float]] = r.zrange(KEYS.handed, 0, -1, withscores=True)  # type: ignore[assignment]
        assert sorted(e for e, _ in rows) == sorted(entries)
        assert all(before <= at <= _now(r) for _, at in rows)
        assert 0 < r.pttl(KEYS.handed) <= spec.HANDED_FOR_MS
        deadline = time.monotonic() + 5
        message = None
        while message is None and time.monotonic() < deadline:
            message = sub.get_message(timeout=0.1)
        assert message is not None
        assert message["data"] == HANDED_HINT
        sub.close()


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(keys=st.lists(st.binary(max_size=20), max_size=5, unique=True))
def test_any_key_bytes_survive_the_round_trip(redis_server: RedisServer, keys: list[bytes]) -> None:
    names = [k.decode("utf-8", "surrogateescape") for k in keys]
    with redis_server.client(decode_responses=False) as raw:
        raw.hset(KEYS.lease, mapping={"holder": HOLDER})
        raw.delete(KEYS.handed)
        hand_over = raw.register_script(scripts.HAND_OVER)
        take = raw.register_script(scripts.TAKE_HANDED)
        entries = [
            e.encode("utf-8", "surrogateescape")
            for n in names
            for e in spec.handed_entries(n, 7, True)
        ]
        if entries:
            hand_over(keys=[KEYS.handed], args=[KEYS.redeliver, *entries])
        _, taken = take(keys=[KEYS.lease, KEYS.handed], args=[HOLDER, 100])
    back = [spec.parse_handed(e.decode("utf-8", "surrogateescape")) for e in taken]
    assert sorted(r for r in back if r is not None) == sorted(
        (n, 7, heard) for n in names for heard in (False, True)
    )
