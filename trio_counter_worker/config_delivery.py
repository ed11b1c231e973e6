"""The settings of sending resets: the endpoint, its secrets, and how requests are paced.

One group of :class:`~trio_counter_worker.config.Config`'s fields (see there). Each is
marked ``delivery``: the commands that only read Redis ignore them.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from typing import Any
from urllib.parse import urlsplit

import attrs

from .errors import ConfigError
from .setting import (
    HIDDEN,
    boolean,
    duration,
    env_var,
    host_problem,
    int_in,
    integer,
    is_ip,
    is_utf8,
    non_empty,
    one_line,
    setting_of,
    shown,
    utf8,
)

__all__ = ["DeliverySettings"]


def _shown_url(url: str) -> str:
    """:func:`shown` with a ``user:password@`` part masked: a URL may carry credentials."""
    return shown(re.sub(r"(?<=//)[^/?#]*@", "***@", url, count=1))


def _header_safe(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
    # httpx encodes header values as ASCII and h11 refuses control characters; a space
    # is legal but is stripped by some proxies and servers, so the secret would differ.
    if not all("\x21" <= c <= "\x7e" for c in value):
        raise ConfigError(
            f"{setting_of(attribute).name} must be visible ASCII only (0x21-0x7E: letters, "
            "digits and punctuation; no spaces, accents or control characters), since it is "
            f"sent as the x-secret header {HIDDEN}"
        )


def _http_url(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
    name, text = setting_of(attribute).name, _shown_url(value)
    if not is_utf8(value) or not value.isprintable():
        raise ConfigError(
            f"{name} must be printable text, without control characters or "
            f"bytes that are not UTF-8, got {text}"
        )
    try:
        parts = urlsplit(value)
    except ValueError:  # every urlsplit error is about the host part
        raise ConfigError(
            f"{name} has a malformed host (an IPv6 address goes in balanced "
            f"brackets, like https://[::1]:8443/reset), got {text}"
        ) from None
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"{name} must be an http:// or https:// URL with a host, got {text}")
    if not parts.hostname:
        raise ConfigError(
            f"{name} must name a host, like https://backend.example/reset, got {text}"
        )
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ConfigError(
            f"{name} has an invalid port: it must be a number from 1 to 65535, got {text}"
        )
    if (problem := host_problem(parts.hostname)) is not None:
        raise ConfigError(f"{name}'s host {problem}")
    import httpx  # here: a setting that fails earlier exits 2 without its ~70 ms import

    try:
        httpx.URL(value)
    except (httpx.InvalidURL, ValueError) as exc:  # ValueError: idna's errors among them
        raise ConfigError(
            f"{name} is not a URL httpx can send to ({one_line(str(exc))}), got {text}"
        ) from None


def _is_loopback(host: str) -> bool:
    """Whether every address ``host`` stands for is loopback. A name is resolved, so that
    the answer holds for where the request really goes; ConfigError if it does not."""
    if host == "localhost":
        return True
    if is_ip(host):
        return ipaddress.ip_address(host).is_loopback
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(
            f"RESET_ENDPOINT_URL's host {shown(host)} does not resolve "
            f"({one_line(reason)}): check the spelling. (Plain http is allowed to a "
            "loopback host only, unless ALLOW_INSECURE_HTTP=1)"
        ) from None
    return all(ipaddress.ip_address(str(info[4][0])).is_loopback for info in infos)


@attrs.frozen(kw_only=True, slots=False)  # slots=False: see Config
class DeliverySettings:
    """Where resets go, what proves them, and how many are in the air."""

    reset_endpoint_url: str = attrs.field(
        validator=_http_url,
        metadata=env_var(
            "RESET_ENDPOINT_URL",
            "http(s) URL the reset is POSTed to; plain http "
            "only to a loopback host unless ALLOW_INSECURE_HTTP=1",
            delivery=True,
            expects="the http(s) URL of your backend's reset endpoint",
        ),
    )
    reset_secret: str = attrs.field(
        validator=[non_empty, _header_safe],
        metadata=env_var(
            "RESET_SECRET",
            "sent as the x-secret header: visible ASCII only, no spaces",
            secret=True,
            delivery=True,
            expects="the shared secret your backend expects",
        ),
    )
    reset_timeout_ms: int = attrs.field(
        default=5000,
        validator=int_in(100, 14999, " ms"),
        metadata=env_var(
            "RESET_TIMEOUT_MS",
            "timeout of one reset request in ms (100-14999)",
            parse=integer,
            delivery=True,
        ),
    )
    max_in_flight: int = attrs.field(
        default=32,
        validator=int_in(1, 1000),
        metadata=env_var(
            "MAX_IN_FLIGHT",
            "most reset requests in the air that are not yet slow (1-1000); at most "
            "half of them retries. A request still unanswered after 0.1 s (20-100 ms: "
            "4 x the p90 of the backend's recent answers) frees its place and goes on "
            "among at most max(MAX_IN_FLIGHT, 4) slow ones (past that, the oldest is "
            "abandoned and retried): the worker holds at most MAX_IN_FLIGHT + "
            "max(MAX_IN_FLIGHT, 4) requests at once",
            parse=integer,
            delivery=True,
        ),
    )
    reset_give_up_after: float | None = attrs.field(
        default=None,
        metadata=env_var(
            "RESET_GIVE_UP_AFTER",
            "a duration such as 90s, 30m, 6h or 2d: a reset "
            "failing that long moves to the dead letters (`redeliver` sends it "
            "again)",
            parse=duration,
            default="never",
            delivery=True,
        ),
    )
    reset_signing_secret: str | None = attrs.field(
        default=None,
        validator=utf8,
        metadata=env_var(
            "RESET_SIGNING_SECRET",
            "if set, sign each request: x-signature: t=<unix>,v1=<HMAC-SHA256 hex of '<t>.<body>'>",
            secret=True,
            delivery=True,
        ),
    )
    allow_insecure_http: bool = attrs.field(
        default=False,
        metadata=env_var(
            "ALLOW_INSECURE_HTTP",
            "1 to allow a plain http:// RESET_ENDPOINT_URL "
            "on a host that is not loopback (the secret then travels unencrypted)",
            parse=boolean,
            delivery=True,
        ),
    )

    def _check_transport(self) -> None:
        """Plain http only where the secret cannot be read on the way (after each field's
        checks: the URL is known to parse)."""
        parts = urlsplit(self.reset_endpoint_url)
        if (
            parts.scheme == "http"
            and not self.allow_insecure_http
            and not _is_loopback(parts.hostname or "")
        ):
            raise ConfigError(
                f"RESET_ENDPOINT_URL uses plain http to {shown(parts.hostname or '')}, which "
                "is not loopback: RESET_SECRET would travel unencrypted. Use https, or set "
                "ALLOW_INSECURE_HTTP=1 if that network is private and trusted"
            )

    @property
    def reset_timeout(self) -> float:
        return self.reset_timeout_ms / 1000
