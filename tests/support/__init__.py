"""Reusable test-support code: a throwaway Redis, an HTTP recording backend, a fault proxy,
worker processes."""

from tests.support.backend import (
    ApplyThenDrop,
    Behaviour,
    Chooser,
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
from tests.support.procs import SpawnWorker, WorkerProcess, clean_env, run_cli, worker_env
from tests.support.proxy import FaultProxy
from tests.support.redis_server import RedisServer, find_redis_server, free_port

__all__ = [
    "ApplyThenDrop",
    "Behaviour",
    "Chooser",
    "Drip",
    "Endless",
    "FaultProxy",
    "Hang",
    "HeadersThenNothing",
    "Huge",
    "Received",
    "RecordingBackend",
    "RedisServer",
    "Respond",
    "SpawnWorker",
    "WorkerProcess",
    "by_key",
    "clean_env",
    "find_redis_server",
    "free_port",
    "run_cli",
    "worker_env",
]
