"""The reset POST over HTTP/1.1 without httpx's per-request layers: one kept-alive
connection per lane (courier).

Under a burst, httpx → httpcore → h11 was half of the leader's CPU (~0.5 ms a request:
models, cookies, a pool, tracing, h11's state machine, a timeout scope per socket
operation). A lane writes the request httpx would write (the same bytes: its header
block is made once by httpx and h11, see :class:`Endpoint`) in one ``send``, waits for
the socket to be readable and parses a plain answer (``HTTP/1.1``, Content-Length,
headers h11 would accept) itself. Anything else (a 1xx, chunked or close-delimited
bodies, HTTP/1.0, a header h11 would refuse) is handed whole to h11, which then reads
that answer exactly as httpcore would have.

What stays as it was with httpx: connect (``trio.open_tcp_stream``, happy eyeballs) and
TLS (``trio.SSLStream``, the shared context, ALPN ``http/1.1``, SNI the URL's host); no
redirect is followed; a connection idle for 5 s, or readable while idle (closed by the
server), is replaced before a request; an answer not read to its end closes its
connection; errors are named as httpx names them (``ConnectError``, ``ReadError``,
``WriteError``, ``RemoteProtocolError``, ``LocalProtocolError``). Time is the caller's:
it bounds each call with a trio cancel scope. With an HTTP proxy configured in the
environment (``HTTP_PROXY``, ``HTTPS_PROXY``, ``ALL_PROXY``, which httpx honours) the
worker keeps using httpx (:func:`uses_proxy`), through :class:`HttpxLane`.

Both are a :class:`Transport`, the one interface the reset sender uses: ``post`` the
request's own headers and body, read the answer's head (an :class:`Answer`), ``finish``
its body. Tests give a :class:`Lane` an in-memory :class:`Connection` (its ``connect``)
and so run the production code from the request bytes to the parsed answer.
"""

from __future__ import annotations

import re
import select
import socket
import ssl
import urllib.request
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Protocol

import certifi
import h11
import httpx
import trio

__all__ = [
    "Answer",
    "Connection",
    "Endpoint",
    "HttpError",
    "HttpxLane",
    "Lane",
    "Transport",
    "header_value",
    "tls_context",
    "uses_proxy",
]

READ_SIZE = 64 * 1024  # bytes per read, as httpcore
BODY_CAP = 64 * 1024  # bytes of an answer's body read at most: only its status matters
HEAD_LIMIT = 100 * 1024  # an answer head still incomplete past this is refused (httpcore)
KEEPALIVE_EXPIRY = 5.0  # an idle connection older than this is not reused (httpx default)

# h11's grammar (h11/_abnf.py) for the lines of a plain answer: CRLF line ends only.
_VCHAR = rb"[^\x00\s]"  # h11's field_vchar: any byte but NUL and whitespace
_FIELD_VALUE = rb"(?:" + _VCHAR + rb"+(?:[ \t]+" + _VCHAR + rb"+)*)?"
_TOKEN = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
_PLAIN_HEAD = re.compile(
    rb"HTTP/1\.1 [2-9][0-9][0-9](?: (?:[ \t]|" + _VCHAR + rb")*)?\r\n"
    rb"(?:" + _TOKEN + rb":[ \t]*" + _FIELD_VALUE + rb"[ \t]*\r\n)*\r\n"
)
_HEADER_VALUE = re.compile(_FIELD_VALUE)
_BLANK_LINE = re.compile(rb"\n\r?\n")  # the end of a head, as h11 finds it
_STATUS_PREFIX = b"HTTP/1.1 "
_DISCONNECTED = "Server disconnected without sending a response."


class HttpError(Exception):
    """A request that got no usable answer; ``kind`` is httpx's name for it."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def uses_proxy() -> bool:
    """Whether httpx (``trust_env``, its default) would send through a proxy from the
    environment: it reads ``urllib.request.getproxies()`` for http, https and all."""
    found = urllib.request.getproxies()
    return any(found.get(scheme) for scheme in ("http", "https", "all"))


class Endpoint:
    """Where the resets go and the fixed part of every request, made once from the URL
    by httpx itself (Host, default headers, Basic auth from userinfo) and checked by h11.

    ``fixed`` are the headers every request carries, in order, before the per-request
    ones (idempotency-key, x-fencing-token, x-signature, Content-Length)."""

    def __init__(self, url: str, fixed: Iterable[tuple[str, str]]) -> None:
        # The default headers as this httpx sends them (no network: a mock transport).
        with httpx.Client(transport=httpx.MockTransport(_unused), trust_env=False) as client:
            request = client.build_request("POST", url, content=b"", headers=list(fixed))
        parsed = request.url
        self.scheme = parsed.scheme
        self.host = parsed.raw_host.decode("ascii")  # IDNA, no brackets: as httpcore
        self.port = parsed.port or (443 if self.scheme == "https" else 80)
        head = [(k, v) for k, v in request.headers.raw if k.lower() != b"content-length"]
        auth = b""
        if parsed.username or parsed.password:  # httpx sends userinfo as Basic auth
            authed = next(httpx.BasicAuth(parsed.username, parsed.password).sync_auth_flow(request))
            auth = b"Authorization: " + authed.headers["Authorization"].encode("ascii") + b"\r\n"
        target = parsed.raw_path
        # h11 validates the request line and the headers (raises LocalProtocolError).
        check = h11.Connection(h11.CLIENT)
        check.send(h11.Request(method=b"POST", target=target, headers=head))
        self.head = b"POST " + target + b" HTTP/1.1\r\n" + _header_lines(head)
        self.tail = auth + b"\r\n"  # httpx adds Authorization last, after Content-Length

    def request(self, headers: Iterable[tuple[bytes, bytes]], body: bytes) -> bytes:
        """The whole request: the fixed head, ``headers`` (already checked with
        :func:`header_value`), Content-Length, and ``body``."""
        return b"".join(
            (
                self.head,
                _header_lines(headers),
                b"Content-Length: %d\r\n" % len(body),
                self.tail,
                body,
            )
        )


def tls_context() -> ssl.SSLContext:
    """The TLS context httpx would build (certifi's CAs), for HTTP/1.1."""
    context = ssl.create_default_context(cafile=certifi.where())
    context.set_alpn_protocols(["http/1.1"])  # what httpcore sets on it before each TLS
    return context


def _unused(request: httpx.Request) -> httpx.Response:  # pragma: no cover - never sent
    raise AssertionError("Endpoint sends nothing")


def header_value(value: str) -> bytes:
    """``value`` as httpx and h11 would send it: ASCII (else UnicodeEncodeError, as
    httpx raises it) and a legal field value (else LocalProtocolError, as h11)."""
    raw = value.encode("ascii")
    if _HEADER_VALUE.fullmatch(raw) is None:
        raise HttpError("LocalProtocolError", f"Illegal header value {raw!r}")
    return raw


def _header_lines(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    return b"".join(b"%s: %s\r\n" % (k, v) for k, v in headers)


class Answer:
    """An answer's status and headers; its body is read by :meth:`Lane.finish`."""

    __slots__ = ("_body", "_h11", "_raw_headers", "complete", "status")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status
        self._raw_headers = headers
        self.complete = False  # read to its end: the connection stays (if it may)
        self._body = 0  # fast path: body bytes still to come
        self._h11: h11.Connection | None = None  # an unusual answer, read by h11

    def header(self, name: str) -> str | None:
        """A header's value as httpx's ``Headers.get`` gives it: several occurrences
        joined with ", ", decoded as ASCII, else UTF-8, else Latin-1 (whichever fits
        every header of the answer)."""
        key = name.lower().encode("ascii")
        values = [v for k, v in self._raw_headers if k.lower() == key]
        if not values:
            return None
        return b", ".join(values).decode(self._encoding())

    def _encoding(self) -> str:
        for encoding in ("ascii", "utf-8"):
            try:
                for k, v in self._raw_headers:
                    k.decode(encoding)
                    v.decode(encoding)
            except UnicodeDecodeError:
                continue
            return encoding
        return "iso-8859-1"


class Transport(Protocol):
    """One lane of reset requests to the endpoint, one request at a time: a
    :class:`Lane`, or an :class:`HttpxLane` where a proxy is configured."""

    async def post(self, headers: Sequence[tuple[bytes, bytes]], body: bytes) -> Answer:
        """Send the request (the endpoint's fixed headers, then ``headers``, already
        checked with :func:`header_value`, and ``body``) and read the answer's head.
        Raises :class:`HttpError` when there is no answer."""
        ...

    async def finish(self, answer: Answer) -> None:
        """Read the rest of ``answer`` (at most ``BODY_CAP`` bytes), so the connection
        can be reused, or close it. Errors reading it are not the request's: ignored."""
        ...

    async def aclose(self) -> None: ...


class Connection(Protocol):
    """A connection a :class:`Lane` talks over: plain TCP, TLS, or, in tests, memory."""

    async def send_all(self, data: bytes) -> None: ...

    async def receive(self, wait_first: bool) -> bytes:
        """Bytes of the answer, ``b""`` once the peer closed. ``wait_first``: right
        after a request, when nothing can be there yet."""
        ...

    def readable(self) -> bool:
        """Whether bytes (or the peer's close) arrived while idle."""
        ...

    async def aclose(self) -> None: ...


class _Plain:
    """A TCP connection used directly with trio's I/O waits: a request is one ``send``
    and its answer usually one ``recv``, with no stream layers in between."""

    __slots__ = ("_poll", "_sock")

    def __init__(self, stream: trio.SocketStream) -> None:
        self._sock = socket.socket(fileno=stream.socket.detach())
        self._sock.setblocking(False)
        self._poll = select.poll()  # readable while idle: the cheapest way to ask
        self._poll.register(self._sock, select.POLLIN)

    async def send_all(self, data: bytes) -> None:
        sock = self._sock
        view = memoryview(data)
        while view:
            try:
                sent = sock.send(view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
                continue
            view = view[sent:]
            if view:
                await trio.lowlevel.wait_writable(sock)

    async def receive(self, wait_first: bool) -> bytes:
        sock = self._sock
        if wait_first:  # right after a request: nothing can be there yet
            await trio.lowlevel.wait_readable(sock)
        else:
            await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                return sock.recv(READ_SIZE)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)

    def readable(self) -> bool:
        # Bytes nobody asked for, the server's end of the connection, or an error.
        return bool(self._poll.poll(0))

    async def aclose(self) -> None:
        trio.lowlevel.notify_closing(self._sock)
        self._sock.close()


class _Tls:
    """TLS over trio's SSLStream, as httpcore uses it."""

    __slots__ = ("_raw", "_stream")

    def __init__(self, raw: trio.SocketStream, stream: trio.SSLStream[trio.SocketStream]) -> None:
        self._raw = raw
        self._stream = stream

    async def send_all(self, data: bytes) -> None:
        await self._stream.send_all(data)

    async def receive(self, wait_first: bool) -> bytes:
        return bytes(await self._stream.receive_some(READ_SIZE))

    def readable(self) -> bool:
        return self._raw.socket.is_readable()  # httpcore looks at the socket too

    async def aclose(self) -> None:
        await self._stream.aclose()


class _PlainHead:
    """A plain answer's head (see :func:`_plain_head`), parsed: what an answer needs."""

    __slots__ = ("close", "head", "headers", "length", "status")

    def __init__(
        self, head: bytes, status: int, headers: list[tuple[bytes, bytes]], length: int, close: bool
    ) -> None:
        self.head = head
        self.status = status
        self.headers = headers  # shared by every Answer with this head: never changed
        self.length = length  # of the body: 0 for 204 and 304
        self.close = close  # Connection: close


def _plain_head(head: bytes) -> _PlainHead | None:
    """``head`` (through its blank line) parsed, if it is plain: HTTP/1.1, headers h11
    would accept, one Content-Length (or a 204/304), no Transfer-Encoding; else None
    (h11 reads it)."""
    if _PLAIN_HEAD.fullmatch(head) is None:
        return None
    lines = head[:-4].split(b"\r\n")
    status = int(lines[0][9:12])
    headers: list[tuple[bytes, bytes]] = []
    length = -1
    close = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        value = value.strip(b" \t")
        headers.append((name, value))
        lower = name.lower()
        if lower == b"content-length":
            if length >= 0 or not value.isdigit() or len(value) > 20:
                return None
            length = int(value)
        elif lower == b"transfer-encoding":
            return None
        elif lower == b"connection":
            close = close or b"close" in [v.strip() for v in value.lower().split(b",")]
    if status in (204, 304):
        length = 0
    elif length < 0:  # read until closed: h11 knows how
        return None
    return _PlainHead(head, status, headers, length, close)


_CLOSE_TIMEOUT = 1.0  # a TLS close sends close_notify: never wait long for it


class Lane:
    """One connection to the endpoint, kept alive between requests, one request at a
    time. The caller bounds each call's time (cancel scopes); a call interrupted, or
    failing, leaves the connection closed, so the next request starts afresh."""

    def __init__(
        self,
        endpoint: Endpoint,
        tls: ssl.SSLContext | None = None,
        cap: int = BODY_CAP,
        *,
        connect: Callable[[], Awaitable[Connection]] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self._tls = tls
        self._cap = cap
        self._dial = connect  # None: TCP (and TLS) to the endpoint
        self._conn: Connection | None = None
        self._reusable = False  # the last answer was read to its end, on a kept connection
        self._idle_since = 0.0
        self._last_plain: _PlainHead | None = None  # the last plain head read, parsed

    async def post(self, headers: Sequence[tuple[bytes, bytes]], body: bytes) -> Answer:
        """:meth:`request` of the whole request (see :meth:`Transport.post`)."""
        return await self.request(self.endpoint.request(headers, body))

    async def request(self, data: bytes) -> Answer:
        """Send ``data`` (from :meth:`Endpoint.request`) and read the answer's head.
        Raises :class:`HttpError` when there is no answer."""
        conn = self._conn
        if conn is not None and (
            not self._reusable
            or trio.current_time() - self._idle_since > KEEPALIVE_EXPIRY
            or conn.readable()
        ):
            await self._drop()
            conn = None
        self._reusable = False
        try:
            if conn is None:
                conn = self._conn = await self._connect()
            try:
                await conn.send_all(data)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise HttpError("WriteError", _text(exc)) from exc
            answer = await self._read_head(conn, self._cap)
        except BaseException:
            await self._drop()
            raise
        if answer.complete:
            self._kept()
        return answer

    async def finish(self, answer: Answer) -> None:
        """Read the rest of ``answer``'s body (nothing if it was all there), at most
        ``cap`` bytes of it: read to its end, the connection stays; longer, broken or
        interrupted, it is closed. Errors reading it are not the request's: ignored."""
        if answer.complete:
            return
        try:
            await self._read_body(answer, self._cap)
        except HttpError:
            pass
        finally:
            if answer.complete:
                self._kept()
            else:
                await self._drop()

    async def aclose(self) -> None:
        await self._drop()

    # -- inside -------------------------------------------------------------------------

    def _kept(self) -> None:
        self._reusable = True
        self._idle_since = trio.current_time()

    async def _connect(self) -> Connection:
        if self._dial is not None:
            return await self._dial()
        endpoint = self.endpoint
        try:
            stream = await trio.open_tcp_stream(endpoint.host, endpoint.port)
        except OSError as exc:
            raise HttpError("ConnectError", _text(exc)) from exc
        if endpoint.scheme != "https":
            return _Plain(stream)
        tls = self._tls or tls_context()
        secured = trio.SSLStream(stream, tls, server_hostname=endpoint.host, https_compatible=True)
        try:
            await secured.do_handshake()
        except BaseException as exc:
            with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT):
                await stream.aclose()
            if isinstance(exc, trio.BrokenResourceError | OSError):
                raise HttpError("ConnectError", _text(exc)) from exc
            raise
        return _Tls(stream, secured)

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT):
                await conn.aclose()

    async def _receive(self, conn: Connection, wait_first: bool) -> bytes:
        try:
            return await conn.receive(wait_first)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise HttpError("ReadError", _text(exc)) from exc

    async def _read_head(self, conn: Connection, cap: int) -> Answer:
        data = await self._receive(conn, True)
        buf: bytes | bytearray = data  # a bytearray once a head comes in pieces
        searched = 0
        while True:
            if not data:
                raise HttpError("RemoteProtocolError", _DISCONNECTED)
            if not buf.startswith(_STATUS_PREFIX[: len(buf)]) or len(buf) > HEAD_LIMIT:
                return await self._h11_head(conn, buf)
            end = _BLANK_LINE.search(buf, searched)
            if end is not None:
                break
            searched = max(0, len(buf) - 2)
            data = await self._receive(conn, False)
            if isinstance(buf, bytes):
                buf = bytearray(buf)
            buf += data
        head_end = end.end()
        head = bytes(buf[:head_end])
        plain = self._last_plain
        if plain is None or plain.head != head:  # a backend's heads differ by their Date
            plain = _plain_head(head)
            if plain is None:
                return await self._h11_head(conn, buf)
            self._last_plain = plain
        answer = Answer(plain.status, plain.headers)
        length = plain.length
        after = len(buf) - head_end  # body bytes already here
        close = plain.close or after > length  # bytes beyond the answer: not trusted again
        answer._body = length - min(after, length)
        if close or length > cap:
            answer._body = -1  # not worth reading: the connection is closed
        elif answer._body == 0:
            answer.complete = True
        return answer

    async def _h11_head(self, conn: Connection, buf: bytes | bytearray) -> Answer:
        """Hand an answer the fast path does not read to h11, as httpcore would."""
        machine = h11.Connection(h11.CLIENT, max_incomplete_event_size=HEAD_LIMIT)
        # h11 must believe it sent the request; only the method matters for the answer.
        machine.send(h11.Request(method=b"POST", target=b"/", headers=[(b"host", b"x")]))
        machine.send(h11.EndOfMessage())
        machine.receive_data(bytes(buf))
        try:
            while True:
                event = machine.next_event()
                if event is h11.NEED_DATA:
                    data = await self._receive(conn, False)
                    if not data and machine.their_state is h11.SEND_RESPONSE:
                        raise HttpError("RemoteProtocolError", _DISCONNECTED)
                    machine.receive_data(data)
                elif isinstance(event, h11.Response):
                    answer = Answer(event.status_code, list(event.headers.raw_items()))
                    answer._h11 = machine
                    return answer
                elif isinstance(event, h11.InformationalResponse):
                    continue
                else:  # pragma: no cover - h11 gives nothing else before a Response
                    raise HttpError("RemoteProtocolError", f"unexpected {event!r}")
        except h11.RemoteProtocolError as exc:
            raise HttpError("RemoteProtocolError", str(exc)) from exc

    async def _read_body(self, answer: Answer, cap: int) -> None:
        conn = self._conn
        if conn is None:
            return
        machine = answer._h11
        if machine is None:
            if answer._body < 0 or answer._body > cap:
                return  # not worth reading: the connection closes
            read = 0
            while read < answer._body:
                data = await self._receive(conn, False)
                if not data:
                    return
                read += len(data)
            answer.complete = read == answer._body
            return
        read = 0
        try:
            while True:
                event = machine.next_event()
                if event is h11.NEED_DATA:
                    machine.receive_data(await self._receive(conn, False))
                elif isinstance(event, h11.Data):
                    read += len(event.data)
                    if read > cap:
                        return
                elif isinstance(event, h11.EndOfMessage):
                    answer.complete = (
                        machine.our_state is h11.DONE
                        and machine.their_state is h11.DONE
                        and not machine.trailing_data[0]
                    )
                    return
                else:  # ConnectionClosed, PAUSED: the connection cannot be reused
                    return
        except h11.RemoteProtocolError:
            return


class HttpxLane:
    """The reset request through httpx, which honours a proxy configured in the
    environment (a :class:`Lane` does not): ``client`` keeps one connection."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        url: str,
        fixed: Iterable[tuple[str, str]],
        cap: int = BODY_CAP,
    ) -> None:
        self._client = client
        self._url = url
        self._fixed = [(k.encode("ascii"), v.encode("ascii")) for k, v in fixed]
        self._cap = cap
        self._response: httpx.Response | None = None  # the answer being read

    async def post(self, headers: Sequence[tuple[bytes, bytes]], body: bytes) -> Answer:
        await self._close_response()
        request = self._client.build_request(
            "POST", self._url, content=body, headers=[*self._fixed, *headers]
        )
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TransportError as exc:  # refused, reset, DNS, protocol errors
            raise HttpError(type(exc).__name__, str(exc)) from exc
        self._response = response
        return Answer(response.status_code, list(response.headers.raw))

    async def finish(self, answer: Answer) -> None:
        response = self._response
        if response is None:
            return
        try:
            announced = answer.header("content-length") or ""
            if announced.isdigit() and int(announced) > self._cap:
                return  # not worth reading (as a Lane): closing it drops the connection
            read = 0
            # Left at the cap, httpx's body generators go to the GC (encode/httpx#3686).
            async for chunk in response.aiter_raw():
                read += len(chunk)
                if read > self._cap:
                    return
        except httpx.TransportError:
            pass  # the answer's status is in: a body cut short only costs the connection
        finally:
            await self._close_response()

    async def aclose(self) -> None:
        await self._close_response()
        await self._client.aclose()

    async def _close_response(self) -> None:
        # Closing an answer read to its end keeps its connection; any other, drops it.
        response, self._response = self._response, None
        if response is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT):
                await response.aclose()


def _text(exc: BaseException) -> str:
    """An exception's message; trio's stream errors say it in their cause."""
    text = str(exc)
    if not text and exc.__cause__ is not None:
        text = str(exc.__cause__)
    return text
