"""Settings: one frozen class, built from the environment and an optional ``.env`` file.

Every setting is declared once in ``SETTINGS`` (name, default, help), which feeds the
loader, ``--help`` and the README table. Validation happens on construction; a bad
value raises :class:`ConfigError` naming the variable and what was expected. Values of
secret settings never appear in messages or reprs.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import attrs
from dotenv import dotenv_values

from .errors import ConfigError

__all__ = ["SETTINGS", "Config", "Setting"]


@attrs.frozen
class Setting:
    name: str
    default: str | None  # None: required, or "derived" when help says so
    help: str
    secret: bool = False


SETTINGS: tuple[Setting, ...] = (
    Setting("RESET_ENDPOINT_URL", None, "http(s) URL the reset is POSTed to (required)"),
    Setting("RESET_SECRET", None, "sent as the x-secret header (required)", secret=True),
    Setting("COUNTER_KEY", "contador_reset", "key, or glob pattern such as counter:*, whose "
            "expiry means inactivity"),
    Setting("REDIS_HOST", "127.0.0.1", "Redis host"),
    Setting("REDIS_PORT", "6379", "Redis port"),
    Setting("REDIS_PASSWORD", None, "Redis password (optional)", secret=True),
    Setting("REDIS_DB", "0", "Redis database number"),
    Setting("REDIS_URL", None, "redis:// or rediss:// URL with user, password and db; "
            "overrides the REDIS_* settings above (optional)", secret=True),
    Setting("REDIS_SENTINELS", None, "Sentinel mode: host:port,host:port,... of the "
            "sentinels; the master is discovered and followed through failovers (optional)"),
    Setting("REDIS_CLUSTER_NODES", None, "Cluster mode: host:port,... of some cluster "
            "nodes to start from; the rest is discovered (optional)"),
    Setting("REDIS_SENTINEL_MASTER", None, "Sentinel mode: the monitored master's name"),
    Setting("REDIS_SENTINEL_PASSWORD", None, "password of the sentinels themselves "
            "(optional)", secret=True),
    Setting("LEASE_TTL_MS", "3000", "leader lease length in ms (500-5000): a crashed "
            "leader is replaced within this time"),
    Setting("REPLICA_ID", None, "this replica's name in the lease, logs and requests "
            "(default: hostname-pid)"),
    Setting("RESET_TIMEOUT_MS", "5000", "timeout of one reset request in ms (100-14999)"),
    Setting("MAX_IN_FLIGHT", "32", "most reset requests sent at once (1-1000)"),
    Setting("LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING or ERROR"),
    Setting("LOG_FORMAT", "text", "text (readable lines) or json (one JSON object a line)"),
    Setting("RESET_SIGNING_SECRET", None, "if set, sign each request: x-signature: "
            "t=<unix>,v1=<HMAC-SHA256 hex of '<t>.<body>'> (optional)", secret=True),
    Setting("ALLOW_INSECURE_HTTP", None, "1 to allow a plain http:// RESET_ENDPOINT_URL on a "
            "host that is not loopback (the secret then travels unencrypted) [default: 0]"),
    Setting("HEALTH_PORT", None, "if set, serve /healthz, /readyz and /metrics on this port "
            "(optional)"),
    Setting("HEALTH_HOST", "0.0.0.0", "address the health endpoint listens on"),  # noqa: S104
    Setting("REDIS_CA_FILE", None, "CA bundle to verify a rediss:// server with "
            "(default: the system's) (optional)"),
)

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_MAX_DB = 1_000_000


def _int_in(name: str, lo: int, hi: int, unit: str = "") -> Any:
    """attrs validator: an int within [lo, hi]; the message names the variable."""

    def check(_inst: object, _attr: attrs.Attribute[int], value: int) -> None:
        if not lo <= value <= hi:
            raise ConfigError(f"{name} must be between {lo} and {hi}{unit}, got {value}")

    return check


def _non_empty(name: str, what: str) -> Any:
    def check(_inst: object, _attr: attrs.Attribute[str], value: str) -> None:
        if not value.strip():
            raise ConfigError(f"{name} must not be empty: set it to {what}")

    return check


def _http_url(_inst: object, _attr: attrs.Attribute[str], value: str) -> None:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"RESET_ENDPOINT_URL must be an http:// or https:// URL with a host, got {value!r}"
        )


def _replica_id(_inst: object, _attr: attrs.Attribute[str], value: str) -> None:
    if not value or len(value) > 128 or not value.isprintable() or any(c.isspace() for c in value):
        raise ConfigError(
            f"REPLICA_ID must be 1-128 printable characters without spaces, got {value!r}"
        )


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@attrs.frozen(kw_only=True)
class Config:
    """Validated settings of one replica. Build it with :meth:`from_env` or directly."""

    reset_endpoint_url: str = attrs.field(validator=_http_url)
    reset_secret: str = attrs.field(
        repr=False, validator=_non_empty("RESET_SECRET", "the shared secret your backend expects")
    )
    counter_key: str = attrs.field(
        default="contador_reset",
        validator=_non_empty("COUNTER_KEY", "the key (or glob pattern) the app sets"),
    )
    redis_host: str = attrs.field(
        default="127.0.0.1", validator=_non_empty("REDIS_HOST", "the Redis host name")
    )
    redis_port: int = attrs.field(default=6379, validator=_int_in("REDIS_PORT", 1, 65535))
    redis_db: int = attrs.field(default=0, validator=_int_in("REDIS_DB", 0, _MAX_DB))
    redis_username: str | None = None
    redis_password: str | None = attrs.field(default=None, repr=False)
    redis_tls: bool = False
    lease_ttl_ms: int = attrs.field(
        default=3000, validator=_int_in("LEASE_TTL_MS", 500, 5000, " ms")
    )
    replica_id: str = attrs.field(factory=default_replica_id, validator=_replica_id)
    reset_timeout_ms: int = attrs.field(
        default=5000, validator=_int_in("RESET_TIMEOUT_MS", 100, 14999, " ms")
    )
    max_in_flight: int = attrs.field(default=32, validator=_int_in("MAX_IN_FLIGHT", 1, 1000))
    log_level: str = attrs.field(default="INFO")
    log_format: str = attrs.field(default="text")
    reset_signing_secret: str | None = attrs.field(default=None, repr=False)
    allow_insecure_http: bool = attrs.field(default=False)
    redis_ca_file: str | None = attrs.field(default=None)
    redis_cluster_nodes: tuple[tuple[str, int], ...] = ()
    redis_sentinels: tuple[tuple[str, int], ...] = ()
    redis_sentinel_master: str | None = None
    redis_sentinel_password: str | None = attrs.field(default=None, repr=False)
    health_port: int | None = attrs.field(default=None)
    health_host: str = "0.0.0.0"  # noqa: S104 - probes reach the pod on its own address

    @health_port.validator
    def _check_health_port(self, _attr: attrs.Attribute[int | None], value: int | None) -> None:
        if value is not None and not 0 <= value <= 65535:
            raise ConfigError(f"HEALTH_PORT must be between 0 and 65535, got {value}")

    @log_format.validator
    def _check_log_format(self, _attr: attrs.Attribute[str], value: str) -> None:
        if value not in ("text", "json"):
            raise ConfigError(f"LOG_FORMAT must be text or json, got {value!r}")

    @redis_ca_file.validator
    def _check_ca_file(self, _attr: attrs.Attribute[str | None], value: str | None) -> None:
        if value is not None and not Path(value).is_file():
            raise ConfigError(f"REDIS_CA_FILE must name a readable file, got {value!r}")

    def __attrs_post_init__(self) -> None:
        if self.redis_cluster_nodes and self.redis_sentinels:
            raise ConfigError(
                "REDIS_CLUSTER_NODES and REDIS_SENTINELS exclude each other: a deployment "
                "is a Cluster or uses Sentinel, not both"
            )
        if self.redis_cluster_nodes and self.redis_db != 0:
            raise ConfigError(f"REDIS_DB must be 0 with REDIS_CLUSTER_NODES (Redis Cluster "
                              f"has only database 0), got {self.redis_db}")
        if bool(self.redis_sentinels) != bool(self.redis_sentinel_master):
            raise ConfigError(
                "REDIS_SENTINELS and REDIS_SENTINEL_MASTER go together: set both for "
                "Sentinel mode, or neither"
            )
        parts = urlsplit(self.reset_endpoint_url)
        if parts.scheme == "http" and not self.allow_insecure_http and not _is_loopback(
            parts.hostname or ""
        ):
            raise ConfigError(
                f"RESET_ENDPOINT_URL uses plain http to {parts.hostname}, which is not "
                "loopback: RESET_SECRET would travel unencrypted. Use https, or set "
                "ALLOW_INSECURE_HTTP=1 if that network is private and trusted"
            )

    @log_level.validator
    def _check_log_level(self, _attr: attrs.Attribute[str], value: str) -> None:
        if value not in _LOG_LEVELS:
            raise ConfigError(f"LOG_LEVEL must be one of {', '.join(_LOG_LEVELS)}, got {value!r}")

    @property
    def lease_ttl(self) -> float:
        return self.lease_ttl_ms / 1000

    @property
    def reset_timeout(self) -> float:
        return self.reset_timeout_ms / 1000

    @property
    def namespace(self) -> str:
        """Prefix of the worker's own Redis keys. The braces make it one cluster hash slot."""
        return f"tcw:{{{self.counter_key}}}"

    @property
    def redis_location(self) -> str:
        """Where Redis is, for logs: no credentials."""
        scheme = "rediss" if self.redis_tls else "redis"
        if self.redis_cluster_nodes:
            nodes = ",".join(f"{h}:{p}" for h, p in self.redis_cluster_nodes)
            return f"{'rediss' if self.redis_tls else 'redis'}-cluster://{nodes}"
        if self.redis_sentinels:
            nodes = ",".join(f"{h}:{p}" for h, p in self.redis_sentinels)
            return f"sentinel://{nodes}/{self.redis_sentinel_master}/{self.redis_db}"
        return f"{scheme}://{self.redis_host}:{self.redis_port}/{self.redis_db}"

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, env_file: str | Path | None = ".env"
    ) -> Config:
        """Read settings from ``environ`` (default ``os.environ``) over ``env_file``.

        The real environment wins over the file. A missing file is not an error.
        """
        values: dict[str, str] = {}
        if env_file is not None and Path(env_file).is_file():
            values.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
        values.update(os.environ if environ is None else environ)
        return cls._from_mapping(values)

    @classmethod
    def _from_mapping(cls, env: Mapping[str, str]) -> Config:
        def get(name: str) -> str | None:
            value = env.get(name)
            return value.strip() if value is not None and value.strip() else None

        def required(name: str, what: str) -> str:
            value = get(name)
            if value is None:
                raise ConfigError(f"{name} is required: set it to {what}")
            return value

        def integer(name: str, default: int) -> int:
            raw = get(name)
            if raw is None:
                return default
            try:
                return int(raw)
            except ValueError:
                shown = "(value hidden)" if name in _SECRET_NAMES else repr(raw)
                raise ConfigError(f"{name} must be a whole number, got {shown}") from None

        def boolean(name: str) -> bool:
            raw = (get(name) or "0").lower()
            if raw in _TRUE:
                return True
            if raw in _FALSE:
                return False
            raise ConfigError(f"{name} must be 1 or 0 (true/false, yes/no), got {raw!r}")

        kwargs: dict[str, Any] = {
            "reset_endpoint_url": required(
                "RESET_ENDPOINT_URL", "the http(s) URL of your backend's reset endpoint"
            ),
            "reset_secret": required("RESET_SECRET", "the shared secret your backend expects"),
            "counter_key": get("COUNTER_KEY") or "contador_reset",
            "redis_host": get("REDIS_HOST") or "127.0.0.1",
            "redis_port": integer("REDIS_PORT", 6379),
            "redis_db": integer("REDIS_DB", 0),
            "redis_password": get("REDIS_PASSWORD"),
            "lease_ttl_ms": integer("LEASE_TTL_MS", 3000),
            "reset_timeout_ms": integer("RESET_TIMEOUT_MS", 5000),
            "max_in_flight": integer("MAX_IN_FLIGHT", 32),
            "log_level": (get("LOG_LEVEL") or "INFO").upper(),
            "log_format": (get("LOG_FORMAT") or "text").lower(),
            "reset_signing_secret": get("RESET_SIGNING_SECRET"),
            "allow_insecure_http": boolean("ALLOW_INSECURE_HTTP"),
            "redis_ca_file": get("REDIS_CA_FILE"),
            "health_host": get("HEALTH_HOST") or "0.0.0.0",  # noqa: S104
        }
        if (cluster := get("REDIS_CLUSTER_NODES")) is not None:
            kwargs["redis_cluster_nodes"] = _parse_nodes("REDIS_CLUSTER_NODES", cluster)
        if (sentinels := get("REDIS_SENTINELS")) is not None:
            kwargs["redis_sentinels"] = _parse_nodes("REDIS_SENTINELS", sentinels)
        kwargs["redis_sentinel_master"] = get("REDIS_SENTINEL_MASTER")
        kwargs["redis_sentinel_password"] = get("REDIS_SENTINEL_PASSWORD")
        if get("HEALTH_PORT") is not None:
            kwargs["health_port"] = integer("HEALTH_PORT", 0)
        if (replica := get("REPLICA_ID")) is not None:
            kwargs["replica_id"] = replica
        if (url := get("REDIS_URL")) is not None:
            kwargs.update(_parse_redis_url(url))
        return cls(**kwargs)


_SECRET_NAMES = frozenset(s.name for s in SETTINGS if s.secret)
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse_nodes(name: str, text: str) -> tuple[tuple[str, int], ...]:
    """``host:port,host:port`` into pairs; the message names the variable."""
    nodes = []
    for item in (part.strip() for part in text.split(",")):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ConfigError(f"{name} must be host:port[,host:port...], got {item!r}")
        nodes.append((host.strip("[]"), int(port)))
    return tuple(nodes)


def _parse_redis_url(url: str) -> dict[str, Any]:
    """Split REDIS_URL into settings. Errors never echo the URL: it may hold a password."""
    hidden = "(value hidden: it may contain a password)"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ConfigError(
            f"REDIS_URL must look like redis://[user:password@]host[:port][/db] {hidden}"
        ) from None
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ConfigError(
            "REDIS_URL must start with redis:// or rediss:// and name a host "
            f"{hidden}"
        )
    db_text = parts.path.lstrip("/") or "0"
    if not db_text.isdigit() or int(db_text) > _MAX_DB:
        raise ConfigError(
            f"REDIS_URL must end with a database number from 0 to {_MAX_DB} like /0 {hidden}"
        )
    if port == 0:
        raise ConfigError(f"REDIS_URL must have a port between 1 and 65535 {hidden}")
    return {
        "redis_host": parts.hostname,
        "redis_port": 6379 if port is None else port,
        "redis_db": int(db_text),
        "redis_username": unquote(parts.username) if parts.username else None,
        "redis_password": unquote(parts.password) if parts.password else None,
        "redis_tls": parts.scheme == "rediss",
    }
