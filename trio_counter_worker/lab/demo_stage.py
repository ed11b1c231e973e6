"""What the demo starts and stops: a temporary directory, ``redis-server``, the reference
backend and the replicas, each started on its own call so :mod:`.demo` can narrate
between them; :meth:`DemoStage.close` stops them all and removes the directory.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import redis

from .backend import RecordingBackend, ResetLedger
from .replicas import Replica, spawn_replica, stop_replicas
from .servers import HOST, RedisServer

__all__ = ["DemoStage"]


class DemoStage:
    """The demo's servers and replicas, in ``tmp`` (a fresh temporary directory).

    ``env``: the settings every replica gets besides where Redis and the backend are.
    """

    def __init__(self, binary: str, env: Mapping[str, str]) -> None:
        self.binary = binary
        self.env = dict(env)
        self.tmp = Path(tempfile.mkdtemp(prefix="tcw-demo-"))
        self.secret = secrets.token_urlsafe(24)
        self.redis_server = RedisServer(self.tmp, binary=binary)
        self.ledger = ResetLedger(self.secret)
        self.backend = RecordingBackend()
        self.backend.behave(self.ledger)
        self.client: redis.Redis | None = None
        self.replicas: dict[str, Replica] = {}
        self.replica_count = 0

    def start_redis(self) -> redis.Redis:
        """Start ``redis-server``; a client to it."""
        self.redis_server.start()
        self.client = redis.Redis(
            host=HOST,
            port=self.redis_server.port,
            decode_responses=True,
            socket_timeout=2.0,
            socket_connect_timeout=2.0,
        )
        return self.client

    def spawn_replica(self) -> str:
        """Start the next replica, ``replica-<n>``; its name."""
        self.replica_count += 1
        name = f"replica-{self.replica_count}"
        self.replicas[name] = spawn_replica(
            self.tmp,
            name,
            {
                "REDIS_HOST": HOST,
                "REDIS_PORT": str(self.redis_server.port),
                "RESET_ENDPOINT_URL": self.backend.url,
                "RESET_SECRET": self.secret,
                **self.env,
            },
        )
        return name

    def close(self) -> None:
        """Stop everything this stage started and remove its directory. Idempotent."""
        stop_replicas(self.replicas.values())
        self.replicas.clear()
        self.backend.close()
        if self.client is not None:
            self.client.close()
            self.client = None
        self.redis_server.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)
