"""Settings: one frozen class, built from the environment and an optional ``.env`` file.

Every setting is declared once in ``SETTINGS`` (name, default, help), which feeds the
loader, ``--help`` and the README table. Validation happens on construction, and checks
everything that could otherwise fail later (a secret that cannot be sent as a header, a
URL httpx refuses, a COUNTER_KEY that would match the worker's own keys); a bad value
raises :class:`ConfigError` with a one-line message naming the variable and what was
expected. Values of secret settings never appear in messages or reprs.
"""

from __future__ import annotations

import io
import ipaddress
import os
import re
import socket
import ssl
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import attrs
import httpx
from dotenv import dotenv_values
from dotenv.parser import parse_stream

from .errors import ConfigError
from .glob import may_match_prefix
from .keyspace import OWN_KEY_PREFIX

__all__ = ["OWN_KEY_PREFIX", "SETTINGS", "Config", "Setting"]


@attrs.frozen
class Setting:
    name: str
    default: str | None  # None: required, or "derived" when help says so
    help: str
    secret: bool = False


SETTINGS: tuple[Setting, ...] = (
    Setting("RESET_ENDPOINT_URL", None, "http(s) URL the reset is POSTed to; plain http only "
            "to a loopback host unless ALLOW_INSECURE_HTTP=1 (required)"),
    Setting("RESET_SECRET", None, "sent as the x-secret header: visible ASCII only, no "
            "spaces (required)", secret=True),
    Setting("COUNTER_KEY", "contador_reset", "key, or glob pattern such as counter:*, whose "
            "expiry means inactivity; must not be able to match the worker's own tcw:{ keys"),
    Setting("REDIS_HOST", "127.0.0.1", "Redis host"),
    Setting("REDIS_PORT", "6379", "Redis port"),
    Setting("REDIS_PASSWORD", None, "Redis password (optional)", secret=True),
    Setting("REDIS_DB", "0", "Redis database number"),
    Setting("REDIS_URL", None, "redis:// or rediss:// URL with user, password and db; "
            "overrides REDIS_HOST, REDIS_PORT, REDIS_PASSWORD and REDIS_DB, with a warning "
            "at start if any is set too (optional)", secret=True),
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
    Setting("MAX_IN_FLIGHT", "32", "most reset requests sent at once (1-1000); at most half "
            "of them are retries of failing resets"),
    Setting("RESET_GIVE_UP_AFTER", None, "a duration such as 90s, 30m, 6h or 2d: a reset "
            "failing that long moves to the dead letters (`redeliver` sends it again) "
            "[default: never]"),
    Setting("LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING or ERROR"),
    Setting("LOG_FORMAT", "text", "text (readable lines) or json (one JSON object a line)"),
    Setting("RESET_SIGNING_SECRET", None, "if set, sign each request: x-signature: "
            "t=<unix>,v1=<HMAC-SHA256 hex of '<t>.<body>'> (optional)", secret=True),
    Setting("ALLOW_INSECURE_HTTP", None, "1 to allow a plain http:// RESET_ENDPOINT_URL on a "
            "host that is not loopback (the secret then travels unencrypted) [default: 0]"),
    Setting("HEALTH_PORT", None, "if set, serve /healthz, /readyz and /metrics on this port "
            "(optional)"),
    Setting("HEALTH_HOST", "0.0.0.0", "address the health endpoint listens on"),  # noqa: S104
    Setting("REDIS_CA_FILE", None, "CA bundle (PEM) to verify a rediss:// server with "
            "(default: the system's) (optional)"),
)

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_MAX_DB = 1_000_000
_SHOWN_MAX = 100  # longer values are cut short in messages
_HIDDEN = "(value hidden)"
# What `status` ignores (see Config.from_env's redis_only): only sending resets uses them.
_DELIVERY_SETTINGS = frozenset({
    "RESET_ENDPOINT_URL", "RESET_SECRET", "RESET_SIGNING_SECRET", "RESET_TIMEOUT_MS",
    "MAX_IN_FLIGHT", "ALLOW_INSECURE_HTTP", "RESET_GIVE_UP_AFTER",
})  # fmt: skip
_UNUSED_URL = "https://reset-endpoint.invalid/"  # .invalid: can never resolve (RFC 6761)
_UNUSED_SECRET = "unused"  # noqa: S105 - a placeholder, never sent
_URL_OVERRIDES = ("REDIS_HOST", "REDIS_PORT", "REDIS_PASSWORD", "REDIS_DB")
_INTEGER = re.compile(r"[-+]?[0-9]+")
_DURATION = re.compile(r"([0-9]{1,9})(s|m|h|d)")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(name: str, raw: str | None) -> float | None:
    """``90s``, ``30m``, ``6h``, ``2d`` (at least 1 s) into seconds; None when unset."""
    if raw is None:
        return None
    match = _DURATION.fullmatch(raw.strip().lower())
    if match is None or int(match[1]) == 0:
        raise ConfigError(
            f"{name} must be a duration such as 90s, 30m, 6h or 2d, got {_shown(raw)}"
        )
    return float(int(match[1]) * _UNIT_SECONDS[match[2]])
_DIGITS = re.compile(r"[0-9]+")


def _shown(value: str) -> str:
    """A value for a message: ``repr`` (one line, control characters escaped), cut short."""
    if len(value) <= _SHOWN_MAX:
        return repr(value)
    return f"{value[:_SHOWN_MAX]!r}... ({len(value)} characters)"


def _shown_number(value: int) -> str:
    digits = str(value)
    return digits if len(digits) <= 20 else f"{digits[:20]}... ({len(digits)} digits)"


def _shown_url(url: str) -> str:
    """:func:`_shown` with a ``user:password@`` part masked: a URL may carry credentials."""
    return _shown(re.sub(r"(?<=//)[^/?#]*@", "***@", url, count=1))


def _one_line(text: str) -> str:
    """An error text from elsewhere, on one line."""
    return " ".join(text.split())


def _is_utf8(value: str) -> bool:
    """False if ``value`` holds lone surrogates: on Linux, ``os.environ`` decodes bytes that
    are not UTF-8 that way, and every later ``encode()`` of them fails."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _host_problem(host: str) -> str | None:
    """What is wrong with ``host`` as a host name or IP address, as the rest of a sentence
    that starts with the variable's name; None if nothing. The test is what connecting
    needs: ``socket.getaddrinfo`` encodes names with the idna codec."""
    shown = _shown(host)
    if not host:
        return "must be a host name or IP address, got ''"
    if not host.isprintable() or any(c.isspace() for c in host):
        return ("must be a host name or IP address, without spaces or control characters, "
                f"got {shown}")
    if not _is_ip(host):
        try:
            host.encode("idna")
        except UnicodeError as exc:
            reason = _one_line(str(exc.__cause__ or exc))
            return (f"is not a valid host name ({reason}; each dot-separated part has 1-63 "
                    f"characters), got {shown}")
    return None


def _int_in(name: str, lo: int, hi: int, unit: str = "") -> Any:
    """attrs validator: an int within [lo, hi]; the message names the variable."""

    def check(_inst: object, _attr: attrs.Attribute[int], value: int) -> None:
        if not lo <= value <= hi:
            raise ConfigError(
                f"{name} must be between {lo} and {hi}{unit}, got {_shown_number(value)}"
            )

    return check


def _non_empty(name: str, what: str) -> Any:
    def check(_inst: object, _attr: attrs.Attribute[str], value: str) -> None:
        if not value.strip():
            raise ConfigError(f"{name} must not be empty: set it to {what}")

    return check


def _utf8(name: str, *, secret: bool = False) -> Any:
    """attrs validator: text that can be sent (None passes)."""

    def check(_inst: object, _attr: attrs.Attribute[str | None], value: str | None) -> None:
        if value is not None and not _is_utf8(value):
            shown = _HIDDEN if secret else f"got {_shown(value)}"
            raise ConfigError(
                f"{name} must be valid UTF-8 text, but holds bytes that are not (a file or "
                f"shell in another encoding?): {shown}"
            )

    return check


def _host(name: str) -> Any:
    def check(_inst: object, _attr: attrs.Attribute[str], value: str) -> None:
        if (problem := _host_problem(value)) is not None:
            raise ConfigError(f"{name} {problem}")

    return check


def _header_safe(_inst: object, _attr: attrs.Attribute[str], value: str) -> None:
    # httpx encodes header values as ASCII and h11 refuses control characters; a space
    # is legal but is stripped by some proxies and servers, so the secret would differ.
    if not all("\x21" <= c <= "\x7e" for c in value):
        raise ConfigError(
            "RESET_SECRET must be visible ASCII only (0x21-0x7E: letters, digits and "
            "punctuation; no spaces, accents or control characters), since it is sent as "
            f"the x-secret header {_HIDDEN}"
        )


def _http_url(_inst: object, _attr: attrs.Attribute[str], value: str) -> None:
    name, shown = "RESET_ENDPOINT_URL", _shown_url(value)
    if not _is_utf8(value) or not value.isprintable():
        raise ConfigError(f"{name} must be printable text, without control characters or "
                          f"bytes that are not UTF-8, got {shown}")
    try:
        parts = urlsplit(value)
    except ValueError:  # every urlsplit error is about the host part
        raise ConfigError(f"{name} has a malformed host (an IPv6 address goes in balanced "
                          f"brackets, like https://[::1]:8443/reset), got {shown}") from None
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"{name} must be an http:// or https:// URL with a host, got {shown}")
    if not parts.hostname:
        raise ConfigError(f"{name} must name a host, like https://backend.example/reset, "
                          f"got {shown}")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ConfigError(f"{name} has an invalid port: it must be a number from 1 to 65535, "
                          f"got {shown}")
    if (problem := _host_problem(parts.hostname)) is not None:
        raise ConfigError(f"{name}'s host {problem}")
    try:
        httpx.URL(value)
    except (httpx.InvalidURL, ValueError) as exc:  # ValueError: idna's errors among them
        raise ConfigError(f"{name} is not a URL httpx can send to ({_one_line(str(exc))}), "
                          f"got {shown}") from None


def _counter_key(_inst: object, _attr: attrs.Attribute[str], value: str) -> None:
    # Reconcile and the event subscription would take the lease, the deadlines and the
    # release channel (of this or another deployment) for counters.
    if may_match_prefix(value, OWN_KEY_PREFIX):
        raise ConfigError(
            f"COUNTER_KEY {_shown(value)} could match the worker's own keys, which all start "
            f"with {OWN_KEY_PREFIX!r}: start it with a literal prefix of your own, like "
            "'counter:*'"
        )


def _replica_id(_inst: object, _attr: attrs.Attribute[str], value: str) -> None:
    if not value or len(value) > 128 or not value.isprintable() or any(c.isspace() for c in value):
        raise ConfigError(
            f"REPLICA_ID must be 1-128 printable characters without spaces, got {_shown(value)}"
        )


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@attrs.frozen(kw_only=True)
class Config:
    """Validated settings of one replica. Build it with :meth:`from_env` or directly."""

    reset_endpoint_url: str = attrs.field(validator=_http_url)
    reset_secret: str = attrs.field(
        repr=False,
        validator=[
            _non_empty("RESET_SECRET", "the shared secret your backend expects"),
            _header_safe,
        ],
    )
    counter_key: str = attrs.field(
        default="contador_reset",
        validator=[
            _non_empty("COUNTER_KEY", "the key (or glob pattern) the app sets"),
            _utf8("COUNTER_KEY"),
            _counter_key,
        ],
    )
    redis_host: str = attrs.field(default="127.0.0.1", validator=_host("REDIS_HOST"))
    redis_port: int = attrs.field(default=6379, validator=_int_in("REDIS_PORT", 1, 65535))
    redis_db: int = attrs.field(default=0, validator=_int_in("REDIS_DB", 0, _MAX_DB))
    redis_username: str | None = attrs.field(default=None, validator=_utf8("REDIS_URL"))
    redis_password: str | None = attrs.field(
        default=None, repr=False, validator=_utf8("REDIS_PASSWORD", secret=True)
    )
    redis_tls: bool = False
    lease_ttl_ms: int = attrs.field(
        default=3000, validator=_int_in("LEASE_TTL_MS", 500, 5000, " ms")
    )
    replica_id: str = attrs.field(factory=default_replica_id, validator=_replica_id)
    reset_timeout_ms: int = attrs.field(
        default=5000, validator=_int_in("RESET_TIMEOUT_MS", 100, 14999, " ms")
    )
    max_in_flight: int = attrs.field(default=32, validator=_int_in("MAX_IN_FLIGHT", 1, 1000))
    reset_give_up_after: float | None = attrs.field(default=None)
    log_level: str = attrs.field(default="INFO")
    log_format: str = attrs.field(default="text")
    reset_signing_secret: str | None = attrs.field(
        default=None, repr=False, validator=_utf8("RESET_SIGNING_SECRET", secret=True)
    )
    allow_insecure_http: bool = attrs.field(default=False)
    redis_ca_file: str | None = attrs.field(default=None)
    redis_cluster_nodes: tuple[tuple[str, int], ...] = ()
    redis_sentinels: tuple[tuple[str, int], ...] = ()
    redis_sentinel_master: str | None = attrs.field(
        default=None, validator=_utf8("REDIS_SENTINEL_MASTER")
    )
    redis_sentinel_password: str | None = attrs.field(
        default=None, repr=False, validator=_utf8("REDIS_SENTINEL_PASSWORD", secret=True)
    )
    health_port: int | None = attrs.field(default=None)
    health_host: str = attrs.field(
        default="0.0.0.0",  # noqa: S104 - probes reach the pod on its own address
        validator=_host("HEALTH_HOST"),
    )
    # Where the settings came from, not what they are (so not part of equality): the
    # REDIS_* settings that were set but lost to REDIS_URL, for a warning at start.
    overridden: tuple[str, ...] = attrs.field(default=(), eq=False)

    @health_port.validator
    def _check_health_port(self, _attr: attrs.Attribute[int | None], value: int | None) -> None:
        if value is not None and not 0 <= value <= 65535:
            raise ConfigError(
                f"HEALTH_PORT must be between 0 and 65535, got {_shown_number(value)}"
            )

    @log_format.validator
    def _check_log_format(self, _attr: attrs.Attribute[str], value: str) -> None:
        if value not in ("text", "json"):
            raise ConfigError(f"LOG_FORMAT must be text or json, got {_shown(value)}")

    @redis_ca_file.validator
    def _check_ca_file(self, _attr: attrs.Attribute[str | None], value: str | None) -> None:
        if value is None:
            return
        try:
            readable = stat.S_ISREG(os.stat(value).st_mode) and os.access(value, os.R_OK)
        except (OSError, ValueError):  # ValueError: a NUL, or a surrogate os cannot encode
            readable = False
        if not readable:
            raise ConfigError(f"REDIS_CA_FILE must name a readable file, got {_shown(value)}")
        try:
            ssl.create_default_context(cafile=value)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ConfigError(
                f"REDIS_CA_FILE {_shown(value)} holds no CA certificate ssl can load "
                f"({_one_line(str(exc))}): point it at the PEM file of the CA that signed the "
                "Redis server's certificate"
            ) from None

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
                f"RESET_ENDPOINT_URL uses plain http to {_shown(parts.hostname or '')}, which "
                "is not loopback: RESET_SECRET would travel unencrypted. Use https, or set "
                "ALLOW_INSECURE_HTTP=1 if that network is private and trusted"
            )

    @log_level.validator
    def _check_log_level(self, _attr: attrs.Attribute[str], value: str) -> None:
        if value not in _LOG_LEVELS:
            raise ConfigError(
                f"LOG_LEVEL must be one of {', '.join(_LOG_LEVELS)}, got {_shown(value)}"
            )

    @property
    def lease_ttl(self) -> float:
        return self.lease_ttl_ms / 1000

    @property
    def reset_timeout(self) -> float:
        return self.reset_timeout_ms / 1000

    @property
    def namespace(self) -> str:
        """Prefix of the worker's own Redis keys. The braces make it one cluster hash slot."""
        return f"{OWN_KEY_PREFIX}{self.counter_key}}}"

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
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        env_file: str | Path | None = ".env",
        required_file: bool = False,
        redis_only: bool = False,
    ) -> Config:
        """Read settings from ``environ`` (default ``os.environ``) over ``env_file``.

        The real environment wins over the file. A missing ``env_file`` is not an error
        unless ``required_file`` (it was named on purpose, as with ``--env-file``); a file
        that cannot be read, is not UTF-8 or has a line that is not ``NAME=value`` is.

        ``redis_only`` is for commands that only read Redis (``status``): the settings of
        reset delivery (RESET_*, MAX_IN_FLIGHT, ALLOW_INSECURE_HTTP) are ignored and the
        endpoint and secret hold placeholders, so such a Config must not run a worker.
        """
        values: dict[str, str] = {}
        hint = ""
        if env_file is not None:
            path = Path(env_file)
            if _exists(path):
                values.update(_read_env_file(path))
            elif required_file:
                raise ConfigError(f"--env-file {_shown(str(path))}: no such file")
            else:
                hint = _no_file_hint(path)
        values.update(os.environ if environ is None else environ)
        if redis_only:
            values = {k: v for k, v in values.items() if k not in _DELIVERY_SETTINGS}
            values.update(RESET_ENDPOINT_URL=_UNUSED_URL, RESET_SECRET=_UNUSED_SECRET)
        return cls._from_mapping(values, hint)

    @classmethod
    def _from_mapping(cls, env: Mapping[str, str], hint: str = "") -> Config:
        def get(name: str) -> str | None:
            value = env.get(name)
            return value.strip() if value is not None and value.strip() else None

        def required(name: str, what: str) -> str:
            value = get(name)
            if value is None:
                raise ConfigError(f"{name} is required: set it to {what}{hint}")
            return value

        def integer(name: str, default: int) -> int:
            raw = get(name)
            if raw is None:
                return default
            shown = _HIDDEN if name in _SECRET_NAMES else _shown(raw)
            try:
                if _INTEGER.fullmatch(raw):
                    return int(raw)
            except ValueError:  # more digits than int() takes
                pass
            raise ConfigError(f"{name} must be a whole number, got {shown}")

        def boolean(name: str) -> bool:
            raw = (get(name) or "0").lower()
            if raw in _TRUE:
                return True
            if raw in _FALSE:
                return False
            raise ConfigError(
                f"{name} must be 1 or 0 (true/false, yes/no), got {_shown(raw)}"
            )

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
            "reset_give_up_after": parse_duration("RESET_GIVE_UP_AFTER",
                                                  get("RESET_GIVE_UP_AFTER")),
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
            kwargs["overridden"] = tuple(n for n in _URL_OVERRIDES if get(n) is not None)
        return cls(**kwargs)


_SECRET_NAMES = frozenset(s.name for s in SETTINGS if s.secret)
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _read_env_file(path: Path) -> dict[str, str]:
    """The settings in a ``.env`` file; ConfigError if it cannot be read or parsed.

    Read here rather than by python-dotenv, which would log a warning for a line it
    cannot parse and skip it, and raise a bare UnicodeDecodeError for a file in another
    encoding. Messages never quote a line: it may hold a secret."""
    shown = _shown(str(_absolute(path)))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"env file {shown} is not UTF-8 text (line {line} has byte "
            f"0x{exc.object[exc.start]:02x}): save it as UTF-8"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"env file {shown} cannot be read: {_one_line(exc.strerror or str(exc))}"
        ) from None
    for binding in parse_stream(io.StringIO(text)):
        if binding.error:
            raise ConfigError(
                f"env file {shown} line {binding.original.line} is not NAME=value (nor a "
                "# comment): fix or remove that line"
            )
    values = dotenv_values(stream=io.StringIO(text))
    return {k: v for k, v in values.items() if v is not None}


def _exists(path: Path) -> bool:
    """Path.exists, except that a path too long to look up counts as there, so that
    reading it gives the error."""
    try:
        return path.exists()
    except OSError:
        return True


def _absolute(path: Path) -> Path:
    try:
        return path.absolute()
    except OSError:  # the working directory is gone
        return path


def _no_file_hint(path: Path) -> str:
    """For "X is required": where the settings were looked for."""
    where = _absolute(path)
    found = f"no .env file in {where.parent}" if path.name == ".env" else f"no file {where}"
    return f" ({found}; pass --env-file or set the environment)"


def _is_loopback(host: str) -> bool:
    """Whether every address ``host`` stands for is loopback. A name is resolved, so that
    the answer holds for where the request really goes; ConfigError if it does not."""
    if host == "localhost":
        return True
    if _is_ip(host):
        return ipaddress.ip_address(host).is_loopback
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(
            f"RESET_ENDPOINT_URL's host {_shown(host)} does not resolve "
            f"({_one_line(reason)}): check the spelling. (Plain http is allowed to a "
            "loopback host only, unless ALLOW_INSECURE_HTTP=1)"
        ) from None
    return all(ipaddress.ip_address(str(info[4][0])).is_loopback for info in infos)


def _parse_nodes(name: str, text: str) -> tuple[tuple[str, int], ...]:
    """``host:port,host:port`` into pairs; the message names the variable."""
    nodes = []
    for item in (part.strip() for part in text.split(",")):
        host, _, port = item.rpartition(":")
        if not host or not _DIGITS.fullmatch(port) or not 1 <= int(port) <= 65535:
            raise ConfigError(f"{name} must be host:port[,host:port...], got {_shown(item)}")
        host = host.strip("[]")
        if (problem := _host_problem(host)) is not None:
            raise ConfigError(f"{name}: the host {problem}")
        nodes.append((host, int(port)))
    return tuple(nodes)


def _parse_redis_url(url: str) -> dict[str, Any]:
    """Split REDIS_URL into settings. Errors never echo the URL: it may hold a password."""
    hidden = "(value hidden: it may contain a password)"
    if not _is_utf8(url) or not url.isprintable():
        raise ConfigError(f"REDIS_URL must be printable UTF-8 text {hidden}")
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
    if _host_problem(parts.hostname) is not None:
        raise ConfigError(f"REDIS_URL must name a valid host name or IP address {hidden}")
    db_text = parts.path.lstrip("/") or "0"
    if not _DIGITS.fullmatch(db_text) or int(db_text) > _MAX_DB:
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
