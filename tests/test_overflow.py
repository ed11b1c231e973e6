"""A subscription Redis closes for falling behind (client-output-buffer-limit pubsub) is
named for what it is and costs no reset. Real redis-server, the worker in-process."""

from __future__ import annotations

import logging

import pytest
import trio

from tests.support.backend import RecordingBackend
from tests.support.in_process import leading, lone_replica, reconciled
from tests.support.redis_server import RedisServer


async def test_a_subscription_closed_for_its_output_buffer_is_named_and_costs_no_reset(
    redis_server: RedisServer, backend: RecordingBackend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trio_counter_worker")
    cfg = lone_replica(redis_server, backend, lease_ttl_ms=2000)
    with trio.fail_after(45), redis_server.client() as c:  # a loaded machine: ~25 s seen
        # 7.2+ counts output-buffer disconnections (named for sure); before, the
        # subscription closed by a server that stays up is named as most likely that.
        async with leading(cfg):
            await reconciled(caplog)
            c.config_set("client-output-buffer-limit", "pubsub 64kb 32kb 1")
            # 8 MB of keyspace events at once (4 KiB key names): more than the socket
            # and the limit hold before the leader can read them.
            pipe = c.pipeline(transaction=False)
            for i in range(2000):
                pipe.set(f"c:long:{i}:" + "x" * 4096, 1, px=600_000)
            pipe.set("c:short", 1, px=1500)
            pipe.execute()
            while "client-output-buffer-limit" not in caplog.text:
                await trio.sleep(0.01)
            c.config_set("client-output-buffer-limit", "pubsub 32mb 8mb 60")
            await backend.wait_for_count_async(1, timeout=10)
    assert [r.json["key"] for r in backend.requests if r.json is not None] == ["c:short"]
    assert "Redis unavailable (" not in caplog.text  # Redis was up: not an outage
    (line,) = [r for r in caplog.records if "client-output-buffer-limit" in r.getMessage()]
    assert line.levelno == logging.WARNING
