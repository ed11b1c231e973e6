"""The fault proxy's thread: one selector loop that pumps every connection's bytes, with
the current fault (:data:`Mode`) applied.

:class:`~trio_counter_worker.lab.faultproxy.FaultProxy` is the control side (lifecycle,
mode switches from any thread); this module is what runs on its thread. Two parts:

- :class:`ProxyLoop`: the selector, the listener, the delay timers, the mode and the
  counters; it accepts, fires due timers and runs the commands other threads submit;
- :class:`_Conn`: one accepted client and its connection to the target, moving bytes
  each way under the loop's mode (delayed, dropped, or passed on), FINs and resets
  included.

Nothing here is thread-safe except :meth:`ProxyLoop.submit`: every other method runs on
the loop's thread (or before it starts). Stdlib only, loopback only.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import itertools
import queue
import selectors
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Literal

__all__ = ["HOST", "Mode", "ProxyLoop"]

HOST = "127.0.0.1"
Mode = Literal["forward", "delay", "blackhole", "reset"]

_RECV_SIZE = 256 * 1024
# Bytes queued in one direction (delayed, or waiting for a slow reader) before the
# proxy stops reading from the sender, so TCP flow control pushes back as it would on
# a real link. Caps a delayed stream at _HIGH_WATER / delay bytes per second.
_HIGH_WATER = 4 * 1024 * 1024
_LISTEN_BACKLOG = 1024
_LINGER_RST = struct.pack("ii", 1, 0)

_LISTENER = object()
_WAKE = object()

# A command from another thread: run fn on the loop, then set the event (fn None: stop).
Command = tuple[Callable[[], None] | None, threading.Event]


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


class ProxyLoop:
    """The proxy's state and the loop that runs on its thread (see the module docstring).

    Built once per :class:`FaultProxy`; :meth:`open` and :meth:`run` once per start, so
    the mode and the counters outlive a close and a restart.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.mode: Mode = "forward"
        self.delay = 0.0
        self.connections = 0  # accepted so far
        self.active = 0  # open now
        self.bytes_up = 0  # delivered to the target
        self.bytes_down = 0  # delivered to clients
        self.bytes_dropped = 0
        self.error: BaseException | None = None  # what crashed the loop, if anything
        self.listener: socket.socket | None = None
        self.conns: set[_Conn] = set()
        self.timers: list[tuple[float, int, _Direction]] = []
        self._timer_seq = itertools.count()
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self.sel: selectors.BaseSelector | None = None

    # -- from other threads -------------------------------------------------

    def submit(self, fn: Callable[[], None] | None, done: threading.Event) -> None:
        """Queue ``fn`` for the loop thread (None: stop it) and wake the loop; ``done`` is
        set once it ran, or when the loop ends without running it. Thread-safe."""
        self._commands.put((fn, done))
        if self._wake_w is not None:
            # A full pipe already guarantees a wake-up.
            with contextlib.suppress(BlockingIOError, OSError):
                self._wake_w.send(b"\0")

    # -- lifecycle ----------------------------------------------------------

    def open(self) -> None:
        """Bind a free loopback port and set up the selector, before :meth:`run`."""
        self.error = None
        listener = socket.create_server((HOST, 0), backlog=_LISTEN_BACKLOG)
        listener.setblocking(False)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.sel = selectors.DefaultSelector()
        self.sel.register(listener, selectors.EVENT_READ, _LISTENER)
        self.sel.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        self.listener = listener

    def run(self) -> None:
        """The loop thread's body: until a stop command, or a crash (kept in :attr:`error`)."""
        assert self.sel is not None
        try:
            while True:
                events = self.sel.select(self._next_timeout())
                commands = False
                for key, mask in events:
                    if key.data is _LISTENER:
                        self._accept()
                    elif key.data is _WAKE:
                        commands = True  # after the I/O, so a command sees it done
                    elif not key.data.closed:
                        key.data.on_event(key.fileobj, mask)
                self._run_timers()
                if commands and self._run_commands():
                    return
        except BaseException as exc:  # surfaced by close() and by the next mode switch
            self.error = exc
        finally:
            self._teardown()

    def _teardown(self) -> None:
        self.abort_all()
        for sock in (self.listener, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        if self.sel is not None:
            self.sel.close()
        self.listener = self._wake_r = self._wake_w = None
        self.sel = None
        self.timers.clear()
        # Release anyone waiting on a command: they see error, or nothing to wait for.
        while True:
            try:
                _, done = self._commands.get_nowait()
            except queue.Empty:
                break
            done.set()

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

    # -- the faults -----------------------------------------------------------

    def set_mode(self, mode: Mode, delay: float) -> None:
        """Switch to ``mode``, applied to every open connection at once."""
        self.mode, self.delay = mode, delay
        if mode == "reset":
            self.abort_all()
            return
        for conn in list(self.conns):
            if mode == "blackhole":
                for d in (conn.up, conn.down):
                    self.bytes_dropped += d.drop_queued()
            else:
                conn.flush(conn.up)
                conn.flush(conn.down)
                conn.settle()
            conn.update()

    def abort_all(self) -> None:
        """RST every open connection."""
        for conn in list(self.conns):
            conn.close(rst=True)

    # -- accepting and timers -----------------------------------------------

    def arm(self, d: _Direction, due: float) -> None:
        """Flush ``d`` again at ``due`` (superseding the timer it had armed)."""
        d.timer = due
        heapq.heappush(self.timers, (due, next(self._timer_seq), d))

    def _next_timeout(self) -> float | None:
        if not self.timers:
            return None
        return max(0.0, self.timers[0][0] - time.monotonic())

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            due, _, d = heapq.heappop(self.timers)
            if d.timer != due or d.conn.closed:
                continue  # superseded
            d.timer = None
            d.conn.flush(d)
            if not d.conn.closed:
                d.conn.settle()
                d.conn.update()

    def _accept(self) -> None:
        assert self.listener is not None
        while True:
            try:
                client, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                raise
            self.connections += 1
            if self.mode == "reset":
                _abort(client)
                continue
            upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            for sock in (client, upstream):
                sock.setblocking(False)
                # Each chunk goes out as it comes: Nagle plus delayed ACKs would add
                # ~40 ms to small request/response exchanges.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = upstream.connect_ex(self.target)
            if err not in (0, errno.EINPROGRESS):
                _abort(upstream)
                _abort(client)  # the target is down: so is the proxied connection
                continue
            conn = _Conn(self, client, upstream)
            conn.connected = err == 0
            self.conns.add(conn)
            self.active += 1
            conn.update()


class _Conn:
    """One accepted client and its connection to the target: the bytes pumped both ways."""

    __slots__ = ("client", "closed", "connected", "down", "loop", "masks", "up", "upstream")

    def __init__(self, loop: ProxyLoop, client: socket.socket, upstream: socket.socket) -> None:
        self.loop = loop
        self.client = client
        self.upstream = upstream
        self.connected = False  # the non-blocking connect to the target has completed
        self.closed = False
        self.up = _Direction(self, client, upstream, up=True)
        self.down = _Direction(self, upstream, client, up=False)
        self.masks: dict[socket.socket, int] = {client: 0, upstream: 0}

    def on_event(self, sock: socket.socket, mask: int) -> None:
        """``sock`` (one of ours) is readable or writable, as ``mask`` says."""
        if sock is self.upstream and not self.connected:
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                self.close(rst=True)  # refused: the client sees an RST
                return
            self.connected = True
            self.flush(self.up)
        else:
            if mask & selectors.EVENT_READ:
                self._read(self.up if sock is self.client else self.down)
            if mask & selectors.EVENT_WRITE and not self.closed:
                d = self.down if sock is self.client else self.up
                d.blocked = False
                self.flush(d)
        if not self.closed:
            self.settle()
            self.update()

    def _read(self, d: _Direction) -> None:
        loop = self.loop
        try:
            data = d.src.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            if loop.mode == "blackhole":
                d.eof = d.broken = True
            else:
                self.close(rst=True)
            return
        if not data:
            d.eof = True
            return
        if loop.mode == "blackhole":
            loop.bytes_dropped += len(data)
            return
        due = max(time.monotonic() + loop.delay, d.last_due)
        d.last_due = due
        d.queue.append((due, data))
        d.queued += len(data)
        self.flush(d)

    def flush(self, d: _Direction) -> None:
        """Write every due byte ``dst`` takes; arm a timer for the next chunk."""
        if d.blocked or self.closed or not self.connected:
            return
        loop = self.loop
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
                self.close(rst=True)
                return
            d.queued -= sent
            if d.up:
                loop.bytes_up += sent
            else:
                loop.bytes_down += sent
            d.out = d.out[sent:] if sent < len(d.out) else None
        if d.queue and d.timer != d.queue[0][0]:
            loop.arm(d, d.queue[0][0])

    def settle(self) -> None:
        """Pass on FINs and resets once the bytes before them are delivered."""
        if self.loop.mode == "blackhole" or not self.connected:
            return
        for d in (self.up, self.down):
            if d.broken:
                self.close(rst=True)
                return
            if d.eof and not d.shut and d.out is None and not d.queue:
                try:
                    d.dst.shutdown(socket.SHUT_WR)
                except OSError:
                    self.close(rst=True)
                    return
                d.shut = True
        if self.up.shut and self.down.shut:
            self.close(rst=False)

    def update(self) -> None:
        """Register each socket for the events it waits for now."""
        if self.closed:
            return
        read, write = selectors.EVENT_READ, selectors.EVENT_WRITE
        blackhole = self.loop.mode == "blackhole"

        def reading(d: _Direction) -> bool:
            return not d.eof and (blackhole or d.queued < _HIGH_WATER)

        client = (read if reading(self.up) else 0) | (write if self.down.blocked else 0)
        if self.connected:
            upstream = (read if reading(self.down) else 0) | (write if self.up.blocked else 0)
        else:
            upstream = write  # the connect's completion
        for sock, mask in ((self.client, client), (self.upstream, upstream)):
            self._register(sock, mask)

    def _register(self, sock: socket.socket, mask: int) -> None:
        sel = self.loop.sel
        assert sel is not None
        old = self.masks[sock]
        if mask == old:
            return
        if old == 0:
            sel.register(sock, mask, self)
        elif mask == 0:
            sel.unregister(sock)
        else:
            sel.modify(sock, mask, self)
        self.masks[sock] = mask

    def close(self, *, rst: bool) -> None:
        """Close both legs, with an RST (``rst``) or a FIN. Idempotent."""
        if self.closed:
            return
        self.closed = True
        # Counted before the sockets close, so a peer seeing the close sees the count.
        self.loop.conns.discard(self)
        self.loop.active -= 1
        for sock in (self.client, self.upstream):
            self._register(sock, 0)
            if rst:
                _abort(sock)
            else:
                sock.close()
