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

This module is the control side (lifecycle, modes, counters); the loop that pumps the
bytes, on that thread, is :mod:`.proxyloop`. It lives in the package, not with the
tests, because ``trio-counter-worker chaos`` puts one in front of Redis for each replica
(its ``slow`` and ``partition`` faults); the tests import it from ``tests.support.proxy``.
Stdlib only, loopback only.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from types import TracebackType

from .proxyloop import HOST, Mode, ProxyLoop

__all__ = ["FaultProxy", "Mode"]

_COMMAND_TIMEOUT = 5.0
_JOIN_TIMEOUT = 5.0


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
        self._loop = ProxyLoop((target_host, target_port))
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        """Bind a free loopback port and start proxying in a daemon thread."""
        if self._thread is not None:
            raise RuntimeError("proxy already started")
        self._loop.open()
        self._thread = threading.Thread(target=self._loop.run, name="fault-proxy", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """RST every connection, stop listening and join the thread. Idempotent.

        Raises RuntimeError if the proxy's loop crashed (with that error as the cause),
        so a bug in the proxy fails the test that used it.
        """
        thread = self._thread
        if thread is None:
            return
        self._loop.submit(None, threading.Event())
        thread.join(_JOIN_TIMEOUT)
        if thread.is_alive():
            raise RuntimeError(f"fault proxy thread still running {_JOIN_TIMEOUT}s after close")
        self._thread = None
        if self._loop.error is not None:
            raise RuntimeError("fault proxy loop crashed") from self._loop.error

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
        if self._loop.listener is None:
            raise RuntimeError("proxy not started")
        port: int = self._loop.listener.getsockname()[1]
        return port

    @property
    def mode(self) -> Mode:
        """The current mode's name."""
        return self._loop.mode

    @property
    def delay_seconds(self) -> float:
        """The one-way delay (0.0 unless in ``delay`` mode)."""
        return self._loop.delay

    @property
    def connections(self) -> int:
        """Client connections accepted so far."""
        return self._loop.connections

    @property
    def active(self) -> int:
        """Client connections open through the proxy right now."""
        return self._loop.active

    @property
    def bytes_up(self) -> int:
        """Bytes delivered to the target."""
        return self._loop.bytes_up

    @property
    def bytes_down(self) -> int:
        """Bytes delivered to clients."""
        return self._loop.bytes_down

    @property
    def bytes_dropped(self) -> int:
        """Bytes dropped by :meth:`blackhole` (read while in it, or queued when it began)."""
        return self._loop.bytes_dropped

    # -- modes ----------------------------------------------------------------

    def forward(self) -> None:
        """Pass bytes both ways. FINs and resets held back by :meth:`blackhole` pass now."""
        self._call(lambda: self._loop.set_mode("forward", 0.0))

    def delay(self, seconds: float) -> None:
        """Deliver each chunk ``seconds`` after it arrived, per direction: a round trip
        costs ``2 * seconds`` (``delay(0.025)`` is a Redis 50 ms away). Order is kept."""
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"delay seconds must be a finite number >= 0, got {seconds!r}")
        self._call(lambda: self._loop.set_mode("delay", float(seconds)))

    def blackhole(self) -> None:
        """Drop every byte both ways, undelivered delayed ones included; keep every socket
        open and accept new connections (no FIN, no RST: a half-open network)."""
        self._call(lambda: self._loop.set_mode("blackhole", 0.0))

    def reset(self) -> None:
        """RST every connection now, and each new one on accept, until the mode changes."""
        self._call(lambda: self._loop.set_mode("reset", 0.0))

    def drop_connections(self) -> None:
        """RST every current connection once; new ones are handled by the current mode."""
        self._call(self._loop.abort_all)

    def _call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop thread and wait for it (directly when not started)."""
        if self._thread is None:
            fn()
            return
        if not self._thread.is_alive():
            raise RuntimeError("fault proxy loop is not running") from self._loop.error
        done = threading.Event()
        self._loop.submit(fn, done)
        if not done.wait(_COMMAND_TIMEOUT):
            raise RuntimeError(
                f"fault proxy did not apply a mode change within {_COMMAND_TIMEOUT}s"
            ) from self._loop.error
        if self._loop.error is not None:
            raise RuntimeError("fault proxy loop crashed") from self._loop.error

    def __repr__(self) -> str:
        loop = self._loop
        where = f"{HOST}:{self.port}" if loop.listener is not None else "stopped"
        target = f"{loop.target[0]}:{loop.target[1]}"
        return f"<FaultProxy {where} -> {target} mode={loop.mode} active={loop.active}>"
