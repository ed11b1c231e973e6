"""A leader whose pub/sub connection is killed resynchronises: flags, subscription, state.

Real redis-server, real HTTP backend, the worker in-process (real clock).
"""

from __future__ import annotations

import logging

import pytest
import trio

from tests.support.backend import RecordingBackend
from tests.support.in_process import leading, lone_replica, reconciled
from tests.support.redis_server import RedisServer


async def test_killed_subscription_is_resynchronised(
    redis_server: RedisServer, backend: RecordingBackend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trio_counter_worker")
    cfg = lone_replica(redis_server, backend, lease_ttl_ms=1000)
    with trio.fail_after(20):
        async with leading(cfg):
            with redis_server.client() as c:
                await reconciled(caplog)
                # An operator (or a managed Redis) resets the flags, then the connection
                # drops: events published in between are lost.
                c.config_set("notify-keyspace-events", "")
                killed = c.client_kill_filter(_type="pubsub")
                assert killed >= 1
                # Killing every pubsub client kills the leader's liveness subscription as
                # well: it steps down and is elected again, which under load took longer
                # than 600 ms (the key then expired with nobody subscribed: README, "Not
                # covered"). 3 s outlives that; the rescan must find it.
                c.set("c:during-gap", 1, px=3000)
                await backend.wait_for_count_async(1, timeout=10)
                flags = c.config_get("notify-keyspace-events")["notify-keyspace-events"]
    (request,) = backend.requests
    assert request.json is not None
    assert request.json["key"] == "c:during-gap"
    assert "Redis unavailable (" in caplog.text  # said once, for every loop that saw it
    assert set("Kg$x") <= set(flags)
