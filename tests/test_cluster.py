"""Redis Cluster: three primaries with a replica each, on loopback; real replicas.

Counters spread over all slots expire while a primary fails over: every counter is reset
exactly once, and the notification flags are on every primary afterwards.
"""

from __future__ import annotations

import secrets
import shutil
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.support.backend import RecordingBackend
from tests.support.cluster import ClusterSetup
from tests.support.procs import SpawnWorker

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("redis-cli") is None, reason="needs redis-cli"),
]

COUNTER_KEY = "k:*"
LEASE_KEY = f"tcw:{{{COUNTER_KEY}}}:lease"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[ClusterSetup]:
    setup = ClusterSetup(tmp_path / "cluster")
    setup.start()
    try:
        yield setup
    finally:
        setup.stop()


def test_every_counter_reset_once_across_a_primary_failover(
    cluster: ClusterSetup, backend: RecordingBackend, spawn_worker: SpawnWorker
) -> None:
    secret = f"cluster-secret-{secrets.token_hex(6)}"
    env = {
        "REDIS_CLUSTER_NODES": cluster.env_value,
        "RESET_ENDPOINT_URL": backend.url,
        "RESET_SECRET": secret,
        "COUNTER_KEY": COUNTER_KEY,
        "LEASE_TTL_MS": "1000",
    }
    workers = [spawn_worker({**env, "REPLICA_ID": f"c{i}"}, f"c{i}") for i in range(2)]
    app = cluster.client()
    try:
        deadline = time.monotonic() + 20
        while not app.hget(LEASE_KEY, "replica"):
            assert time.monotonic() < deadline, "no leader elected on the cluster"
            time.sleep(0.02)
        leader = str(app.hget(LEASE_KEY, "replica"))
        next(w for w in workers if w.log_path.stem == leader).wait_for_output("reconciled:", 20)
        keys = []
        for i in range(30):
            key = f"k:{i}"
            app.set(key, 1, px=1500 + 100 * i)
            keys.append(key)
        nodes = {app.get_node_from_key(k).name for k in keys}  # type: ignore[no-untyped-call, unused-ignore]
        assert len(nodes) == 3, "counters should live on every primary"
        time.sleep(1.2)
        cluster.failover(cluster.primaries()[0])
        for i in range(30, 40):  # after the failover
            key = f"k:{i}"
            for _ in range(50):
                try:
                    app.set(key, 1, px=1500)
                    break
                except (redis.ConnectionError, redis.ResponseError):
                    time.sleep(0.1)
            keys.append(key)

        def all_reset(requests: list[Any]) -> bool:
            return set(keys) <= {q.json["key"] for q in requests if q.json}

        backend.wait_for(all_reset, timeout=30)
        time.sleep(0.5)  # a stray second reset_id would show up within this
        ids: dict[str, set[str]] = defaultdict(set)
        for q in backend.requests:
            ids[q.json["key"]].add(q.json["reset_id"])
        assert {k: v for k, v in ids.items() if len(v) > 1} == {}, "an episode doubled"
        for node in cluster.primaries():
            with node.client() as c:
                flags: Any = c.config_get("notify-keyspace-events")
                assert set("Kg$x") <= set(flags["notify-keyspace-events"]), node.port
        for w in workers:
            assert secret not in w.output()
            assert "Traceback" not in w.output(), w.output()
    finally:
        app.close()
