"""The reset lanes with the backend in memory: production's :class:`Lane` (its request
bytes, its reading of the answer) over a connection that hands each request to a
handler, as ``httpx.MockTransport`` does for httpx. No socket and no thread, so the
tests run under trio's autojump clock with exact times.

    async with open_lanes(config, connect=memory_backend(handler)) as lanes:
        ...  # open_worker(config, http_client=lanes) or ResetSender(config, lanes)

The handler takes an ``httpx.Request`` and returns (or awaits) an ``httpx.Response``;
it runs in the requesting task, so a handler that never returns hangs that request until
its timeout, and a request cancelled meanwhile cancels the handler.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

import h11
import httpx
import trio

from trio_counter_worker.http_client import Connection

Handler = Callable[[httpx.Request], httpx.Response | Awaitable[httpx.Response]]


def memory_backend(handler: Handler, scheme: str = "https") -> Callable[[], Awaitable[Connection]]:
    """A ``connect`` for :func:`~trio_counter_worker.delivery.open_lanes`: each new
    connection answers with ``handler``. ``scheme``: the requests' URL, as the handler
    sees it."""

    async def connect() -> Connection:
        await trio.lowlevel.checkpoint()
        return MemoryConnection(handler, scheme)

    return connect


class MemoryConnection:
    """One connection: the requests are parsed by h11 as a server would, the answers
    written by h11 (a Content-Length added when the response has none)."""

    def __init__(self, handler: Handler, scheme: str) -> None:
        self._handler = handler
        self._scheme = scheme
        self._server = h11.Connection(h11.SERVER)
        self._out = b""  # answer bytes not yet received
        self.closed = False

    async def send_all(self, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self._server.receive_data(data)

    async def receive(self, wait_first: bool) -> bytes:
        if not self._out and not self.closed:
            self._out = await self._answer()
        else:
            await trio.lowlevel.checkpoint()
        data, self._out = self._out, b""
        return data

    def readable(self) -> bool:
        return self.closed

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()
        self.closed = True

    async def _answer(self) -> bytes:
        request = self._request()
        result = self._handler(request)
        response = await result if inspect.isawaitable(result) else result
        body = await response.aread()
        headers = list(response.headers.raw)
        if not any(k.lower() in (b"content-length", b"transfer-encoding") for k, _ in headers):
            headers.append((b"content-length", b"%d" % len(body)))
        server = self._server
        out = server.send(
            h11.Response(
                status_code=response.status_code,
                headers=headers,
                reason=response.reason_phrase.encode("ascii"),
            )
        )
        assert out is not None
        for event in (h11.Data(data=body), h11.EndOfMessage()):
            out += server.send(event) or b""
        if server.our_state is h11.DONE and server.their_state is h11.DONE:
            server.start_next_cycle()
        else:
            self.closed = True  # the answer said Connection: close
        return out

    def _request(self) -> httpx.Request:
        """The request the lane sent, whole: it sends one in a single ``send_all``."""
        head = self._server.next_event()
        assert isinstance(head, h11.Request), f"expected a whole request, got {head!r}"
        body = b""
        while not isinstance(event := self._server.next_event(), h11.EndOfMessage):
            assert isinstance(event, h11.Data), f"expected the request's body, got {event!r}"
            body += event.data
        headers = list(head.headers.raw_items())
        host = next(v for k, v in headers if k.lower() == b"host").decode("ascii")
        url = f"{self._scheme}://{host}{head.target.decode('ascii')}"
        return httpx.Request(head.method.decode("ascii"), url, headers=headers, content=body)
