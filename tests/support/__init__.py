"""Reusable test-support code: a throwaway Redis, an HTTP recording backend, worker processes."""

from tests.support.backend import Received, RecordingBackend
from tests.support.procs import SpawnWorker, WorkerProcess, clean_env, run_cli
from tests.support.redis_server import RedisServer, find_redis_server, free_port

__all__ = [
    "Received",
    "RecordingBackend",
    "RedisServer",
    "SpawnWorker",
    "WorkerProcess",
    "clean_env",
    "find_redis_server",
    "free_port",
    "run_cli",
]
