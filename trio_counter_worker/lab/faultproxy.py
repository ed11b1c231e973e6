"""A fault-injecting TCP proxy on loopback: forward, delay, blackhole or reset, at any time.

Put it between a client and a server (Redis, the HTTP backend) and point the client at
``proxy.host:proxy.port``::

    with FaultProxy(redis_server.host, redis_server.port) as proxy:
        client = redis.Redis(host=proxy.host, port=proxy.port)
        proxy.delay(0.025)          # +50 ms per round trip (25 ms each way)
        proxy.blackhole()           # half-open: sockets stay up, no byte gets through
        proxy.reset()               # RST every connection, and every new one
        proxy.forward()             # back to normal, for new connections at least

One daemon thread runs a selector loop over every connection, so the proxy neither
needs nor disturbs the caller's event loop: it works the same from plain and from trio
tests. A mode switch is synchronous: when the method returns, the loop has applied it
(existing connections are reset; bytes it reads from then on are delayed or dropped).
Bytes already in a kernel buffer on their way to a peer are beyond its reach.

It lives in the package, not with the tests, because ``trio-counter-worker chaos``
puts one in front of Redis for each replica (its ``slow`` and ``partition`` faults);
the tests import it from ``tests.support.proxy``. Stdlib only, loopback only.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import itertools
import math
import queue
import selectors
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Literal

__all__ = ["FaultProxy", "Mode"]

HOST = "127.0.0.1"
Mode = Literal["forward", "delay", "blackhole", "reset"]

_RECV_SIZE = 256 * 1024
# Bytes queued in one direction (delayed, or waiting for a slow reader) before the
# proxy stops reading from the sender, so TCP flow control pushes back as it would on
# a real link. Caps a delayed stream at _HIGH_WATER / delay bytes per second.
_HIGH_WATER = 4 * 1024 * 1024
_COMMAND_TIMEOUT = 5.0
_JOIN_TIMEOUT = 5.0
_LISTEN_BACKLOG = 1024
_LINGER_RST = struct.pack("ii", 1, 0)

_LISTENER = object()
_WAKE = object()


def _abort(sock: socket.socket) -> None:
    """Close with an RST rather than a FIN (SO_LINGER 0), as a crashed peer or a middlebox would."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    sock.close()


class _Direction:
    """Bytes on their way from ``src`` to ``dst``, each chunk with the time it is due."""

    __slots__ = (
        "blocked",
        "broken",
        "conn",
        "dst",
        "eof",
        "last_due",
        "out",
        "queue",
        "queued",
        "shut",
        "src",
        "timer",
        "up",
    )

    def __init__(self, conn: _Conn, src: socket.socket, dst: socket.socket, up: bool) -> None:
        self.conn = conn
        self.src = src
        self.dst = dst
        self.up = up  # client -> target
        self.queue: deque[tuple[float, bytes]] = deque()
        self.out: memoryview | None = None  # due bytes being written to dst
        self.queued = 0  # bytes in queue and out
        self.last_due = 0.0  # a later chunk is never due before an earlier one
        self.eof = False  # src sent its FIN (or, while blackholed, died)
        self.broken = False  # src was reset while blackholed: reset dst once healed
        self.shut = False  # the FIN was passed on to dst
        self.blocked = False  # dst's send buffer is full: waiting for EVENT_WRITE
        self.timer: float | None = None  # the due time a timer is armed for

    def drop_queued(self) -> int:
        dropped = self.queued
        self.queue.clear()
        self.out = None
        self.queued = 0
        self.timer = None
        return dropped


class _Conn:
    """One accepted client and its connection to the target."""

    __slots__ = ("client", "closed", "connected", "down", "masks", "up", "upstream")

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.connected = False  # the non-blocking connect to the target has completed
        self.closed = False
        self.up = _Direction(self, client, upstream, up=True)
        self.down = _Direction(self, upstream, client, up=False)
        self.masks: dict[socket.socket, int] = {client: 0, upstream: 0}


class FaultProxy:
    """A TCP proxy from ``127.0.0.1:<port>`` to ``target_host:target_port`` that breaks on demand.

    Modes (switchable from any thread at any time; each applies to existing and new
    connections, and takes effect before the method returns):

    - :meth:`forward`: pass bytes both ways (the initial mode);
    - :meth:`delay`: deliver every chunk ``seconds`` after it arrived, in order, in each
      direction, so a request/response round trip costs ``2 * seconds``;
    - :meth:`blackhole`: keep every socket open and accept new connections, but drop
      every byte both ways, FINs and RSTs included (a half-open network);
    - :meth:`reset`: RST every connection, and every new one as soon as it is accepted;
    - :meth:`drop_connections`: RST the current connections once, keeping the mode.

    Counters: :attr:`connections` (accepted so far), :attr:`active` (open now),
    :attr:`bytes_up` / :attr:`bytes_down` (delivered to the target / to clients) and
    :attr:`bytes_dropped`. A connection whose peer resets it is reset on the other side
    too; a FIN is passed on once the bytes before it have been delivered.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._mode: Mode = "forward"
        self._delay = 0.0
        self.connections = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.bytes_dropped = 0
        self._active = 0
        self._conns: set[_Conn] = set()
        self._timers: list[tuple[float, int, _Direction]] = []
        self._timer_seq = itertools.count()
        self._commands: queue.SimpleQueue[tuple[Callable[[], None] | None, threading.Event]]
        self._commands = queue.SimpleQueue()
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._sel: selectors.BaseSelector | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        """Bind a free loopback port and start proxying in a daemon thread."""
        if self._thread is not None:
            raise RuntimeError("proxy already started")
        self._error = None
        listener = socket.create_server((HOST, 0), backlog=_LISTEN_BACKLOG)
        listener.setblocking(False)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(listener, selectors.EVENT_READ, _LISTENER)
        self._sel.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        self._listener = listener
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """RST every connection, stop listening and join the thread. Idempotent.

        Raises RuntimeError if the proxy's loop crashed (with that error as the cause),
        so a bug in the proxy fails the test that used it.
        """
        thread = self._thread
        if thread is None:
            return
        self._commands.put((None, threading.Event()))
        self._wake()
        thread.join(_JOIN_TIMEOUT)
        if thread.is_alive():
            raise RuntimeError(f"fault proxy thread still running {_JOIN_TIMEOUT}s after close")
        self._thread = None
        if self._error is not None:
            raise RuntimeError("fault proxy loop crashed") from self._error

    def __enter__(self) -> FaultProxy:
        if self._thread is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- addressing and counters --------------------------------------------

    @property
    def host(self) -> str:
        """Always ``127.0.0.1``."""
        return HOST

    @property
    def port(self) -> int:
        """The listening port (only while started)."""
        if self._listener is None:
            raise RuntimeError("proxy not started")
        port: int = self._listener.getsockname()[1]
        return port

    @property
    def mode(self) -> Mode:
        """The current mode's name."""
        return self._mode

    @property
    def delay_seconds(self) -> float:
        """The one-way delay (0.0 unless in ``delay`` mode)."""
        return self._delay

    @property
    def active(self) -> int:
        """Client connections open through the proxy right now."""
        return self._active

    # -- modes ----------------------------------------------------------------

    def forward(self) -> None:
        """Pass bytes both ways. FINs and resets held back by :meth:`blackhole` pass now."""
        self._call(lambda: self._set_mode("forward", 0.0))

    def delay(self, seconds: float) -> None:
        """Deliver each chunk ``seconds`` after it arrived, per direction: a round trip
        costs ``2 * seconds`` (``delay(0.025)`` is a Redis 50 ms away). Order is kept."""
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"delay seconds must be a finite number >= 0, got {seconds!r}")
        self._call(lambda: self._set_mode("delay", float(seconds)))

    def blackhole(self) -> None:
        """Drop every byte both ways, undelivered delayed ones included; keep every socket
        open and accept new connections (no FIN, no RST: a half-open network)."""
        self._call(lambda: self._set_mode("blackhole", 0.0))

    def reset(self) -> None:
        """RST every connection now, and each new one on accept, until the mode changes."""
        self._call(lambda: self._set_mode("reset", 0.0))

    def drop_connections(self) -> None:
        """RST every current connection once; new ones are handled by the current mode."""
        self._call(self._abort_all)

    # -- control: other threads -> the loop -----------------------------------

    def _call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop thread and wait for it (directly when not started)."""
        if self._thread is None:
            fn()
            return
        if not self._thread.is_alive():
            raise RuntimeError("fault proxy loop is not running") from self._error
        done = threading.Event()
        self._commands.put((fn, done))
        self._wake()
        if not done.wait(_COMMAND_TIMEOUT):
            raise RuntimeError(
                f"fault proxy did not apply a mode change within {_COMMAND_TIMEOUT}s"
            ) from self._error
        if self._error is not None:
            raise RuntimeError("fault proxy loop crashed") from self._error

    def _wake(self) -> None:
        if self._wake_w is not None:
            # A full pipe already guarantees a wake-up.
            with contextlib.suppress(BlockingIOError, OSError):
                self._wake_w.send(b"\0")

    def _run_commands(self) -> bool:
        """Apply queued commands; True when asked to close."""
        assert self._wake_r is not None
        with contextlib.suppress(BlockingIOError):
            while self._wake_r.recv(4096):
                pass
        while True:
            try:
                fn, done = self._commands.get_nowait()
            except queue.Empty:
                return False
            if fn is None:
                return True
            try:
                fn()
            finally:
                done.set()

    def _set_mode(self, mode: Mode, delay: float) -> None:
        self._mode, self._delay = mode, delay
        if mode == "reset":
            self._abort_all()
            return
        for conn in list(self._conns):
            if mode == "blackhole":
                for d in (conn.up, conn.down):
                    self.bytes_dropped += d.drop_queued()
            else:
                self._flush(conn.up)
                self._flush(conn.down)
                self._settle(conn)
            self._update(conn)

    def _abort_all(self) -> None:
        for conn in list(self._conns):
            self._abort_conn(conn)

    # -- the loop -------------------------------------------------------------

    def _run(self) -> None:
        assert self._sel is not None
        try:
            while True:
                events = self._sel.select(self._next_timeout())
                commands = False
                for key, mask in events:
                    if key.data is _LISTENER:
                        self._accept()
                    elif key.data is _WAKE:
                        commands = True  # after the I/O, so a command sees it done
                    elif not key.data.closed:
                        self._on_event(key.data, key.fileobj, mask)  # type: ignore[arg-type]
                self._run_timers()
                if commands and self._run_commands():
                    return
        except BaseException as exc:  # surfaced by close() and by the next mode switch
            self._error = exc
        finally:
            self._teardown()

    def _teardown(self) -> None:
        self._abort_all()
        for sock in (self._listener, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        if self._sel is not None:
            self._sel.close()
        self._listener = self._wake_r = self._wake_w = None
        self._sel = None
        self._timers.clear()
        # Release anyone waiting on a command: they see _error, or nothing to wait for.
        while True:
            try:
                _, done = self._commands.get_nowait()
            except queue.Empty:
                break
            done.set()

    def _next_timeout(self) -> float | None:
        if not self._timers:
            return None
        return max(0.0, self._timers[0][0] - time.monotonic())

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            due, _, d = heapq.heappop(self._timers)
            if d.timer != due or d.conn.closed:
                continue  # superseded
            d.timer = None
            self._flush(d)
            if not d.conn.closed:
                self._settle(d.conn)
                self._update(d.conn)

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                raise
            self.connections += 1
            if self._mode == "reset":
                _abort(client)
                continue
            upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            for sock in (client, upstream):
                sock.setblocking(False)
                # Each chunk goes out as it comes: Nagle plus delayed ACKs would add
                # ~40 ms to small request/response exchanges.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = upstream.connect_ex(self._target)
            if err not in (0, errno.EINPROGRESS):
                _abort(upstream)
                _abort(client)  # the target is down: so is the proxied connection
                continue
            conn = _Conn(client, upstream)
            conn.connected = err == 0
            self._conns.add(conn)
            self._active += 1
            self._update(conn)

    def _on_event(self, conn: _Conn, sock: socket.socket, mask: int) -> None:
        if sock is conn.upstream and not conn.connected:
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                self._abort_conn(conn)  # refused: the client sees an RST
                return
            conn.connected = True
            self._flush(conn.up)
        else:
            if mask & selectors.EVENT_READ:
                self._read(conn.up if sock is conn.client else conn.down)
            if mask & selectors.EVENT_WRITE and not conn.closed:
                d = conn.down if sock is conn.client else conn.up
                d.blocked = False
                self._flush(d)
        if not conn.closed:
            self._settle(conn)
            self._update(conn)

    def _read(self, d: _Direction) -> None:
        try:
            data = d.src.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            if self._mode == "blackhole":
                d.eof = d.broken = True
            else:
                self._abort_conn(d.conn)
            return
        if not data:
            d.eof = True
            return
        if self._mode == "blackhole":
            self.bytes_dropped += len(data)
            return
        due = max(time.monotonic() + self._delay, d.last_due)
        d.last_due = due
        d.queue.append((due, data))
        d.queued += len(data)
        self._flush(d)

    def _flush(self, d: _Direction) -> None:
        """Write every due byte ``dst`` takes; arm a timer for the next chunk."""
        if d.blocked or d.conn.closed or not d.conn.connected:
            return
        now = time.monotonic()
        while True:
            if d.out is None:
                if not d.queue or d.queue[0][0] > now:
                    break
                parts: list[bytes] = []
                size = 0
                while d.queue and d.queue[0][0] <= now and size < _RECV_SIZE:
                    chunk = d.queue.popleft()[1]
                    parts.append(chunk)
                    size += len(chunk)
                d.out = memoryview(parts[0] if len(parts) == 1 else b"".join(parts))
            try:
                sent = d.dst.send(d.out)
            except (BlockingIOError, InterruptedError):
                d.blocked = True
                return
            except OSError:
                self._abort_conn(d.conn)
                return
            d.queued -= sent
            if d.up:
                self.bytes_up += sent
            else:
                self.bytes_down += sent
            d.out = d.out[sent:] if sent < len(d.out) else None
        if d.queue and d.timer != d.queue[0][0]:
            d.timer = d.queue[0][0]
            heapq.heappush(self._timers, (d.timer, next(self._timer_seq), d))

    def _settle(self, conn: _Conn) -> None:
        """Pass on FINs and resets once the bytes before them are delivered."""
        if self._mode == "blackhole" or not conn.connected:
            return
        for d in (conn.up, conn.down):
            if d.broken:
                self._abort_conn(conn)
                return
            if d.eof and not d.shut and d.out is None and not d.queue:
                try:
                    d.dst.shutdown(socket.SHUT_WR)
                except OSError:
                    self._abort_conn(conn)
                    return
                d.shut = True
        if conn.up.shut and conn.down.shut:
            self._close_conn(conn, rst=False)

    def _update(self, conn: _Conn) -> None:
        """Register each socket for the events it waits for now."""
        if conn.closed:
            return
        read, write = selectors.EVENT_READ, selectors.EVENT_WRITE
        blackhole = self._mode == "blackhole"

        def reading(d: _Direction) -> bool:
            return not d.eof and (blackhole or d.queued < _HIGH_WATER)

        client = (read if reading(conn.up) else 0) | (write if conn.down.blocked else 0)
        if conn.connected:
            upstream = (read if reading(conn.down) else 0) | (write if conn.up.blocked else 0)
        else:
            upstream = write  # the connect's completion
        for sock, mask in ((conn.client, client), (conn.upstream, upstream)):
            self._register(conn, sock, mask)

    def _register(self, conn: _Conn, sock: socket.socket, mask: int) -> None:
        assert self._sel is not None
        old = conn.masks[sock]
        if mask == old:
            return
        if old == 0:
            self._sel.register(sock, mask, conn)
        elif mask == 0:
            self._sel.unregister(sock)
        else:
            self._sel.modify(sock, mask, conn)
        conn.masks[sock] = mask

    def _abort_conn(self, conn: _Conn) -> None:
        self._close_conn(conn, rst=True)

    def _close_conn(self, conn: _Conn, *, rst: bool) -> None:
        if conn.closed:
            return
        conn.closed = True
        # Counted before the sockets close, so a peer seeing the close sees the count.
        self._conns.discard(conn)
        self._active -= 1
        for sock in (conn.client, conn.upstream):
            self._register(conn, sock, 0)
            if rst:
                _abort(sock)
            else:
                sock.close()

    def __repr__(self) -> str:
        where = f"{HOST}:{self.port}" if self._listener is not None else "stopped"
        target = f"{self._target[0]}:{self._target[1]}"
        return f"<FaultProxy {where} -> {target} mode={self._mode} active={self._active}>"
