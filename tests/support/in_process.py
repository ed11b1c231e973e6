"""A worker run in-process against a real Redis and the recording backend (real clock)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from tests.support.backend import RecordingBackend
from tests.support.redis_server import RedisServer
from trio_counter_worker import Config, Hooks, Worker, open_worker

__all__ = ["leading", "lone_replica", "reconciled"]


def lone_replica(redis_server: RedisServer, backend: RecordingBackend, **settings: Any) -> Config:
    """Replica r1, alone, watching ``c:*`` on ``redis_server`` and sending to ``backend``."""
    return Config(
        reset_endpoint_url=backend.url,
        reset_secret="in-process-secret",
        counter_key="c:*",
        redis_port=redis_server.port,
        replica_id="r1",
        **settings,
    )


@asynccontextmanager
async def leading(config: Config) -> AsyncIterator[Worker]:
    """The worker of ``config``, run in-process: the block starts once it leads, and the
    worker is cancelled when the block ends."""
    elected = trio.Event()
    hooks = Hooks(on_elected=lambda _epoch: elected.set())
    async with open_worker(config, hooks=hooks) as worker, trio.open_nursery() as nursery:
        await nursery.start(worker.run)
        await elected.wait()
        yield worker
        nursery.cancel_scope.cancel()


async def reconciled(caplog: pytest.LogCaptureFixture) -> None:
    """Until the leader has said it reconciled (``caplog`` must hold trio_counter_worker's
    INFO lines)."""
    while "reconciled" not in caplog.text:
        await trio.sleep(0.01)
