"""RedisBridge and the in-process worker against a real redis-server, on trio's real clock.

The Lua scripts are where every exclusive decision is made (acquire, renew, release,
track, claim, mark sent), so they are exercised here directly through the bridge, then
the in-process worker (``open_worker`` / ``Worker.run``) end to end with the recording
HTTP backend. Waits await an event (a pub/sub message, a hook, a request reaching the
backend) or poll Redis state with a deadline; the only fixed-length waits are "nothing
more must happen" windows and letting a key's TTL run out.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
import trio
import trio.testing

from tests.support.backend import Received, RecordingBackend
from tests.support.redis_server import RedisServer, free_port
from tests.support.tracking import armed_and_tracked
from trio_counter_worker import (
    Config,
    Hooks,
    LeaseLost,
    RedisAuthError,
    RedisUnavailable,
    Worker,
    open_worker,
    redis_bridge,
    redis_listener,
    redis_pipelines,
)
from trio_counter_worker.keys import Keys, keyspace_pattern
from trio_counter_worker.redis_bridge import RedisBridge
from trio_counter_worker.store import KeyOutcome, Message, PageStart, PendingReset

T = TypeVar("T")

TEST_TIMEOUT = 20.0
COUNTER_KEY = "c:*"
KEYS = Keys(COUNTER_KEY)
NS = KEYS.namespace
LEASE_KEY, EPOCH_KEY = KEYS.lease, KEYS.epoch
DEADLINES_KEY, PENDING_KEY = KEYS.deadlines, KEYS.pending
RELEASE_CHANNEL = KEYS.released
PATTERN = keyspace_pattern(0, COUNTER_KEY)

LEASE_TTL_MS = 1000
LONG_LEASE_MS = 60_000  # bridge-level tests: a lease that cannot run out mid-test
HOLDER, REPLICA = "h1#0001", "r1"
OTHER, OTHER_REPLICA = "h2#0002", "r2"
SECRET = "s3cret-bridge"
POLL = 0.005


# --- helpers -------------------------------------------------------------------------


def config(server: RedisServer, **kw: Any) -> Config:
    base: dict[str, Any] = {
        "reset_endpoint_url": "http://127.0.0.1:1/reset",
        "reset_secret": "x",
        "counter_key": COUNTER_KEY,
        "redis_port": server.port,
        "lease_ttl_ms": LEASE_TTL_MS,
    }
    return Config(**(base | kw))


@pytest.fixture
async def bridge(redis_server: RedisServer) -> AsyncIterator[RedisBridge]:
    b = RedisBridge(config(redis_server))
    try:
        yield b
    finally:
        await b.aclose()


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """The test's own connection, to arrange and inspect Redis state directly."""
    with redis_server.client() as c:
        yield c


def reset_id_of(key: str, deadline_ms: int, namespace: str = NS) -> str:
    """What the CLAIM script derives: sha1("<namespace>\\n<key>\\n<deadline ms>")[:32]."""
    return hashlib.sha1(f"{namespace}\n{key}\n{deadline_ms}".encode()).hexdigest()[:32]


def hgetall(c: redis.Redis, key: str) -> dict[str, str]:
    raw: Any = c.hgetall(key)
    return {str(k): str(v) for k, v in raw.items()}


def deadline_of(c: redis.Redis, key: str) -> int | None:
    """The deadline recorded for ``key`` in the worker's sorted set (ms), if any."""
    raw: Any = c.zscore(DEADLINES_KEY, key)
    return None if raw is None else int(raw)


def exact_deadlines(c: redis.Redis) -> bool:
    """Whether the scripts read deadlines exactly: where Redis has PEXPIRETIME (7.0+);
    on 6.2 a deadline is TIME + PTTL, which may be 1 ms off either way."""
    return int(str(c.info("server")["redis_version"]).split(".")[0]) >= 7


def assert_recorded(c: redis.Redis, key: str, deadline_ms: int) -> None:
    """The deadline recorded for ``key`` is ``deadline_ms`` (see :func:`exact_deadlines`)."""
    recorded = deadline_of(c, key)
    assert recorded is not None, key
    exact = exact_deadlines(c)
    assert recorded == deadline_ms if exact else abs(recorded - deadline_ms) <= 1, (
        recorded,
        deadline_ms,
    )


def pttl(c: redis.Redis, key: str) -> int:
    raw: Any = c.pttl(key)
    return int(raw)


def redis_now_ms(c: redis.Redis) -> int:
    raw: Any = c.time()
    seconds, micros = raw
    return int(seconds) * 1000 + int(micros) // 1000


def set_key(c: redis.Redis, key: str, ttl_ms: int) -> int:
    """Arm ``key`` for ``ttl_ms`` from Redis's now; return its absolute deadline (ms).

    ``SET ... PXAT`` fixes the deadline exactly on every version the worker supports;
    reading it back needs PEXPIRETIME, which Redis 6.2 lacks.
    """
    deadline = redis_now_ms(c) + ttl_ms
    assert c.set(key, "1", pxat=deadline)
    return deadline


async def track_one(bridge: RedisBridge, key: str) -> KeyOutcome:
    return one(await bridge.track(HOLDER, [key]))


async def sleep_past(c: redis.Redis, deadline_ms: int, margin_ms: int = 10) -> None:
    """Let a TTL run out: sleep until Redis's clock is ``margin_ms`` past ``deadline_ms``."""
    while (left := deadline_ms + margin_ms - redis_now_ms(c)) > 0:
        await trio.sleep(left / 1000)


async def wait_until(check: Callable[[], T | None], what: str, timeout: float = 5.0) -> T:
    """Poll ``check`` (Redis state, usually) until it returns something truthy."""
    deadline = trio.current_time() + timeout
    while True:
        value = check()
        if value:
            return value
        if trio.current_time() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        await trio.sleep(POLL)


def one(outcomes: list[KeyOutcome]) -> KeyOutcome:
    assert len(outcomes) == 1, outcomes
    return outcomes[0]


async def lead(bridge: RedisBridge, holder: str = HOLDER, replica: str = REPLICA) -> int:
    """Take the lease (long TTL) and return its epoch."""
    view = await bridge.acquire(holder, replica, LONG_LEASE_MS, 0)
    assert view.acquired, view
    return view.epoch


class Inbox:
    """Messages forwarded by ``RedisBridge.listen``, one at a time."""

    def __init__(self, receive: trio.MemoryReceiveChannel[list[Message]]) -> None:
        self._receive = receive
        self._buffer: deque[Message] = deque()
        self.batches = 0

    async def next(self) -> Message:
        while not self._buffer:
            batch = await self._receive.receive()
            assert batch, "listen forwarded an empty batch"
            assert all(isinstance(m, Message) for m in batch), batch
            self.batches += 1
            self._buffer.extend(batch)
        return self._buffer.popleft()

    async def wait_for(self, channel: str, data: str) -> Message:
        """Skip other messages until one on ``channel`` carrying ``data``."""
        while True:
            msg = await self.next()
            if msg.channel == channel and msg.data == data:
                return msg

    def drain(self) -> list[Message]:
        """Everything already forwarded, without waiting."""
        out = list(self._buffer)
        self._buffer.clear()
        while True:
            try:
                out.extend(self._receive.receive_nowait())
            except trio.WouldBlock:
                return out


async def start_listening(
    nursery: trio.Nursery,
    bridge: RedisBridge,
    *,
    patterns: list[str] = [],  # noqa: B006 - never mutated
    channels: list[str] = [],  # noqa: B006
) -> Inbox:
    """Start ``bridge.listen`` in ``nursery``; returns once Redis confirmed the subscription."""
    send, receive = trio.open_memory_channel[list[Message]](256)
    listen = functools.partial(bridge.listen, patterns=patterns, channels=channels, send=send)
    await nursery.start(listen)
    return Inbox(receive)


# --- 1. lease scripts -----------------------------------------------------------------


async def test_acquire_refuses_another_holder_and_lets_the_holder_reacquire(
    bridge: RedisBridge, client: redis.Redis
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        first = await bridge.acquire(HOLDER, REPLICA, LEASE_TTL_MS, 0)
        assert first.acquired
        assert first.epoch == 1
        assert first.pttl_ms == LEASE_TTL_MS
        lease = hgetall(client, LEASE_KEY)
        assert lease["holder"] == HOLDER
        assert lease["replica"] == REPLICA
        assert lease["epoch"] == "1"
        assert abs(int(lease["since_ms"]) - redis_now_ms(client)) < 1000
        assert 0 < pttl(client, LEASE_KEY) <= LEASE_TTL_MS

        refused = await bridge.acquire(OTHER, OTHER_REPLICA, LEASE_TTL_MS, 0)
        assert not refused.acquired
        assert refused.epoch == 1
        assert refused.holder_replica == REPLICA
        assert 0 < refused.pttl_ms <= LEASE_TTL_MS
        assert hgetall(client, LEASE_KEY)["holder"] == HOLDER  # untouched
        assert client.get(EPOCH_KEY) == "1"  # a refused acquire takes no epoch

        again = await bridge.acquire(HOLDER, REPLICA, LEASE_TTL_MS * 5, 0)
        assert again.acquired
        assert again.epoch == 1  # same lease, same fencing token
        assert client.get(EPOCH_KEY) == "1"
        assert pttl(client, LEASE_KEY) > LEASE_TTL_MS


async def test_renew_only_for_the_holder(bridge: RedisBridge, client: redis.Redis) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        await bridge.acquire(HOLDER, REPLICA, LEASE_TTL_MS, 0)
        assert await bridge.renew(HOLDER, LONG_LEASE_MS) == "renewed"
        assert pttl(client, LEASE_KEY) > LEASE_TTL_MS

        assert await bridge.renew(OTHER, 100) == "lost"
        assert pttl(client, LEASE_KEY) > LEASE_TTL_MS
        assert hgetall(client, LEASE_KEY)["holder"] == HOLDER

        client.delete(LEASE_KEY)  # expired: a renewal cannot bring it back
        assert await bridge.renew(HOLDER, LEASE_TTL_MS) == "lost"
        assert client.exists(LEASE_KEY) == 0


async def test_release_is_compare_and_delete_and_announced(
    bridge: RedisBridge, client: redis.Redis
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            inbox = await start_listening(nursery, bridge, channels=[RELEASE_CHANNEL])
            await bridge.acquire(HOLDER, REPLICA, LEASE_TTL_MS, 0)

            assert await bridge.release(OTHER, OTHER_REPLICA) is False
            assert hgetall(client, LEASE_KEY)["holder"] == HOLDER

            assert await bridge.release(HOLDER, REPLICA) is True
            assert client.exists(LEASE_KEY) == 0
            msg = await inbox.next()
            assert msg == Message(channel=RELEASE_CHANNEL, data=REPLICA)
            # Only the successful release was announced.
            assert inbox.drain() == []

            assert await bridge.release(HOLDER, REPLICA) is False  # nothing left to release
            nursery.cancel_scope.cancel()


async def test_epoch_grows_and_never_goes_below_the_floor(
    bridge: RedisBridge, client: redis.Redis
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        assert (await bridge.acquire(HOLDER, REPLICA, LEASE_TTL_MS, 0)).epoch == 1
        assert await bridge.release(HOLDER, REPLICA)
        assert (await bridge.acquire(OTHER, OTHER_REPLICA, LEASE_TTL_MS, 0)).epoch == 2
        assert await bridge.release(OTHER, OTHER_REPLICA)

        client.delete(EPOCH_KEY)  # Redis lost its data: INCR would start again at 1
        view = await bridge.acquire(HOLDER, REPLICA, LEASE_TTL_MS, 9)
        assert view.acquired
        assert view.epoch == 10
        assert client.get(EPOCH_KEY) == "10"
        assert hgetall(client, LEASE_KEY)["epoch"] == "10"
        assert await bridge.release(HOLDER, REPLICA)

        # A floor below the stored epoch changes nothing: INCR wins.
        assert (await bridge.acquire(OTHER, OTHER_REPLICA, LEASE_TTL_MS, 3)).epoch == 11


# --- 2. track / claim / mark_sent -----------------------------------------------------


async def test_key_is_claimed_at_its_deadline_under_a_deterministic_reset_id(
    bridge: RedisBridge, client: redis.Redis
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        epoch = await lead(bridge)
        deadline = set_key(client, "c:1", 300)

        alive = one(await bridge.track(HOLDER, ["c:1"]))
        assert alive.kind == "alive"
        assert alive.key == "c:1"
        assert 0 < alive.pttl_ms <= 300
        assert_recorded(client, "c:1", deadline)
        deadline = deadline_of(client, "c:1") or 0  # what the episode is recorded under

        early = one(await bridge.claim(HOLDER, ["c:1"]))
        assert early.kind == "alive"  # not due yet
        assert client.hlen(PENDING_KEY) == 0

        await sleep_past(client, deadline)
        # A track after the deadline reports it due (and keeps the deadline for the claim).
        assert one(await bridge.track(HOLDER, ["c:1"])).kind == "due"
        assert_recorded(client, "c:1", deadline)
        deadline = deadline_of(client, "c:1") or 0  # the episode's, 1 ms off on 6.2

        claimed = one(await bridge.claim(HOLDER, ["c:1"]))
        assert claimed.kind == "claimed"
        expected = PendingReset(
            reset_id=reset_id_of("c:1", deadline),
            key="c:1",
            deadline_ms=deadline,
            fencing_token=epoch,
        )
        assert claimed.reset == expected
        assert client.exists("c:1") == 0
        assert deadline_of(client, "c:1") is None  # the episode is over
        pending = hgetall(client, PENDING_KEY)
        assert list(pending) == [expected.reset_id]
        record = json.loads(pending[expected.reset_id])
        assert record["reset_id"] == expected.reset_id
        assert record["key"] == "c:1"
        assert record["deadline_ms"] == deadline
        assert record["fencing_token"] == epoch
        assert record["claimed_ms"] >= deadline
        assert await bridge.pending() == [expected]

        # Claiming the same episode again (another leader that recorded the same
        # deadline, or a retry) yields the same id and still one record.
        client.zadd(DEADLINES_KEY, {"c:1": deadline})
        again = one(await bridge.claim(HOLDER, ["c:1"]))
        assert again.kind == "claimed"
        assert again.reset == expected
        assert list(hgetall(client, PENDING_KEY)) == [expected.reset_id]

        # A later episode of the same key gets a different id.
        later = deadline + 1
        client.zadd(DEADLINES_KEY, {"c:1": later})
        other = one(await bridge.claim(HOLDER, ["c:1"]))
        assert other.reset is not None
        assert other.reset.reset_id == reset_id_of("c:1", later) != expected.reset_id

        await bridge.mark_sent(HOLDER, expected.reset_id)
        assert list(hgetall(client, PENDING_KEY)) == [other.reset.reset_id]
        await bridge.mark_sent(HOLDER, other.reset.reset_id)
        assert client.exists(PENDING_KEY) == 0
        assert await bridge.pending() == []
        await bridge.mark_sent(HOLDER, expected.reset_id)  # already gone: no error


async def test_rearmed_key_is_alive_not_claimed(bridge: RedisBridge, client: redis.Redis) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        await lead(bridge)
        first, _ = await armed_and_tracked(
            functools.partial(set_key, client, "c:1"),
            functools.partial(track_one, bridge, "c:1"),
            ttl_ms=150,
        )
        rearmed = set_key(client, "c:1", 5000)  # activity; no track: the event was missed
        await sleep_past(client, first)

        outcome = one(await bridge.claim(HOLDER, ["c:1"]))
        assert outcome.kind == "alive"
        assert 4000 < outcome.pttl_ms <= 5000
        assert outcome.reset is None
        assert_recorded(client, "c:1", rearmed)  # rescheduled to the new deadline
        assert client.exists(PENDING_KEY) == 0
        assert client.exists("c:1") == 1


async def test_key_deleted_before_its_deadline_is_gone(
    bridge: RedisBridge, client: redis.Redis
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        await lead(bridge)
        set_key(client, "c:1", 5000)
        set_key(client, "c:2", 5000)
        assert [o.kind for o in await bridge.track(HOLDER, ["c:1", "c:2"])] == ["alive", "alive"]
        assert deadline_of(client, "c:1") is not None
        client.delete("c:1", "c:2")

        assert one(await bridge.track(HOLDER, ["c:1"])).kind == "gone"
        assert deadline_of(client, "c:1") is None
        assert one(await bridge.claim(HOLDER, ["c:2"])).kind == "gone"
        assert deadline_of(client, "c:2") is None
        assert client.exists(PENDING_KEY) == 0
        assert (await bridge.tracked(HOLDER, PageStart())).rows == []


async def test_key_without_ttl_is_gone(bridge: RedisBridge, client: redis.Redis) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        await lead(bridge)
        client.set("c:1", "1")
        assert one(await bridge.track(HOLDER, ["c:1"])).kind == "gone"
        assert one(await bridge.claim(HOLDER, ["c:1"])).kind == "gone"
        assert client.exists(DEADLINES_KEY) == 0

        # A tracked key that loses its TTL (PERSIST) stops being tracked at its claim.
        set_key(client, "c:2", 5000)
        assert one(await bridge.track(HOLDER, ["c:2"])).kind == "alive"
        client.persist("c:2")
        assert one(await bridge.claim(HOLDER, ["c:2"])).kind == "gone"
        assert deadline_of(client, "c:2") is None
        assert client.exists(PENDING_KEY) == 0


async def test_tracked_pages_give_every_deadline_once_whatever_changes_between(
    bridge: RedisBridge, client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pages of 3, deadlines tied across page ends (one tie group larger than a page),
    and keys recorded and claimed between pages: every key recorded all along comes once,
    earliest first."""
    monkeypatch.setattr(redis_bridge, "TRACKED_PAGE", 3)
    now = redis_now_ms(client) + 60_000
    plan = {"a": 0, "b": 1, "c": 1, "d": 1, "e": 1, "f": 1, "g": 2, "h": 3, "i": 3, "j": 4}
    client.zadd(DEADLINES_KEY, {f"c:{k}": now + d for k, d in plan.items()})
    with trio.fail_after(TEST_TIMEOUT):
        await lead(bridge)
        seen: list[str] = []
        start: PageStart | None = PageStart()
        pages = 0
        while start is not None:
            page = await bridge.tracked(HOLDER, start)
            seen += [k for k, _ in page.rows]
            start = page.next
            pages += 1
            if pages == 1:  # meanwhile: seen ones claimed, a later one recorded
                client.zrem(DEADLINES_KEY, "c:a", "c:b")
                client.zadd(DEADLINES_KEY, {"c:late": now + 9})
    assert seen == [f"c:{k}" for k in plan] + ["c:late"]
    assert pages == 3  # a, b-c and the rest of their tie group | g-i | j, late


async def test_tracked_reads_up_to_a_window_and_says_how_far(
    bridge: RedisBridge, client: redis.Redis
) -> None:
    """With ``within_ms``: only deadlines due within it; ``upto``/``ahead_ms`` say how far
    the read covered, and the next read from there brings the rest, once each."""
    now = redis_now_ms(client)
    client.zadd(DEADLINES_KEY, {"c:soon": now + 1_000, "c:late": now + 30_000})
    with trio.fail_after(TEST_TIMEOUT):
        await lead(bridge)
        first = await bridge.tracked(HOLDER, PageStart(), 10_000)
        assert [k for k, _ in first.rows] == ["c:soon"]
        assert first.next is None
        assert first.upto is not None
        assert now + 10_000 <= first.upto < now + 10_000 + 1_000
        assert first.ahead_ms == 10_000
        rest = await bridge.tracked(HOLDER, PageStart(first.upto), 60_000)
        assert [k for k, _ in rest.rows] == ["c:late"]
        everything = await bridge.tracked(HOLDER, PageStart())
        assert (everything.upto, everything.ahead_ms) == (None, math.inf)
        assert [k for k, _ in everything.rows] == ["c:soon", "c:late"]


async def test_tracked_reports_deadlines_as_delays(
    bridge: RedisBridge, client: redis.Redis
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        await lead(bridge)
        set_key(client, "c:1", 5000)
        set_key(client, "c:2", 2000)
        await bridge.track(HOLDER, ["c:1", "c:2", "c:none"])
        rows = dict((await bridge.tracked(HOLDER, PageStart())).rows)
        assert set(rows) == {"c:1", "c:2"}
        assert 4000 < rows["c:1"] <= 5000
        assert 1000 < rows["c:2"] <= 2000


# --- 3. the lease check ---------------------------------------------------------------


async def test_scripts_refuse_a_replica_that_lost_the_lease(
    bridge: RedisBridge, client: redis.Redis
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        await lead(bridge)
        # A reset claimed while we led, not yet marked sent.
        done, _ = await armed_and_tracked(
            functools.partial(set_key, client, "c:done"),
            functools.partial(track_one, bridge, "c:done"),
        )
        await sleep_past(client, done)
        claimed = one(await bridge.claim(HOLDER, ["c:done"]))
        assert claimed.reset is not None
        # A key that is due, tracked while we led.
        due, _ = await armed_and_tracked(
            functools.partial(set_key, client, "c:due"),
            functools.partial(track_one, bridge, "c:due"),
        )
        assert_recorded(client, "c:due", due)
        recorded = deadline_of(client, "c:due")
        # A key we never tracked.
        set_key(client, "c:new", 5000)
        await sleep_past(client, due)

        # Another replica takes over (our lease expired and it acquired one).
        client.hset(LEASE_KEY, mapping={"holder": OTHER, "replica": OTHER_REPLICA, "epoch": 2})
        before_pending = hgetall(client, PENDING_KEY)

        with pytest.raises(LeaseLost):
            await bridge.track(HOLDER, ["c:new"])
        assert deadline_of(client, "c:new") is None

        with pytest.raises(LeaseLost):
            await bridge.claim(HOLDER, ["c:due"])
        assert hgetall(client, PENDING_KEY) == before_pending  # nothing claimed
        assert deadline_of(client, "c:due") == recorded  # left for the real leader

        with pytest.raises(LeaseLost):
            await bridge.mark_sent(HOLDER, claimed.reset.reset_id)
        assert hgetall(client, PENDING_KEY) == before_pending  # still to be sent

        with pytest.raises(LeaseLost):
            await bridge.tracked(HOLDER, PageStart())

        assert await bridge.renew(HOLDER, LEASE_TTL_MS) == "lost"
        assert await bridge.release(HOLDER, REPLICA) is False
        assert hgetall(client, LEASE_KEY)["holder"] == OTHER

        # With no lease at all, the same.
        client.delete(LEASE_KEY)
        with pytest.raises(LeaseLost):
            await bridge.claim(HOLDER, ["c:due"])
        assert deadline_of(client, "c:due") == recorded

        # The real leader finds the due key and the unsent reset where they were.
        assert (await bridge.acquire(OTHER, OTHER_REPLICA, LONG_LEASE_MS, 0)).epoch == 2
        taken = one(await bridge.claim(OTHER, ["c:due"]))
        assert taken.kind == "claimed"
        assert taken.reset is not None
        assert taken.reset.reset_id == reset_id_of("c:due", recorded or 0)
        assert taken.reset.fencing_token == 2
        assert {p.reset_id for p in await bridge.pending()} == {
            claimed.reset.reset_id,
            taken.reset.reset_id,
        }


# --- 4. claim expires the key now, not when Redis's background cycle finds it ---------


async def test_claim_expires_the_key_at_once_among_many_volatile_keys(
    bridge: RedisBridge, client: redis.Redis
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        with client.pipeline(transaction=False) as pipe:
            for i in range(20_000):
                pipe.set(f"filler:{i}", "x", ex=3600)
            pipe.execute()
        assert client.dbsize() == 20_000
        assert (await bridge.ensure_notifications()).ok
        await lead(bridge)
        async with trio.open_nursery() as nursery:
            inbox = await start_listening(nursery, bridge, patterns=[PATTERN])
            channel = "__keyspace@0__:c:1"
            deadline = set_key(client, "c:1", 300)
            await inbox.wait_for(channel, "set")
            assert one(await bridge.track(HOLDER, ["c:1"])).kind == "alive"

            await sleep_past(client, deadline, margin_ms=2)
            outcome = one(await bridge.claim(HOLDER, ["c:1"]))
            while outcome.kind == "alive":  # our clock ran a hair ahead of Redis's
                await trio.sleep(outcome.pttl_ms / 1000 + 0.002)
                outcome = one(await bridge.claim(HOLDER, ["c:1"]))
            claimed_at = redis_now_ms(client)
            assert outcome.kind == "claimed"
            assert outcome.reset is not None
            assert abs(outcome.reset.deadline_ms - deadline) <= (
                0 if exact_deadlines(client) else 1
            )
            # The claim itself expired the key: the event is already on its way.
            with trio.fail_after(0.5):
                await inbox.wait_for(channel, "expired")
            latency_ms = redis_now_ms(client) - deadline
            assert latency_ms < 500, f"expired event {latency_ms} ms after the deadline"
            assert claimed_at - deadline < 300
            # fillers + lease, epoch, pending, claim tombstones: c:1 is gone
            assert client.dbsize() == 20_000 + 4
            nursery.cancel_scope.cancel()


# --- 5. keyspace-notification flags ---------------------------------------------------


def flags(c: redis.Redis) -> str:
    raw: Any = c.config_get("notify-keyspace-events")
    return str(raw["notify-keyspace-events"])


async def test_ensure_notifications_from_none(bridge: RedisBridge, client: redis.Redis) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        client.config_set("notify-keyspace-events", "")
        status = await bridge.ensure_notifications()
        assert status.ok
        assert status.changed
        assert status.error is None
        assert status.flags is not None
        assert set("Kg$x") <= set(status.flags)
        assert set("Kg$x") <= set(flags(client))

        again = await bridge.ensure_notifications()
        assert again.ok
        assert not again.changed


async def test_ensure_notifications_keeps_the_apps_flags(
    bridge: RedisBridge, client: redis.Redis
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        client.config_set("notify-keyspace-events", "Eh")
        status = await bridge.ensure_notifications()
        assert status.ok
        assert status.changed
        now = flags(client)
        assert set("EhKg$x") <= set(now), now
        assert status.flags == now


async def test_ensure_notifications_when_config_is_disabled(tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        no_config = ["--rename-command", "CONFIG", ""]
        with RedisServer(tmp_path / "noconfig", extra_args=no_config) as server:
            bridge = RedisBridge(config(server))
            try:
                status = await bridge.ensure_notifications()
            finally:
                await bridge.aclose()
        assert not status.ok
        assert status.error is not None
        assert "unknown command" in status.error.lower(), status.error
        assert status.flags is None
        assert not status.changed


# --- 6. listen --------------------------------------------------------------------------


async def test_listen_forwards_pmessages_in_batches(
    bridge: RedisBridge, client: redis.Redis
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        assert (await bridge.ensure_notifications()).ok
        async with trio.open_nursery() as nursery:
            inbox = await start_listening(
                nursery, bridge, patterns=[PATTERN], channels=[RELEASE_CHANNEL]
            )
            client.set("other:1", "1", px=5000)  # not a counter key: filtered by Redis
            client.set("c:1", "1", px=5000)
            assert await inbox.next() == Message(channel="__keyspace@0__:c:1", data="set")
            assert await inbox.next() == Message(channel="__keyspace@0__:c:1", data="expire")
            client.delete("c:1")
            assert await inbox.next() == Message(channel="__keyspace@0__:c:1", data="del")
            client.publish(RELEASE_CHANNEL, "r9")
            assert await inbox.next() == Message(channel=RELEASE_CHANNEL, data="r9")

            # A burst arrives in order, in fewer batches than messages.
            batches_before = inbox.batches
            with client.pipeline(transaction=False) as pipe:
                for i in range(300):
                    pipe.set(f"c:burst:{i}", "1")
                pipe.execute()
            got = [await inbox.next() for _ in range(300)]
            assert [m.channel for m in got] == [f"__keyspace@0__:c:burst:{i}" for i in range(300)]
            assert {m.data for m in got} == {"set"}
            assert inbox.batches - batches_before < 300
            assert all(m.channel != "__keyspace@0__:other:1" for m in inbox.drain())
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("parser", ["hiredis", "python"])
def test_batch_reader_takes_whole_replies_in_order_whatever_the_parser(
    redis_server: RedisServer, parser: str
) -> None:
    """The listener's reader: messages in publication order, at most a batch at a time,
    confirmations left out, and a message longer than one socket read (several recvs,
    the partial reply kept in hiredis's reader) whole."""
    from redis._parsers import _HiredisParser, _RESP2Parser

    parser_class = _HiredisParser if parser == "hiredis" else _RESP2Parser
    pool = redis.ConnectionPool(
        port=redis_server.port, decode_responses=True, parser_class=parser_class
    )
    c = redis.Redis(connection_pool=pool)
    pubsub = c.pubsub()
    try:
        pubsub.subscribe("ch")
        read = redis_listener.batch_reader(pubsub, redis_listener.GATHER_SECONDS)
        big = "x" * 300_000  # redis-py reads 64 KiB at a time
        with c.pipeline(transaction=False) as pipe:
            for i in range(2500):
                pipe.publish("ch", big if i == 1234 else str(i))
            pipe.execute()
        got: list[Message] = []
        deadline = time.monotonic() + TEST_TIMEOUT
        while len(got) < 2500 and time.monotonic() < deadline:
            batch = read(0.1)
            assert len(batch) <= redis_listener.MAX_BATCH
            got += batch
        assert [m.data for m in got] == [big if i == 1234 else str(i) for i in range(2500)]
        assert {m.channel for m in got} == {"ch"}
        assert read(0.01) == []  # nothing more: an empty batch after the wait
    finally:
        pubsub.close()
        c.close()


def test_batch_reader_gathers_what_comes_shortly_after_the_first_message(
    redis_server: RedisServer,
) -> None:
    """Once a message has come, the reader waits ``gather`` (the keyspace watch's
    GATHER_SECONDS) for more before it hands the batch on: a trickle of events goes to
    the leader as one batch (stretched here so that a loaded machine cannot make the
    second message miss it)."""
    c = redis.Redis(port=redis_server.port, decode_responses=True)
    pubsub = c.pubsub()
    try:
        pubsub.subscribe("ch")
        read = redis_listener.batch_reader(pubsub, 1.0)
        assert read(0.01) == []  # the confirmation only: nothing gathered, nothing waited
        c.publish("ch", "first")
        later = threading.Timer(0.2, c.publish, ("ch", "second"))
        later.start()
        try:
            assert [m.data for m in read(TEST_TIMEOUT)] == ["first", "second"]
        finally:
            later.join()
        # What comes in plenty is forwarded as it comes: a burst is not held up.
        many = [str(i) for i in range(2 * redis_listener.GATHER_BELOW)]
        with c.pipeline(transaction=False) as pipe:
            for data in many:
                pipe.publish("ch", data)
            pipe.execute()
        start = time.monotonic()
        got = [m.data for m in read(TEST_TIMEOUT)]
        assert got == many
        assert time.monotonic() - start < 0.5
        # The release watch gathers nothing: a release is handed on as it comes.
        at_once = redis_listener.batch_reader(pubsub, 0.0)
        c.publish("ch", "released")
        later = threading.Timer(0.5, c.publish, ("ch", "later"))
        later.start()
        try:
            assert [m.data for m in at_once(TEST_TIMEOUT)] == ["released"]
        finally:
            later.join()
    finally:
        pubsub.close()
        c.close()


async def test_concurrent_counter_calls_share_pipelines(
    bridge: RedisBridge, client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many deciders at once: each gets its own reply, in fewer pipelines than calls."""
    sent: list[int] = []
    pipelines = bridge._pipelines
    assert pipelines is not None
    send = pipelines._send

    def counted(batch: list[Any]) -> list[Any]:
        sent.append(len(batch))
        return send(batch)

    monkeypatch.setattr(pipelines, "_send", counted)
    with trio.fail_after(TEST_TIMEOUT):
        await bridge.ensure_notifications()  # loads the scripts: no NOSCRIPT round
        await lead(bridge)
        for i in range(40):
            set_key(client, f"c:{i}", 60_000 + i)
        outcomes: dict[str, KeyOutcome] = {}

        async def track(key: str) -> None:
            outcomes[key] = one(await bridge.track(HOLDER, [key]))

        async with trio.open_nursery() as nursery:
            for i in range(40):
                nursery.start_soon(track, f"c:{i}")
    assert sorted(outcomes) == sorted(f"c:{i}" for i in range(40))
    assert all(o.key == k and o.kind == "alive" for k, o in outcomes.items())
    assert sum(sent) == 40
    assert len(sent) < 40


async def test_pipelined_call_reloads_scripts_a_restarted_redis_lost(
    bridge: RedisBridge, client: redis.Redis
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        await lead(bridge)
        set_key(client, "c:1", 60_000)
        client.script_flush()
        assert one(await bridge.track(HOLDER, ["c:1"])).kind == "alive"
        # A script error is that call's alone, and translated as any call's.
        with pytest.raises(LeaseLost):
            await bridge.mark_sent(OTHER, "no-such-reset")


async def test_cancelled_pipelined_call_returns_at_once_and_the_next_one_works(
    bridge: RedisBridge, client: redis.Redis
) -> None:
    """A step-down must not wait for a stuck Redis: the waiting task is cancelled at
    once; its reply, when it comes, is dropped; the bridge goes on."""
    with trio.fail_after(TEST_TIMEOUT):
        await lead(bridge)
        set_key(client, "c:1", 60_000)
        client.client_pause(150)  # every command waits (inside the 250 ms socket timeout)
        with trio.move_on_after(0.05) as scope:
            await bridge.track(HOLDER, ["c:1"])
        assert scope.cancelled_caught
        assert one(await bridge.track(HOLDER, ["c:1"])).kind == "alive"
        pipelines = bridge._pipelines
        assert pipelines is not None
        await wait_until(lambda: pipelines._running == 0 or None, "the paused pipeline ends")


def test_pipelines_start_afresh_in_another_trio_run(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    """Pipelines a finished trio.run left in flight cannot report back: another run on
    the same bridge must not wait for their slots."""
    bridge = RedisBridge(config(redis_server))

    async def abandon_both_slots() -> None:
        await lead(bridge)
        set_key(client, "c:1", 60_000)
        client.client_pause(150)
        with trio.move_on_after(0.05):
            async with trio.open_nursery() as nursery:
                for _ in range(redis_pipelines.PIPELINES):
                    nursery.start_soon(bridge.track, HOLDER, ["c:1"])
                    await trio.sleep(0.01)  # each in its own pipeline

    async def track_again() -> KeyOutcome:
        with trio.fail_after(TEST_TIMEOUT):
            return one(await bridge.track(HOLDER, ["c:1"]))

    try:
        trio.run(abandon_both_slots)
        assert bridge._pipelines is not None
        assert bridge._pipelines._running == redis_pipelines.PIPELINES
        assert trio.run(track_again).kind == "alive"
    finally:
        bridge._client.close()


@pytest.mark.parametrize("how", ["kill", "restart"])
async def test_listen_raises_when_the_connection_drops(
    redis_server: RedisServer, bridge: RedisBridge, how: str
) -> None:
    """Messages may be lost with the connection: listen must say so, not reconnect
    silently (after a restart redis-py could resubscribe to the new server)."""
    with trio.fail_after(TEST_TIMEOUT):
        with pytest.RaisesGroup(RedisUnavailable):
            async with trio.open_nursery() as nursery:
                await start_listening(nursery, bridge, patterns=[PATTERN])
                start = trio.current_time()
                if how == "kill":
                    redis_server.kill()
                else:
                    redis_server.restart()
                with trio.fail_after(2.0):
                    await trio.sleep_forever()
        assert trio.current_time() - start < 2.0


# --- 7-9. the in-process worker -------------------------------------------------------


class Watch:
    """Hooks of one worker, as events a test can await."""

    def __init__(self, any_elected: trio.Event | None = None) -> None:
        self.elected = trio.Event()
        self.epochs: list[int] = []
        self.deposed: list[int] = []
        self.resets: list[PendingReset] = []
        self.reset_done = trio.Event()
        self._any = any_elected

    def _on_elected(self, epoch: int) -> None:
        self.epochs.append(epoch)
        self.elected.set()
        if self._any is not None:
            self._any.set()

    def _on_reset(self, reset: PendingReset, _attempts: int) -> None:
        self.resets.append(reset)
        self.reset_done.set()

    def hooks(self) -> Hooks:
        return Hooks(
            on_elected=self._on_elected, on_deposed=self.deposed.append, on_reset=self._on_reset
        )


def worker_config(
    server: RedisServer, backend: RecordingBackend, replica_id: str, **kw: Any
) -> Config:
    return config(
        server, reset_endpoint_url=backend.url, reset_secret=SECRET, replica_id=replica_id, **kw
    )


async def until_ready(worker: Worker) -> None:
    """Until ``worker`` leads, subscribed and reconciled: a key living and dying wholly
    before that is reset at its heard expiry, not at its deadline (which check_reset
    holds exactly)."""
    while worker.metrics.registry.get_sample_value("tcw_reconciled") != 1:
        await trio.sleep(0.01)


def check_reset(
    request: Received,
    *,
    key: str,
    deadline_ms: int,
    epoch: int,
    replica_id: str,
    exact: bool = True,
) -> None:
    """``exact``: :func:`exact_deadlines` (else the episode's deadline, and so its
    reset_id, may be 1 ms off)."""
    sent = round(float(request.json["expired_at"]) * 1000)
    assert sent == deadline_ms if exact else abs(sent - deadline_ms) <= 1, (sent, deadline_ms)
    deadline_ms = sent
    reset_id = reset_id_of(key, deadline_ms)
    assert request.method == "POST"
    assert request.path == "/reset"
    assert request.headers["x-secret"] == SECRET
    assert request.headers["content-type"] == "application/json"
    assert request.headers["idempotency-key"] == reset_id
    assert request.headers["x-fencing-token"] == str(epoch)
    assert request.json == {
        "key": key,
        "reset_id": reset_id,
        "expired_at": deadline_ms / 1000,
        "fencing_token": epoch,
        "replica_id": replica_id,
    }
    # Never before the deadline (how soon after it is measured in bench/).
    late = request.received_at - deadline_ms / 1000
    assert late >= -0.005, f"POST {late * 1000:+.1f} ms after the deadline"


async def assert_no_more_requests(backend: RecordingBackend, count: int, window: float) -> None:
    with pytest.raises(AssertionError, match="condition not met"):
        await backend.wait_for_async(lambda requests: len(requests) > count, timeout=window)
    assert len(backend.requests) == count


async def run_worker(
    worker: Worker, *, task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run ``worker`` until the cancel scope it reports as started is cancelled."""
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            task_status.started(scope)


async def test_worker_resets_once_then_releases_the_lease_on_cancel(
    redis_server: RedisServer, backend: RecordingBackend, client: redis.Redis
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        watch = Watch()
        cfg = worker_config(redis_server, backend, "w1")
        async with open_worker(cfg, hooks=watch.hooks()) as worker:
            async with trio.open_nursery() as nursery:
                await nursery.start(worker.run)
                await watch.elected.wait()
                assert worker.is_leader
                (epoch,) = watch.epochs
                assert hgetall(client, LEASE_KEY)["holder"] == worker.holder
                await until_ready(worker)

                deadline = set_key(client, "c:1", 300)
                await watch.reset_done.wait()  # POSTed, 2xx, marked sent
                (request,) = backend.requests
                check_reset(
                    request,
                    key="c:1",
                    deadline_ms=deadline,
                    epoch=epoch,
                    replica_id="w1",
                    exact=exact_deadlines(client),
                )
                assert client.exists(PENDING_KEY) == 0
                assert deadline_of(client, "c:1") is None
                await assert_no_more_requests(backend, 1, window=0.5)
                nursery.cancel_scope.cancel()
            assert client.exists(LEASE_KEY) == 0  # released, not left to expire
            assert watch.deposed == [epoch]
        await trio.testing.wait_all_threads_completed()
        assert trio.testing.active_thread_count() == 0


async def test_standby_takes_over_promptly_when_the_leader_stops(
    redis_server: RedisServer, backend: RecordingBackend, client: redis.Redis
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        any_elected = trio.Event()
        watches = {rid: Watch(any_elected) for rid in ("a", "b")}
        # A 2 s lease: a renewal may then take over 1.1 s (0.9 x TTL - TTL / 3) before the
        # leader steps down, which a loaded CI host needs (with 1 s, 0.57 s was too short).
        lease_ms = 2 * LEASE_TTL_MS

        def cfg(rid: str) -> Config:
            return worker_config(redis_server, backend, rid, lease_ttl_ms=lease_ms)

        async with (
            open_worker(cfg("a"), hooks=watches["a"].hooks()) as worker_a,
            open_worker(cfg("b"), hooks=watches["b"].hooks()) as worker_b,
            trio.open_nursery() as nursery,
        ):
            workers = {"a": worker_a, "b": worker_b}
            scopes = {rid: await nursery.start(run_worker, w) for rid, w in workers.items()}
            await any_elected.wait()
            leading = [rid for rid, w in watches.items() if w.elected.is_set()]
            assert len(leading) == 1, leading
            (leader_id,) = leading
            (standby_id,) = set(workers) - {leader_id}
            leader, standby = watches[leader_id], watches[standby_id]
            (epoch,) = leader.epochs
            assert hgetall(client, LEASE_KEY)["holder"] == workers[leader_id].holder
            # Over more than a lease TTL the leader keeps renewing; the standby waits.
            with trio.move_on_after(1.25 * lease_ms / 1000):
                await standby.elected.wait()
            assert not standby.elected.is_set()
            assert not workers[standby_id].is_leader

            # Announced release: the standby takes over at once. Without it, it would sleep
            # out the lease it last read, so its lease cannot start (Redis's clock) before
            # the old one's expiry, read here (a renewal after the read only delays it).
            pipe = client.pipeline(transaction=True)
            pipe.pttl(LEASE_KEY)
            pipe.time()
            pttl, (seconds, micros) = pipe.execute()
            old_expiry_ms = int(seconds) * 1000 + int(micros) // 1000 + int(pttl)
            scopes[leader_id].cancel()
            await standby.elected.wait()
            since_ms = int(hgetall(client, LEASE_KEY)["since_ms"])
            assert since_ms < old_expiry_ms, "the standby slept out the lease: no release seen"
            assert standby.epochs == [epoch + 1]
            while not leader.deposed:  # its hook may run after the standby is elected
                await trio.sleep(0.01)
            assert leader.deposed == [epoch]
            assert hgetall(client, LEASE_KEY)["holder"] == workers[standby_id].holder
            await until_ready(workers[standby_id])

            deadline = set_key(client, "c:2", 300)
            await standby.reset_done.wait()
            (request,) = backend.requests
            check_reset(
                request,
                key="c:2",
                deadline_ms=deadline,
                epoch=epoch + 1,
                replica_id=standby_id,
                exact=exact_deadlines(client),
            )
            await assert_no_more_requests(backend, 1, window=0.5)
            assert leader.resets == []
            nursery.cancel_scope.cancel()
        await trio.testing.wait_all_threads_completed()
        assert trio.testing.active_thread_count() == 0


@pytest.mark.parametrize(
    ("server_password", "password"),
    [("right", "wrong"), ("right", None), (None, "unexpected")],
    ids=["wrong-password", "no-password", "password-without-requirepass"],
)
async def test_open_worker_raises_on_bad_credentials(
    redis_server: RedisServer, server_password: str | None, password: str | None
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        if server_password is not None:
            with redis_server.client() as c:
                c.config_set("requirepass", server_password)
        cfg = config(redis_server, redis_password=password)
        with pytest.RaisesGroup(RedisAuthError, flatten_subgroups=True) as caught:
            # As an embedding program would: in a nursery, so errors come as a group.
            async with trio.open_nursery() as nursery, open_worker(cfg) as worker:
                await nursery.start(worker.run)
                pytest.fail("open_worker accepted bad credentials")
        (error,) = caught.value.exceptions
        assert "REDIS_PASSWORD" in str(error)
        if password is not None:
            assert password not in str(error)
        await trio.testing.wait_all_threads_completed()
        assert trio.testing.active_thread_count() == 0


async def test_open_worker_waits_while_redis_is_unreachable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="trio_counter_worker")
    port = free_port()  # nothing listens there
    cfg = Config(
        reset_endpoint_url="http://127.0.0.1:1/reset",
        reset_secret="x",
        counter_key=COUNTER_KEY,
        redis_port=port,
        lease_ttl_ms=LEASE_TTL_MS,
    )
    with trio.fail_after(TEST_TIMEOUT):
        started = time.monotonic()
        with trio.move_on_after(1.5) as scope:
            async with open_worker(cfg):
                pytest.fail("open_worker yielded without a Redis")
        assert scope.cancelled_caught
        assert time.monotonic() - started >= 1.5
        warnings = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
        assert len(warnings) == 1, "it retries, saying so once (then a summary every 10 s)"
        assert f"127.0.0.1:{port}" in warnings[0]
        await trio.testing.wait_all_threads_completed()
        assert trio.testing.active_thread_count() == 0
