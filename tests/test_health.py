"""The health endpoint over real HTTP on loopback: probes and Prometheus metrics.

The worker runs in-process on the trio-native fake store (real clock) with an in-memory
backend behind its lanes; the health endpoint itself is served on a real loopback port.
The routing (`respond`) is also tested alone, on a stand-in for what it reads.
"""

from __future__ import annotations

import httpx
import trio

from tests.fakes import FakeLease, FakeStore
from tests.support.memory_http import memory_backend
from trio_counter_worker import Config, Hooks, open_worker
from trio_counter_worker.delivery import open_lanes
from trio_counter_worker.health import respond
from trio_counter_worker.metrics import Metrics


def config() -> Config:
    return Config(
        reset_endpoint_url="https://backend.test/reset",
        reset_secret="health-secret-123",
        counter_key="c:*",
        replica_id="h1",
        lease_ttl_ms=1000,
        health_port=0,
        health_host="127.0.0.1",
    )


async def test_probes_and_metrics() -> None:
    store = FakeStore("c:*")
    elected = trio.Event()
    reset_done = trio.Event()
    hooks = Hooks(on_elected=lambda _e: elected.set(), on_reset=lambda _r, _a: reset_done.set())
    with trio.fail_after(10):
        async with (
            open_lanes(config(), connect=memory_backend(lambda r: httpx.Response(200))) as lanes,
            open_worker(config(), store=store, http_client=lanes, hooks=hooks) as worker,
            trio.open_nursery() as nursery,
        ):
            await nursery.start(worker.run)
            await elected.wait()
            store.set_key("c:1", 0.05)
            await reset_done.wait()
            base = f"http://127.0.0.1:{worker.health_port}"
            async with httpx.AsyncClient(base_url=base) as http:
                assert (await http.get("/healthz")).status_code == 200
                ready = await http.get("/readyz")
                assert ready.status_code == 200
                assert ready.json() == {
                    "ready": True,
                    "role": "leader",
                    "replica_id": "h1",
                    "fencing_token": 1,
                    "reconciled": True,
                }
                metrics = await http.get("/metrics")
                assert metrics.headers["content-type"].startswith("text/plain")
                text = metrics.text
                assert "tcw_leader 1.0" in text
                assert "tcw_fencing_token 1.0" in text
                assert "tcw_leader_changes_total 1.0" in text
                assert 'tcw_reset_attempts_total{outcome="delivered"} 1.0' in text
                assert "tcw_reset_latency_seconds_count 1.0" in text
                assert "tcw_lease_renewal_seconds_bucket" in text
                assert "health-secret-123" not in text
                assert (await http.get("/nope")).status_code == 404
                assert (await http.post("/healthz")).status_code == 405

                # Deposed: still ready, as a healthy standby.
                until_ms = round(trio.current_time() * 1000) + 60_000
                store.lease = FakeLease("other#1", "other", 9, until_ms)
                with trio.fail_after(5):
                    while worker.is_leader:
                        await trio.sleep(0.01)
                ready = await http.get("/readyz")
                assert ready.json()["role"] == "standby"
                assert ready.json()["reconciled"] is False
                assert ready.status_code == 200
                deposed = (await http.get("/metrics")).text
                assert "tcw_leader 0.0" in deposed
                assert "tcw_reconciled 0.0" in deposed  # what it reconciled is the leader's now

                # Redis gone for longer than 3 lease periods: not ready.
                store.down = True
                with trio.fail_after(10):
                    while (await http.get("/readyz")).status_code == 200:
                        await trio.sleep(0.05)
                assert (await http.get("/healthz")).status_code == 200  # but alive
            nursery.cancel_scope.cancel()


async def test_a_broken_client_does_not_disturb_the_worker() -> None:
    store = FakeStore("c:*")
    with trio.fail_after(10):
        async with (
            open_lanes(config(), connect=memory_backend(lambda r: httpx.Response(200))) as lanes,
            open_worker(config(), store=store, http_client=lanes) as worker,
            trio.open_nursery() as n,
        ):
            await n.start(worker.run)
            assert worker.health_port is not None
            stream = await trio.open_tcp_stream("127.0.0.1", worker.health_port)
            await stream.send_all(b"this is not http\r\n\r\n")
            await stream.receive_some(100)  # answered or dropped: the worker goes on
            await stream.aclose()
            async with httpx.AsyncClient() as http:
                ok = await http.get(f"http://127.0.0.1:{worker.health_port}/healthz")
                assert ok.status_code == 200
            n.cancel_scope.cancel()


class Observed:
    """What the endpoint reads of a worker (health.Observed), and nothing more."""

    def __init__(self, ready: bool) -> None:
        self.metrics = Metrics()
        self.ready = ready

    def state(self) -> dict[str, object]:
        return {"ready": self.ready, "role": "standby"}


def test_readiness_is_the_state_the_worker_reports() -> None:
    assert respond(Observed(True), "GET", "/readyz") == (
        200,
        b'{"ready": true, "role": "standby", "reconciled": false}\n',
        "application/json",
    )
    assert respond(Observed(False), "HEAD", "/readyz?verbose=1")[0] == 503
    status, body, ctype = respond(Observed(True), "GET", "/metrics")
    assert (status, ctype.split(";")[0]) == (200, "text/plain")
    assert b"tcw_leader 0.0" in body
    assert respond(Observed(True), "POST", "/healthz")[0] == 405
    assert respond(Observed(True), "GET", "/nope")[0] == 404
