"""What to do about a reset request that failed: plain logic, for the "reset not
delivered" log line.

The delivery's error text says what happened (``ConnectError talking to host:port: ...``,
``HTTP 503 from host:port``, ``no answer within RESET_TIMEOUT_MS=...``); the hint says
which setting or which side to look at. Errors that already name a setting (a 401, a
404, a redirect) get no second hint.
"""

from __future__ import annotations

__all__ = ["delivery_hint", "with_hint"]

# Substrings of the error text (as httpx and the lanes word them), first match wins.
_NO_ANSWER = (
    (
        ("refused",),
        "is the backend running and listening at the host and port of RESET_ENDPOINT_URL?",
    ),
    (
        ("name or service not known", "nodename nor servname", "no address", "getaddrinfo"),
        "the host in RESET_ENDPOINT_URL does not resolve: check its spelling and DNS",
    ),
    (
        ("certificate", "[ssl"),
        "the backend's certificate must be valid for the host in RESET_ENDPOINT_URL "
        "and trusted by this machine",
    ),
    (
        ("timed out", "timeout", "no answer within"),
        "the backend is slow or unreachable: see its logs and load, or raise "
        "RESET_TIMEOUT_MS if it answers, just late",
    ),
    (
        ("unreachable", "no route"),
        "no network route to the host in RESET_ENDPOINT_URL: check the network and firewall",
    ),
)
_NO_ANSWER_ELSE = "the backend dropped the connection: see its logs (RESET_ENDPOINT_URL)"
_BY_STATUS = {
    401: "check RESET_SECRET (and RESET_SIGNING_SECRET)",
    403: "check RESET_SECRET (and RESET_SIGNING_SECRET)",
    404: "check the path in RESET_ENDPOINT_URL",
    408: "the backend timed out reading the request: see its logs and load",
    429: "the backend asks for fewer requests: lower MAX_IN_FLIGHT or give it capacity",
}


def delivery_hint(status: int | None, error: str) -> str:
    """What to look at for a failed attempt (``status`` None: no answer); "" if the
    error already names the setting to change."""
    if status is None:
        text = error.lower()
        for needles, hint in _NO_ANSWER:
            if any(n in text for n in needles):
                return hint
        return _NO_ANSWER_ELSE
    if "RESET_" in error:  # the delivery's own hint names it already
        return ""
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    if status >= 500:
        return "the backend failed: its logs say why; the worker retries with backoff"
    if 300 <= status < 400:
        return "set RESET_ENDPOINT_URL to the final URL (redirects are not followed)"
    return "the backend refused the request: its logs say why"


def with_hint(status: int | None, error: str) -> str:
    """``error`` followed by its hint in parentheses, if there is one."""
    hint = delivery_hint(status, error)
    return f"{error} ({hint})" if hint else error
