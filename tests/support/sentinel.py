"""A Redis Sentinel setup on loopback: one master, one replica, three sentinels."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import redis

from tests.support.redis_server import RedisServer

MASTER_NAME = "mymaster"


class SentinelSetup:
    def __init__(self, tmp_dir: Path) -> None:
        self.dir = tmp_dir
        self.master = RedisServer(tmp_dir / "master")
        self.replica = RedisServer(
            tmp_dir / "replica", extra_args=["--replicaof", "127.0.0.1", "0"]
        )
        self.sentinels: list[RedisServer] = []

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", s.port) for s in self.sentinels]

    @property
    def env_value(self) -> str:
        return ",".join(f"{h}:{p}" for h, p in self.addresses)

    def start(self) -> None:
        self.master.start()
        self.replica = RedisServer(
            self.dir / "replica", extra_args=["--replicaof", "127.0.0.1", str(self.master.port)]
        )
        self.replica.start()
        for i in range(3):
            d = self.dir / f"sentinel{i}"
            d.mkdir(parents=True, exist_ok=True)
            conf = d / "sentinel.conf"
            conf.write_text(
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} 1000\n"
                f"sentinel failover-timeout {MASTER_NAME} 3000\n"
                f"sentinel parallel-syncs {MASTER_NAME} 1\n"
            )
            s = RedisServer(d, conf_file=conf, extra_args=["--sentinel"])
            s.start()
            self.sentinels.append(s)
        self.wait_ready()

    def sentinel_client(self, i: int = 0) -> redis.Redis:
        return redis.Redis(port=self.sentinels[i].port, decode_responses=True)

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Until every sentinel knows the replica and the other sentinels, and the replica
        is in sync: a failover can then be asked for."""
        deadline = time.monotonic() + timeout
        while True:
            ok = True
            for i in range(len(self.sentinels)):
                with self.sentinel_client(i) as c:
                    replicas: Any = c.execute_command("SENTINEL", "REPLICAS", MASTER_NAME)
                    others: Any = c.execute_command("SENTINEL", "SENTINELS", MASTER_NAME)
                    ok = ok and len(replicas) >= 1 and len(others) >= 2
            with self.replica.client() as r:
                info: Any = r.info("replication")
                ok = ok and info.get("master_link_status") == "up"
            if ok:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("sentinel setup not ready in time")
            time.sleep(0.05)

    def master_port(self) -> int:
        with self.sentinel_client() as c:
            addr: Any = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
            return int(addr[1])

    def failover(self) -> None:
        with self.sentinel_client() as c:
            c.execute_command("SENTINEL", "FAILOVER", MASTER_NAME)

    def stop(self) -> None:
        for s in [*self.sentinels, self.replica, self.master]:
            s.stop()
