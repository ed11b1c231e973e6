"""Shared fixtures: a throwaway Redis, a recording HTTP backend, and a worker-process factory."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from tests.support.backend import RecordingBackend
from tests.support.procs import SpawnWorker, WorkerProcess
from tests.support.redis_server import RedisServer


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A started, empty redis-server on a free loopback port, stopped after the test."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def backend() -> Iterator[RecordingBackend]:
    """A started RecordingBackend; point the worker's reset URL at ``backend.url``."""
    with RecordingBackend() as recording:
        yield recording


@pytest.fixture
def spawn_worker(tmp_path: Path) -> Iterator[SpawnWorker]:
    """Factory ``spawn_worker(env, name, args=("run",))`` returning a started WorkerProcess.

    Logs go to ``tmp_path/<name>.log``. At teardown every still-running worker is
    SIGCONTed (a test may have SIGSTOPped it) and SIGKILLed, and all logs are
    printed so they appear in the report of a failing test.
    """
    workers: list[WorkerProcess] = []

    def spawn(env: Mapping[str, str], name: str, args: Sequence[str] = ("run",)) -> WorkerProcess:
        log_path = tmp_path / f"{name}.log"
        # Same name twice: keep both logs rather than interleaving them.
        n = 2
        while log_path.exists() or any(w.log_path == log_path for w in workers):
            log_path = tmp_path / f"{name}-{n}.log"
            n += 1
        worker = WorkerProcess(env, log_path, args=args)
        worker.start()
        workers.append(worker)
        return worker

    try:
        yield spawn
    finally:
        for worker in workers:
            worker.cleanup()
        for worker in workers:
            print(f"===== {worker!r} exit={worker.returncode} =====\n{worker.output()}")
