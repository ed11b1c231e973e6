"""The replica fleet: N ``python -m trio_counter_worker run`` processes (each behind a
fault proxy of its own when a ``slow`` or ``partition`` fault may come), their logs, their
exits, and who holds the lease."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ..faultproxy import FaultProxy
from ..replicas import LeaseInfo, Replica, new_exits, read_lease, spawn_replica, stop_replicas, tail
from ..servers import HOST, MASTER_NAME
from .options import PROG, RESET_TIMEOUT_MS, RESTART_FAULTS
from .record import log_time
from .stage import Stage

__all__ = ["Fleet", "ping_rtt"]

PROBES = 3  # slow: PINGs timed through a proxy (the median is kept)
PROBE_TIMEOUT = 2.0

LogHandler = Callable[[Replica, dict[str, Any], "float | None"], None]


def _via(url: str, port: int) -> str:
    """``url`` with its host and port replaced by a loopback proxy's (credentials, db and
    query kept)."""
    parts = urlsplit(url)
    userinfo, at, _ = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{userinfo}{at}{HOST}:{port}"))


def ping_rtt(host: str, port: int) -> float:
    """The median round trip of PROBES inline PINGs on one connection, seconds. Any reply
    line counts (``-NOAUTH`` too): it is the round trip that is measured."""
    with socket.create_connection((host, port), timeout=PROBE_TIMEOUT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        times = []
        for _ in range(PROBES):
            start = time.perf_counter()
            sock.sendall(b"PING\r\n")
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = sock.recv(256)
                if not chunk:
                    raise ConnectionError("Redis closed the probe connection")
                reply += chunk
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


class Fleet:
    def __init__(self, stage: Stage, proxied: bool, slow_run: bool) -> None:
        self.stage = stage
        self.proxied = proxied
        self.slow_run = slow_run  # every proxy delays from the start
        self.replicas: dict[str, Replica] = {}
        self.proxies: dict[str, FaultProxy] = {}  # replica -> its proxy to Redis
        self.spawned = 0
        self.acquired: dict[str, int] = {}  # replica -> epoch it last took, from its log
        self.reconciled: dict[str, tuple[int, float]] = {}  # replica -> (epoch, wall) of
        # its last "reconciled" log line
        self.reconciles: list[tuple[float, int]] = []  # (wall, epoch) of every one
        self.errors: list[str] = []  # replicas' ERROR lines (and lines that are no JSON)
        self.unexpected_exits: list[str] = []
        self.leader: LeaseInfo | None = None
        self.gap_start: float | None = None
        self.gaps: list[tuple[float, float]] = []  # wall clock: no lease held

    # -- processes ---------------------------------------------------------------------

    def spawn(self) -> str:
        s = self.stage
        self.spawned += 1
        name = f"replica-{self.spawned}"
        url = s.url
        if self.proxied:
            proxy = FaultProxy(*s.target)
            proxy.start()
            self.proxies[name] = proxy
            self.base_mode(proxy)
            url = _via(s.url, proxy.port)
        where = {"REDIS_URL": url}
        if s.sentinels is not None:
            where = {
                "REDIS_SENTINELS": s.sentinels.env_value,
                "REDIS_SENTINEL_MASTER": MASTER_NAME,
            }
        self.replicas[name] = spawn_replica(
            s.tmp,
            name,
            {
                **where,
                "RESET_ENDPOINT_URL": s.backend.url,
                "RESET_SECRET": s.secret,
                "COUNTER_KEY": s.counter_key,
                "LEASE_TTL_MS": str(s.opts.lease_ms),
                "RESET_TIMEOUT_MS": str(RESET_TIMEOUT_MS),
                "LOG_LEVEL": "INFO",
            },
        )
        return name

    def close(self) -> None:
        """Stop every replica and proxy. Idempotent."""
        stop_replicas(self.replicas.values())
        for name, proxy in self.proxies.items():
            try:
                proxy.close()
            except RuntimeError as exc:  # a bug in the proxy: say so, clean up the rest
                self.stage.err.write(
                    f"{PROG}: the fault proxy of {name}: {exc}: {exc.__cause__!r}\n"
                )
        self.proxies.clear()

    def base_mode(self, proxy: FaultProxy) -> None:
        """Forward, or delay when the whole run is slow."""
        if self.slow_run:
            proxy.delay(self.stage.opts.slow_ms / 2000)
        else:
            proxy.forward()

    def probe(self, proxy: FaultProxy) -> tuple[float, float] | None:
        """A PING's round trip through ``proxy`` and straight to Redis, seconds (the median
        of PROBES each); None if either failed."""
        try:
            return ping_rtt(proxy.host, proxy.port), ping_rtt(*self.stage.target)
        except OSError:
            return None

    def poll_exits(self) -> None:
        for replica, code in new_exits(self.replicas.values()):
            if replica.signalled == "kill":
                continue
            if replica.signalled == "term" and code == 0:
                self.stage.event(f"{replica.name} exited with code 0")
                continue
            self.unexpected_exits.append(f"{replica.name} exit {code}")
            self.stage.event(
                f"{replica.name} exited unexpectedly with code {code}; its log ends:\n"
                + tail(replica.log_path)
            )

    # -- logs --------------------------------------------------------------------------

    def poll_logs(self, handler: LogHandler) -> None:
        """Read what the replicas logged; each record goes to ``handler`` too."""
        for replica in list(self.replicas.values()):
            for record in replica.new_events():
                at = log_time(record)
                self.on_log(replica, record, at)
                handler(replica, record, at)
            for line in replica.other_lines:
                self.errors.append(f"{replica.name}: {line}")
            replica.other_lines.clear()

    def on_log(self, replica: Replica, record: dict[str, Any], at: float | None) -> None:
        message = str(record.get("message", ""))
        if record.get("level") in ("ERROR", "CRITICAL"):
            self.errors.append(f"{replica.name}: {message}")
        if record.get("event") == "leader_acquired":
            self.acquired[replica.name] = int(record.get("fencing_token") or 0)
        elif message.startswith("reconciled:") and at is not None:
            epoch = self.acquired.get(replica.name, 0)
            self.reconciled[replica.name] = (epoch, at)
            self.reconciles.append((at, epoch))

    # -- the lease ---------------------------------------------------------------------

    def poll_lease(self) -> tuple[LeaseInfo | None, bool]:
        """Who holds the lease now, and whether that is a new holder."""
        lease = read_lease(self.stage.client, self.stage.lease_key)
        now = time.time()
        if lease is None and self.gap_start is None:
            self.gap_start = now
        elif lease is not None and self.gap_start is not None:
            self.gaps.append((self.gap_start, now))
            self.gap_start = None
        changed = lease is not None and (self.leader is None or lease.epoch != self.leader.epoch)
        self.leader = lease
        return lease, changed

    def leader_working(self) -> bool:
        """The lease holder has reconciled since it took the lease (and since the last
        Redis restart): it watches every key."""
        lease = self.leader
        if lease is None:
            return False
        last = self.reconciled.get(lease.replica)
        if last is None or last[0] != lease.epoch:
            return False
        restart = self.stage.last(*RESTART_FAULTS)
        return restart is None or last[1] >= (restart.restarted or 0.0) - 0.001

    def leader_process(self) -> Replica | None:
        """The lease holder's process, if it is ours, alive and not being faulted."""
        lease = self.leader
        target = self.replicas.get(lease.replica) if lease is not None else None
        if target is None or not target.alive or target.signalled:
            return None
        return target
