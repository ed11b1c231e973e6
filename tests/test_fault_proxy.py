"""FaultProxy against a real redis-server (and the recording backend): each mode, seen by
real clients.

Policy: loopback only, port 0; every blocking call has its own timeout and every test
runs under a watchdog (the trio one under ``fail_after`` too). Timing is asserted as a
lower bound only: a delayed byte cannot arrive early, but a busy machine may make it
late. Where there is no event to await (a server-side connection going away), the test
polls the observable state with a deadline.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
import trio
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.support.backend import RecordingBackend
from tests.support.polling import wait_until
from tests.support.proxy import FaultProxy
from tests.support.redis_server import RedisServer, free_port
from tests.support.watchdog import watchdog

TEST_TIMEOUT = 60.0
IO_TIMEOUT = 5.0


@pytest.fixture(autouse=True)
def bounded() -> Iterator[None]:
    """Bound every test: dump all threads' stacks and exit if one hangs."""
    with watchdog(TEST_TIMEOUT):
        yield


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[FaultProxy]:
    with FaultProxy(redis_server.host, redis_server.port) as started:
        yield started


def via(proxy: FaultProxy, socket_timeout: float = IO_TIMEOUT, **kwargs: Any) -> redis.Redis:
    """A redis client through the proxy that never retries (a fault must show at once)."""
    return redis.Redis(
        host=proxy.host,
        port=proxy.port,
        socket_timeout=socket_timeout,
        socket_connect_timeout=IO_TIMEOUT,
        retry=Retry(NoBackoff(), 0),
        decode_responses=True,
        **kwargs,
    )


def raw(proxy: FaultProxy, timeout: float = IO_TIMEOUT) -> socket.socket:
    return socket.create_connection((proxy.host, proxy.port), timeout=timeout)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise AssertionError(f"EOF after {data!r}, expected {n} bytes")
        data += chunk
    return data


def client_count(server: RedisServer) -> int:
    with server.client() as direct:
        return len(direct.client_list())


# --- forward ---------------------------------------------------------------------------


def test_forward_passes_commands(proxy: FaultProxy) -> None:
    assert proxy.host == "127.0.0.1"
    assert proxy.mode == "forward"
    with via(proxy) as client:
        assert client.ping()
        assert client.set("k", "v")
        assert client.get("k") == "v"
    assert proxy.connections == 1
    assert proxy.bytes_up > 0
    assert proxy.bytes_down > 0
    assert proxy.bytes_dropped == 0


def test_forward_passes_pubsub_messages(proxy: FaultProxy, redis_server: RedisServer) -> None:
    with via(proxy) as subscriber, redis_server.client() as publisher:
        pubsub = subscriber.pubsub()
        try:
            pubsub.subscribe("ch")
            assert pubsub.get_message(timeout=IO_TIMEOUT)["type"] == "subscribe"
            for i in range(100):
                publisher.publish("ch", f"m{i}")
            got = [pubsub.get_message(timeout=IO_TIMEOUT) for _ in range(100)]
        finally:
            pubsub.close()
    assert [m["data"] for m in got if m is not None] == [f"m{i}" for i in range(100)]


def test_half_close_passes_on_after_the_answer(
    proxy: FaultProxy, redis_server: RedisServer
) -> None:
    with raw(proxy) as sock:
        sock.sendall(b"PING\r\n")
        sock.shutdown(socket.SHUT_WR)  # our FIN reaches Redis after the PING
        assert recv_exactly(sock, 7) == b"+PONG\r\n"
        assert sock.recv(1) == b""  # Redis closed in turn, and its FIN came through
    wait_until(
        lambda: proxy.active == 0,
        "the proxy forgets a connection closed both ways",
        IO_TIMEOUT,
        interval=0.01,
    )


def test_hundreds_of_connections(proxy: FaultProxy) -> None:
    socks = [raw(proxy) for _ in range(300)]
    try:
        for sock in socks:
            sock.sendall(b"PING\r\n")
        for sock in socks:
            assert recv_exactly(sock, 7) == b"+PONG\r\n"
        assert proxy.active == 300
    finally:
        for sock in socks:
            sock.close()
    assert proxy.connections == 300


def test_pubsub_stream_megabytes_with_mode_switches_from_another_thread(
    proxy: FaultProxy, redis_server: RedisServer
) -> None:
    n, payload = 20_000, "x" * 1000  # ~20 MB
    got: list[str] = []
    subscribed = threading.Event()
    errors: list[BaseException] = []

    def subscribe() -> None:
        try:
            with via(proxy) as subscriber:
                pubsub = subscriber.pubsub()
                try:
                    pubsub.subscribe("stream")
                    pubsub.get_message(timeout=IO_TIMEOUT)
                    subscribed.set()
                    while len(got) < n:
                        message = pubsub.get_message(timeout=IO_TIMEOUT)
                        if message is None:
                            raise AssertionError(f"stream stalled after {len(got)} messages")
                        got.append(message["data"])
                finally:
                    pubsub.close()
        except BaseException as exc:
            errors.append(exc)
            subscribed.set()

    thread = threading.Thread(target=subscribe, name="test-subscriber")
    thread.start()
    try:
        assert subscribed.wait(IO_TIMEOUT)
        with redis_server.client() as publisher:
            for i in range(n):
                if i % 2000 == 0:  # switch modes mid-stream, from this (non-proxy) thread
                    proxy.forward() if i % 4000 else proxy.delay(0.01)
                publisher.publish("stream", f"{i}:{payload}")
    finally:
        thread.join(TEST_TIMEOUT / 2)
    assert not thread.is_alive()
    assert errors == []
    assert [int(m.split(":", 1)[0]) for m in got] == list(range(n))  # all, in order
    assert proxy.bytes_down > n * len(payload)


def test_proxy_is_protocol_agnostic_http(backend: RecordingBackend) -> None:
    with FaultProxy("127.0.0.1", backend.port) as proxy:
        url = f"http://{proxy.host}:{proxy.port}/reset"
        with httpx.Client(timeout=0.5) as http:
            assert http.post(url, json={"key": "k"}).status_code == 200
        proxy.blackhole()
        with httpx.Client(timeout=0.5) as http, pytest.raises(httpx.ReadTimeout):
            http.post(url, json={"key": "lost"})
    assert [r.key for r in backend.requests] == ["k"]  # the second never got through


# --- delay -----------------------------------------------------------------------------


def test_delay_adds_the_round_trip(proxy: FaultProxy) -> None:
    with via(proxy) as client:
        assert client.ping()  # connected before timing
        proxy.delay(0.05)
        assert proxy.mode == "delay"
        assert proxy.delay_seconds == 0.05
        for _ in range(3):
            start = time.monotonic()
            assert client.ping()
            assert time.monotonic() - start >= 0.1  # 0.05 each way


def test_delay_is_per_direction(proxy: FaultProxy, redis_server: RedisServer) -> None:
    with via(proxy) as subscriber, redis_server.client() as publisher:
        pubsub = subscriber.pubsub()
        try:
            pubsub.subscribe("ch")
            assert pubsub.get_message(timeout=IO_TIMEOUT)["type"] == "subscribe"
            proxy.delay(0.1)
            start = time.monotonic()
            publisher.publish("ch", "hello")  # only the way down crosses the proxy
            message = pubsub.get_message(timeout=IO_TIMEOUT)
            assert time.monotonic() - start >= 0.1
        finally:
            pubsub.close()
    assert message is not None
    assert message["data"] == "hello"


def test_delay_keeps_order_across_a_switch_to_forward(proxy: FaultProxy) -> None:
    with raw(proxy) as sock:
        proxy.delay(0.3)
        sock.sendall(b"SET k slow\r\n")
        proxy.forward()  # the SET is still in flight; the GET must not overtake it
        sock.sendall(b"GET k\r\n")
        assert recv_exactly(sock, 15) == b"+OK\r\n$4\r\nslow\r\n"


def test_delay_pipeline_order(proxy: FaultProxy) -> None:
    proxy.delay(0.02)
    with via(proxy) as client:
        pipe = client.pipeline(transaction=False)
        for _ in range(1000):
            pipe.incr("n")
        assert pipe.execute() == list(range(1, 1001))


def test_delay_rejects_nonsense() -> None:
    proxy = FaultProxy("127.0.0.1", 1)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="delay seconds must be a finite number >= 0"):
            proxy.delay(bad)


# --- blackhole -------------------------------------------------------------------------


def test_blackhole_times_out_with_the_connection_kept_open(
    proxy: FaultProxy, redis_server: RedisServer
) -> None:
    with via(proxy, socket_timeout=0.5) as client, raw(proxy, timeout=0.5) as sock:
        assert client.ping()
        sock.sendall(b"PING\r\n")
        assert recv_exactly(sock, 7) == b"+PONG\r\n"
        clients_before = client_count(redis_server)

        proxy.blackhole()
        with pytest.raises(redis.exceptions.TimeoutError):
            client.ping()
        sock.sendall(b"PING\r\n")
        with pytest.raises(TimeoutError):  # silence: neither an answer, nor EOF, nor RST
            sock.recv(1)

        # Half-open, not closed: both legs are still up (redis-py dropped its own
        # connection after the timeout, and the proxy kept that FIN from Redis).
        assert proxy.active == 2
        assert client_count(redis_server) == clients_before
        assert proxy.bytes_dropped >= len(b"PING\r\n")

        # New connections are accepted, and see the same silence.
        with raw(proxy, timeout=0.3) as late:
            late.sendall(b"PING\r\n")
            with pytest.raises(TimeoutError):
                late.recv(1)
        assert proxy.connections == 3


def test_blackhole_drops_delayed_bytes_in_flight(proxy: FaultProxy) -> None:
    with raw(proxy, timeout=0.5) as sock:
        proxy.delay(0.3)
        sock.sendall(b"PING\r\n")
        proxy.blackhole()  # before the PING was due: it is lost
        proxy.forward()
        with pytest.raises(TimeoutError):
            sock.recv(1)
    assert proxy.bytes_dropped == len(b"PING\r\n")


def test_forward_after_blackhole_recovers_for_new_connections(
    proxy: FaultProxy, redis_server: RedisServer
) -> None:
    proxy.blackhole()
    with via(proxy, socket_timeout=0.3) as client, pytest.raises(redis.exceptions.TimeoutError):
        client.ping()
    clients_during = client_count(redis_server)
    proxy.forward()
    with via(proxy) as client:
        assert client.ping()
        assert client.set("k", "v")
    # The FIN held back while blackholed now reaches Redis.
    wait_until(
        lambda: client_count(redis_server) < clients_during,
        "Redis sees the held FIN",
        IO_TIMEOUT,
        interval=0.01,
    )


# --- reset / drop_connections ----------------------------------------------------------


def test_reset_gives_connection_errors_at_once(proxy: FaultProxy) -> None:
    with via(proxy) as client:
        assert client.ping()
        proxy.reset()
        assert proxy.active == 0
        with pytest.raises(redis.ConnectionError) as existing:
            client.ping()
        with via(proxy) as fresh, pytest.raises(redis.ConnectionError) as new:
            fresh.ping()
    # Errors, not timeouts: the RST is an answer, it doesn't leave the client waiting.
    assert not isinstance(existing.value, redis.exceptions.TimeoutError)
    assert not isinstance(new.value, redis.exceptions.TimeoutError)
    assert proxy.connections >= 2  # redis-py may reconnect once when it sees the dead socket

    proxy.forward()
    with via(proxy) as client:
        assert client.ping()


def test_reset_is_an_rst_for_raw_sockets(proxy: FaultProxy) -> None:
    with raw(proxy) as sock:
        sock.sendall(b"PING\r\n")
        assert recv_exactly(sock, 7) == b"+PONG\r\n"
        proxy.reset()
        with pytest.raises(ConnectionResetError):
            sock.recv(1)
    assert_reset_on_connect(proxy)


def assert_reset_on_connect(proxy: FaultProxy) -> None:
    """A new connection is accepted, then reset at once (the RST may beat connect()'s return)."""
    with pytest.raises(ConnectionResetError), raw(proxy) as sock:
        sock.recv(1)


def test_drop_connections_once_then_forward(proxy: FaultProxy) -> None:
    with raw(proxy) as old, via(proxy) as client:
        assert client.ping()
        proxy.drop_connections()
        assert proxy.mode == "forward"
        assert proxy.active == 0
        with pytest.raises(ConnectionResetError):
            old.recv(1)
        assert client.ping()  # redis-py reconnects: new connections are forwarded
    assert proxy.connections == 3


def test_target_down_resets_the_client() -> None:
    with FaultProxy("127.0.0.1", free_port()) as proxy:
        assert_reset_on_connect(proxy)
        assert proxy.active == 0
        assert proxy.connections == 1


# --- lifecycle -------------------------------------------------------------------------


def test_close_ends_everything_promptly(redis_server: RedisServer) -> None:
    proxy = FaultProxy(redis_server.host, redis_server.port)
    proxy.delay(0.5)  # set before start: applies from the first connection
    proxy.start()
    socks = [raw(proxy) for _ in range(5)]
    try:
        for sock in socks:
            sock.sendall(b"PING\r\n")  # in flight in the delay queue at close
        assert proxy.mode == "delay"
        proxy.blackhole()
        proxy.delay(0.5)
        proxy.close()
        assert not [t for t in threading.enumerate() if t.name == "fault-proxy"]
        with pytest.raises(RuntimeError, match="proxy not started"):
            _ = proxy.port
        for sock in socks:
            with pytest.raises(ConnectionResetError):
                sock.recv(1)
        proxy.close()  # idempotent
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.trio
async def test_works_under_trio(proxy: FaultProxy) -> None:
    with trio.fail_after(TEST_TIMEOUT / 2):
        stream = await trio.open_tcp_stream(proxy.host, proxy.port)
        async with stream:
            await stream.send_all(b"PING\r\n")
            assert await stream.receive_some(7) == b"+PONG\r\n"

            proxy.delay(0.05)
            start = trio.current_time()
            await stream.send_all(b"PING\r\n")
            assert await stream.receive_some(7) == b"+PONG\r\n"
            assert trio.current_time() - start >= 0.1

            proxy.blackhole()
            await stream.send_all(b"PING\r\n")
            with trio.move_on_after(0.3) as silence:
                await stream.receive_some(7)
            assert silence.cancelled_caught

            proxy.reset()
            with pytest.raises(trio.BrokenResourceError):
                await stream.receive_some(7)
