"""`expired` events for keys with no recorded deadline, against a real redis-server."""

from __future__ import annotations

import trio

from tests.support.redis_server import RedisServer
from trio_counter_worker import Config
from trio_counter_worker.redis_bridge import RedisBridge

HOLDER = "me#1"


async def test_reported_expiry_is_claimed_once_and_echoes_are_not(
    redis_server: RedisServer,
) -> None:
    cfg = Config(reset_endpoint_url="http://127.0.0.1:1/r", reset_secret="x",
                 counter_key="c:*", redis_port=redis_server.port, lease_ttl_ms=5000)
    bridge = RedisBridge(cfg)
    try:
        with trio.fail_after(10):
            assert (await bridge.acquire(HOLDER, "me", 5000, 0)).acquired
            # Never tracked, already gone: without the report it is just "gone".
            (plain,) = await bridge.claim(HOLDER, ["c:unseen"])
            assert plain.kind == "gone"
            (first,) = await bridge.claim(HOLDER, ["c:unseen"], reported=True)
            assert first.kind == "claimed"
            (echo,) = await bridge.claim(HOLDER, ["c:unseen"], reported=True)
            assert echo.kind == "gone"  # the tombstone: one reset per expiry
            # A tracked key claimed at its deadline: its own `expired` echo is ignored.
            with redis_server.client() as c:
                c.set("c:tracked", 1, px=50)
            await bridge.track(HOLDER, ["c:tracked"])
            await trio.sleep(0.1)
            (due,) = await bridge.claim(HOLDER, ["c:tracked"])
            assert due.kind == "claimed"
            (echo2,) = await bridge.claim(HOLDER, ["c:tracked"], reported=True)
            assert echo2.kind == "gone"
            # A key alive again when the report is read: tracked, not reset.
            with redis_server.client() as c:
                c.set("c:back", 1, ex=60)
            (alive,) = await bridge.claim(HOLDER, ["c:back"], reported=True)
            assert alive.kind == "alive"
            assert len(await bridge.pending()) == 2
    finally:
        bridge.close()
