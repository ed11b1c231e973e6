"""A small HTTP endpoint for probes and scraping: /healthz, /readyz, /metrics.

Served with trio and h11 (HTTP/1.1 parsing). One request per connection, answered and
closed; a slow or broken client is dropped after a few seconds and never disturbs the
worker.
"""

from __future__ import annotations

import errno
import json
import logging
import socket
from functools import partial
from typing import Protocol

import h11
import trio

from .errors import ConfigError
from .metrics import Metrics

__all__ = ["Observed", "serve_health"]

log = logging.getLogger("trio_counter_worker.health")

_CLIENT_TIMEOUT = 5.0
_PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"


class Observed(Protocol):
    """What the endpoint reads of the worker (a :class:`~.worker.Worker`): its
    readiness and its metrics, nothing else."""

    @property
    def metrics(self) -> Metrics: ...

    def state(self) -> dict[str, object]:
        """Readiness as JSON: ``ready`` says whether /readyz answers 200."""
        ...


async def serve_health(
    worker: Observed,
    port: int,
    host: str = "0.0.0.0",  # noqa: S104 - probes reach the pod on its own address
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; report the bound port (useful with port 0) when listening.

    A port in use or a host that does not resolve or is not this machine's is a
    :class:`ConfigError` naming HEALTH_PORT or HEALTH_HOST, raised before ``started``.
    """
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except (OSError, UnicodeError) as exc:  # UnicodeError: idna, for a host name
        raise _listen_error(exc, port, host) from exc
    bound = listeners[0].socket.getsockname()[1]
    log.info("health endpoint on http://%s:%d (/healthz /readyz /metrics)", host, bound)
    task_status.started(bound)
    await trio.serve_listeners(partial(_handle, worker), listeners)


def _listen_error(exc: OSError | UnicodeError, port: int, host: str) -> ConfigError:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    reason = " ".join(reason.split())
    code = exc.errno if isinstance(exc, OSError) else None
    if isinstance(exc, (socket.gaierror, UnicodeError)):
        return ConfigError(
            f"HEALTH_HOST {host!r} does not resolve ({reason}): set it to an "
            "address of this machine, such as 0.0.0.0 (all) or 127.0.0.1"
        )
    if code == errno.EADDRINUSE:
        return ConfigError(
            f"HEALTH_PORT {port} is already in use on {host} ({reason}): "
            "choose another port, or unset HEALTH_PORT"
        )
    if code == errno.EACCES:
        return ConfigError(
            f"HEALTH_PORT {port} cannot be bound here ({reason}): choose a "
            "port above 1023, or unset HEALTH_PORT"
        )
    if code == errno.EADDRNOTAVAIL:
        return ConfigError(
            f"HEALTH_HOST {host!r} is not an address of this machine "
            f"({reason}): set it to one, such as 0.0.0.0 (all) or 127.0.0.1"
        )
    return ConfigError(f"HEALTH_HOST {host!r} / HEALTH_PORT {port}: cannot listen there ({reason})")


def respond(worker: Observed, method: str, target: str) -> tuple[int, bytes, str]:
    """Status, body and content type for one request: the routing, without I/O."""
    path = target.split("?", 1)[0]
    if method not in ("GET", "HEAD"):
        return 405, b"method not allowed\n", "text/plain"
    if path == "/healthz":
        return 200, b"ok\n", "text/plain"
    if path == "/readyz":
        state = worker.state()
        # Whether this leader has looked at every counter key since it took the lease:
        # before that, a key set while nobody led may not be watched yet.
        reconciled = worker.metrics.registry.get_sample_value("tcw_reconciled") == 1
        state["reconciled"] = state["role"] == "leader" and reconciled
        body = json.dumps(state).encode() + b"\n"
        return (200 if state["ready"] else 503), body, "application/json"
    if path == "/metrics":
        return 200, worker.metrics.render(), _PROMETHEUS
    return 404, b"not found: try /healthz, /readyz or /metrics\n", "text/plain"


async def _handle(worker: Observed, stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    try:
        with trio.move_on_after(_CLIENT_TIMEOUT):
            request = await _read_request(conn, stream)
            if request is None:
                return
            status, body, ctype = respond(worker, request.method.decode(), request.target.decode())
            headers = [
                ("content-type", ctype),
                ("content-length", str(len(body))),
                ("connection", "close"),
            ]
            await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
            if request.method != b"HEAD":
                await stream.send_all(conn.send(h11.Data(data=body)))
            await stream.send_all(conn.send(h11.EndOfMessage()))
    except (h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        log.debug("health request dropped: %s", exc)
    finally:
        await stream.aclose()


async def _read_request(conn: h11.Connection, stream: trio.SocketStream) -> h11.Request | None:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(16384)
            conn.receive_data(data)  # b"" means the client closed
            continue
        if isinstance(event, h11.Request):
            return event
        return None
