"""Self-tests for tests/support: the fixtures must be trustworthy before the real tests use them."""

from __future__ import annotations

import signal
import socket
import textwrap
import time
import types
from pathlib import Path

import httpx
import pytest
import redis
import trio
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.support import cluster as cluster_support
from tests.support.backend import RecordingBackend
from tests.support.cluster import ClusterSetup
from tests.support.procs import WorkerProcess, run_cli
from tests.support.redis_server import RedisServer
from trio_counter_worker.lab.errors import LabError

# --- redis_server ------------------------------------------------------------


def test_redis_server_starts_and_answers(redis_server: RedisServer) -> None:
    assert redis_server.host == "127.0.0.1"
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert redis_server.pid is not None
    with redis_server.client() as client:
        assert client.ping()
        client.set("k", "v")
        assert client.get("k") == "v"  # decode_responses=True by default


def test_redis_server_kill_then_restart_same_port_empty(redis_server: RedisServer) -> None:
    port = redis_server.port
    with redis_server.client() as client:
        client.set("k", "v")

    redis_server.kill()
    assert redis_server.pid is None
    # No retries: the default backoff would turn this into a multi-second wait.
    no_retry = Retry(NoBackoff(), 0)
    with (
        redis_server.client(retry=no_retry, socket_connect_timeout=1) as client,
        pytest.raises(redis.ConnectionError),
    ):
        client.ping()

    redis_server.restart()
    assert redis_server.port == port
    with redis_server.client() as client:
        assert client.ping()
        assert client.dbsize() == 0  # persistence is off: a restart loses everything


# --- backend -------------------------------------------------------------------


def test_backend_records_post(backend: RecordingBackend) -> None:
    before = time.time()
    with httpx.Client() as http:
        response = http.post(backend.url, json={"count": 3}, headers={"X-Replica": "r1"})
    assert response.status_code == 200
    assert response.json() == {"ok": True}

    [received] = backend.wait_for_count(1, timeout=5)
    assert received.method == "POST"
    assert received.path == "/reset"
    assert received.headers["x-replica"] == "r1"
    assert received.headers["content-type"] == "application/json"
    assert received.json == {"count": 3}
    assert before <= received.received_at <= time.time()


def test_backend_queued_statuses_then_200(backend: RecordingBackend) -> None:
    backend.respond_with(500, (429, {"retry-after": "1"}), 404)
    with httpx.Client() as http:
        responses = [http.post(backend.url, content=b"x") for _ in range(4)]
    assert [r.status_code for r in responses] == [500, 429, 404, 200]
    assert responses[1].headers["retry-after"] == "1"
    assert len(backend.requests) == 4
    assert backend.requests[0].json is None  # body is not JSON


def test_backend_wait_for_times_out(backend: RecordingBackend) -> None:
    with pytest.raises(AssertionError, match=r"0 request\(s\) so far"):
        backend.wait_for_count(1, timeout=0.2)


def test_backend_hang_next_causes_client_timeout(backend: RecordingBackend) -> None:
    # Hang far longer than the test: close() at teardown must cut it short.
    backend.hang_next(1, 60)
    with httpx.Client(timeout=0.3) as http:
        with pytest.raises(httpx.ReadTimeout):
            http.post(backend.url, content=b"first")
        assert http.post(backend.url, content=b"second").status_code == 200
    assert [r.body for r in backend.requests] == [b"first", b"second"]


@pytest.mark.trio
async def test_backend_wait_for_async(backend: RecordingBackend) -> None:
    async with httpx.AsyncClient() as http, trio.open_nursery() as nursery:
        nursery.start_soon(http.post, backend.url)
        requests = await backend.wait_for_count_async(1, timeout=5)
    assert requests[0].method == "POST"


# --- procs ---------------------------------------------------------------------

FAKE_MODULE = "support_selftest_fake_worker"
FAKE_SOURCE = textwrap.dedent(
    """
    import os, signal, sys

    print("REDIS_URL=" + os.environ.get("REDIS_URL", "<unset>"))
    print("LEASE_TTL=" + os.environ.get("LEASE_TTL", "<unset>"))
    print("dotenv=" + str(os.path.exists(".env")))
    if sys.argv[1:] == ["run"]:
        def on_term(signum, frame):
            print("got SIGTERM")
            sys.exit(3)
        signal.signal(signal.SIGTERM, on_term)
        print("ready")
        while True:
            signal.pause()
    """
)


@pytest.fixture
def fake_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A stand-in for the worker module, and a host env that must not leak into it."""
    fake_dir = tmp_path / "fake"
    fake_dir.mkdir()
    (fake_dir / f"{FAKE_MODULE}.py").write_text(FAKE_SOURCE)
    monkeypatch.setenv("REDIS_URL", "redis://leaked-from-host")
    return {"PYTHONPATH": str(fake_dir), "LEASE_TTL": "5"}


def test_run_cli_strips_host_config(fake_env: dict[str, str]) -> None:
    result = run_cli(["check"], fake_env, timeout=30, module=FAKE_MODULE)
    assert result.returncode == 0, result.stderr
    assert "REDIS_URL=<unset>" in result.stdout
    assert "LEASE_TTL=5" in result.stdout
    assert "dotenv=False" in result.stdout


def test_worker_process_terminate(fake_env: dict[str, str], tmp_path: Path) -> None:
    worker = WorkerProcess(fake_env, tmp_path / "w.log", module=FAKE_MODULE)
    worker.start()
    try:
        output = worker.wait_for_output("ready", timeout=10)
        assert "REDIS_URL=<unset>" in output
        worker.terminate()
        assert worker.wait(10) == 3
        assert "got SIGTERM" in worker.output()
        assert not worker.alive
    finally:
        worker.cleanup()


def test_worker_process_cleanup_kills_stopped(fake_env: dict[str, str], tmp_path: Path) -> None:
    worker = WorkerProcess(fake_env, tmp_path / "w.log", module=FAKE_MODULE)
    worker.start()
    worker.wait_for_output("ready", timeout=10)
    worker.signal(signal.SIGSTOP)
    worker.cleanup()  # what spawn_worker's teardown does
    assert worker.returncode == -signal.SIGKILL


def test_wait_for_output_fails_fast_on_exit(fake_env: dict[str, str], tmp_path: Path) -> None:
    worker = WorkerProcess(fake_env, tmp_path / "w.log", args=("once",), module=FAKE_MODULE)
    worker.start()
    try:
        with pytest.raises(AssertionError, match="exited"):
            worker.wait_for_output("never printed", timeout=30)
    finally:
        worker.cleanup()


# --- exports -------------------------------------------------------------------


def test_support_exports_exactly_all() -> None:
    import tests.support as support

    public = {
        name
        for name, value in vars(support).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public == set(support.__all__)


# --- cluster -----------------------------------------------------------------


def test_a_cluster_node_whose_port_was_taken_starts_on_another(tmp_path: Path) -> None:
    """Ports are picked before the nodes start; one taken meanwhile (by any process on
    the machine) must not fail the setup, nor leave the nodes started so far running."""
    setup = ClusterSetup(tmp_path / "cluster")
    taken = setup.nodes[2].port
    with socket.socket() as squatter:
        # A connection of an earlier test may hold the port in TIME_WAIT: bind anyway.
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        setup.start()
    try:
        assert setup.nodes[2].port != taken
        setup.wait_ok()
    finally:
        setup.stop()
    assert not any(n.running for n in setup.nodes)


def test_a_cluster_that_cannot_start_stops_the_nodes_it_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup = ClusterSetup(tmp_path / "cluster")
    last = setup.nodes[-1]

    def refuse() -> None:
        raise LabError("no")

    monkeypatch.setattr(cluster_support, "_START_ATTEMPTS", 1)
    monkeypatch.setattr(last, "start", refuse)
    with pytest.raises(LabError):
        setup.start()
    assert not any(n.running for n in setup.nodes)
