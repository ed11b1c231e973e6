"""trio-counter-worker: POST a reset when a Redis activity key expires — once, on time.

Embed it in a trio program::

    async with open_worker(Config.from_env()) as worker:
        await worker.run()
"""

from ._version import __version__
from .config import Config
from .errors import (
    ConfigError,
    LeaseLost,
    RedisAuthError,
    RedisTLSError,
    RedisUnavailable,
    WorkerError,
)
from .hooks import Hooks
from .worker import Worker, open_worker

__all__ = [
    "Config",
    "ConfigError",
    "Hooks",
    "LeaseLost",
    "RedisAuthError",
    "RedisTLSError",
    "RedisUnavailable",
    "Worker",
    "WorkerError",
    "__version__",
    "open_worker",
]
