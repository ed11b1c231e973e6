"""Faults of Redis itself: ``redis`` (SIGKILL redis-server, start it again on the same
port: append-only, fsync always, nothing lost) and ``failover`` (SENTINEL FAILOVER, the
app following the master the sentinels name)."""

from __future__ import annotations

import time
from typing import Any

import redis

from ...replicas import Replica
from ...servers import HOST, MASTER_NAME
from ..driver import AppDriver
from ..fleet import Fleet
from ..record import Fault
from ..report import ms as _ms
from ..stage import Stage, connect
from .base import Fired, Nemesis

__all__ = ["RestartNemesis"]

SWITCH_WAIT = 10.0  # failover: the longest wait for the new master, then for the workers


class RestartNemesis(Nemesis):
    kinds = ("redis", "failover")

    def __init__(self, stage: Stage, fleet: Fleet, driver: AppDriver) -> None:
        super().__init__(stage, fleet, driver)
        self.switching: Fault | None = None  # failover: until the workers left the old one

    def fire(self, f: Fault, leader: Replica) -> Fired:
        if f.kind == "redis":
            self.restart(f)
            self.stage.pending = f
            return "fired"
        return self.failover(f)

    def restart(self, f: Fault) -> None:
        """kill -9 redis-server and start it again on the same port. Nothing of ours is in
        flight meanwhile: the run's loop is the only user of its connection."""
        s = self.stage
        assert s.server is not None
        pttl = int(s.client.pttl(s.lease_key))
        f.expiry_before = time.time() + pttl / 1000 if pttl > 0 else None
        port = s.server.port
        f.fired = time.time()
        s.server.kill()
        # Noted before starting it: a worker may reconnect and reconcile before start()
        # has seen the server answer, and such a reconcile must count as after it.
        f.restarted = time.time()
        s.server.start()  # on the same port
        f.down = time.time() - f.fired
        s.client.connection_pool.disconnect()  # the old connections are dead
        s.event(
            f"{self.head(f)}redis-server killed (SIGKILL) and restarted on port "
            f"{port}: down {_ms(f.down)}"
        )

    def failover(self, f: Fault) -> Fired:
        """SENTINEL FAILOVER, once the replica has every write (WAIT): nothing the app
        wrote is lost with the old master. The app holds its writes until the sentinels
        name the new master (:meth:`tick`). Skipped if the replica is not in sync (a
        second failover before the old master rejoined as a replica, say)."""
        s = self.stage
        assert s.sentinels is not None
        try:
            if int(s.client.wait(1, 1000)) < 1:
                raise redis.ResponseError("the replica is not in sync (WAIT 1 1000: 0)")
            pttl = int(s.client.pttl(s.lease_key))
            f.fired = time.time()
            s.sentinels.failover()
        except redis.ResponseError as exc:
            s.event(f"failover skipped: {exc}")
            return "skipped"
        f.expiry_before = f.fired + pttl / 1000 if pttl > 0 else None
        self.driver.paused = True
        self.switching = s.pending = f
        s.event(
            f"{self.head(f)}SENTINEL FAILOVER {MASTER_NAME} (the master on port "
            f"{s.master_port}); the app holds its writes until the sentinels name "
            "the new one"
        )
        return "fired"

    @property
    def busy(self) -> bool:
        return self.switching is not None

    def tick(self, mono: float) -> None:
        """failover: follow the master once the sentinels name the new one, then time the
        workers leaving the old one (each names its connections ``<prefix>:REPLICA_ID``)."""
        f = self.switching
        if f is None:
            return
        s = self.stage
        assert s.sentinels is not None
        now = time.time()
        if f.restarted is None:
            port = s.sentinels.master_port()
            if port != s.master_port:
                f.restarted = now
                s.old_master, s.client = s.client, connect(f"redis://{HOST}:{port}/0")
                self.driver.sim.use(s.client)
                s.master_port = port
                self.driver.paused = False
                s.event(
                    f"the sentinels name the master on port {port} "
                    f"{_ms(now - f.fired)} after the failover; the app writes there"
                )
            elif now - f.fired > SWITCH_WAIT:
                self.driver.paused = False
                self.switching = None
                s.event(
                    f"fault {f.number} (failover): the sentinels did NOT name a new "
                    f"master within {SWITCH_WAIT:g} s"
                )
            return
        assert s.old_master is not None
        try:
            listing: Any = s.old_master.client_list()
        except redis.RedisError:
            return
        if any(str(c.get("name", "")).rpartition(":")[2] in self.fleet.replicas for c in listing):
            if now - f.restarted > SWITCH_WAIT:
                self.switching = None
                s.event(
                    f"fault {f.number} (failover): workers still connected to the "
                    f"old master {SWITCH_WAIT:g} s after the switch"
                )
            return
        f.left = now
        self.switching = None
        s.old_master.close()
        s.old_master = None
        s.event(
            f"no worker connection left on the old master {_ms(now - f.fired)} after the failover"
        )

    def on_log(self, replica: Replica, record: dict[str, Any], at: float | None) -> None:
        f = self.stage.faults[-1] if self.stage.faults else None
        if f is None or f.kind not in self.kinds or f.restarted is None:
            return
        if at is None or at < f.restarted - 0.001:
            return
        message = str(record.get("message", ""))
        if message.startswith("enabled keyspace notifications"):
            f.notifications = True
        elif message.startswith("reconciled:") and f.resynced is None:
            f.resynced = at
            self.stage.event(
                f"{replica.name} reconnected and reconciled "
                f"{_ms(at - f.restarted)} after the "
                + ("Redis restart" if f.kind == "redis" else "switch")
                + (" (notifications re-enabled)" if f.notifications else "")
            )
