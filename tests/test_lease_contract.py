"""The contract for the lease: ACQUIRE and RENEW (Lua) decide as lease_spec says.

Every combination of a lease (none, ours, another holder's with or without a liveness
channel), which channels have a real subscriber on the real redis-server, what the caller
suspects, and whether the caller runs with liveness goes through both; the outcome and
the lease and epoch counter left behind must match. A Redis user without ``+pubsub``
stands for an ACL that refuses PUBSUB: the scripts then fall back to the lease's TTL.
A standby's watch between two ACQUIREs (``wait_leader_gone``) wakes exactly when ACQUIRE
would see the holder gone.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import trio

from tests.support.bridge import bridge_on
from tests.support.proxy import FaultProxy
from tests.support.redis_server import RedisServer
from trio_counter_worker import lease_spec, scripts
from trio_counter_worker.acl import acl_rule
from trio_counter_worker.errors import RedisRefused, RedisUnavailable
from trio_counter_worker.keys import Keys
from trio_counter_worker.redis_bridge import RedisBridge

KEYS = Keys("k:*")
ME, OTHER = "me#1", "other#1"
MINE, THEIRS = KEYS.alive("me#1:1"), KEYS.alive("other#1:1")
EPOCH = 7
ENDPOINT = "https://a.example/r"  # where the caller sends resets

LEASES: dict[str, lease_spec.LeaseRecord | None] = {
    "free": None,
    "ours": lease_spec.LeaseRecord(ME, "me", EPOCH, MINE),
    "ours-old": lease_spec.LeaseRecord(ME, "me", EPOCH, KEYS.alive("me#1:0")),
    "theirs": lease_spec.LeaseRecord(OTHER, "other", EPOCH, THEIRS, "https://b.example/r"),
    "theirs-plain": lease_spec.LeaseRecord(OTHER, "other", EPOCH, ""),  # (an older replica's)
}
SUBSCRIBED = [(), (MINE,), (THEIRS,), (MINE, THEIRS)]


@pytest.fixture
def r(redis_server: RedisServer) -> Iterator[redis.Redis]:
    with redis_server.client() as client:
        yield client


@pytest.fixture
def no_pubsub(redis_server: RedisServer, r: redis.Redis) -> Iterator[redis.Redis]:
    """A client whose user may run the scripts but not PUBSUB."""
    r.acl_setuser(
        "nopubsub", enabled=True, passwords=["+pw"], keys=["*"], channels=["*"],
        commands=["+@all", "-pubsub"],
    )  # fmt: skip
    with redis.Redis(
        port=redis_server.port, username="nopubsub", password="pw", decode_responses=True
    ) as client:
        yield client


def arrange(r: redis.Redis, lease: lease_spec.LeaseRecord | None) -> None:
    r.delete(KEYS.lease)
    r.set(KEYS.epoch, EPOCH)
    if lease is not None:
        r.hset(
            KEYS.lease,
            mapping={
                "holder": lease.holder,
                "replica": lease.replica,
                "epoch": lease.epoch,
                "alive": lease.alive,
                **({"endpoint": lease.endpoint} if lease.endpoint else {}),
            },
        )
        r.pexpire(KEYS.lease, 60_000)


def left(r: redis.Redis) -> tuple[lease_spec.LeaseRecord | None, int]:
    raw: dict[str, str] = r.hgetall(KEYS.lease)  # type: ignore[assignment]
    counter = int(r.get(KEYS.epoch) or 0)
    if not raw:
        return None, counter
    record = lease_spec.LeaseRecord(
        raw["holder"], raw["replica"], int(raw["epoch"]), raw["alive"], raw.get("endpoint", "")
    )
    return record, counter


def subscribed(r: redis.Redis, channels: tuple[str, ...]) -> redis.client.PubSub:
    pubsub = r.pubsub()
    if channels:
        pubsub.subscribe(*channels)
        for _ in channels:  # wait for Redis to confirm each
            while pubsub.get_message(timeout=1.0) is None:
                pass
    return pubsub


@pytest.mark.parametrize("refused", [False, True], ids=["pubsub", "pubsub-refused"])
def test_acquire_and_renew_decide_as_the_spec(
    r: redis.Redis, no_pubsub: redis.Redis, refused: bool
) -> None:
    caller = no_pubsub if refused else r
    acquire = caller.register_script(scripts.ACQUIRE)
    renew = caller.register_script(scripts.RENEW)
    checked = 0
    for channels in SUBSCRIBED:
        pubsub = subscribed(r, channels)
        try:
            counts = None if refused else {c: 1 for c in channels}
            for (name, lease), mine, suspect in itertools.product(
                LEASES.items(), ["", MINE], ["", THEIRS, KEYS.alive("x:1")]
            ):
                arrange(r, lease)
                want = lease_spec.acquire(
                    lease, EPOCH, holder=ME, replica="me", epoch_floor=0, mine=mine,
                    suspect=suspect, subscribers=counts, endpoint=ENDPOINT,
                )  # fmt: skip
                got = json.loads(
                    str(
                        acquire(
                            [KEYS.lease, KEYS.epoch], [ME, "me", 60_000, 0, mine, suspect, ENDPOINT]
                        )
                    )
                )
                case = f"{name} mine={mine!r} suspect={suspect!r} subscribed={channels}"
                assert bool(got["acquired"]) is want.acquired, case
                assert int(got.get("epoch") or 0) == want.epoch, case
                assert (got.get("ready", True) is not False) is want.ready, case
                if want.acquired:
                    assert str(got.get("replica") or "") == want.taken_from, case
                else:
                    assert got.get("liveness", "off") == want.liveness, case
                    assert str(got.get("alive") or "") == want.alive, case
                    assert str(got.get("endpoint") or "") == want.endpoint, case
                assert left(r) == (want.lease, want.epoch_counter), case

                arrange(r, lease)
                answer = int(str(renew([KEYS.lease], [ME, 60_000])))
                renewal = lease_spec.renew(lease, holder=ME, subscribers=counts)
                assert {1: "renewed", 0: "lost", -1: "unseen"}[answer] == renewal, case
                checked += 1
        finally:
            pubsub.close()
    assert checked == len(SUBSCRIBED) * len(LEASES) * 2 * 3


def _bridge(redis_server: RedisServer, **kw: Any) -> RedisBridge:
    return bridge_on(redis_server, "k:*", **kw)


async def test_a_standby_watch_wakes_exactly_when_acquire_sees_the_holder_gone(
    redis_server: RedisServer, r: redis.Redis
) -> None:
    """A standby that watches (wait_leader_gone) instead of calling ACQUIRE every
    TAKEOVER_CHECK_MS must wake whenever ACQUIRE would see the holder gone or the lease
    free, and only then (else it would look for nothing, or miss a dead leader)."""
    bridge = _bridge(redis_server)
    checked = 0
    try:
        for channels in SUBSCRIBED:
            pubsub = subscribed(r, channels)
            try:
                for name, lease in LEASES.items():
                    if lease is not None and not lease.alive:
                        continue  # a holder without liveness is not watched
                    arrange(r, lease)
                    # The standby watching is subscribed to its own channel (ready).
                    third = KEYS.alive("third#1:1")
                    want = lease_spec.acquire(
                        lease, EPOCH, holder="third#1", replica="third", epoch_floor=0,
                        mine=third, suspect="", subscribers={third: 1, **{c: 1 for c in channels}},
                    )  # fmt: skip
                    watched = THEIRS if lease is None else lease.alive
                    if watched not in channels:
                        assert lease is None or want.liveness == "gone"
                        wakes: str | None = "gone"
                    else:
                        assert lease is None or want.liveness == "alive"
                        wakes = "free" if lease is None else None
                    woke = None
                    # Waking is bounded generously (a loaded host); not waking, for 0.1 s
                    # of asks every 5 ms.
                    with trio.move_on_after(0.1 if wakes is None else 10):
                        woke = await bridge.wait_leader_gone(watched, 0.005)
                    assert woke == wakes, f"{name} subscribed={channels}"
                    checked += 1
            finally:
                pubsub.close()
    finally:
        await bridge.aclose()
    assert checked == len(SUBSCRIBED) * 4


async def stays_asleep(bridge: RedisBridge) -> None:
    """The watch of a holder that is there does not wake for 0.1 s of asks every 5 ms."""
    with trio.move_on_after(0.1):
        await bridge.wait_leader_gone(THEIRS, 0.005)
        raise AssertionError("woken while the holder is there")


async def test_the_documented_acl_rule_lets_a_standby_watch(
    redis_server: RedisServer, r: redis.Redis
) -> None:
    """With exactly the ACL rule ``check`` prints, the watch runs (it would otherwise
    fail every round and leave the looking to the acquire script, unseen)."""
    major = int(str(r.info("server")["redis_version"]).split(".")[0])
    rule = acl_rule("k:*", KEYS.namespace, 0, major)
    r.execute_command("ACL", "SETUSER", "worker", "on", ">pw", *rule.split())  # type: ignore[no-untyped-call, unused-ignore]
    bridge = _bridge(redis_server, redis_username="worker", redis_password="pw")
    try:
        arrange(r, LEASES["theirs"])
        pubsub = subscribed(r, (THEIRS,))
        try:
            await stays_asleep(bridge)
            r.delete(KEYS.lease)
            with trio.fail_after(10):
                assert await bridge.wait_leader_gone(THEIRS, 0.005) == "free"
            arrange(r, LEASES["theirs"])  # back: only the holder's connection goes now
        finally:
            pubsub.close()  # Redis drops the subscription a moment later
        with trio.fail_after(10):
            assert await bridge.wait_leader_gone(THEIRS, 0.005) == "gone"
    finally:
        await bridge.aclose()


async def test_a_standby_watch_refused_by_the_acl_says_so(
    redis_server: RedisServer, no_pubsub: redis.Redis
) -> None:
    bridge = _bridge(redis_server, redis_username="nopubsub", redis_password="pw")
    try:
        with pytest.raises(RedisRefused) as refused:
            await bridge.wait_leader_gone(THEIRS, 0.005)
        assert refused.value.kind == "permission"
    finally:
        await bridge.aclose()


async def test_a_standby_watch_on_a_redis_that_stops_answering_fails_at_the_socket_timeout(
    redis_server: RedisServer, r: redis.Redis
) -> None:
    """Redis (or the path to it) goes silent mid-watch: the watch's thread waits on a
    read that never ends. It must fail at the socket timeout (LEASE_TTL_MS / 4), which the
    standby takes as Redis away, and watch again once Redis answers, on a new connection
    (the silent one may still carry an answer: never reused)."""
    with FaultProxy(redis_server.host, redis_server.port) as proxy:
        bridge = _bridge(redis_server, redis_port=proxy.port, lease_ttl_ms=2000)
        try:
            arrange(r, LEASES["theirs"])
            pubsub = subscribed(r, (THEIRS,))
            try:
                await stays_asleep(bridge)
                proxy.blackhole()
                started = trio.current_time()
                with trio.fail_after(10), pytest.raises(RedisUnavailable):
                    await bridge.wait_leader_gone(THEIRS, 0.005)
                assert trio.current_time() - started >= 0.5  # the socket timeout, not less
                proxy.forward()
                await stays_asleep(bridge)
            finally:
                pubsub.close()
            with trio.fail_after(10):
                assert await bridge.wait_leader_gone(THEIRS, 0.005) == "gone"
        finally:
            await bridge.aclose()
