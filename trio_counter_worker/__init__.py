"""trio-counter-worker: POST a reset when a Redis activity key expires — once, on time.

Embed it in a trio program::

    async with open_worker(Config.from_env()) as worker:
        await worker.run()
"""

import typing

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

if typing.TYPE_CHECKING:
    from .hooks import Hooks
    from .worker import Worker, open_worker

# Imported when first asked for: trio, redis-py and the leader's modules take ~0.4 s, which
# a command that stops at a bad setting (exit 2) or only prints need not pay.
_LAZY = {"Hooks": "hooks", "Worker": "worker", "open_worker": "worker"}


def __getattr__(name: str) -> typing.Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


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
