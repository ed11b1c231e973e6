"""Settings: one frozen class, built from the environment and an optional ``.env`` file.

Each setting is declared once, on the :class:`Config` field it fills: the field holds the
default and the validators, a :class:`Setting` in its metadata the variable's name, help
text, parser and secrecy. ``SETTINGS``, the loader, ``--help``, the README check and the
error messages all read that one declaration. Validation happens on construction, and
checks everything that could otherwise fail later (a secret that cannot be sent as a
header, a URL httpx refuses, a COUNTER_KEY that would match the worker's own keys); a bad
value raises :class:`ConfigError` with a one-line message naming the variable and what was
expected. Values of secret settings never appear in messages or reprs.
"""

from __future__ import annotations

import difflib
import io
import ipaddress
import os
import re
import socket
import ssl
import stat
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import attrs
import httpx
from dotenv import dotenv_values
from dotenv.parser import parse_stream

from .errors import ConfigError
from .glob import may_match_prefix
from .keys import OWN_KEY_PREFIX, Keys

__all__ = ["OWN_KEY_PREFIX", "SETTINGS", "Config", "Setting"]

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_LOG_FORMATS = ("text", "json")
_LOG_RESETS = ("each", "summary")
_MAX_DB = 1_000_000
_SHOWN_MAX = 100  # longer values are cut short in messages
_HIDDEN = "(value hidden)"
_UNUSED_URL = "https://reset-endpoint.invalid/"  # .invalid: can never resolve (RFC 6761)
_UNUSED_SECRET = "unused"  # noqa: S105 - a placeholder, never sent
_INTEGER = re.compile(r"[-+]?[0-9]+")
_DIGITS = re.compile(r"[0-9]+")
_DURATION = re.compile(r"([0-9]{1,9})(s|m|h|d)")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_SETTING = "trio_counter_worker.setting"  # the field metadata key of a Setting


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
        return (
            f"must be a host name or IP address, without spaces or control characters, got {shown}"
        )
    if not _is_ip(host):
        try:
            host.encode("idna")
        except UnicodeError as exc:
            reason = _one_line(str(exc.__cause__ or exc))
            return (
                f"is not a valid host name ({reason}; each dot-separated part has 1-63 "
                f"characters), got {shown}"
            )
    return None


# --- parsers: (the setting, its stripped and non-blank text) -> the field's value ---------


def _text(_setting: Setting, raw: str) -> str:
    return raw


def _upper(_setting: Setting, raw: str) -> str:
    return raw.upper()


def _lower(_setting: Setting, raw: str) -> str:
    return raw.lower()


def _integer(setting: Setting, raw: str) -> int:
    try:
        if _INTEGER.fullmatch(raw):
            return int(raw)
    except ValueError:  # more digits than int() takes
        pass
    shown = _HIDDEN if setting.secret else _shown(raw)
    raise ConfigError(f"{setting.name} must be a whole number, got {shown}")


def _boolean(setting: Setting, raw: str) -> bool:
    raw = raw.lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ConfigError(f"{setting.name} must be 1 or 0 (true/false, yes/no), got {_shown(raw)}")


def _duration(setting: Setting, raw: str) -> float:
    """``90s``, ``30m``, ``6h``, ``2d`` (at least 1 s) into seconds."""
    match = _DURATION.fullmatch(raw.lower())
    if match is None or int(match[1]) == 0:
        raise ConfigError(
            f"{setting.name} must be a duration such as 90s, 30m, 6h or 2d, got {_shown(raw)}"
        )
    return float(int(match[1]) * _UNIT_SECONDS[match[2]])


def _nodes(setting: Setting, text: str) -> tuple[tuple[str, int], ...]:
    """``host:port,host:port`` into pairs."""
    nodes = []
    for item in (part.strip() for part in text.split(",")):
        host, _, port = item.rpartition(":")
        if not host or not _DIGITS.fullmatch(port) or not 1 <= int(port) <= 65535:
            raise ConfigError(
                f"{setting.name} must be host:port[,host:port...], got {_shown(item)}"
            )
        host = host.strip("[]")
        if (problem := _host_problem(host)) is not None:
            raise ConfigError(f"{setting.name}: the host {problem}")
        nodes.append((host, int(port)))
    return tuple(nodes)


def _redis_url(setting: Setting, url: str) -> dict[str, Any]:
    """REDIS_URL split into the fields it fills. Errors never echo the URL: it may hold a
    password."""
    name, hidden = setting.name, "(value hidden: it may contain a password)"
    if not _is_utf8(url) or not url.isprintable():
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
    if _host_problem(parts.hostname) is not None:
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


@attrs.frozen
class Setting:
    """One environment variable. Declared with ``_env`` in the metadata of the
    :class:`Config` field it fills; ``required`` and ``default`` are then taken from that
    field, so ``SETTINGS`` shows what the class really does."""

    name: str
    help: str
    parse: Callable[[Setting, str], Any] = attrs.field(default=_text, repr=False)
    secret: bool = False  # never shown: not in messages, not in the repr
    delivery: bool = False  # only sending resets uses it: `status` and `redeliver` ignore it
    expects: str = ""  # what to set it to, for "is required" and "must not be empty"
    spread: bool = False  # ``parse`` gives the values of several fields, by name
    # As --help and the README show it; None: no default. Declared only where the field's
    # own default cannot say it: a factory, or a None that stands for "never" or "the system's".
    default: str | None = None
    required: bool = False


def _env(name: str, help: str, **options: Any) -> dict[str, Setting]:
    """Field metadata: the field is filled from the variable ``name`` (see Setting)."""
    return {_SETTING: Setting(name, help, **options)}


def _setting(attribute: attrs.Attribute[Any]) -> Setting:
    return cast(Setting, attribute.metadata[_SETTING])


def _shown_default(value: object) -> str | None:
    """A field default as the environment would spell it; None for "unset"."""
    if value is attrs.NOTHING or value is None or value == ():
        return None
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def _complete_settings(
    _cls: type, fields: list[attrs.Attribute[Any]]
) -> list[attrs.Attribute[Any]]:
    """attrs field transformer: each field's Setting learns its default from the field,
    and a secret field stays out of the repr."""
    return [_complete(field) if _SETTING in field.metadata else field for field in fields]


def _complete(field: attrs.Attribute[Any]) -> attrs.Attribute[Any]:
    setting = _setting(field)
    setting = attrs.evolve(
        setting,
        required=field.default is attrs.NOTHING,
        default=setting.default or _shown_default(field.default),
    )
    # A spread setting's other fields are parts of it with their own secrecy (REDIS_URL's
    # password is secret, its user name is not).
    shown = field.repr and not (setting.secret and not setting.spread)
    return field.evolve(metadata={**field.metadata, _SETTING: setting}, repr=shown)


# --- validators: each message names the variable, from the field's Setting -------------


def _int_in(lo: int, hi: int, unit: str = "") -> Any:
    """attrs validator: None, or an int within [lo, hi]."""

    def check(_inst: object, attribute: attrs.Attribute[Any], value: int | None) -> None:
        if value is not None and not lo <= value <= hi:
            raise ConfigError(
                f"{_setting(attribute).name} must be between {lo} and {hi}{unit}, "
                f"got {_shown_number(value)}"
            )

    return check


def _one_of(choices: tuple[str, ...]) -> Any:
    def check(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
        if value not in choices:
            raise ConfigError(
                f"{_setting(attribute).name} must be one of {', '.join(choices)}, "
                f"got {_shown(value)}"
            )

    return check


def _non_empty(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if not value.strip():
        setting = _setting(attribute)
        raise ConfigError(f"{setting.name} must not be empty: set it to {setting.expects}")


def _utf8(_inst: object, attribute: attrs.Attribute[Any], value: str | None) -> None:
    """Text that can be sent (None passes)."""
    if value is not None and not _is_utf8(value):
        setting = _setting(attribute)
        shown = _HIDDEN if setting.secret else f"got {_shown(value)}"
        raise ConfigError(
            f"{setting.name} must be valid UTF-8 text, but holds bytes that are not (a file or "
            f"shell in another encoding?): {shown}"
        )


def _host(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if (problem := _host_problem(value)) is not None:
        raise ConfigError(f"{_setting(attribute).name} {problem}")


def _header_safe(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
    # httpx encodes header values as ASCII and h11 refuses control characters; a space
    # is legal but is stripped by some proxies and servers, so the secret would differ.
    if not all("\x21" <= c <= "\x7e" for c in value):
        raise ConfigError(
            f"{_setting(attribute).name} must be visible ASCII only (0x21-0x7E: letters, "
            "digits and punctuation; no spaces, accents or control characters), since it is "
            f"sent as the x-secret header {_HIDDEN}"
        )


def _http_url(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
    name, shown = _setting(attribute).name, _shown_url(value)
    if not _is_utf8(value) or not value.isprintable():
        raise ConfigError(
            f"{name} must be printable text, without control characters or "
            f"bytes that are not UTF-8, got {shown}"
        )
    try:
        parts = urlsplit(value)
    except ValueError:  # every urlsplit error is about the host part
        raise ConfigError(
            f"{name} has a malformed host (an IPv6 address goes in balanced "
            f"brackets, like https://[::1]:8443/reset), got {shown}"
        ) from None
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"{name} must be an http:// or https:// URL with a host, got {shown}")
    if not parts.hostname:
        raise ConfigError(
            f"{name} must name a host, like https://backend.example/reset, got {shown}"
        )
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ConfigError(
            f"{name} has an invalid port: it must be a number from 1 to 65535, got {shown}"
        )
    if (problem := _host_problem(parts.hostname)) is not None:
        raise ConfigError(f"{name}'s host {problem}")
    try:
        httpx.URL(value)
    except (httpx.InvalidURL, ValueError) as exc:  # ValueError: idna's errors among them
        raise ConfigError(
            f"{name} is not a URL httpx can send to ({_one_line(str(exc))}), got {shown}"
        ) from None


def _counter_key(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
    # Reconcile and the event subscription would take the lease, the deadlines and the
    # release channel (of this or another deployment) for counters.
    if may_match_prefix(value, OWN_KEY_PREFIX):
        raise ConfigError(
            f"{_setting(attribute).name} {_shown(value)} could match the worker's own keys, "
            f"which all start with {OWN_KEY_PREFIX!r}: start it with a literal prefix of your "
            "own, like 'counter:*'"
        )


def _replica_id(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if not value or len(value) > 128 or not value.isprintable() or any(c.isspace() for c in value):
        raise ConfigError(
            f"{_setting(attribute).name} must be 1-128 printable characters "
            f"without spaces, got {_shown(value)}"
        )


def _ca_file(_inst: object, attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is None:
        return
    name = _setting(attribute).name
    try:
        readable = stat.S_ISREG(os.stat(value).st_mode) and os.access(value, os.R_OK)
    except (OSError, ValueError):  # ValueError: a NUL, or a surrogate os cannot encode
        readable = False
    if not readable:
        raise ConfigError(f"{name} must name a readable file, got {_shown(value)}")
    try:
        ssl.create_default_context(cafile=value)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ConfigError(
            f"{name} {_shown(value)} holds no CA certificate ssl can load "
            f"({_one_line(str(exc))}): point it at the PEM file of the CA that signed the "
            "Redis server's certificate"
        ) from None


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@attrs.frozen(kw_only=True, field_transformer=_complete_settings)
class Config:
    """Validated settings of one replica. Build it with :meth:`from_env` or directly.

    A field filled from the environment declares its variable in its metadata; the
    fields' order is that of ``SETTINGS``, ``--help`` and the README's table.
    """

    reset_endpoint_url: str = attrs.field(
        validator=_http_url,
        metadata=_env(
            "RESET_ENDPOINT_URL",
            "http(s) URL the reset is POSTed to; plain http "
            "only to a loopback host unless ALLOW_INSECURE_HTTP=1",
            delivery=True,
            expects="the http(s) URL of your backend's reset endpoint",
        ),
    )
    reset_secret: str = attrs.field(
        validator=[_non_empty, _header_safe],
        metadata=_env(
            "RESET_SECRET",
            "sent as the x-secret header: visible ASCII only, no spaces",
            secret=True,
            delivery=True,
            expects="the shared secret your backend expects",
        ),
    )
    counter_key: str = attrs.field(
        default="contador_reset",
        validator=[_non_empty, _utf8, _counter_key],
        metadata=_env(
            "COUNTER_KEY",
            "key, or glob pattern such as counter:*, whose expiry "
            "means inactivity; must not be able to match the worker's own tcw:{ keys",
            expects="the key (or glob pattern) the app sets",
        ),
    )
    redis_host: str = attrs.field(
        default="127.0.0.1", validator=_host, metadata=_env("REDIS_HOST", "Redis host")
    )
    redis_port: int = attrs.field(
        default=6379,
        validator=_int_in(1, 65535),
        metadata=_env("REDIS_PORT", "Redis port", parse=_integer),
    )
    redis_password: str | None = attrs.field(
        default=None,
        validator=_utf8,
        metadata=_env("REDIS_PASSWORD", "Redis password", secret=True),
    )
    redis_db: int = attrs.field(
        default=0,
        validator=_int_in(0, _MAX_DB),
        metadata=_env("REDIS_DB", "Redis database number", parse=_integer),
    )
    # A user name comes only with REDIS_URL, which fills the four fields above too.
    redis_username: str | None = attrs.field(
        default=None,
        validator=_utf8,
        metadata=_env(
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
        metadata=_env(
            "REDIS_CLUSTER_NODES",
            "Cluster mode: host:port,... of some cluster "
            "nodes to start from; the rest is discovered",
            parse=_nodes,
        ),
    )
    redis_sentinels: tuple[tuple[str, int], ...] = attrs.field(
        default=(),
        metadata=_env(
            "REDIS_SENTINELS",
            "Sentinel mode: host:port,host:port,... of the "
            "sentinels; the master is discovered and followed through failovers",
            parse=_nodes,
        ),
    )
    redis_sentinel_master: str | None = attrs.field(
        default=None,
        validator=_utf8,
        metadata=_env("REDIS_SENTINEL_MASTER", "Sentinel mode: the monitored master's name"),
    )
    redis_sentinel_password: str | None = attrs.field(
        default=None,
        validator=_utf8,
        metadata=_env(
            "REDIS_SENTINEL_PASSWORD", "password of the sentinels themselves", secret=True
        ),
    )
    lease_ttl_ms: int = attrs.field(
        default=3000,
        validator=_int_in(500, 5000, " ms"),
        metadata=_env(
            "LEASE_TTL_MS",
            "leader lease length in ms (500-5000): a crashed leader is replaced within this time",
            parse=_integer,
        ),
    )
    takeover_check_ms: int = attrs.field(
        default=25,
        validator=_int_in(0, 1000, " ms (0: off)"),
        metadata=_env(
            "TAKEOVER_CHECK_MS",
            "how often a standby asks Redis whether the leader's connection is gone, in ms "
            "(0-1000): a leader that dies is replaced within about twice this; 0: only "
            "when its lease expires",
            parse=_integer,
        ),
    )
    replica_id: str = attrs.field(
        factory=default_replica_id,
        validator=_replica_id,
        metadata=_env(
            "REPLICA_ID",
            "this replica's name in the lease, logs and requests",
            default="hostname-pid",
        ),
    )
    reset_timeout_ms: int = attrs.field(
        default=5000,
        validator=_int_in(100, 14999, " ms"),
        metadata=_env(
            "RESET_TIMEOUT_MS",
            "timeout of one reset request in ms (100-14999)",
            parse=_integer,
            delivery=True,
        ),
    )
    max_in_flight: int = attrs.field(
        default=32,
        validator=_int_in(1, 1000),
        metadata=_env(
            "MAX_IN_FLIGHT",
            "most reset requests in the air that began under 0.1 s ago "
            "(1-1000); at most half of them retries. A request still unanswered "
            "after 0.1 s frees its place and goes on among at most max(MAX_IN_FLIGHT, "
            "4) slow ones: the backend sees at most MAX_IN_FLIGHT + max(MAX_IN_FLIGHT, "
            "4) requests at once",
            parse=_integer,
            delivery=True,
        ),
    )
    reset_give_up_after: float | None = attrs.field(
        default=None,
        metadata=_env(
            "RESET_GIVE_UP_AFTER",
            "a duration such as 90s, 30m, 6h or 2d: a reset "
            "failing that long moves to the dead letters (`redeliver` sends it "
            "again)",
            parse=_duration,
            default="never",
            delivery=True,
        ),
    )
    log_level: str = attrs.field(
        default="INFO",
        validator=_one_of(_LOG_LEVELS),
        metadata=_env("LOG_LEVEL", "DEBUG, INFO, WARNING or ERROR", parse=_upper),
    )
    log_format: str = attrs.field(
        default="text",
        validator=_one_of(_LOG_FORMATS),
        metadata=_env(
            "LOG_FORMAT", "text (readable lines) or json (one JSON object a line)", parse=_lower
        ),
    )
    log_resets: str = attrs.field(
        default="each",
        validator=_one_of(_LOG_RESETS),
        metadata=_env(
            "LOG_RESETS",
            "each (one INFO line per reset sent) or summary (at most one INFO line per "
            "10 s: how many were sent, how many after a retry, the slowest)",
            parse=_lower,
        ),
    )
    reset_signing_secret: str | None = attrs.field(
        default=None,
        validator=_utf8,
        metadata=_env(
            "RESET_SIGNING_SECRET",
            "if set, sign each request: x-signature: t=<unix>,v1=<HMAC-SHA256 hex of '<t>.<body>'>",
            secret=True,
            delivery=True,
        ),
    )
    allow_insecure_http: bool = attrs.field(
        default=False,
        metadata=_env(
            "ALLOW_INSECURE_HTTP",
            "1 to allow a plain http:// RESET_ENDPOINT_URL "
            "on a host that is not loopback (the secret then travels unencrypted)",
            parse=_boolean,
            delivery=True,
        ),
    )
    health_port: int | None = attrs.field(
        default=None,
        validator=_int_in(0, 65535),
        metadata=_env(
            "HEALTH_PORT",
            "if set, serve /healthz, /readyz and /metrics on this port",
            parse=_integer,
        ),
    )
    health_host: str = attrs.field(
        default="0.0.0.0",  # noqa: S104 - probes reach the pod on its own address
        validator=_host,
        metadata=_env("HEALTH_HOST", "address the health endpoint listens on"),
    )
    redis_ca_file: str | None = attrs.field(
        default=None,
        validator=_ca_file,
        metadata=_env(
            "REDIS_CA_FILE",
            "CA bundle (PEM) to verify a rediss:// server with",
            default="system CAs",
        ),
    )
    # Where the settings came from, not what they are (so not part of equality): the
    # REDIS_* settings that were set but lost to REDIS_URL, for a warning at start.
    overridden: tuple[str, ...] = attrs.field(default=(), eq=False)
    # Names in the .env file that are no setting, and environment variables a typo away
    # from one: a warning each at start and in `check` (see ``misnamed``).
    notices: tuple[str, ...] = attrs.field(default=(), eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
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
        parts = urlsplit(self.reset_endpoint_url)
        if (
            parts.scheme == "http"
            and not self.allow_insecure_http
            and not _is_loopback(parts.hostname or "")
        ):
            raise ConfigError(
                f"RESET_ENDPOINT_URL uses plain http to {_shown(parts.hostname or '')}, which "
                "is not loopback: RESET_SECRET would travel unencrypted. Use https, or set "
                "ALLOW_INSECURE_HTTP=1 if that network is private and trusted"
            )

    @property
    def lease_ttl(self) -> float:
        return self.lease_ttl_ms / 1000

    @property
    def takeover_check(self) -> float | None:
        """Seconds between a standby's liveness checks; None: fast takeover off."""
        return self.takeover_check_ms / 1000 or None

    @property
    def reset_timeout(self) -> float:
        return self.reset_timeout_ms / 1000

    @property
    def keys(self) -> Keys:
        """The deployment's own Redis keys and channels."""
        return Keys(self.counter_key)

    @property
    def namespace(self) -> str:
        """Prefix of the worker's own Redis keys (:attr:`Keys.namespace`)."""
        return self.keys.namespace

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
        environ = os.environ if environ is None else environ
        notices: tuple[str, ...] = ()
        if env_file is not None:
            path = Path(env_file)
            if _exists(path):
                values.update(_read_env_file(path))
                notices = misnamed(values, str(path))
            elif required_file:
                raise ConfigError(f"--env-file {_shown(str(path))}: no such file")
            else:
                hint = _no_file_hint(path)
        notices += misnamed(environ)
        values.update(environ)
        if redis_only:
            values = {k: v for k, v in values.items() if k not in _DELIVERY_SETTINGS}
            values.update(RESET_ENDPOINT_URL=_UNUSED_URL, RESET_SECRET=_UNUSED_SECRET)
        return cls._from_mapping(values, hint, notices)

    @classmethod
    def _from_mapping(
        cls, env: Mapping[str, str], hint: str = "", notices: tuple[str, ...] = ()
    ) -> Config:
        """Each field's variable through its parser; unset or blank leaves the default."""
        kwargs: dict[str, Any] = {}
        spread: dict[str, Any] = {}
        for field in attrs.fields(cls):
            if _SETTING not in field.metadata:
                continue
            setting = _setting(field)
            raw = env.get(setting.name, "").strip()
            if not raw:
                if setting.required:
                    raise ConfigError(
                        f"{setting.name} is required: set it to {setting.expects}{hint}"
                    )
            elif setting.spread:
                spread = setting.parse(setting, raw)
            else:
                kwargs[field.name] = setting.parse(setting, raw)
        if spread:  # REDIS_URL wins over the settings it holds too: name those that were set
            lost = spread.keys() & kwargs.keys()
            kwargs["overridden"] = tuple(
                _setting(f).name for f in attrs.fields(cls) if f.name in lost
            )
            kwargs.update(spread)
        return cls(**kwargs, notices=notices)


SETTINGS: tuple[Setting, ...] = tuple(
    _setting(field) for field in attrs.fields(Config) if _SETTING in field.metadata
)
_DELIVERY_SETTINGS = frozenset(s.name for s in SETTINGS if s.delivery)
_NAMES = [s.name for s in SETTINGS]
_CLOSE = 0.8  # difflib ratio: LEASE_TLL_MS, REDIS_PASS; not REDIS_SERVICE_HOST (Kubernetes)


def misnamed(names: Iterable[str], env_file: str | None = None) -> tuple[str, ...]:
    """A warning for each name that is no setting: every such name of ``env_file`` (all
    its names are meant for the worker), and of the environment only those close to a
    setting's name (it holds PATH, HOME and the like too). Names only: never a value."""
    out = []
    for name in names:
        if name in _NAMES:
            continue
        shown = _shown(name)
        close = difflib.get_close_matches(name.upper(), _NAMES, n=1, cutoff=_CLOSE)
        if env_file is not None:
            guess = close or difflib.get_close_matches(name.upper(), _NAMES, n=1)
            advice = f"did you mean {guess[0]}?" if guess else "`--help` lists the settings"
            out.append(f"{_shown(env_file)} sets {shown}, which is no setting ({advice}); ignored")
        elif close:
            out.append(
                f"environment variable {shown} is no setting (did you mean {close[0]}?); ignored"
            )
    return tuple(out)


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
