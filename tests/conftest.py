"""Shared fixtures: a throwaway Redis, a recording HTTP backend, and a worker-process factory."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.support.backend import RecordingBackend
from tests.support.procs import SpawnWorker, WorkerProcess
from tests.support.redis_server import RedisServer, debug_args, find_redis_server


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests marked slow first (they mostly wait: the rest runs beside them, and no
    long one is left for the end). ``@pytest.mark.fail_after(seconds)`` (or a module's
    ``pytestmark``): a trio test that runs longer fails with TooSlowError instead of
    hanging. Under the autojump clock a hang reaches the deadline at once."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    for item in items:
        marker = item.get_closest_marker("fail_after")
        if (
            marker is not None
            and isinstance(item, pytest.Function)
            and inspect.iscoroutinefunction(item.obj)
        ):
            item.obj = _failing_after(float(marker.args[0]), item.obj)


def _failing_after(
    seconds: float, test: Callable[..., Awaitable[Any]]
) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(test)
    async def bounded(*args: Any, **kwargs: Any) -> Any:
        with trio.fail_after(seconds):
            return await test(*args, **kwargs)

    return bounded


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A started, empty redis-server on a free loopback port, stopped after the test."""
    # DEBUG allowed: a test may stall Redis (DEBUG SLEEP).
    server = RedisServer(tmp_path / "redis", extra_args=debug_args(find_redis_server()))
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
