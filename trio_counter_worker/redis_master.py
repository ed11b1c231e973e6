"""Sentinel: which node is the master, for a redis-py client that asks the sentinels
only when it opens a connection."""

from __future__ import annotations

import threading
import time
from typing import Any

from .errors import RedisUnavailable

__all__ = ["MASTER_CHECK_EVERY", "MasterWatch"]

MASTER_CHECK_EVERY = 0.25  # how often to ask which node is the master


class MasterWatch:
    """Sentinel: which node is the master, asked of the sentinels at most every
    ``MASTER_CHECK_EVERY`` seconds by whichever command comes first.

    After a manual failover the old master stays a master for ~10 s and accepts every
    command, so nothing fails on its own: redis-py asks the sentinels only when it opens
    a connection. On a change, every connection to the old master is dropped (pub/sub
    included: each listener, in its own thread, closes its subscription when it sees
    ``generation`` change) and the caller gets RedisUnavailable: it resynchronises
    against the new master within about a second.
    """

    def __init__(self, client: Any) -> None:
        pool = getattr(client, "connection_pool", None)
        self._pool = pool if hasattr(pool, "get_master_address") else None
        self._lock = threading.Lock()
        self._address: tuple[str, int] | None = None
        self._next_check = 0.0
        self.generation = 0  # bumped at each change of master

    def follow(self) -> None:
        if self._pool is None:
            return
        with self._lock:
            now = time.monotonic()
            if now < self._next_check:
                return
            self._next_check = now + MASTER_CHECK_EVERY
            address = tuple(self._pool.get_master_address())
            old, self._address = self._address, (str(address[0]), int(address[1]))
            if old is None or old == self._address:
                return
            # redis-py has dropped the idle connections to the old master and drops each
            # busy one when it comes back; subscriptions go by ``generation``.
            self.generation += 1
        raise RedisUnavailable(
            f"Sentinel moved the master from {old[0]}:{old[1]} to {address[0]}:{address[1]}:"
            " dropped every connection to the old one; resynchronising"
        )
