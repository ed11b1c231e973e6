"""A real HTTP server on loopback that records every request and answers with scripted statuses."""

from __future__ import annotations

import contextlib
import functools
import json
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

import attrs
import trio

HOST = "127.0.0.1"
DEFAULT_WAIT = 10.0
# Idle keep-alive connections are dropped after this long; close() doesn't wait for it.
_IDLE_TIMEOUT = 30.0
_JOIN_TIMEOUT = 5.0

Predicate = Callable[[list["Received"]], bool]
ResponseSpec = int | tuple[int, dict[str, str]]


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


def _describe(requests: list[Received]) -> str:
    if not requests:
        return "  (none)"
    return "\n".join(
        f"  {r.method} {r.path} {r.body[:200]!r} @ {r.received_at:.3f}" for r in requests
    )


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
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        received = Received(
            method=self.command,
            path=self.path,
            headers=headers,
            body=self._read_body(),
            received_at=time.time(),
        )
        status, extra_headers, hang = self.server.backend._record(received)
        if hang:
            # An Event rather than sleep so close() can release hung handlers at once.
            self.server.backend._released.wait(hang)
        payload = json.dumps({"ok": 200 <= status < 300}).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        for name, value in extra_headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _handle


class _Server(ThreadingHTTPServer):
    """Tracks handler threads and their sockets so close() can end them deterministically."""

    daemon_threads = True
    request_queue_size = 1024  # the default 5 resets connections under a burst

    def __init__(self, backend: RecordingBackend) -> None:
        self.backend = backend
        self._conn_lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._handlers: list[threading.Thread] = []
        super().__init__((HOST, 0), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            name=f"backend-handler-{client_address[1]}",
            daemon=True,
        )
        with self._conn_lock:
            self._conns.add(request)
            self._handlers = [t for t in self._handlers if t.is_alive()]
            self._handlers.append(thread)
        thread.start()

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


class RecordingBackend:
    """Loopback HTTP server recording all requests; responses are scripted per test.

    Every request on any path and method is recorded. Queued responses (see
    :meth:`respond_with`) are used first, then ``200 {"ok": true}``.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._requests: list[Received] = []
        self._responses: deque[tuple[int, dict[str, str]]] = deque()
        self._hangs: deque[float] = deque()
        self._released = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

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
        """Stop serving, drop open connections, release hung handlers. Idempotent."""
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
        """Queue responses for the next requests: ``404`` or ``(429, {"retry-after": "1"})``."""
        with self._cond:
            for spec in statuses:
                status, headers = (spec, {}) if isinstance(spec, int) else spec
                self._responses.append((status, dict(headers)))

    def hang_next(self, n: int, seconds: float) -> None:
        """Make the next ``n`` requests wait ``seconds`` before being answered (for timeouts).

        The request is still recorded on arrival; close() cuts the wait short.
        """
        with self._cond:
            self._hangs.extend([seconds] * n)

    def clear(self) -> None:
        """Forget recorded requests (scripted responses and hangs are kept)."""
        with self._cond:
            self._requests.clear()

    def _record(self, received: Received) -> tuple[int, dict[str, str], float]:
        """Called by handler threads: store the request, pick its response and hang."""
        with self._cond:
            self._requests.append(received)
            status, headers = self._responses.popleft() if self._responses else (200, {})
            hang = self._hangs.popleft() if self._hangs else 0.0
            self._cond.notify_all()
        return status, headers, hang

    # -- inspection ---------------------------------------------------------

    @property
    def requests(self) -> list[Received]:
        """A snapshot of everything received so far, in arrival order."""
        with self._cond:
            return list(self._requests)

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
