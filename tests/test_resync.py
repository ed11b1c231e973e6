"""A leader whose pub/sub connection is killed resynchronises: flags, subscription, state.

Real redis-server, real HTTP backend, the worker in-process (real clock).
"""

from __future__ import annotations

import logging

import pytest
import trio

from tests.support.backend import RecordingBackend
from tests.support.redis_server import RedisServer
from trio_counter_worker import Config, Hooks, open_worker


async def test_killed_subscription_is_resynchronised(
    redis_server: RedisServer, backend: RecordingBackend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trio_counter_worker")
    cfg = Config(
        reset_endpoint_url=backend.url,
        reset_secret="resync-secret",
        counter_key="c:*",
        redis_port=redis_server.port,
        lease_ttl_ms=1000,
        replica_id="r1",
    )
    elected = trio.Event()
    with trio.fail_after(20):
        hooks = Hooks(on_elected=lambda e: elected.set())
        async with open_worker(cfg, hooks=hooks) as worker, trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            await elected.wait()
            with redis_server.client() as c:
                while "reconciled" not in caplog.text:
                    await trio.sleep(0.01)
                # An operator (or a managed Redis) resets the flags, then the connection
                # drops: events published in between are lost.
                c.config_set("notify-keyspace-events", "")
                killed = c.client_kill_filter(_type="pubsub")
                assert killed >= 1
                c.set("c:during-gap", 1, px=600)
                await backend.wait_for_count_async(1, timeout=10)
                flags = c.config_get("notify-keyspace-events")["notify-keyspace-events"]
            nursery.cancel_scope.cancel()
    (request,) = backend.requests
    assert request.json is not None
    assert request.json["key"] == "c:during-gap"
    assert "Redis unavailable (" in caplog.text  # said once, for every loop that saw it
    assert set("Kg$x") <= set(flags)
