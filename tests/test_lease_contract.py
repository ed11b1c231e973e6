"""The contract for the lease: ACQUIRE and RENEW (Lua) decide as lease_spec says.

Every combination of a lease (none, ours, another holder's with or without a liveness
channel), which channels have a real subscriber on the real redis-server, what the caller
suspects, and whether the caller runs with liveness goes through both; the outcome and
the lease and epoch counter left behind must match. A Redis user without ``+pubsub``
stands for an ACL that refuses PUBSUB: the scripts then fall back to the lease's TTL.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator

import pytest
import redis

from tests.support.redis_server import RedisServer
from trio_counter_worker import lease_spec, scripts
from trio_counter_worker.keys import Keys

KEYS = Keys("k:*")
ME, OTHER = "me#1", "other#1"
MINE, THEIRS = KEYS.alive("me#1:1"), KEYS.alive("other#1:1")
EPOCH = 7

LEASES: dict[str, lease_spec.LeaseRecord | None] = {
    "free": None,
    "ours": lease_spec.LeaseRecord(ME, "me", EPOCH, MINE),
    "ours-old": lease_spec.LeaseRecord(ME, "me", EPOCH, KEYS.alive("me#1:0")),
    "theirs": lease_spec.LeaseRecord(OTHER, "other", EPOCH, THEIRS),
    "theirs-plain": lease_spec.LeaseRecord(OTHER, "other", EPOCH, ""),
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
            },
        )
        r.pexpire(KEYS.lease, 60_000)


def left(r: redis.Redis) -> tuple[lease_spec.LeaseRecord | None, int]:
    raw: dict[str, str] = r.hgetall(KEYS.lease)  # type: ignore[assignment]
    counter = int(r.get(KEYS.epoch) or 0)
    if not raw:
        return None, counter
    record = lease_spec.LeaseRecord(raw["holder"], raw["replica"], int(raw["epoch"]), raw["alive"])
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
                    suspect=suspect, subscribers=counts,
                )  # fmt: skip
                got = json.loads(
                    str(acquire([KEYS.lease, KEYS.epoch], [ME, "me", 60_000, 0, mine, suspect]))
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
                assert left(r) == (want.lease, want.epoch_counter), case

                arrange(r, lease)
                answer = int(str(renew([KEYS.lease], [ME, 60_000])))
                renewal = lease_spec.renew(lease, holder=ME, subscribers=counts)
                assert {1: "renewed", 0: "lost", -1: "unseen"}[answer] == renewal, case
                checked += 1
        finally:
            pubsub.close()
    assert checked == len(SUBSCRIBED) * len(LEASES) * 2 * 3
