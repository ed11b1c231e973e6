"""A real HTTP server on loopback that records every request and answers as scripted.

By default every request gets ``200 {"ok": true}``. :meth:`RecordingBackend.respond_with`
and :meth:`RecordingBackend.hang_next` queue answers for the next requests;
:meth:`RecordingBackend.behave` picks a behaviour per request (by key, say), including
hostile ones a real backend shows on a bad day:

- :class:`Respond`: any status with any headers (404, 429 + Retry-After, 30x + Location);
- :class:`Hang`: wait, then behave as told (a slow backend);
- :class:`Drip`: the body one byte per interval (optionally the head too);
- :class:`HeadersThenNothing`: status and headers with a content-length, then silence;
- :class:`Endless`: a chunked body that never ends;
- :class:`Huge`: a very large body, its length announced;
- :class:`ApplyThenDrop`: take the request, then close without answering (RST or FIN).

Every request is recorded on arrival, whatever its behaviour; :meth:`RecordingBackend.close`
ends every behaviour at once (each notices the server closing, or its client leaving).

:class:`ResetLedger` is what a reset backend should do, as a chooser for
:meth:`RecordingBackend.behave`: check ``x-secret``, apply each ``idempotency-key`` once
(2xx to repeats), record each reset as a :class:`ResetPost`; and, on demand, answer 503
(:meth:`ResetLedger.fail_for`), hang (:meth:`ResetLedger.hang_for`) or refuse some keys
with a 4xx (:meth:`ResetLedger.poison`). It holds no I/O: the server carries it out.
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import json
import select
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, assert_never

import attrs
import trio

from .servers import HOST

__all__ = [
    "ApplyThenDrop",
    "Behaviour",
    "Chooser",
    "Drip",
    "Endless",
    "Hang",
    "HeadersThenNothing",
    "Huge",
    "Received",
    "RecordingBackend",
    "ResetLedger",
    "ResetPost",
    "Respond",
    "by_key",
]

DEFAULT_WAIT = 10.0
# Idle keep-alive connections are dropped after this long; close() doesn't wait for it.
_IDLE_TIMEOUT = 30.0
_JOIN_TIMEOUT = 5.0
# How often a waiting handler checks whether its client has hung up; the server
# closing wakes it at once.
_CLIENT_CHECK = 0.05
_WRITE_SLICE = 64 * 1024
_LINGER_RST = struct.pack("ii", 1, 0)

Predicate = Callable[[list["Received"]], bool]


@attrs.frozen
class Received:
    """One request as the backend saw it."""

    method: str
    path: str  # the raw request target, query string included
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes
    received_at: float  # time.time() on arrival, before any hang/response

    @property
    def json(self) -> Any:
        """The body parsed as JSON, or None when empty or not JSON."""
        if not self.body:
            return None
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    @property
    def key(self) -> str | None:
        """The ``"key"`` field of a JSON object body (a reset's key), else None."""
        data = self.json
        key = data.get("key") if isinstance(data, dict) else None
        return key if isinstance(key, str) else None


# -- behaviours ---------------------------------------------------------------------


def _status(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not 100 <= value <= 599:
        raise ValueError(f"{attribute.name} must be an HTTP status in 100..599, got {value!r}")


def _seconds(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value >= 0:  # NaN fails this too; inf means "until close()"
        raise ValueError(f"{attribute.name} must be a number of seconds >= 0, got {value!r}")


def _header_dict(value: Mapping[str, str]) -> dict[str, str]:
    return dict(value)


@attrs.frozen
class Respond:
    """Answer ``status`` with extra ``headers``, e.g. ``Respond(429, {"retry-after": "2"})``
    or ``Respond(308, {"location": "/elsewhere"})``.

    The body is ``{"ok": <status is 2xx>}`` as JSON unless ``body`` is given.
    """

    status: int = attrs.field(default=200, validator=_status)
    headers: dict[str, str] = attrs.field(factory=dict, converter=_header_dict)
    body: bytes | None = None


@attrs.frozen
class Hang:
    """Wait ``seconds`` (cut short by close() or the client hanging up), then do ``then``."""

    seconds: float = attrs.field(validator=_seconds)
    then: Behaviour = attrs.field(factory=Respond)


@attrs.frozen
class Drip:
    """Send the status line and headers (``content-length: length``) at once, then the
    body one byte per ``interval`` seconds, each byte after a wait.

    ``head_too``: drip the status line and headers as well. The body is ``{"ok": ...}``
    padded with spaces to ``length`` bytes (valid JSON once complete, if long enough).
    """

    interval: float = attrs.field(validator=_seconds)
    length: int = attrs.field(default=64, validator=attrs.validators.ge(0))
    status: int = attrs.field(default=200, validator=_status)
    head_too: bool = False


@attrs.frozen
class HeadersThenNothing:
    """Send status and headers announcing ``length`` body bytes, then never send the body:
    hold the connection until close() or the client hangs up."""

    status: int = attrs.field(default=200, validator=_status)
    length: int = attrs.field(default=1024, validator=attrs.validators.ge(1))


@attrs.frozen
class Endless:
    """A chunked body that never ends: ``chunk_size`` bytes per chunk, as fast as the
    socket takes them, or one chunk per ``interval`` seconds. Stops when the client
    disconnects or the server closes."""

    chunk_size: int = attrs.field(default=16 * 1024, validator=attrs.validators.ge(1))
    interval: float = attrs.field(default=0.0, validator=_seconds)
    status: int = attrs.field(default=200, validator=_status)


@attrs.frozen
class Huge:
    """A body of ``length`` bytes (``{"ok": ...}`` padded with spaces) with its
    content-length announced."""

    length: int = attrs.field(default=10_000_000, validator=attrs.validators.ge(0))
    status: int = attrs.field(default=200, validator=_status)


@attrs.frozen
class ApplyThenDrop:
    """Take the request (it is recorded: a real backend would have applied it), then
    close the connection without an answer: an RST (``rst=True``) or a FIN."""

    rst: bool = True


Behaviour = Respond | Hang | Drip | HeadersThenNothing | Endless | Huge | ApplyThenDrop
Chooser = Callable[[Received], Behaviour | None]
ResponseSpec = int | tuple[int, dict[str, str]] | Behaviour


def by_key(behaviours: Mapping[str, Behaviour]) -> Chooser:
    """A chooser for :meth:`RecordingBackend.behave`: ``behaviours[key]`` for a request
    whose JSON body's ``"key"`` is listed, None (the queued/default answer) otherwise."""
    table = dict(behaviours)

    def choose(received: Received) -> Behaviour | None:
        key = received.key
        return table.get(key) if key is not None else None

    return choose


def _json_filler(status: int, length: int) -> bytes:
    """``{"ok": ...}`` padded with spaces to ``length`` bytes (truncated if shorter)."""
    payload = json.dumps({"ok": 200 <= status < 300}).encode()
    return payload[:length] + b" " * max(0, length - len(payload))


def _as_behaviour(spec: ResponseSpec) -> Behaviour:
    if isinstance(spec, int):
        return Respond(spec)
    if isinstance(spec, tuple):
        status, headers = spec
        return Respond(status, headers)
    return spec


# -- the server ----------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 so clients can keep connections alive, as they would with a real backend.
    protocol_version = "HTTP/1.1"
    timeout = _IDLE_TIMEOUT
    # Headers and body go out as two writes: with Nagle on, the body waits for the
    # client's delayed ACK (~40 ms) on a kept-alive connection.
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: request logs on stderr are noise in test output."""

    def _read_body(self) -> bytes:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    # Skip trailers up to the terminating blank line.
                    while self.rfile.readline().strip():
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # CRLF after each chunk
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        received_at = time.time()
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        body = self._read_body()
        if len(body) < int(headers.get("content-length") or 0):
            # The client went away mid-request (a killed replica): nothing to answer.
            self.server.backend._count_truncated()
            self.close_connection = True
            return
        received = Received(
            method=self.command,
            path=self.path,
            headers=headers,
            body=body,
            received_at=received_at,
        )
        self._behave(self.server.backend._record(received))

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _handle

    def _behave(self, behaviour: Behaviour) -> None:
        match behaviour:
            case Respond():
                self._respond(behaviour)
            case Hang():
                if self._hold(behaviour.seconds):
                    self._behave(behaviour.then)
                else:
                    self.close_connection = True
            case Drip():
                self._drip(behaviour)
            case HeadersThenNothing():
                self._send_head(behaviour.status, {"content-length": str(behaviour.length)})
                self._hold(None)
                self.close_connection = True
            case Endless():
                self._endless(behaviour)
            case Huge():
                self._huge(behaviour)
            case ApplyThenDrop():
                self._drop(rst=behaviour.rst)
            case _:
                assert_never(behaviour)

    # -- the behaviours' I/O ----------------------------------------------------------

    def _respond(self, behaviour: Respond) -> None:
        status = behaviour.status
        if status in (204, 304) or status < 200:  # HTTP allows no body on these
            self.send_response(status)
            for name, value in behaviour.headers.items():
                self.send_header(name, value)
            self.end_headers()
            return
        if behaviour.body is None:
            payload = json.dumps({"ok": 200 <= status < 300}).encode()
            content_type: str | None = "application/json"
        else:
            payload, content_type = behaviour.body, None
        self.send_response(status)
        if content_type is not None:
            self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(payload)))
        for name, value in behaviour.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _head(self, status: int, headers: Mapping[str, str]) -> bytes:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        lines = [f"HTTP/1.1 {status} {phrase}", "content-type: application/json"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _send_head(self, status: int, headers: Mapping[str, str]) -> None:
        self.wfile.write(self._head(status, headers))

    def _drip(self, behaviour: Drip) -> None:
        head = self._head(behaviour.status, {"content-length": str(behaviour.length)})
        body = _json_filler(behaviour.status, behaviour.length)
        if behaviour.head_too:
            data = head + body
        else:
            self.wfile.write(head)
            data = body
        for i in range(len(data)):
            if not self._hold(behaviour.interval):
                self.close_connection = True
                return
            self.wfile.write(data[i : i + 1])

    def _endless(self, behaviour: Endless) -> None:
        self._send_head(behaviour.status, {"transfer-encoding": "chunked"})
        self.close_connection = True  # the body never ends, so neither can the connection
        size = behaviour.chunk_size
        first = _json_filler(behaviour.status, size)
        frame = f"{size:x}\r\n".encode()
        self.wfile.write(frame + first + b"\r\n")
        rest = frame + b" " * size + b"\r\n"
        released = self.server.backend._released
        while True:
            if behaviour.interval:
                if not self._hold(behaviour.interval):
                    return
            elif released.is_set():
                return
            # A client that stops reading blocks this write until it leaves, or until
            # close() shuts the socket down.
            self.wfile.write(rest)

    def _huge(self, behaviour: Huge) -> None:
        self._send_head(behaviour.status, {"content-length": str(behaviour.length)})
        body = memoryview(_json_filler(behaviour.status, behaviour.length))
        released = self.server.backend._released
        for start in range(0, len(body), _WRITE_SLICE):
            if released.is_set():
                self.close_connection = True
                return
            self.wfile.write(body[start : start + _WRITE_SLICE])

    def _drop(self, *, rst: bool) -> None:
        self.close_connection = True
        self.server.forget(self.connection)
        if rst:
            # The fd closes (sending the RST) only once the buffered reader lets go of it.
            with contextlib.suppress(OSError):
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            self.rfile.close()
            self.connection.close()
        else:
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)

    # -- waiting ----------------------------------------------------------------------

    def _hold(self, seconds: float | None) -> bool:
        """Wait ``seconds`` (None: until the end); False if the server closes or the
        client hangs up first."""
        released = self.server.backend._released
        deadline = None if seconds is None else time.monotonic() + seconds
        while True:
            step = _CLIENT_CHECK
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return not released.is_set()
                step = min(step, remaining)
            # An Event rather than sleep so close() can release waiting handlers at once.
            if released.wait(step) or self._client_gone():
                return False

    def _client_gone(self) -> bool:
        try:
            poller = select.poll()  # not select.select: fds past 1024 are fine
            poller.register(self.connection, select.POLLIN)
            # Readable while waiting for us: EOF, or an error (pipelined bytes are not).
            return bool(poller.poll(0)) and not self.connection.recv(1, socket.MSG_PEEK)
        except (OSError, ValueError):
            return True


class _Server(ThreadingHTTPServer):
    """Tracks handler threads and their sockets so close() can end them deterministically."""

    daemon_threads = True
    request_queue_size = 1024  # the default 5 resets connections under a burst

    def __init__(self, backend: RecordingBackend) -> None:
        self.backend = backend
        self._conn_lock = threading.Condition()
        self._conns: set[socket.socket] = set()
        self._handlers: list[threading.Thread] = []
        self.open_connections = 0
        super().__init__((HOST, 0), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self._serve_connection,
            args=(request, client_address),
            name=f"backend-handler-{client_address[1]}",
            daemon=True,
        )
        with self._conn_lock:
            self._conns.add(request)
            self._handlers = [t for t in self._handlers if t.is_alive()]
            self._handlers.append(thread)
            self.open_connections += 1
        thread.start()

    def _serve_connection(self, request: Any, client_address: Any) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            with self._conn_lock:
                self.open_connections -= 1
                self._conn_lock.notify_all()

    def forget(self, request: Any) -> None:
        """Deregister a socket a handler is about to close itself."""
        with self._conn_lock:
            self._conns.discard(request)

    def shutdown_request(self, request: Any) -> None:
        # Deregister under the lock so abort_connections() never touches a closed socket.
        with self._conn_lock:
            self._conns.discard(request)
            super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up (e.g. after their own timeout) are expected in tests.
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)

    def abort_connections(self) -> None:
        """Shut down every open client socket, unblocking handlers waiting on keep-alive reads."""
        with self._conn_lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):  # already closed by the client
                    conn.shutdown(socket.SHUT_RDWR)

    def join_handlers(self, timeout: float) -> None:
        with self._conn_lock:
            handlers = list(self._handlers)
        deadline = time.monotonic() + timeout
        for thread in handlers:
            thread.join(max(0.0, deadline - time.monotonic()))

    def wait_idle(self, timeout: float) -> bool:
        with self._conn_lock:
            return self._conn_lock.wait_for(lambda: self.open_connections == 0, timeout)


class RecordingBackend:
    """Loopback HTTP server recording all requests; responses are scripted per test.

    Every request on any path and method is recorded. Each one's behaviour is, first
    to match: the :meth:`behave` chooser's pick, the next queued answer (see
    :meth:`respond_with` and :meth:`hang_next`), then ``200 {"ok": true}``.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._requests: list[Received] = []
        self._responses: deque[Behaviour] = deque()
        self._hangs: deque[float] = deque()
        self._chooser: Chooser | None = None
        self._chooser_errors: list[Exception] = []
        self._released = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.truncated = 0  # requests cut short: the client went away mid-request

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        """Bind a free loopback port and serve in a daemon thread."""
        if self._server is not None:
            raise RuntimeError("backend already started")
        self._released.clear()
        self._server = _Server(self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},  # bounds how long shutdown() takes
            name="recording-backend",
            daemon=True,
        )
        self._thread.start()

    def close(self) -> None:
        """Stop serving, drop open connections, end every behaviour in progress. Idempotent.

        Raises RuntimeError if a :meth:`behave` chooser raised (those requests got a 500).
        """
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._server = self._thread = None
        self._released.set()
        server.shutdown()
        server.abort_connections()
        server.server_close()
        thread.join()
        server.join_handlers(_JOIN_TIMEOUT)
        with self._cond:
            errors, self._chooser_errors = self._chooser_errors, []
        if errors:
            raise RuntimeError(
                f"the behave() chooser raised for {len(errors)} request(s)"
            ) from errors[0]

    def __enter__(self) -> RecordingBackend:
        if self._server is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- addressing ---------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port (only while started)."""
        if self._server is None:
            raise RuntimeError("backend not started")
        port: int = self._server.server_address[1]
        return port

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{HOST}:{self.port}"

    @property
    def url(self) -> str:
        """The reset endpoint, ``http://127.0.0.1:PORT/reset``."""
        return f"{self.base_url}/reset"

    # -- scripting ----------------------------------------------------------

    def respond_with(self, *statuses: ResponseSpec) -> None:
        """Queue answers for the next requests: ``404``, ``(429, {"retry-after": "1"})``
        or any behaviour, e.g. ``Drip(0.5)``."""
        behaviours = [_as_behaviour(spec) for spec in statuses]
        with self._cond:
            self._responses.extend(behaviours)

    def hang_next(self, n: int, seconds: float) -> None:
        """Make the next ``n`` requests wait ``seconds`` before being answered (for timeouts).

        The request is still recorded on arrival; close() cuts the wait short.
        """
        Hang(seconds)  # validates
        with self._cond:
            self._hangs.extend([seconds] * n)

    def behave(self, choose: Chooser | None) -> None:
        """Pick each request's behaviour with ``choose(received)``; None from it means the
        queued/default answer (queued answers are only used up by such requests).

        ``choose`` runs in a handler thread, under the backend's lock: keep it quick.
        See :func:`by_key`. ``behave(None)`` goes back to queued/default answers only.
        """
        with self._cond:
            self._chooser = choose

    def clear(self) -> None:
        """Forget recorded requests (scripted responses and hangs are kept)."""
        with self._cond:
            self._requests.clear()

    def _count_truncated(self) -> None:
        with self._cond:
            self.truncated += 1

    def _record(self, received: Received) -> Behaviour:
        """Called by handler threads: store the request, pick its behaviour."""
        with self._cond:
            self._requests.append(received)
            self._cond.notify_all()
            chosen: Behaviour | None = None
            if self._chooser is not None:
                try:
                    chosen = self._chooser(received)
                except Exception as exc:  # reported by close(), so the test fails
                    self._chooser_errors.append(exc)
                    return Respond(500, body=f"behave() chooser raised {exc!r}".encode())
            if chosen is not None:
                return chosen
            queued = self._responses.popleft() if self._responses else Respond()
            hang = self._hangs.popleft() if self._hangs else 0.0
        return Hang(hang, then=queued) if hang else queued

    # -- inspection ---------------------------------------------------------

    @property
    def requests(self) -> list[Received]:
        """A snapshot of everything received so far, in arrival order."""
        with self._cond:
            return list(self._requests)

    @property
    def open_connections(self) -> int:
        """Client connections being served right now (kept-alive idle ones included)."""
        return self._server.open_connections if self._server is not None else 0

    def wait_idle(self, timeout: float = DEFAULT_WAIT) -> None:
        """Block until no client connection is open: every client has hung up and every
        behaviour has stopped. Raises AssertionError if ``timeout`` passes first."""
        server = self._server
        if server is not None and not server.wait_idle(timeout):
            raise AssertionError(
                f"{server.open_connections} backend connection(s) still open after {timeout}s"
            )

    def wait_for(self, predicate: Predicate, timeout: float = DEFAULT_WAIT) -> list[Received]:
        """Block until ``predicate(requests)`` holds; return the requests then.

        Raises AssertionError listing the requests so far if ``timeout`` passes first.
        Blocks the calling thread: from async (trio) tests use :meth:`wait_for_async`.
        """
        with self._cond:
            ok = self._cond.wait_for(lambda: predicate(list(self._requests)), timeout)
            snapshot = list(self._requests)
        if not ok:
            raise AssertionError(
                f"backend condition not met within {timeout}s; "
                f"{len(snapshot)} request(s) so far:\n{_describe(snapshot)}"
            )
        return snapshot

    def wait_for_count(self, n: int, timeout: float = DEFAULT_WAIT) -> list[Received]:
        """Block until at least ``n`` requests have arrived."""
        return self.wait_for(lambda requests: len(requests) >= n, timeout)

    async def wait_for_async(
        self, predicate: Predicate, timeout: float = DEFAULT_WAIT
    ) -> list[Received]:
        """:meth:`wait_for` without blocking the trio event loop."""
        # abandon_on_cancel: a cancelled test must not wait for the thread's timeout.
        return await trio.to_thread.run_sync(
            functools.partial(self.wait_for, predicate, timeout), abandon_on_cancel=True
        )

    async def wait_for_count_async(self, n: int, timeout: float = DEFAULT_WAIT) -> list[Received]:
        """:meth:`wait_for_count` without blocking the trio event loop."""
        return await self.wait_for_async(lambda requests: len(requests) >= n, timeout)

    def __repr__(self) -> str:
        where = self.base_url if self._server is not None else "stopped"
        return f"<RecordingBackend {where} requests={len(self.requests)}>"


def _describe(requests: list[Received]) -> str:
    if not requests:
        return "  (none)"
    return "\n".join(
        f"  {r.method} {r.path} {r.body[:200]!r} @ {r.received_at:.3f}" for r in requests
    )


# -- a reset backend --------------------------------------------------------------------


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


def _answer(status: int, answer: dict[str, Any]) -> Respond:
    return Respond(status, {"content-type": "application/json"}, json.dumps(answer).encode())


class ResetLedger:
    """What a backend should do with resets, as a :meth:`RecordingBackend.behave` chooser:
    check the secret, apply each ``idempotency-key`` once (answering 2xx to repeats), and
    here, record every reset.

    Faults on demand: :meth:`fail_for` answers 503 for a while, :meth:`hang_for` holds
    requests (past the worker's request timeout) and then answers 503, :meth:`poison`
    refuses the resets of some keys (a 4xx) for a while. None applies the reset; every
    reset is recorded, with its status.
    """

    def __init__(self, secret: str, path: str = "/reset") -> None:
        self._secret = secret.encode()
        self._path = path
        self._lock = threading.Lock()
        self._posts: list[ResetPost] = []
        self._applied: set[str] = set()
        self.rejected = 0  # wrong secret or malformed
        self._fail_until = 0.0  # time.monotonic()
        self._hang_until = 0.0
        self._hang_seconds = 0.0
        self._poisoned: dict[str, float] = {}  # key -> time.monotonic() it is refused until
        self._poison_status = 404

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

    def __call__(self, received: Received) -> Behaviour:
        if received.method != "POST":
            return _answer(405, {"ok": False, "error": "POST only"})
        if received.path != self._path:
            return _answer(404, {"ok": False, "error": "no such path"})
        secret = received.headers.get("x-secret", "").encode()
        if not hmac.compare_digest(secret, self._secret):
            with self._lock:
                self.rejected += 1
            return _answer(401, {"ok": False, "error": "bad x-secret"})
        reset_id = received.headers.get("idempotency-key", "")
        try:
            data = json.loads(received.body)
            post = ResetPost(
                key=str(data["key"]),
                reset_id=reset_id,
                expired_at=float(data["expired_at"]),
                fencing_token=int(data["fencing_token"]),
                replica_id=str(data["replica_id"]),
                received_at=received.received_at,
                duplicate=False,
            )
        except (ValueError, KeyError, TypeError):
            post = None
        if post is None or not reset_id:
            with self._lock:
                self.rejected += 1
            return _answer(400, {"ok": False, "error": "malformed reset"})
        now = time.monotonic()
        with self._lock:
            if now < self._hang_until:
                self._posts.append(attrs.evolve(post, status=503))
                return Hang(
                    self._hang_seconds, then=_answer(503, {"ok": False, "error": "hung on purpose"})
                )
            if now < self._fail_until:
                self._posts.append(attrs.evolve(post, status=503))
                return _answer(503, {"ok": False, "error": "failing on purpose"})
            if now < self._poisoned.get(post.key, 0.0):
                status = self._poison_status
                self._posts.append(attrs.evolve(post, status=status))
                return _answer(status, {"ok": False, "error": "refused on purpose"})
            duplicate = reset_id in self._applied
            self._applied.add(reset_id)  # here a real backend zeroes the counter, once
            self._posts.append(attrs.evolve(post, duplicate=duplicate))
            return _answer(200, {"ok": True, "duplicate": duplicate})

    def posts_since(self, index: int) -> list[ResetPost]:
        with self._lock:
            return self._posts[index:]
