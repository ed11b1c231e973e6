"""A RedisBridge on a test server, for tests that call the store directly."""

from __future__ import annotations

from typing import Any

from tests.support.redis_server import RedisServer
from trio_counter_worker import Config
from trio_counter_worker.redis_bridge import RedisBridge

__all__ = ["bridge_on"]


def bridge_on(redis_server: RedisServer, counter_key: str, **kw: Any) -> RedisBridge:
    """A bridge to ``redis_server`` for ``counter_key`` (no backend is called), with any
    other setting in ``kw`` (``redis_port``: a proxy's, in front of it)."""
    settings: dict[str, Any] = {"redis_port": redis_server.port, **kw}
    return RedisBridge(
        Config(
            reset_endpoint_url="http://127.0.0.1:1/r",
            reset_secret="x",
            counter_key=counter_key,
            **settings,
        )
    )
