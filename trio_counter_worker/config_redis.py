"""The settings of the connection to Redis: one server, a Cluster or Sentinel; TLS.

One group of :class:`~trio_counter_worker.config.Config`'s fields (see there).
"""

from __future__ import annotations

import os
import re
import ssl
import stat
from typing import Any
from urllib.parse import unquote, urlsplit

import attrs

from .errors import ConfigError
from .setting import (
    Setting,
    env_var,
    host_or_ip,
    host_problem,
    int_in,
    integer,
    is_utf8,
    one_line,
    setting_of,
    shown,
    utf8,
)

__all__ = ["RedisSettings"]

_MAX_DB = 1_000_000
_DIGITS = re.compile(r"[0-9]+")


def _nodes(setting: Setting, text: str) -> tuple[tuple[str, int], ...]:
    """``host:port,host:port`` into pairs."""
    nodes = []
    for item in (part.strip() for part in text.split(",")):
        host, _, port = item.rpartition(":")
        if not host or not _DIGITS.fullmatch(port) or not 1 <= int(port) <= 65535:
            raise ConfigError(f"{setting.name} must be host:port[,host:port...], got {shown(item)}")
        host = host.strip("[]")
        if (problem := host_problem(host)) is not None:
            raise ConfigError(f"{setting.name}: the host {problem}")
        nodes.append((host, int(port)))
    return tuple(nodes)


def _redis_url(setting: Setting, url: str) -> dict[str, Any]:
    """REDIS_URL split into the fields it fills. Errors never echo the URL: it may hold a
    password."""
    name, hidden = setting.name, "(value hidden: it may contain a password)"
    if not is_utf8(url) or not url.isprintable():
        raise ConfigError(f"{name} must be printable UTF-8 text {hidden}")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ConfigError(
            f"{name} must look like redis://[user:password@]host[:port][/db] {hidden}"
        ) from None
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ConfigError(f"{name} must start with redis:// or rediss:// and name a host {hidden}")
    if host_problem(parts.hostname) is not None:
        raise ConfigError(f"{name} must name a valid host name or IP address {hidden}")
    db_text = parts.path.lstrip("/") or "0"
    if not _DIGITS.fullmatch(db_text) or int(db_text) > _MAX_DB:
        raise ConfigError(
            f"{name} must end with a database number from 0 to {_MAX_DB} like /0 {hidden}"
        )
    if port == 0:
        raise ConfigError(f"{name} must have a port between 1 and 65535 {hidden}")
    return {
        "redis_host": parts.hostname,
        "redis_port": 6379 if port is None else port,
        "redis_db": int(db_text),
        "redis_username": unquote(parts.username) if parts.username else None,
        "redis_password": unquote(parts.password) if parts.password else None,
        "redis_tls": parts.scheme == "rediss",
    }


def _ca_file(_inst: object, attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is None:
        return
    name = setting_of(attribute).name
    try:
        readable = stat.S_ISREG(os.stat(value).st_mode) and os.access(value, os.R_OK)
    except (OSError, ValueError):  # ValueError: a NUL, or a surrogate os cannot encode
        readable = False
    if not readable:
        raise ConfigError(f"{name} must name a readable file, got {shown(value)}")
    try:
        ssl.create_default_context(cafile=value)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ConfigError(
            f"{name} {shown(value)} holds no CA certificate ssl can load "
            f"({one_line(str(exc))}): point it at the PEM file of the CA that signed the "
            "Redis server's certificate"
        ) from None


@attrs.frozen(kw_only=True, slots=False)  # slots=False: see Config
class RedisSettings:
    """Where Redis is and how to log in to it."""

    redis_host: str = attrs.field(
        default="127.0.0.1", validator=host_or_ip, metadata=env_var("REDIS_HOST", "Redis host")
    )
    redis_port: int = attrs.field(
        default=6379,
        validator=int_in(1, 65535),
        metadata=env_var("REDIS_PORT", "Redis port", parse=integer),
    )
    redis_password: str | None = attrs.field(
        default=None,
        validator=utf8,
        metadata=env_var("REDIS_PASSWORD", "Redis password", secret=True),
    )
    redis_db: int = attrs.field(
        default=0,
        validator=int_in(0, _MAX_DB),
        metadata=env_var("REDIS_DB", "Redis database number", parse=integer),
    )
    # A user name comes only with REDIS_URL, which fills the four fields above too.
    redis_username: str | None = attrs.field(
        default=None,
        validator=utf8,
        metadata=env_var(
            "REDIS_URL",
            "redis:// or rediss:// URL with user, password and db; "
            "overrides REDIS_HOST, REDIS_PORT, REDIS_PASSWORD and REDIS_DB, with a "
            "warning at start if any is set too",
            parse=_redis_url,
            spread=True,
            secret=True,
        ),
    )
    redis_tls: bool = False  # rediss:// in REDIS_URL
    redis_cluster_nodes: tuple[tuple[str, int], ...] = attrs.field(
        default=(),
        metadata=env_var(
            "REDIS_CLUSTER_NODES",
            "Cluster mode: host:port,... of some cluster "
            "nodes to start from; the rest is discovered",
            parse=_nodes,
        ),
    )
    redis_sentinels: tuple[tuple[str, int], ...] = attrs.field(
        default=(),
        metadata=env_var(
            "REDIS_SENTINELS",
            "Sentinel mode: host:port,host:port,... of the "
            "sentinels; the master is discovered and followed through failovers",
            parse=_nodes,
        ),
    )
    redis_sentinel_master: str | None = attrs.field(
        default=None,
        validator=utf8,
        metadata=env_var("REDIS_SENTINEL_MASTER", "Sentinel mode: the monitored master's name"),
    )
    redis_sentinel_password: str | None = attrs.field(
        default=None,
        validator=utf8,
        metadata=env_var(
            "REDIS_SENTINEL_PASSWORD", "password of the sentinels themselves", secret=True
        ),
    )
    redis_ca_file: str | None = attrs.field(
        default=None,
        validator=_ca_file,
        metadata=env_var(
            "REDIS_CA_FILE",
            "CA bundle (PEM) to verify a rediss:// server with",
            default="system CAs",
        ),
    )

    def _check_topology(self) -> None:
        """The settings that go together or exclude each other (after each field's checks)."""
        if self.redis_cluster_nodes and self.redis_sentinels:
            raise ConfigError(
                "REDIS_CLUSTER_NODES and REDIS_SENTINELS exclude each other: a deployment "
                "is a Cluster or uses Sentinel, not both"
            )
        if self.redis_cluster_nodes and self.redis_db != 0:
            raise ConfigError(
                f"REDIS_DB must be 0 with REDIS_CLUSTER_NODES (Redis Cluster "
                f"has only database 0), got {self.redis_db}"
            )
        if bool(self.redis_sentinels) != bool(self.redis_sentinel_master):
            raise ConfigError(
                "REDIS_SENTINELS and REDIS_SENTINEL_MASTER go together: set both for "
                "Sentinel mode, or neither"
            )

    @property
    def redis_location(self) -> str:
        """Where Redis is, for logs: no credentials."""
        scheme = "rediss" if self.redis_tls else "redis"
        if self.redis_cluster_nodes:
            nodes = ",".join(f"{h}:{p}" for h, p in self.redis_cluster_nodes)
            return f"{scheme}-cluster://{nodes}"
        if self.redis_sentinels:
            nodes = ",".join(f"{h}:{p}" for h, p in self.redis_sentinels)
            return f"sentinel://{nodes}/{self.redis_sentinel_master}/{self.redis_db}"
        return f"{scheme}://{self.redis_host}:{self.redis_port}/{self.redis_db}"
