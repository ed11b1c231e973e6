"""What the couriers' shape costs: the reset POSTs of a burst sent by today's couriers
(one trio task per lane, a :class:`~trio_counter_worker.http_client.Lane` each, a
wait on each socket per request) against a prototype that drives every lane's socket
from one task through an epoll set of its own (trio waits on that set's fd once per
wake-up, however many answers it brings), with the same per-request work in both: the
body, the headers and the request bytes as the worker builds them, the answer's head
parsed as a Lane parses a plain one, :meth:`ResetSender._judge` and the metrics. Beside
them: the layers of today's path written out (tasks-raw), libcurl's multi interface
(curl; only where pycurl is installed, which the worker does not need) and the bare
floor of HTTP in Python (bare).

The prototype is a measurement, not a second HTTP client: it only handles what a
healthy backend sends (a plain answer, read whole, on a kept-alive connection) and
stops at anything else. §22.7 of docs/BENCHMARKS.md has the method and the results.

    .venv/bin/python -m bench.courier_shape [--requests 10000] [--lanes 32] [--rounds 3]

The backend is the RecordingBackend with the benchmarks' tuning, in this process; each
side runs in a child process of its own (its CPU is its ``getrusage``), sides
alternating per round.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import select
import socket
import statistics
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import trio

from trio_counter_worker.config import Config
from trio_counter_worker.delivery import (
    Limit,
    ResetSender,
    fixed_headers,
    open_lanes,
    request_body,
    reset_headers,
)
from trio_counter_worker.http_client import (
    _BLANK_LINE,
    READ_SIZE,
    Endpoint,
    _plain_head,
    _PlainHead,
)
from trio_counter_worker.metrics import Metrics
from trio_counter_worker.store import PendingReset

from .common import backend_running, log, write_result

_START: list[resource.struct_rusage] = []  # CPU as the first request goes


def _started() -> None:
    """Setup done (connections may still be made by the first requests): measure from here."""
    _START.append(resource.getrusage(resource.RUSAGE_SELF))


SHAPES = ("couriers", "one-task", "tasks-raw", "bare", "curl")


def _config(url: str, lanes: int) -> Config:
    return Config.from_env(
        {
            "RESET_ENDPOINT_URL": url,
            "RESET_SECRET": "bench-shape",
            "ALLOW_INSECURE_HTTP": "1",
            "MAX_IN_FLIGHT": str(lanes),
        },
        env_file=None,
    )


def _resets(n: int) -> deque[PendingReset]:
    now_ms = int(time.time() * 1000)
    return deque(PendingReset(f"{i:032x}", f"c:{i}", now_ms, 1) for i in range(n))


def _endpoint(config: Config) -> Endpoint:
    """The request head the worker's lanes send (:func:`~.delivery.open_lanes`)."""
    return Endpoint(config.reset_endpoint_url, fixed_headers(config.reset_secret))


def _connected(endpoint: Endpoint) -> socket.socket:
    """A non-blocking TCP connection to ``endpoint``, as trio opens one (TCP_NODELAY)."""
    sock = socket.create_connection((endpoint.host, endpoint.port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    return sock


async def _couriers(config: Config, n: int, lanes: int) -> int:
    """Today's shape: a task per lane, each request a Lane's post and finish."""
    resets = _resets(n)
    done = 0
    async with open_lanes(config) as transports:
        sender = ResetSender(config, transports, Metrics())
        _started()

        async def courier(lane: int) -> None:
            nonlocal done
            with trio.CancelScope() as scope:
                limit = Limit(scope, lambda _due: None)
                while resets:
                    attempt = await sender.attempt(resets.popleft(), 1, lane, limit)
                    done += attempt.done

        async with trio.open_nursery() as nursery:
            for lane in range(lanes):
                nursery.start_soon(courier, lane)
    return done


@contextmanager
def _epoll_lanes(
    endpoint: Endpoint, lanes: int
) -> Iterator[tuple[select.epoll, dict[int, socket.socket]]]:
    """``lanes`` connections to ``endpoint`` in one epoll set: the set, and fd -> socket."""
    with select.epoll() as epoll, ExitStack() as stack:
        socks: dict[int, socket.socket] = {}
        for _ in range(lanes):
            sock = stack.enter_context(_connected(endpoint))
            epoll.register(sock.fileno(), select.EPOLLIN)
            socks[sock.fileno()] = sock
        yield epoll, socks


def _whole(buf: bytes, last: _PlainHead | None) -> tuple[_PlainHead | None, bool]:
    """The head of the answer ``buf`` begins (``last`` if it is the same, parsed again
    if not; as a Lane does) and whether the answer is all there. Plain answers only."""
    end = _BLANK_LINE.search(buf)
    if end is None:
        return last, False
    head = buf[: end.end()]
    if last is None or last.head != head:
        last = _plain_head(head)
        if last is None:
            raise RuntimeError(f"not a plain answer: {head!r}")
    return last, len(buf) - end.end() >= last.length


def _judged(sender: ResetSender, reset: PendingReset, status: int) -> int:
    """What a courier does with an answer's status: judged and counted; 1 if done."""
    attempt = sender._judge(reset, status, lambda _name: None)
    sender._outcomes[attempt.verdict].inc()
    if attempt.done:
        sender._metrics.reset_latency.observe(max(0.0, attempt.latency))
    return int(attempt.done)


async def _one_task(config: Config, n: int, lanes: int) -> int:
    """The prototype: every lane's socket in one epoll set, driven from one task."""
    resets = _resets(n)
    sender = ResetSender(config, [], Metrics())
    endpoint = _endpoint(config)
    replica = config.replica_id
    in_air: dict[int, PendingReset] = {}  # fd -> the reset whose answer it waits for
    read: dict[int, bytes] = {}  # fd -> what came of that answer so far

    def fire(fd: int, sock: socket.socket) -> None:
        reset = in_air[fd] = resets.popleft()
        body = request_body(reset, replica_id=replica, fencing_token=1)
        headers = reset_headers(reset, body, fencing_token=1, signing_secret=None)
        sock.send(endpoint.request(headers, body))
        read[fd] = b""

    done = 0
    last = None
    with _epoll_lanes(endpoint, lanes) as (epoll, socks):
        _started()
        for fd, sock in socks.items():
            if resets:
                fire(fd, sock)
        while in_air:
            await trio.lowlevel.wait_readable(epoll)
            for fd, _ in epoll.poll(0):
                sock = socks[fd]
                read[fd] += sock.recv(READ_SIZE)
                last, whole = _whole(read[fd], last)
                if last is None or not whole:
                    continue
                done += _judged(sender, in_air.pop(fd), last.status)
                if resets:
                    fire(fd, sock)
    return done


async def _tasks_raw(config: Config, n: int, lanes: int) -> int:
    """A task per lane as today, but each request raw: send, trio's wait, recv, the same
    parse and judging as one-task (no Lane, no attempt layers)."""
    resets = _resets(n)
    sender = ResetSender(config, [], Metrics())
    endpoint = _endpoint(config)
    replica = config.replica_id
    done = 0

    async def courier() -> None:
        nonlocal done
        last = None
        with _connected(endpoint) as sock:
            while resets:
                reset = resets.popleft()
                body = request_body(reset, replica_id=replica, fencing_token=1)
                headers = reset_headers(reset, body, fencing_token=1, signing_secret=None)
                sock.send(endpoint.request(headers, body))
                buf = b""
                whole = False
                while last is None or not whole:
                    await trio.lowlevel.wait_readable(sock)
                    buf += sock.recv(READ_SIZE)
                    last, whole = _whole(buf, last)
                done += _judged(sender, reset, last.status)

    _started()
    async with trio.open_nursery() as nursery:
        for _ in range(lanes):
            nursery.start_soon(courier)
    return done


async def _bare(config: Config, n: int, lanes: int) -> int:
    """The floor: one task, one epoll set, the same request bytes every time (built once),
    and of each answer only its blank line and body length looked at: no request built,
    nothing judged or counted. What HTTP costs in Python on this host, and no less."""
    endpoint = _endpoint(config)
    reset = _resets(1)[0]
    body = request_body(reset, replica_id=config.replica_id, fencing_token=1)
    data = endpoint.request(reset_headers(reset, body, fencing_token=1, signing_secret=None), body)
    read: dict[int, bytes] = {}
    sent = done = 0
    length = -1
    with _epoll_lanes(endpoint, lanes) as (epoll, socks):
        _started()
        for fd, sock in socks.items():
            if sent < n:
                sock.send(data)
                read[fd] = b""
                sent += 1
        while done < sent:
            await trio.lowlevel.wait_readable(epoll)
            for fd, _ in epoll.poll(0):
                sock = socks[fd]
                buf = read[fd] = read[fd] + sock.recv(READ_SIZE)
                end = _BLANK_LINE.search(buf)
                if end is not None and length < 0:
                    plain = _plain_head(buf[: end.end()])
                    assert plain is not None
                    length = plain.length
                if end is None or len(buf) - end.end() < length:
                    continue
                read[fd] = b""
                done += 1
                if sent < n:
                    sock.send(data)
                    sent += 1
    return done


def _curl_loop(config: Config, n: int, lanes: int) -> int:
    """libcurl's multi interface (pycurl) in a thread of its own: the same requests,
    bodies and headers, and the same judging and metrics per answer; curl does the HTTP
    (its connection cache keeps ``lanes`` connections alive), Python only what a reset
    needs around it."""
    import pycurl  # type: ignore[import-untyped, import-not-found, unused-ignore]  # not the worker's: for this probe only

    resets = _resets(n)
    sender = ResetSender(config, [], Metrics())
    fixed = [f"{k}: {v}" for k, v in fixed_headers(config.reset_secret)] + ["Expect:"]
    multi = pycurl.CurlMulti()
    multi.setopt(pycurl.M_MAX_HOST_CONNECTIONS, lanes)
    handles = [pycurl.Curl() for _ in range(lanes)]
    for handle in handles:
        handle.setopt(pycurl.URL, config.reset_endpoint_url)
        handle.setopt(pycurl.POST, 1)
        handle.setopt(pycurl.WRITEFUNCTION, len)  # the body, read and dropped
        handle.setopt(pycurl.NOSIGNAL, 1)
        handle.setopt(pycurl.TCP_NODELAY, 1)
        handle.setopt(pycurl.TIMEOUT_MS, round(config.reset_timeout * 1000))
    in_air: dict[Any, PendingReset] = {}
    replica = config.replica_id

    def fire(handle: Any) -> None:
        reset = in_air[handle] = resets.popleft()
        body = request_body(reset, replica_id=replica, fencing_token=1)
        sent = reset_headers(reset, body, fencing_token=1, signing_secret=None)
        handle.setopt(pycurl.HTTPHEADER, fixed + [f"{k.decode()}: {v.decode()}" for k, v in sent])
        handle.setopt(pycurl.POSTFIELDS, body)
        multi.add_handle(handle)

    done = 0
    _started()
    for handle in handles:
        if resets:
            fire(handle)
    while in_air:
        multi.select(1.0)
        while multi.perform()[0] == pycurl.E_CALL_MULTI_PERFORM:
            pass
        _, ended, failed = multi.info_read()
        if failed:
            raise RuntimeError(f"curl: {failed[0][1:]}")
        for handle in ended:
            multi.remove_handle(handle)
            status = handle.getinfo(pycurl.RESPONSE_CODE)
            done += _judged(sender, in_air.pop(handle), status)
            if resets:
                fire(handle)
    return done


async def _curl(config: Config, n: int, lanes: int) -> int:
    return await trio.to_thread.run_sync(_curl_loop, config, n, lanes)


def available() -> tuple[str, ...]:
    """The shapes this environment can run: curl only where pycurl is installed."""
    return tuple(s for s in SHAPES if s != "curl" or importlib.util.find_spec("pycurl"))


def _child(shape: str, url: str, n: int, lanes: int) -> None:
    config = _config(url, lanes)
    run = {"couriers": _couriers, "one-task": _one_task, "tasks-raw": _tasks_raw}.get(shape)
    run = run or {"bare": _bare, "curl": _curl}[shape]
    trio.run(run, config, lanes * 10, lanes)  # warm: lazy imports, compiled patterns
    _START.clear()
    t0 = time.perf_counter()
    done = trio.run(run, config, n, lanes)
    wall = time.perf_counter() - t0
    r0 = _START[0]
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    user, system = r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime
    print(
        json.dumps(
            {
                "shape": shape,
                "done": done,
                "per_s": round(done / wall),
                "cpu_ms_per_request": round((user + system) * 1000 / n, 4),
                "sys_ms_per_request": round(system * 1000 / n, 4),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--lanes", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", choices=SHAPES, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.url, args.requests, args.lanes)
        return
    shapes = available()
    runs: dict[str, list[dict[str, Any]]] = {shape: [] for shape in shapes}
    with backend_running() as backend:
        for i in range(args.rounds):
            for shape in shapes if i % 2 == 0 else shapes[::-1]:
                child = ["--child", shape, "--url", backend.url, "--lanes", str(args.lanes)]
                child += ["--requests", str(args.requests)]
                out = subprocess.run(
                    [sys.executable, "-m", "bench.courier_shape", *child],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                result = json.loads(out)
                runs[shape].append(result)
                log(f"  round {i + 1} {shape}: {result}")
    cpu = {s: statistics.median(r["cpu_ms_per_request"] for r in runs[s]) for s in shapes}
    for shape in shapes:
        each = " / ".join(f"{r['cpu_ms_per_request']:.3f}" for r in runs[shape])
        ratio = cpu[shape] / cpu["couriers"]
        log(f"{shape}: CPU per request {cpu[shape]:.4f} ms ({each}), x{ratio:.2f} of couriers")
    write_result(
        "courier_shape",
        {
            "requests": args.requests,
            "lanes": args.lanes,
            "cpu_ms_per_request": cpu,
            "runs": runs,
        },
    )


if __name__ == "__main__":
    main()
