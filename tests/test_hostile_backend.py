"""RecordingBackend's hostile behaviours, each checked from a real client's side.

Policy: loopback only, port 0; a real httpx client (sync) or a raw socket; every
blocking call has its own timeout and every test runs under a watchdog. Timing is
asserted as a lower bound only (a dripped byte cannot arrive early); the one upper
bound is close()'s promptness, which is the property under test, with a wide margin.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.support.backend import (
    ApplyThenDrop,
    Behaviour,
    Drip,
    Endless,
    Hang,
    HeadersThenNothing,
    Huge,
    Received,
    RecordingBackend,
    Respond,
    by_key,
)
from tests.support.watchdog import watchdog

TEST_TIMEOUT = 30.0
CLIENT_TIMEOUT = 5.0


@pytest.fixture(autouse=True)
def bounded() -> Iterator[None]:
    """Bound every test: dump all threads' stacks and exit if one hangs."""
    with watchdog(TEST_TIMEOUT):
        yield


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=CLIENT_TIMEOUT) as client:
        yield client


def post_key(http: httpx.Client, backend: RecordingBackend, key: str) -> httpx.Response:
    return http.post(backend.url, json={"key": key})


def raw_post(port: int, key: str, *, rcvbuf: int | None = None) -> socket.socket:
    """Send a reset-shaped POST on a new raw socket and return it unread."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:  # before connect, so the window stays small
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(CLIENT_TIMEOUT)
    sock.connect(("127.0.0.1", port))
    body = json.dumps({"key": key}).encode()
    head = f"POST /reset HTTP/1.1\r\nhost: x\r\ncontent-length: {len(body)}\r\n\r\n"
    sock.sendall(head.encode() + body)
    return sock


# --- Respond: statuses with headers ------------------------------------------------


@pytest.mark.parametrize(
    ("status", "headers"),
    [
        (404, {}),
        (429, {"retry-after": "3"}),
        (503, {"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}),
        (301, {"location": "/moved"}),
        (302, {"location": "/found"}),
        (307, {"location": "/temporary"}),
        (308, {"location": "http://127.0.0.1:1/permanent"}),
    ],
)
def test_respond_status_and_headers(
    backend: RecordingBackend, http: httpx.Client, status: int, headers: dict[str, str]
) -> None:
    backend.behave(lambda received: Respond(status, headers))
    response = post_key(http, backend, "k")
    assert response.status_code == status
    for name, value in headers.items():
        assert response.headers[name] == value
    assert response.json() == {"ok": False}
    assert [r.key for r in backend.requests] == ["k"]


@pytest.mark.parametrize(
    ("status", "method_after"), [(301, "GET"), (302, "GET"), (307, "POST"), (308, "POST")]
)
def test_redirects_are_followed_by_a_real_client(
    backend: RecordingBackend, http: httpx.Client, status: int, method_after: str
) -> None:
    backend.behave(
        lambda received: (
            Respond(status, {"location": "/elsewhere"}) if received.path == "/reset" else None
        )
    )
    response = http.post(backend.url, json={"key": "k"}, follow_redirects=True)
    assert response.status_code == 200
    first, second = backend.requests
    assert (first.method, first.path) == ("POST", "/reset")
    assert (second.method, second.path) == (method_after, "/elsewhere")
    # 307/308 keep the method and the body; 301/302 turn a POST into a bodiless GET.
    assert second.body == (first.body if method_after == "POST" else b"")


def test_respond_with_a_custom_body(backend: RecordingBackend, http: httpx.Client) -> None:
    backend.respond_with(Respond(502, {"content-type": "text/html"}, body=b"<h1>Bad</h1>"))
    response = post_key(http, backend, "k")
    assert response.status_code == 502
    assert response.headers["content-type"] == "text/html"
    assert response.content == b"<h1>Bad</h1>"


# --- Hang ----------------------------------------------------------------------------


def test_hang_then_answers(backend: RecordingBackend, http: httpx.Client) -> None:
    backend.behave(lambda received: Hang(0.3, then=Respond(503)))
    start = time.monotonic()
    response = post_key(http, backend, "k")
    assert response.status_code == 503
    assert time.monotonic() - start >= 0.3
    [received] = backend.requests
    assert received.received_at <= time.time() - 0.3  # recorded on arrival, not on answer


def test_hang_makes_a_client_time_out_and_ends_when_it_leaves(backend: RecordingBackend) -> None:
    backend.behave(lambda received: Hang(60))
    with httpx.Client(timeout=0.3) as http, pytest.raises(httpx.ReadTimeout):
        post_key(http, backend, "k")
    backend.wait_idle(timeout=5)  # the handler noticed its client hanging up
    assert len(backend.requests) == 1


def test_hang_then_drop(backend: RecordingBackend, http: httpx.Client) -> None:
    backend.behave(lambda received: Hang(0.1, then=ApplyThenDrop()))
    with pytest.raises(httpx.ReadError):
        post_key(http, backend, "k")


# --- Drip ----------------------------------------------------------------------------


def test_drip_delivers_the_body_slowly(backend: RecordingBackend, http: httpx.Client) -> None:
    interval = 0.05
    backend.behave(lambda received: Drip(interval, length=14))
    # Timed from the request: the server waits an interval before each byte.
    start = time.monotonic()
    with http.stream("POST", backend.url, json={"key": "k"}) as response:
        assert response.status_code == 200
        assert response.headers["content-length"] == "14"
        body = b""
        chunks = response.iter_raw()
        while len(body) < 3:
            body += next(chunks)
        assert time.monotonic() - start >= 3 * interval
        body += b"".join(chunks)
    assert json.loads(body) == {"ok": True}  # padded with spaces to the length
    assert len(body) == 14


def test_drip_beats_a_per_read_timeout(backend: RecordingBackend) -> None:
    # Every byte comes well within the read timeout, so only a total deadline stops it.
    interval, length = 0.02, 20
    backend.behave(lambda received: Drip(interval, length=length))
    with httpx.Client(timeout=httpx.Timeout(CLIENT_TIMEOUT, read=10 * interval)) as http:
        start = time.monotonic()
        response = post_key(http, backend, "k")
    assert response.status_code == 200
    assert len(response.content) == length
    assert time.monotonic() - start >= length * interval


def test_drip_the_head_too(backend: RecordingBackend, http: httpx.Client) -> None:
    interval = 0.01
    backend.behave(lambda received: Drip(interval, length=12, status=201, head_too=True))
    start = time.monotonic()
    with http.stream("POST", backend.url, json={"key": "k"}) as response:
        # The status line and headers alone are more than 40 bytes.
        assert time.monotonic() - start >= 40 * interval
        assert response.status_code == 201
        assert response.read() == b'{"ok": true}'


def test_drip_stops_when_the_client_leaves(backend: RecordingBackend, http: httpx.Client) -> None:
    backend.behave(lambda received: Drip(0.05, length=10_000))
    with http.stream("POST", backend.url, json={"key": "k"}) as response:
        next(response.iter_raw())
    http.close()
    backend.wait_idle(timeout=5)


# --- HeadersThenNothing --------------------------------------------------------------


def test_headers_then_nothing_times_out_on_the_body(backend: RecordingBackend) -> None:
    backend.behave(lambda received: HeadersThenNothing(status=200, length=5000))
    timeout = httpx.Timeout(CLIENT_TIMEOUT, read=0.3)
    with (
        httpx.Client(timeout=timeout) as http,
        http.stream("POST", backend.url, json={"key": "k"}) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-length"] == "5000"
        with pytest.raises(httpx.ReadTimeout):
            response.read()
    backend.wait_idle(timeout=5)
    assert len(backend.requests) == 1


# --- Endless -------------------------------------------------------------------------


def test_endless_keeps_sending_past_a_megabyte_and_stops_on_disconnect(
    backend: RecordingBackend, http: httpx.Client
) -> None:
    backend.behave(lambda received: Endless())
    received = 0
    with http.stream("POST", backend.url, json={"key": "k"}) as response:
        assert response.status_code == 200
        assert response.headers["transfer-encoding"] == "chunked"
        assert "content-length" not in response.headers
        for chunk in response.iter_raw():
            received += len(chunk)
            if received > 4 * 1024 * 1024:
                break
    assert received > 4 * 1024 * 1024
    http.close()
    backend.wait_idle(timeout=5)


def test_endless_at_a_rate(backend: RecordingBackend, http: httpx.Client) -> None:
    interval = 0.05
    backend.behave(lambda received: Endless(chunk_size=100, interval=interval))
    # Timed from the request: the first chunk goes with the head, each further one
    # after an interval.
    start = time.monotonic()
    with http.stream("POST", backend.url, json={"key": "k"}) as response:
        received = 0
        for chunk in response.iter_raw():
            received += len(chunk)
            if received >= 300:
                break
        assert time.monotonic() - start >= 2 * interval


# --- Huge ----------------------------------------------------------------------------


def test_huge_announces_its_length_and_sends_it_all(
    backend: RecordingBackend, http: httpx.Client
) -> None:
    backend.behave(lambda received: Huge())
    with http.stream("POST", backend.url, json={"key": "k"}) as response:
        assert response.headers["content-length"] == "10000000"
        body = response.read()
    assert len(body) == 10_000_000
    assert json.loads(body) == {"ok": True}


def test_huge_client_reading_only_the_head(backend: RecordingBackend, http: httpx.Client) -> None:
    backend.behave(lambda received: Huge(length=50_000_000, status=500))
    with http.stream("POST", backend.url, json={"key": "k"}) as response:
        assert response.status_code == 500
        assert response.headers["content-length"] == "50000000"
    http.close()  # mid-body: the handler's blocked write must fail, not linger
    backend.wait_idle(timeout=5)


# --- ApplyThenDrop -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rst", "error", "match"),
    [
        (True, httpx.ReadError, "Connection reset by peer"),
        (False, httpx.RemoteProtocolError, "without sending a response"),
    ],
)
def test_apply_then_drop(
    backend: RecordingBackend, http: httpx.Client, rst: bool, error: type[Exception], match: str
) -> None:
    backend.behave(lambda received: ApplyThenDrop(rst=rst))
    with pytest.raises(error, match=match):
        post_key(http, backend, "k")
    [received] = backend.requests  # recorded: from the backend's side it was applied
    assert received.json == {"key": "k"}
    backend.wait_idle(timeout=5)


def test_apply_then_drop_raw_rst_and_fin(backend: RecordingBackend) -> None:
    backend.behave(by_key({"rst": ApplyThenDrop(rst=True), "fin": ApplyThenDrop(rst=False)}))
    with raw_post(backend.port, "rst") as sock, pytest.raises(ConnectionResetError):
        sock.recv(1024)
    with raw_post(backend.port, "fin") as sock:
        assert sock.recv(1024) == b""  # a clean EOF, no answer at all


# --- choosing per request ------------------------------------------------------------


def test_by_key_poisons_only_some_keys(backend: RecordingBackend, http: httpx.Client) -> None:
    backend.behave(
        by_key({"tenant-a:1": Respond(404), "tenant-b:1": Respond(429, {"retry-after": "2"})})
    )
    backend.respond_with(500)  # used by the first request the chooser leaves alone
    keys = ["tenant-a:1", "ok:1", "tenant-b:1", "ok:2"]
    statuses = [post_key(http, backend, key).status_code for key in keys]
    assert statuses == [404, 500, 429, 200]
    assert [r.key for r in backend.requests] == keys


def test_chooser_sees_each_request_and_none_falls_back(
    backend: RecordingBackend, http: httpx.Client
) -> None:
    seen: list[Received] = []

    def choose(received: Received) -> Behaviour | None:
        seen.append(received)
        return Respond(418) if received.headers.get("x-tenant") == "evil" else None

    backend.behave(choose)
    evil = http.post(backend.url, content=b"not json", headers={"x-tenant": "evil"})
    assert evil.status_code == 418
    assert http.post(backend.url, content=b"not json").status_code == 200
    assert [r.key for r in seen] == [None, None]
    backend.behave(None)
    assert http.post(backend.url, headers={"x-tenant": "evil"}).status_code == 200


def test_queued_behaviours_and_hang_next_compose(
    backend: RecordingBackend, http: httpx.Client
) -> None:
    backend.respond_with(Drip(0.01, length=12), ApplyThenDrop(), 201)
    backend.hang_next(1, 0.2)
    start = time.monotonic()
    assert post_key(http, backend, "a").content == b'{"ok": true}'
    assert time.monotonic() - start >= 0.2 + 12 * 0.01
    with pytest.raises(httpx.ReadError):
        post_key(http, backend, "b")
    assert post_key(http, backend, "c").status_code == 201


def test_chooser_errors_answer_500_and_fail_close(http: httpx.Client) -> None:
    backend = RecordingBackend()
    backend.start()
    try:
        backend.behave(lambda received: received.json["key"])  # TypeError on a non-JSON body
        assert http.post(backend.url, content=b"x").status_code == 500
    finally:
        with pytest.raises(RuntimeError, match="chooser raised") as info:
            backend.close()
    assert isinstance(info.value.__cause__, TypeError)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Respond(700), "status must be an HTTP status in 100..599, got 700"),
        (lambda: Hang(-1), "seconds must be a number of seconds >= 0, got -1"),
        (lambda: Drip(float("nan")), "interval must be a number of seconds >= 0, got nan"),
        (lambda: Endless(chunk_size=0), "'chunk_size' must be >= 1: 0"),
        (lambda: Huge(length=-5), "'length' must be >= 0: -5"),
    ],
)
def test_behaviours_validate_their_fields(make: Callable[[], Behaviour], message: str) -> None:
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(")):
        make()


# --- close() with everything going on ------------------------------------------------


def test_close_is_prompt_with_every_behaviour_active() -> None:
    behaviours: dict[str, Behaviour] = {
        "hang": Hang(600),
        "hang-forever": Hang(float("inf")),
        "drip": Drip(10, length=100),
        "drip-head": Drip(10, length=100, head_too=True),
        "headers-then-nothing": HeadersThenNothing(),
        "endless": Endless(),
        "endless-slow": Endless(interval=10),
        "huge": Huge(length=50_000_000),
    }
    before = set(threading.enumerate())
    backend = RecordingBackend()
    backend.start()
    socks: list[socket.socket] = []
    try:
        backend.behave(by_key(behaviours))
        # Small receive windows so the writers block as soon as nobody reads.
        socks = [raw_post(backend.port, key, rcvbuf=4096) for key in behaviours]
        idle = socket.create_connection(("127.0.0.1", backend.port), timeout=CLIENT_TIMEOUT)
        socks.append(idle)  # a connection that never sends a request
        backend.wait_for_count(len(behaviours), timeout=5)
        handlers = [t for t in set(threading.enumerate()) - before if t.is_alive()]
        assert len(handlers) >= len(behaviours)
    finally:
        backend.close()  # a close() that hangs is the watchdog's
        for sock in socks:
            sock.close()
    # Prompt means close() ends each behaviour rather than waiting it out: none of them
    # would end by itself for 10 s or more, and close() gives up on a handler after 5 s,
    # so a handler still alive is one close() could not end (no clock needed).
    assert [t.name for t in handlers if t.is_alive()] == []
