"""The lean HTTP/1.1 lane (http_client.py) against httpx, h11 and hostile backends.

Three kinds of checks: the request bytes are exactly the ones httpx sent (httpx itself
as the worker uses it with a proxy: an HttpxLane); any answer,
cut into any pieces, is read as h11 reads it (hypothesis, h11 as the reference, the
way httpcore drives it); and each hostile behaviour of the RecordingBackend costs what
it cost with httpx (one timeout, 64 KiB, the connection), through ResetSender.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import h11
import httpx
import outcome
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.backend import (
    ApplyThenDrop,
    Drip,
    Endless,
    Hang,
    HeadersThenNothing,
    Huge,
    RecordingBackend,
    Respond,
)
from trio_counter_worker import Config, http_client
from trio_counter_worker.delivery import Attempt, Limit, ResetSender, fixed_headers, open_lanes
from trio_counter_worker.http_client import Answer, Endpoint, HttpError, HttpxLane, Lane
from trio_counter_worker.outbox import requests_at_once
from trio_counter_worker.store import PendingReset

pytestmark = pytest.mark.fail_after(60)

CAP = 64 * 1024
# Generous (10x): an attempt the lane cuts at its own deadline (0.3-0.5 s below) returns
# within this even on a loaded machine, while one that waited for the backend's hang or
# drip (8 s for the slowest, a dripped head; most never end) would not. It catches the
# waiting; it does not time the lane (bench/ does).
CUT_SHORT = 5.0
DISCONNECTED = "Server disconnected without sending a response."

Send = Callable[[ResetSender, PendingReset], Awaitable[Attempt]]


def make_config(url: str, **kw: Any) -> Config:
    return Config(reset_endpoint_url=url, reset_secret="s3cret", **kw)


def make_reset(n: int = 0, key: str = "counter:1") -> PendingReset:
    return PendingReset(
        reset_id=f"{n:032x}", key=key, deadline_ms=int(time.time() * 1000), fencing_token=7
    )


@asynccontextmanager
async def httpx_sender(config: Config) -> AsyncIterator[ResetSender]:
    """The sender on httpx, as open_lanes makes it where a proxy is set (here, none)."""
    lane = HttpxLane(
        httpx.AsyncClient(), config.reset_endpoint_url, fixed_headers(config.reset_secret)
    )
    try:
        yield ResetSender(config, [lane])
    finally:
        await lane.aclose()


async def as_a_courier(sender: ResetSender, reset: PendingReset) -> Attempt:
    """An attempt as a courier makes it (Deliveries._courier): bounded by a Limit whose
    scope a watch cancels once its time has passed, counted timed out when that scope
    caught the cancellation."""
    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as scope:
            limit = Limit(scope, lambda due: nursery.start_soon(watch, limit, due))
            attempt = await sender.attempt(reset, 7, 0, limit)
        nursery.cancel_scope.cancel()
    return sender.timed_out() if scope.cancelled_caught else attempt


async def watch(limit: Limit, due: float) -> None:
    """As Deliveries._run_timer watches a courier's limit."""
    await trio.sleep_until(due)
    if limit.due <= trio.current_time():
        limit.expire()


async def on_its_own(sender: ResetSender, reset: PendingReset) -> Attempt:
    return await sender.attempt(reset, 7)


@asynccontextmanager
async def lane_sender(url: str, **kw: Any) -> AsyncIterator[tuple[ResetSender, list[Any]]]:
    config = make_config(url, **kw)
    async with open_lanes(config) as lanes:
        yield ResetSender(config, lanes), lanes


# -- the request: byte for byte what httpx sent ------------------------------------------


class Capture:
    """A loopback server that records each request's raw bytes and answers 200."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.requests: list[bytes] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn: socket.socket) -> None:
        with conn:
            buf = b""
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, rest = buf.partition(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                while len(rest) < length:
                    rest += conn.recv(65536)
                self.requests.append(head + b"\r\n\r\n" + rest[:length])
                buf = rest[length:]
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def capture() -> Iterator[Capture]:
    server = Capture()
    try:
        yield server
    finally:
        server.close()


@pytest.mark.parametrize(
    ("path", "signing", "key"),
    [
        ("/reset", None, "counter:1"),
        ("/hooks/reset?tenant=a%20b&x=1", "sign-me", "caf\u00e9"),
        ("/reset", "sign-me", "k\udcff\udcfe"),  # not UTF-8: key_base64
    ],
)
async def test_the_request_is_the_one_httpx_sent(
    capture: Capture,
    monkeypatch: pytest.MonkeyPatch,
    path: str,
    signing: str | None,
    key: str,
) -> None:
    monkeypatch.setattr(time, "time", lambda: 1_764_370_000.25)
    url = f"http://127.0.0.1:{capture.port}{path}"
    config = make_config(url, reset_signing_secret=signing, replica_id="worker-a")
    reset = PendingReset(
        reset_id="3f1c" * 8, key=key, deadline_ms=1_764_370_000_123, fencing_token=3
    )
    async with httpx_sender(config) as sender:
        assert (await sender.attempt(reset, 7)).done
    async with open_lanes(config) as lanes:
        assert (await ResetSender(config, lanes).attempt(reset, 7)).done
    by_httpx, by_lane = capture.requests
    assert by_lane == by_httpx
    assert by_lane.startswith(f"POST {path} HTTP/1.1\r\n".encode())


def test_userinfo_goes_as_basic_auth_like_httpx() -> None:
    url = "https://us%40er:p%3Ass@backend.example:8443/r?a=1"
    endpoint = Endpoint(url, [("x-secret", "s")])
    sent = endpoint.request([(b"idempotency-key", b"id")], b"{}")
    request = httpx.Request("POST", url)
    auth = next(httpx.BasicAuth("us@er", "p:ss").sync_auth_flow(request))
    assert b"\r\nAuthorization: " + auth.headers["Authorization"].encode() + b"\r\n" in sent
    assert sent.startswith(b"POST /r?a=1 HTTP/1.1\r\nHost: backend.example:8443\r\n")
    assert (endpoint.scheme, endpoint.host, endpoint.port) == ("https", "backend.example", 8443)


def test_an_international_host_is_sent_as_httpx_sends_it() -> None:
    endpoint = Endpoint("https://b\u00fccher.example/reset", [])
    assert endpoint.host == "xn--bcher-kva.example"
    assert endpoint.port == 443
    assert b"\r\nHost: xn--bcher-kva.example\r\n" in endpoint.head


async def test_a_reset_id_httpx_could_not_send_fails_the_same_way(capture: Capture) -> None:
    url = f"http://127.0.0.1:{capture.port}/reset"
    config = make_config(url)
    bad_line = PendingReset(reset_id="a\r\nb", key="k", deadline_ms=1, fencing_token=1)
    not_ascii = PendingReset(reset_id="caf\u00e9", key="k", deadline_ms=1, fencing_token=1)
    async with httpx_sender(config) as by_httpx, open_lanes(config) as lanes:
        for sender in (by_httpx, ResetSender(config, lanes)):
            attempt = await sender.attempt(bad_line, 1)
            assert attempt.verdict == "retry"
            assert attempt.error.startswith("LocalProtocolError talking to http://127.0.0.1:")
            with pytest.raises(UnicodeEncodeError):
                await sender.attempt(not_ascii, 1)
    assert capture.requests == []


# -- answers: read as h11 reads them ------------------------------------------------------


class Script:
    """A connection that hands out ``chunks`` (then EOF) and records what is sent."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = deque(chunks)
        self.sent: list[bytes] = []
        self.closed = False

    async def send_all(self, data: bytes) -> None:
        self.sent.append(data)

    async def receive(self, wait_first: bool) -> bytes:
        await trio.lowlevel.checkpoint()
        return self.chunks.popleft() if self.chunks else b""

    def readable(self) -> bool:
        return False

    async def aclose(self) -> None:
        self.closed = True


def scripted_lane(monkeypatch: pytest.MonkeyPatch, script: Script, cap: int = CAP) -> Lane:
    lane = Lane(Endpoint("http://127.0.0.1:9/reset", []), cap=cap)

    async def connect() -> Script:
        return script

    monkeypatch.setattr(lane, "_connect", connect)
    return lane


Outcome = tuple[Any, ...]


SMALL_CAP = 100  # the differential test's cap: bodies on either side of it stay small


def lane_reads(lane: Lane, script: Script) -> Outcome:
    async def go() -> Outcome:
        try:
            answer = await lane.request(b"POST / HTTP/1.1\r\n\r\n")
        except HttpError as exc:
            return ("error", exc.kind, str(exc) if str(exc) == DISCONNECTED else None)
        head = (answer.status, answer.header("location"), answer.header("retry-after"))
        await lane.finish(answer)
        return ("answer", *head, lane._reusable, script.closed)

    return trio.run(go)


def h11_reads(chunks: list[bytes], cap: int = CAP) -> Outcome:
    """The reference: h11 fed piece by piece, as httpcore drives it; the head's values
    through httpx.Headers; reusable if read to its end within CAP, nothing left over."""
    pending = deque(chunks)
    machine = h11.Connection(h11.CLIENT, max_incomplete_event_size=100 * 1024)
    machine.send(h11.Request(method="POST", target="/", headers=[("host", "x")]))
    machine.send(h11.EndOfMessage())
    try:
        while True:
            event = machine.next_event()
            if event is h11.NEED_DATA:
                data = pending.popleft() if pending else b""
                if not data and machine.their_state is h11.SEND_RESPONSE:
                    return ("error", "RemoteProtocolError", DISCONNECTED)
                machine.receive_data(data)
            elif isinstance(event, h11.Response):
                break
    except h11.RemoteProtocolError:
        return ("error", "RemoteProtocolError", None)
    headers = httpx.Headers(list(event.headers.raw_items()))
    head = (event.status_code, headers.get("location"), headers.get("retry-after"))
    reusable = False
    read = 0
    try:
        while True:
            event = machine.next_event()
            if event is h11.NEED_DATA:
                machine.receive_data(pending.popleft() if pending else b"")
            elif isinstance(event, h11.Data):
                read += len(event.data)
                if read > cap:
                    break
            elif isinstance(event, h11.EndOfMessage):
                reusable = (
                    machine.our_state is h11.DONE
                    and machine.their_state is h11.DONE
                    and not machine.trailing_data[0]
                )
                break
            else:
                break
    except h11.RemoteProtocolError:
        pass
    return ("answer", *head, reusable, not reusable)


_STATUS = st.sampled_from(["200", "204", "201", "301", "304", "404", "429", "503", "099", "1000"])
_NAMES = st.sampled_from(
    [
        "content-type",
        "Retry-After",
        "location",
        "Connection",
        "x-a",
        "Set-Cookie",
        "Content-Length",
        "Transfer-Encoding",
        "X Bad",
    ]
)
_VALUES = st.sampled_from(
    [
        *("text/plain", "3", " 3 ", "close", "Keep-Alive, close", "keep-alive", "/moved"),
        *("a\x01b", "caf\u00e9", "\u00ff", "chunked", "7", "", "a\tb", "x\x7fy", "-1", "5, 5"),
    ]
)


@st.composite
def answers(draw: st.DrawFn) -> list[bytes]:
    eol = draw(st.sampled_from(["\r\n", "\r\n", "\r\n", "\n"]))
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2"]))
    status = draw(_STATUS)
    reason = draw(st.sampled_from([" OK", "", " ", " Not\tFound", " caf\u00e9"]))
    body = draw(st.sampled_from([b"", b"{}", b'{"ok":true}', b"x" * SMALL_CAP, b"y" * 150]))
    framing = draw(st.sampled_from(["length", "length", "short", "long", "chunked", "none"]))
    headers = draw(st.lists(st.tuples(_NAMES, _VALUES), max_size=4))
    if framing in ("length", "short", "long"):
        n = len(body) + {"length": 0, "short": -1, "long": 5}[framing]
        headers.append(("Content-Length", str(max(0, n))))
    elif framing == "chunked":
        headers.append(("Transfer-Encoding", "chunked"))
        body = (b"%x\r\n" % len(body) + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
    informational = draw(st.sampled_from(["", "", f"HTTP/1.1 100 Continue{eol}{eol}"]))
    lines = [f"{version} {status}{reason}"] + [f"{k}: {v}" for k, v in headers]
    head = informational + eol.join(lines) + eol + eol
    data = head.encode("latin-1") + body + draw(st.sampled_from([b"", b"", b"HTTP/1.1 200"]))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=4)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True) if b > a]


@settings(max_examples=400, deadline=None)
@given(answers())
def test_any_answer_in_any_pieces_is_read_as_h11_reads_it(chunks: list[bytes]) -> None:
    with pytest.MonkeyPatch.context() as monkeypatch:
        script = Script(chunks)
        got = lane_reads(scripted_lane(monkeypatch, script, SMALL_CAP), script)
    assert got == h11_reads(chunks, SMALL_CAP)


def socket_lane_reads(chunks: list[bytes], cap: int = CAP) -> Outcome:
    """As :func:`lane_reads`, over a real socket (a socketpair): the lane's flat path for
    plain TCP. Each chunk is written once the lane waits for more, so it is one read."""

    async def go() -> Outcome:
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        lane = Lane(Endpoint("http://127.0.0.1:9/reset", []), cap=cap)

        async def connect() -> http_client.Connection:
            return http_client._Plain(trio.SocketStream(trio.socket.from_stdlib_socket(ours)))

        async def feed() -> None:
            with theirs:
                for chunk in chunks:
                    await trio.testing.wait_all_tasks_blocked()
                    try:
                        theirs.send(chunk)
                    except OSError:  # the lane closed its end: the rest is not read
                        return
                await trio.testing.wait_all_tasks_blocked()
                theirs.shutdown(socket.SHUT_WR)
                await trio.testing.wait_all_tasks_blocked()

        lane._connect = connect  # type: ignore[method-assign]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(feed)
            try:
                answer = await lane.request(b"POST / HTTP/1.1\r\n\r\n")
            except HttpError as exc:
                return ("error", exc.kind, str(exc) if str(exc) == DISCONNECTED else None)
            finally:
                await trio.testing.wait_all_tasks_blocked()
            head = (answer.status, answer.header("location"), answer.header("retry-after"))
            await lane.finish(answer)
            reusable = lane._reusable
            await lane.aclose()
        return ("answer", *head, reusable, not reusable)

    return trio.run(go)


@settings(max_examples=300, deadline=None)
@given(answers())
def test_any_answer_in_any_pieces_over_a_socket_is_read_as_h11_reads_it(
    chunks: list[bytes],
) -> None:
    """The same, through the flat path a plain TCP connection takes (one ``send`` and
    ``recv`` in the lane itself)."""
    assert socket_lane_reads(chunks, SMALL_CAP) == h11_reads(chunks, SMALL_CAP)


def test_a_plain_answer_is_read_in_one_piece(monkeypatch: pytest.MonkeyPatch) -> None:
    answer = b"HTTP/1.1 503 Busy\r\nRetry-After: 3\r\nContent-Length: 2\r\n\r\nno"
    script = Script([answer])
    lane = scripted_lane(monkeypatch, script)
    assert lane_reads(lane, script) == ("answer", 503, None, "3", True, False)
    assert not script.chunks


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 429 Slow\r\nRetry-After: 2\r\nContent-Length: 3\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    ],
)
def test_an_answer_a_byte_at_a_time(monkeypatch: pytest.MonkeyPatch, answer: bytes) -> None:
    chunks = [answer[i : i + 1] for i in range(len(answer))]
    script = Script(chunks)
    got = lane_reads(scripted_lane(monkeypatch, script), script)
    assert got == h11_reads(chunks)
    assert got[-2:] == (True, False)  # read to its end: kept


async def test_an_answer_left_unfinished_is_not_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    script = Script([b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"])
    lane = scripted_lane(monkeypatch, script)
    answer = await lane.request(b"x")
    assert (answer.status, answer.complete) == (200, False)
    with trio.CancelScope() as scope:
        scope.cancel()
        await lane.finish(answer)
    assert script.closed
    assert lane._conn is None


def test_header_decoding_matches_httpx() -> None:
    raw = [(b"Location", b"/caf\xc3\xa9"), (b"location", b"/b"), (b"X", b"\xff")]
    assert Answer(301, raw).header("LOCATION") == httpx.Headers(raw).get("location")
    assert Answer(301, raw[:1]).header("location") == "/caf\u00e9"
    assert Answer(301, raw).header("retry-after") is None


# -- through ResetSender, against the RecordingBackend ------------------------------------


async def test_connections_are_kept_alive_and_replaced(backend: RecordingBackend) -> None:
    async with lane_sender(backend.url, max_in_flight=2) as (sender, lanes):
        assert all(isinstance(lane, Lane) for lane in lanes)
        for n in range(3):
            assert (await sender.attempt(make_reset(n), 7, lane=0)).done
        first = lanes[0]._conn
        assert first is not None
        assert (await sender.attempt(make_reset(3), 7, lane=0)).done
        assert lanes[0]._conn is first  # the same connection, kept alive
        assert lanes[1]._conn is None  # lane 1 never sent
        # Idle for longer than httpx's keep-alive expiry: a new connection.
        lanes[0]._idle_since -= http_client.KEEPALIVE_EXPIRY + 1
        assert (await sender.attempt(make_reset(4), 7, lane=0)).done
        assert lanes[0]._conn is not first
    assert [r.key for r in backend.requests] == ["counter:1"] * 5


@contextmanager
def answering_once(answer: bytes) -> Iterator[tuple[str, list[socket.socket]]]:
    """A server that reads one request per connection, sends ``answer`` and hangs up;
    yields its URL and the connections it accepted."""
    sock = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            accepted.append(conn)
            with conn:
                conn.recv(65536)
                conn.sendall(answer)

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/r", accepted
    finally:
        sock.close()


async def test_a_connection_the_server_closed_while_idle_is_replaced() -> None:
    with answering_once(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n") as (url, accepted):
        async with lane_sender(url) as (sender, _):
            for n in range(3):
                assert (await sender.attempt(make_reset(n), 7)).done
                await trio.sleep(0.05)  # the FIN arrives: readable while idle
    assert len(accepted) == 3


@pytest.mark.parametrize(
    ("behaviour", "error"),
    [
        (ApplyThenDrop(rst=True), "ReadError talking to "),
        (ApplyThenDrop(rst=False), f"RemoteProtocolError talking to {{}}: {DISCONNECTED}"),
        (Hang(30.0), "no answer within RESET_TIMEOUT_MS=300 from {}"),
        (Drip(0.2, head_too=True), "no answer within RESET_TIMEOUT_MS=300 from {}"),
    ],
)
@pytest.mark.parametrize("send", [on_its_own, as_a_courier])
async def test_no_answer_is_a_retry(
    backend: RecordingBackend, behaviour: Any, error: str, send: Send
) -> None:
    backend.respond_with(behaviour)
    async with lane_sender(backend.url, reset_timeout_ms=300) as (sender, lanes):
        with trio.fail_after(CUT_SHORT):
            attempt = await send(sender, make_reset())
        assert lanes[0]._conn is None
        assert (await send(sender, make_reset(1))).done  # a fresh connection
        retried = sender._metrics.registry.get_sample_value(
            "tcw_reset_attempts_total", {"outcome": "retried"}
        )
    assert (attempt.verdict, attempt.status) == ("retry", None)
    assert attempt.error.startswith(error.format(backend.url))
    assert retried == 1


async def test_connection_refused_is_a_connect_error() -> None:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        port = sock.getsockname()[1]
    async with lane_sender(f"http://127.0.0.1:{port}/reset") as (sender, _):
        attempt = await sender.attempt(make_reset(), 7)
    assert attempt.verdict == "retry"
    assert attempt.error.startswith(f"ConnectError talking to http://127.0.0.1:{port}/reset: ")


@pytest.mark.parametrize(
    "behaviour",
    [
        Drip(0.1, length=200),  # a body that drips (20 s): cut at the deadline
        HeadersThenNothing(),  # a body that never comes
        Endless(),  # a body that never ends: cut at 64 KiB
        Huge(),  # 10 MB announced: not read
    ],
)
@pytest.mark.parametrize("send", [on_its_own, as_a_courier])
async def test_only_the_status_matters_and_a_long_body_costs_the_connection(
    backend: RecordingBackend, behaviour: Any, send: Send
) -> None:
    backend.respond_with(behaviour)
    async with lane_sender(backend.url, reset_timeout_ms=500) as (sender, lanes):
        with trio.fail_after(CUT_SHORT):
            attempt = await send(sender, make_reset())
        assert attempt.done
        assert lanes[0]._conn is None
        assert (await send(sender, make_reset(1))).done
        assert lanes[0]._conn is not None


async def test_redirects_are_not_followed(backend: RecordingBackend) -> None:
    backend.respond_with(Respond(308, {"location": "/elsewhere"}))
    async with lane_sender(backend.url) as (sender, _):
        attempt = await sender.attempt(make_reset(), 7)
    assert (attempt.verdict, attempt.status) == ("redirect", 308)
    assert "redirecting to '/elsewhere'" in attempt.error
    assert [r.path for r in backend.requests] == ["/reset"]


async def test_retry_after_and_hints(backend: RecordingBackend) -> None:
    backend.respond_with((429, {"retry-after": "3"}), 404, 200)
    async with lane_sender(backend.url) as (sender, _):
        busy, missing, ok = [await sender.attempt(make_reset(n), 7) for n in range(3)]
    assert (busy.verdict, busy.retry_after) == ("retry", 3.0)
    assert missing == Attempt(
        "rejected",
        404,
        f"HTTP 404 from {backend.url}: check RESET_ENDPOINT_URL: the backend has no such path",
    )
    assert ok.done
    assert ok.status == 200


@pytest.mark.parametrize(
    ("behaviour", "verdict", "error"),
    [
        (ApplyThenDrop(rst=True), "retry", "ReadError talking to "),
        (ApplyThenDrop(rst=False), "retry", f"RemoteProtocolError talking to {{}}: {DISCONNECTED}"),
        (Hang(30.0), "retry", "no answer within RESET_TIMEOUT_MS=300 from {}"),
        (HeadersThenNothing(), "done", ""),
        # Left at the cap, httpx's nested body generators are finalised by the GC,
        # which trio warns of (encode/httpx#3686); the httpx path always did so.
        pytest.param(
            Endless(),
            "done",
            "",
            marks=pytest.mark.filterwarnings(
                "ignore:Exception ignored in. <async_generator object"
                ":pytest.PytestUnraisableExceptionWarning"
            ),
        ),
        (Huge(), "done", ""),
        (Respond(308, {"location": "/elsewhere"}), "redirect", "HTTP 308 from {}"),
    ],
)
async def test_with_a_proxy_httpx_judges_each_answer_as_the_lane_does(
    backend: RecordingBackend, behaviour: Any, verdict: str, error: str
) -> None:
    """The HttpxLane, what the worker uses where a proxy is set, behind the same
    ResetSender: the same verdicts and errors, and the next request goes through."""
    # Only the hang needs the timeout short; the rest get room for a loaded machine
    # (headers that come after the timeout are a retry).
    timeout_ms = 300 if isinstance(behaviour, Hang) else 1000
    config = make_config(backend.url, reset_timeout_ms=timeout_ms)
    async with (
        lane_sender(backend.url, reset_timeout_ms=timeout_ms) as (lane, _),
        httpx_sender(config) as by_httpx,
    ):
        for sender in (lane, by_httpx):
            backend.respond_with(behaviour)
            attempt = await sender.attempt(make_reset(), 7)
            assert attempt.verdict == verdict
            assert attempt.error.startswith(error.format(backend.url))
            assert (await sender.attempt(make_reset(1), 7)).done


async def test_a_2xx_whose_body_is_cut_short_is_delivered() -> None:
    # The status is in; the connection breaks in the body. Both ways count it done.
    cut_short = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nab"
    with answering_once(cut_short) as (url, _):
        async with lane_sender(url) as (sender, _), httpx_sender(make_config(url)) as by_httpx:
            assert (await sender.attempt(make_reset(), 7)).done
            assert (await by_httpx.attempt(make_reset(), 7)).done


class AnswerAsTheDeadlinePasses:
    """A lane whose answer (its head; the body still to come, slowly) arrives in the
    same instant the attempt's deadline passes, after the deadline cancelled the wait
    for it: the task gets the answer, and a cancellation pending."""

    def __init__(self, nursery: trio.Nursery, timeout: float) -> None:
        self._nursery = nursery
        self._timeout = timeout
        self.bodies: list[str] = []

    async def post(self, headers: Any, body: bytes) -> Answer:
        task = trio.lowlevel.current_task()
        at = trio.current_time() + self._timeout

        async def answer() -> None:
            await trio.sleep_until(at)
            trio.lowlevel.reschedule(task, outcome.Value(Answer(200, [])))

        self._nursery.start_soon(answer)
        # Abort.FAILED: cancelled, the wait goes on until answer() wakes it.
        return await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)  # type: ignore[no-any-return]

    async def finish(self, answer: Answer) -> None:
        try:
            await trio.sleep(1.0)
        except trio.Cancelled:
            self.bodies.append("cut at the deadline")
            raise
        self.bodies.append("read")  # pragma: no cover - the deadline has passed

    async def aclose(self) -> None:  # pragma: no cover - not called
        pass


@pytest.mark.parametrize("send", [on_its_own, as_a_courier])
async def test_an_answer_in_the_instant_the_deadline_passes_counts(
    autojump_clock: trio.testing.MockClock, send: Send
) -> None:
    # As with trio.fail_after: the status came in time, so the attempt is judged by it;
    # the rest of the answer is not waited for.
    async with trio.open_nursery() as nursery:
        lane = AnswerAsTheDeadlinePasses(nursery, 1.0)
        sender = ResetSender(
            make_config("https://backend.test/reset", reset_timeout_ms=1000), [lane]
        )
        attempt = await send(sender, make_reset())
    assert attempt.done
    assert lane.bodies == ["cut at the deadline"]
    assert trio.current_time() == 1.0


async def test_cancelled_mid_request_the_connection_is_dropped(backend: RecordingBackend) -> None:
    backend.respond_with(Hang(5.0))
    async with lane_sender(backend.url) as (sender, lanes):
        with trio.move_on_after(0.2):
            await sender.attempt(make_reset(), 7)
        assert lanes[0]._conn is None
        assert (await sender.attempt(make_reset(1), 7)).done


async def test_a_proxy_in_the_environment_keeps_httpx(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    config = make_config("http://127.0.0.1:9/reset", max_in_flight=2)
    async with open_lanes(config) as lanes:
        assert [type(lane) for lane in lanes] == [Lane] * requests_at_once(2)
    monkeypatch.setenv("NO_PROXY", "localhost")
    assert not http_client.uses_proxy()
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert http_client.uses_proxy()
    async with open_lanes(config) as lanes:
        assert [type(lane) for lane in lanes] == [HttpxLane] * requests_at_once(2)


# -- TLS ----------------------------------------------------------------------------------


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl CLI")
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
            *("-keyout", "key.pem", "-out", "cert.pem", "-subj", "/CN=localhost"),
            *("-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
        ],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    return tmp_path / "cert.pem", tmp_path / "key.pem"


async def test_https_keeps_the_connection_and_verifies(
    certificate: tuple[Path, Path],
) -> None:
    cert, key = certificate
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(cert, key)
    connections = []

    async def handler(stream: trio.SSLStream[trio.SocketStream]) -> None:
        connections.append(stream)
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf or not buf.endswith(b"}"):
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buf += data
                buf = b""
                await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        except trio.BrokenResourceError:
            return

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_ssl_over_tcp, host="127.0.0.1", https_compatible=True),
            handler,
            0,
            served,
        )
        port = listeners[0].transport_listener.socket.getsockname()[1]
        url = f"https://localhost:{port}/reset"
        trusting = http_client.tls_context()
        trusting.load_verify_locations(cert)
        config = make_config(url)
        endpoint = Endpoint(url, [("x-secret", "s3cret"), ("content-type", "application/json")])
        lane = Lane(endpoint, trusting)
        sender = ResetSender(config, [lane])
        for n in range(3):
            assert (await sender.attempt(make_reset(n), 7)).done
        assert len(connections) == 1
        await lane.aclose()
        # The default context (certifi's CAs) does not know this certificate.
        untrusting = ResetSender(config, [Lane(endpoint, http_client.tls_context())])
        attempt = await untrusting.attempt(make_reset(), 7)
        assert attempt.verdict == "retry"
        assert attempt.error.startswith(f"ConnectError talking to {url}: ")
        assert "CERTIFICATE_VERIFY_FAILED" in attempt.error
        nursery.cancel_scope.cancel()
