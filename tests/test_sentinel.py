"""Redis Sentinel: one master, one replica, three sentinels on loopback; real replicas.

The worker discovers the master through the sentinels and follows a failover: commands
and subscriptions killed by Sentinel surface as connection errors, the leader
resynchronises against the new master (notification flags set again, pending resets and
deadlines reconciled), and every counter expiring around the failover is reset once.
"""

from __future__ import annotations

import secrets
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.sentinel import Sentinel

from tests.support.backend import RecordingBackend
from tests.support.procs import SpawnWorker
from tests.support.sentinel import MASTER_NAME, SentinelSetup
from trio_counter_worker.keys import Keys

pytestmark = pytest.mark.slow

COUNTER_KEY = "s:*"
LEASE_KEY = Keys(COUNTER_KEY).lease


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[SentinelSetup]:
    setup = SentinelSetup(tmp_path / "sentinel")
    setup.start()
    try:
        yield setup
    finally:
        setup.stop()


def test_resets_survive_a_sentinel_failover(
    sentinels: SentinelSetup, backend: RecordingBackend, spawn_worker: SpawnWorker
) -> None:
    secret = f"sentinel-secret-{secrets.token_hex(6)}"
    env = {
        "REDIS_SENTINELS": sentinels.env_value,
        "REDIS_SENTINEL_MASTER": MASTER_NAME,
        "RESET_ENDPOINT_URL": backend.url,
        "RESET_SECRET": secret,
        "COUNTER_KEY": COUNTER_KEY,
        "LEASE_TTL_MS": "1000",
    }
    workers = [spawn_worker({**env, "REPLICA_ID": f"s{i}"}, f"s{i}") for i in range(2)]
    sentinel: Any = Sentinel(sentinels.addresses, socket_timeout=1.0)  # type: ignore[no-untyped-call, unused-ignore]
    app: redis.Redis = sentinel.master_for(MASTER_NAME, decode_responses=True, socket_timeout=1.0)
    try:
        deadline = time.monotonic() + 20
        while not app.hget(LEASE_KEY, "replica"):
            assert time.monotonic() < deadline, "no leader elected through Sentinel"
            time.sleep(0.02)

        def durable_set(key: str, px: int) -> None:
            """SET, then WAIT for the replica: a write only the old master saw may be
            lost in the failover (Redis's own limit), so write it again until one
            replica has it."""
            for _ in range(100):
                try:
                    app.set(key, 1, px=px)
                    if int(app.execute_command("WAIT", 1, 500)) >= 1:  # type: ignore[no-untyped-call, unused-ignore]
                        return
                except (redis.ConnectionError, redis.ReadOnlyError):
                    pass
                time.sleep(0.05)
            raise AssertionError(f"could not write {key} durably")

        keys = []
        for i in range(10):  # expiring before, during and after the failover
            key = f"s:{i}"
            durable_set(key, 1500 + 300 * i)
            keys.append(key)
        old_master = sentinels.master_port()
        # Resets before the failover too: it starts once the first is reset.
        backend.wait_for(lambda requests: len(requests) >= 1, timeout=10)
        sentinels.failover()
        deadline = time.monotonic() + 15
        while sentinels.master_port() == old_master:
            assert time.monotonic() < deadline, "failover did not happen"
            time.sleep(0.05)
        # Set on the new master after the failover, straight to it: the old one takes
        # ~10 s to become its replica (a WAIT for one would stall until then), and may
        # accept a write meanwhile through a connection it keeps.
        with redis.Redis(port=sentinels.master_port(), socket_timeout=1.0) as new:
            for i in range(10, 15):
                key = f"s:{i}"
                new.set(key, 1, px=1500)
                keys.append(key)

        def all_reset(requests: list[Any]) -> bool:
            return set(keys) <= {q.json["key"] for q in requests if q.json}

        backend.wait_for(all_reset, timeout=20)
        time.sleep(0.5)  # a stray second reset_id would arrive within this
        ids: dict[str, set[str]] = defaultdict(set)
        for q in backend.requests:
            ids[q.json["key"]].add(q.json["reset_id"])
        assert {k: v for k, v in ids.items() if len(v) > 1} == {}, "an episode doubled"
        flags: Any = app.config_get("notify-keyspace-events")
        assert set("Kg$x") <= set(flags["notify-keyspace-events"])  # set on the new master
        for w in workers:
            assert secret not in w.output()
            assert "Traceback" not in w.output(), w.output()
    finally:
        app.close()


def test_a_manual_failover_moves_every_connection_at_once(
    sentinels: SentinelSetup, backend: RecordingBackend, spawn_worker: SpawnWorker
) -> None:
    """After SENTINEL FAILOVER the old master stays a master for ~10 s and accepts
    everything: the worker must leave it on its own, not when Sentinel demotes it."""
    env = {
        "REDIS_SENTINELS": sentinels.env_value,
        "REDIS_SENTINEL_MASTER": MASTER_NAME,
        "RESET_ENDPOINT_URL": backend.url,
        "RESET_SECRET": "s",
        "COUNTER_KEY": COUNTER_KEY,
        "LEASE_TTL_MS": "1000",
    }
    workers = [spawn_worker({**env, "REPLICA_ID": f"m{i}"}, f"m{i}") for i in range(2)]
    sentinel: Any = Sentinel(sentinels.addresses, socket_timeout=1.0)  # type: ignore[no-untyped-call, unused-ignore]
    try:
        deadline = time.monotonic() + 20
        with sentinels.master.client() as old:
            while not old.hget(LEASE_KEY, "replica"):
                assert time.monotonic() < deadline, "no leader elected through Sentinel"
                time.sleep(0.02)
            sentinels.failover()
            while sentinels.master_port() == sentinels.master.port:
                assert time.monotonic() < deadline, "failover did not happen"
                time.sleep(0.02)
            switched = time.monotonic()

            # The app follows Sentinel and writes to the new master at once, plain SETs.
            def worker_clients(c: redis.Redis) -> list[str]:
                listing: Any = c.client_list()
                return [str(x["name"]) for x in listing if str(x["name"]).startswith("tcw:")]

            left: float | None = None
            with sentinels.replica.client() as new:
                keys = [f"s:w{i}" for i in range(20)]
                for key in keys:
                    # Longer than the worker takes to move (a key whose whole life falls
                    # inside that time can be missed: README). It moves when the sentinel
                    # it asks names the new master: 2.1-2.3 s after the switch seen here
                    # in one run on Valkey 9 with three suites side by side on 2 cores.
                    new.set(key, 1, px=3000)
                    if left is None and not worker_clients(old):
                        left = time.monotonic() - switched
                        role: Any = old.execute_command("ROLE")
                    time.sleep(0.1)
                while left is None:
                    # Leaving the demoted master is the behaviour (on it, the worker
                    # would miss every expiry on the new one), not a benchmark: the
                    # bound only says "follows Sentinel": 12x the 0.41 s measured at
                    # load 11-13 on 2 cores.
                    assert time.monotonic() - switched < 5.0, (
                        f"still on the old master: {worker_clients(old)}"
                    )
                    if not worker_clients(old):
                        left = time.monotonic() - switched
                        role = old.execute_command("ROLE")
                    time.sleep(0.02)
                assert worker_clients(new), "the worker is connected to the new master"

        def all_reset(requests: list[Any]) -> bool:
            return set(keys) <= {q.json["key"] for q in requests if q.json}

        backend.wait_for(all_reset, timeout=20)
        print(f"left the old master {left:.2f} s after the switch (its role then: {role[0]})")
        ids: dict[str, set[str]] = defaultdict(set)
        for q in backend.requests:
            ids[q.json["key"]].add(q.json["reset_id"])
        assert {k: v for k, v in ids.items() if len(v) > 1} == {}, "an episode doubled"
        for w in workers:
            assert "Traceback" not in w.output(), w.output()
    finally:
        sentinel.sentinels[0].close()
