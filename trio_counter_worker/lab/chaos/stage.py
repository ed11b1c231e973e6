"""The stage a chaos run plays on: its Redis (one server, a Sentinel setup, or the one
given by ``--redis-url``), the recording backend, the names it uses, the faults so far.

Everything the fleet, the app driver and the nemeses share lives here, so that none of
them needs another: they all take the stage.
"""

from __future__ import annotations

import random
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ...delivery import safe_url
from ...keys import Keys
from ..backend import RecordingBackend, ResetLedger
from ..servers import HOST, RedisServer, SentinelSetup
from .options import PROG, Options
from .record import Fault
from .timeline import Timeline

__all__ = ["Stage", "connect"]


def connect(url: str) -> redis.Redis:
    """The run's own client: no retries, so a fault shows at once."""
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=5.0,
        socket_connect_timeout=5.0,
        retry=Retry(NoBackoff(), 0),
    )


class Stage:
    def __init__(self, opts: Options, binary: str | None, timeline: Timeline, err: TextIO) -> None:
        self.opts = opts
        self.binary = binary
        self.timeline = timeline
        self.err = err
        self.rng = random.Random(opts.seed)
        self.tmp = Path(tempfile.mkdtemp(prefix="tcw-chaos-"))
        self.prefix = f"chaos-{secrets.token_hex(4)}"
        self.counter_key = f"{self.prefix}:*"
        own = Keys(self.counter_key)  # the workers' own keys
        self.namespace = own.namespace
        self.lease_key = own.lease
        self.secret = secrets.token_urlsafe(24)
        self.keys = [f"{self.prefix}:c{i}" for i in range(opts.counters)]
        self.notes: list[str] = []
        self.server: RedisServer | None = None
        self.sentinels: SentinelSetup | None = None
        self.url = opts.redis_url or ""
        self.target = (HOST, 0)  # Redis's host and port, for the proxies
        self.master_port = 0  # Sentinel: the master's port, as this run last saw it
        self._client: redis.Redis | None = None
        self.old_master: redis.Redis | None = None  # failover: until the workers left it
        self.ledger = ResetLedger(self.secret)
        self.backend = RecordingBackend()
        self.backend.behave(self.ledger)
        self.faults: list[Fault] = []
        self.pending: Fault | None = None  # a fault whose failover is being timed

    def event(self, message: str) -> None:
        self.timeline.event(message)

    @property
    def client(self) -> redis.Redis:
        assert self._client is not None, "start() first"
        return self._client

    @client.setter
    def client(self, client: redis.Redis) -> None:
        self._client = client

    def last(self, *kinds: str) -> Fault | None:
        """The latest fault of one of ``kinds``."""
        return next((f for f in reversed(self.faults) if f.kind in kinds), None)

    def start(self) -> None:
        """Redis (started here unless given) and the backend."""
        o = self.opts
        where = "given"
        if o.topology == "sentinel":
            assert self.binary is not None
            self.sentinels = SentinelSetup(self.tmp / "redis", binary=self.binary, appendonly=True)
            self.sentinels.start()
            self.url = self.sentinels.master.url
            self.master_port = self.sentinels.master.port
            where = (
                "started: the master of a Sentinel setup, with a replica and sentinels "
                f"on {self.sentinels.env_value}"
            )
        elif o.redis_url is None:
            assert self.binary is not None
            redis_dir = self.tmp / "redis"
            redis_dir.mkdir()
            self.server = RedisServer(redis_dir, binary=self.binary, appendonly=True)
            self.server.start()
            self.url = self.server.url
            where = "started, append-only fsync always"
        parts = urlsplit(self.url)
        self.target = (parts.hostname or HOST, parts.port or 6379)
        self.client = connect(self.url)
        info: Any = self.client.info("server")
        self.event(
            f"redis {info.get('redis_version', '?')} at {safe_url(self.url)} ({where}); "
            f"keys {self.prefix}:*"
        )
        self.backend.start()
        self.event(f"backend on {self.backend.url}")

    def close(self, keep: bool) -> None:
        """Stop the backend and Redis, delete the run's keys from a given Redis, remove
        the directory (unless ``keep``). Idempotent."""
        self.backend.close()
        if self.old_master is not None:
            self.old_master.close()
            self.old_master = None
        if self._client is not None:
            if self.opts.redis_url:  # someone else's Redis: leave nothing behind
                try:
                    self._delete_keys(self._client)
                except redis.RedisError as exc:
                    self.err.write(f"{PROG}: could not delete the {self.prefix}:* keys: {exc}\n")
                self._restore_flags(self._client)
            self._client.close()
            self._client = None
        if self.server is not None:
            self.server.stop()
        if self.sentinels is not None:
            self.sentinels.stop()
        if not keep:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _restore_flags(self, client: redis.Redis) -> None:
        """After flags faults, notify-keyspace-events as it was before the first one (a
        rewrite to Ex, merged back by the leader, would leave an E behind)."""
        first = next((f for f in self.faults if f.kind == "flags" and f.flags[0]), None)
        if first is None:
            return
        try:
            client.config_set("notify-keyspace-events", first.flags[0])
        except redis.RedisError as exc:
            self.err.write(
                f"{PROG}: could not set notify-keyspace-events back to {first.flags[0]!r}: {exc}\n"
            )

    def _delete_keys(self, client: redis.Redis) -> None:
        # Every key of the workers' namespace (lease, epoch, deadlines, pending, claimed,
        # failing, dead, preflight, ...), not a list that goes stale: its name holds the
        # COUNTER_KEY's literal *, escaped for MATCH.
        own = self.namespace.replace("*", "\\*")
        batch: list[str] = []
        for pattern in (f"{own}:*", f"{self.prefix}:*"):
            for key in client.scan_iter(match=pattern, count=1000):
                batch.append(str(key))
                if len(batch) >= 500:
                    client.delete(*batch)
                    batch.clear()
        if batch:
            client.delete(*batch)
