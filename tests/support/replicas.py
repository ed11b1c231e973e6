"""Worker processes against one real Redis and one recording backend: the set-up the
multi-replica, hostile and hanging-backend tests share."""

from __future__ import annotations

import secrets

import attrs
import redis

from tests.support.backend import Received, RecordingBackend
from tests.support.procs import SpawnWorker, WorkerProcess, worker_env
from tests.support.redis_server import RedisServer


def unique_secret() -> str:
    """A RESET_SECRET no log line can contain by chance, so a leak is found."""
    return f"s3cr3t-{secrets.token_hex(16)}"


@attrs.define
class Replicas:
    """Spawns replicas against ``redis_server`` and ``backend`` with one unique secret,
    and remembers them so the fixture can check their output when the test ends."""

    redis_server: RedisServer
    backend: RecordingBackend
    spawn_worker: SpawnWorker
    counter_key: str = "c:*"
    lease_ttl_ms: int = 1000
    secret: str = attrs.field(factory=unique_secret)
    spawned: list[WorkerProcess] = attrs.field(factory=list)

    def env(self, replica_id: str, **settings: str) -> dict[str, str]:
        """A replica's settings; ``settings`` (by variable name) added or overriding."""
        return worker_env(
            self.redis_server,
            self.backend,
            RESET_SECRET=self.secret,
            COUNTER_KEY=self.counter_key,
            LEASE_TTL_MS=str(self.lease_ttl_ms),
            REPLICA_ID=replica_id,
            **settings,
        )

    def spawn(self, replica_id: str, **settings: str) -> WorkerProcess:
        return self.adopt(self.spawn_worker(self.env(replica_id, **settings), replica_id))

    def adopt(self, worker: WorkerProcess) -> WorkerProcess:
        """Check ``worker`` (spawned with settings of the test's own) at the end too."""
        self.spawned.append(worker)
        return worker

    def client(self) -> redis.Redis:
        """Bytes in, bytes out: the tests' keys need not be UTF-8."""
        return self.redis_server.client(decode_responses=False, protocol=2)

    def requests_for(self, key: str) -> list[Received]:
        return [r for r in self.backend.requests if r.key == key]

    def assert_secret_kept(self) -> None:
        """RESET_SECRET reaches the backend, never a replica's output."""
        for worker in self.spawned:
            assert self.secret not in worker.output(), f"RESET_SECRET leaked into {worker!r}"
