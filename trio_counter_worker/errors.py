"""Exceptions raised by trio_counter_worker.

The hierarchy::

    WorkerError                 base of everything raised on purpose
    ├── ConfigError             a setting is missing or invalid (exit code 2)
    │   ├── RedisAuthError      Redis refused our credentials at start (exit code 2)
    │   └── RedisTLSError       the Redis server's TLS certificate did not verify (exit 2)
    ├── RedisUnavailable        Redis unreachable, timed out or dropped the connection;
    │   │                       the worker retries with backoff
    │   ├── SubscriptionOverflow  Redis closed the leader's subscription for falling
    │   │                       behind (client-output-buffer-limit pubsub); resynchronised
    │   └── RedisRefused        Redis answered but refused: out of memory, a missing ACL
    │                           permission, credentials or database changed; retried with
    │                           backoff and logged at ERROR, since someone must act; at
    │                           start-up, a ConfigError instead (see ``at_start``)
    ├── LeaseLost               this replica is no longer (or may no longer be) the
    │                           leader; leader-only work is cancelled
    └── FunctionsUnavailable    Redis cannot take the tcw Functions library (older than
                                7.0, or FUNCTION LOAD refused): install-functions exits 2

Messages say what happened and what to do, naming the setting involved, and never
contain a secret value.
"""

from __future__ import annotations


def first_error(group: BaseExceptionGroup[Exception]) -> Exception:
    """The first leaf of a (possibly nested) exception group, for a one-line log."""
    exc: Exception | BaseExceptionGroup[Exception] = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


class WorkerError(Exception):
    """Base class for every error this package raises on purpose."""


class ConfigError(WorkerError):
    """A setting is missing or invalid. The message names the variable."""


class RedisAuthError(ConfigError):
    """Redis rejected the password or ACL user (REDIS_PASSWORD / REDIS_URL)."""


class RedisTLSError(ConfigError):
    """The Redis server's certificate did not verify (REDIS_CA_FILE, host name)."""


class RedisUnavailable(WorkerError):
    """Redis could not be reached or dropped the connection; retry later."""


class SubscriptionOverflow(RedisUnavailable):
    """Redis closed the pub/sub connection because the worker read its messages more
    slowly than they came, past ``client-output-buffer-limit pubsub``: Redis is up."""


class RedisRefused(RedisUnavailable):
    """Redis refused a command for a reason an operator must fix (``kind``: "auth",
    "tls", "permission", "db", "oom"). The worker keeps retrying; ``at_start`` turns it
    into the configuration error it is when the worker has not started yet."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind

    def at_start(self) -> WorkerError:
        """What this means before the worker runs: a bad setting (exit 2), except for a
        full memory, which is a state of Redis that may pass."""
        if self.kind == "auth":
            return RedisAuthError(str(self))
        if self.kind == "tls":
            return RedisTLSError(str(self))
        if self.kind in ("permission", "db"):
            return ConfigError(str(self))
        return self


class LeaseLost(WorkerError):
    """Leadership ended: a renewal failed past the local deadline or showed another holder."""


class FunctionsUnavailable(WorkerError):
    """Redis has no Functions (before 7.0) or refused to load the library; the message
    says what to do."""
