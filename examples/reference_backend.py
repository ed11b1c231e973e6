"""Reference reset endpoint for trio-counter-worker: Python standard library only.

Run it::

    python examples/reference_backend.py --port 3000 --secret change-me \
        [--signing-secret K] [--redis-url redis://127.0.0.1:6379/0] [--ttl 1200]

(``--secret`` and ``--signing-secret`` default to the environment variables
``RESET_SECRET`` and ``RESET_SIGNING_SECRET``, the worker's own names. No ``.env`` file is
read: export it first, e.g. ``set -a; . ./.env; set +a``.)

It stands in for your app's backend. Per counter key it keeps the counter value and the
time of the last activity, and serves:

``POST /activity {"key": "...", "ttl": 1200}``
    What the app does on every bit of activity: counter += 1, last activity = now. With
    ``--redis-url`` it also runs ``SET <key> 1 EX <ttl>`` in Redis (a tiny RESP client
    below, so no redis package is needed), so the worker sees the activity.

``POST /reset`` (also ``/api/counter/reset``, the path in ``.env.example``)
    The worker's reset request. It is checked in this order:

    1. ``x-secret`` must equal ``--secret`` (constant-time compare), else 401;
    2. with ``--signing-secret``, ``x-signature: t=<unix s>,v1=<hex HMAC-SHA256>`` must
       be valid and ``t`` within 300 s of now, else 401 (the worker sets
       ``RESET_SIGNING_SECRET`` to the same value to send it);
    3. a repeated ``idempotency-key`` (remembered 24 h) -> 200 ``{"status": "duplicate"}``;
    4. a ``fencing_token`` lower than the highest seen for the key
       -> 200 ``{"status": "stale_fencing_token"}``;
    5. an ``expired_at`` older than the key's last activity
       -> 200 ``{"status": "activity_after_expiry"}``;
    6. otherwise the counter is zeroed -> 200 ``{"status": "reset"}``, and one log line.

    Every "ignored" answer is a 2xx on purpose: the request was understood and nothing
    more needs to happen, so the worker must stop retrying it.

    A **dry run** (header ``x-reset-dry-run: 1``) goes through checks 1 and 2 and the body
    check, then stops: 200 ``{"status": "dry_run"}``, and nothing is reset or recorded.
    ``trio-counter-worker check`` uses it to verify ``RESET_SECRET`` without resetting.

``OPTIONS /reset`` (and ``/api/counter/reset``)
    204 with ``Allow: POST, OPTIONS`` and ``x-reset-dry-run: supported``: how ``check``
    learns that this path exists and that the dry run is supported.

``GET /counters``  the state, as JSON;  ``GET /healthz``  ``{"ok": true}``.

The checks live in small pure functions and one class (:func:`sign`,
:func:`verify_signature`, :class:`ResetLedger`) so a real backend can copy them and
tests can exercise them without HTTP. State is in memory: a real backend keeps it in
its database, next to the counter, and applies a reset in the same transaction as the
idempotency record (otherwise a crash between the two reopens the duplicate window).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import math
import os
import signal
import socket
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

__all__ = [
    "DRY_RUN_HEADER",
    "IDEMPOTENCY_TTL",
    "SIGNATURE_TOLERANCE",
    "MiniRedis",
    "Reset",
    "ResetLedger",
    "ResetStatus",
    "make_server",
    "sign",
    "verify_signature",
]

log = logging.getLogger("reference_backend")

SIGNATURE_TOLERANCE = 300.0  # seconds between the signature's t and our clock
IDEMPOTENCY_TTL = 24 * 3600.0  # how long applied reset ids are remembered
DEFAULT_TTL = 1200  # seconds: the activity key's TTL when /activity does not say
MAX_BODY = 64 * 1024
RESET_PATHS = ("/reset", "/api/counter/reset")
DRY_RUN_HEADER = "x-reset-dry-run"  # "1" on a POST: check everything, reset nothing
# What OPTIONS answers per path; only the reset paths advertise the dry run.
ALLOWED = {
    **dict.fromkeys(RESET_PATHS, "POST, OPTIONS"),
    "/activity": "POST, OPTIONS",
    "/counters": "GET, OPTIONS",
    "/healthz": "GET, OPTIONS",
}

ResetStatus = Literal["reset", "duplicate", "stale_fencing_token", "activity_after_expiry"]


# -- signatures ------------------------------------------------------------------------


def sign(secret: str, body: bytes, t: int) -> str:
    """The ``x-signature`` value for ``body`` signed at Unix time ``t``.

    ``t=<t>,v1=<hex HMAC-SHA256(secret, b"<t>." + body)>``: the scheme of Stripe's
    webhook signatures. The timestamp is inside the MAC, so it cannot be changed to
    replay an old request later.
    """
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify_signature(
    secret: str,
    header: str | None,
    body: bytes,
    now: float,
    tolerance: float = SIGNATURE_TOLERANCE,
) -> bool:
    """Whether ``header`` is a valid ``x-signature`` for ``body`` at time ``now``.

    False when the header is missing or malformed, when ``t`` is more than ``tolerance``
    seconds away from ``now`` (either way: replay protection, with room for clock skew),
    or when no ``v1`` matches. Several ``v1`` entries are allowed (a sender rotating its
    secret may send one per secret); unknown entries are ignored. Comparisons are
    constant-time.
    """
    if not header:
        return False
    t: int | None = None
    candidates: list[bytes] = []
    for part in header.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep:
            return False
        if name == "t":
            if t is not None or not (value.isascii() and value.isdigit()) or len(value) > 12:
                return False
            t = int(value)
        elif name == "v1":
            candidates.append(value.encode())
    if t is None or not candidates or abs(now - t) > tolerance:
        return False
    expected = sign(secret, body, t).partition(",v1=")[2].encode()
    # Check every candidate: how many matched must not leak through timing either.
    matched = False
    for candidate in candidates:
        matched |= hmac.compare_digest(expected, candidate)
    return matched


def secret_matches(expected: str, given: str | None) -> bool:
    """Constant-time comparison of the ``x-secret`` header (as bytes: any characters)."""
    if given is None:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


# -- the ledger ------------------------------------------------------------------------


@dataclass(frozen=True)
class Reset:
    """The reset request body (see "The reset request" in the project README)."""

    key: str
    reset_id: str
    expired_at: float
    fencing_token: int
    replica_id: str = ""

    @classmethod
    def from_json(cls, body: bytes, idempotency_key: str | None = None) -> Reset:
        """Parse and validate a body; ValueError says what is wrong.

        ``idempotency_key`` (the header) must agree with the body's ``reset_id`` when
        given: the worker always sends both, and a mismatch means a broken sender.
        """
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"body is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError("body must be a JSON object")
        key, reset_id = data.get("key"), data.get("reset_id")
        expired_at, token = data.get("expired_at"), data.get("fencing_token")
        replica_id = data.get("replica_id", "")
        if not isinstance(key, str) or not key:
            raise ValueError("key must be a non-empty string")
        if not isinstance(reset_id, str) or not reset_id:
            raise ValueError("reset_id must be a non-empty string")
        if (
            isinstance(expired_at, bool)
            or not isinstance(expired_at, int | float)
            or not math.isfinite(expired_at)
        ):
            raise ValueError("expired_at must be a number (Unix seconds)")
        if isinstance(token, bool) or not isinstance(token, int):
            raise ValueError("fencing_token must be an integer")
        if not isinstance(replica_id, str):
            raise ValueError("replica_id must be a string")
        if idempotency_key is not None and idempotency_key != reset_id:
            raise ValueError("the idempotency-key header differs from the body's reset_id")
        return cls(key, reset_id, float(expired_at), token, replica_id)


@dataclass
class Counter:
    value: int = 0
    last_activity: float | None = None  # our clock, Unix seconds
    deadline: float | None = None  # last_activity + the key's TTL: when this episode ends
    max_fencing_token: int | None = None


class ResetLedger:
    """Counters plus everything needed to apply each reset once. Thread-safe.

    A stand-in for the backend's database: ``activity`` is what the app does on each bit
    of activity, ``apply`` is the reset endpoint's decision.
    """

    def __init__(self, idempotency_ttl: float = IDEMPOTENCY_TTL) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, Counter] = {}
        # reset_id -> (applied at, the answer it got); oldest first, so expiry is cheap.
        self._applied: OrderedDict[str, tuple[float, ResetStatus]] = OrderedDict()
        self._idempotency_ttl = idempotency_ttl

    def activity(self, key: str, now: float, ttl: float | None = None) -> int:
        """Count one activity on ``key`` at ``now``; return the new counter value.

        With ``ttl`` (the activity key's TTL), activity arriving after the previous
        episode's deadline starts a new episode from 0 on its own. The worker's reset for
        the old episode may still be on its way (failover, retries); it then arrives with
        an ``expired_at`` older than this activity and is ignored, correctly: the old
        counts were dropped here already, and the new ones must survive it.
        """
        with self._lock:
            counter = self._counters.setdefault(key, Counter())
            if counter.deadline is not None and now >= counter.deadline:
                counter.value = 0
            counter.value += 1
            counter.last_activity = now
            counter.deadline = None if ttl is None else now + ttl
            return counter.value

    def apply(self, reset: Reset, now: float) -> ResetStatus:
        """Decide ``reset`` at ``now`` and, unless it must be ignored, zero the counter."""
        with self._lock:
            self._forget_old(now)
            if reset.reset_id in self._applied:
                return "duplicate"
            counter = self._counters.setdefault(reset.key, Counter())
            if (
                counter.max_fencing_token is not None
                and reset.fencing_token < counter.max_fencing_token
            ):
                return "stale_fencing_token"
            counter.max_fencing_token = reset.fencing_token
            if counter.last_activity is not None and reset.expired_at < counter.last_activity:
                return "activity_after_expiry"
            counter.value = 0
            counter.deadline = None
            self._applied[reset.reset_id] = (now, "reset")
            return "reset"

    def value(self, key: str) -> int:
        with self._lock:
            counter = self._counters.get(key)
            return 0 if counter is None else counter.value

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {
                key: {
                    "value": c.value,
                    "last_activity": c.last_activity,
                    "max_fencing_token": c.max_fencing_token,
                }
                for key, c in self._counters.items()
            }

    def _forget_old(self, now: float) -> None:
        cutoff = now - self._idempotency_ttl
        while self._applied:
            reset_id, (applied_at, _status) = next(iter(self._applied.items()))
            if applied_at > cutoff:
                break
            del self._applied[reset_id]


# -- a tiny Redis client (SET ... EX only), so the example stays stdlib-only ------------


class MiniRedis:
    """Just enough RESP to run ``SET key 1 EX ttl`` against ``redis://`` or ``rediss://``.

    One short connection per call: simple, thread-safe, and plenty for a demo. Use
    redis-py (see ``app_activity.py``) in a real app.
    """

    def __init__(self, url: str, timeout: float = 2.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss") or not parts.hostname:
            raise ValueError(f"not a redis:// or rediss:// URL: {url!r}")
        self._host = parts.hostname
        self._port = parts.port or 6379
        self._tls = parts.scheme == "rediss"
        self._username = unquote(parts.username) if parts.username else None
        self._password = unquote(parts.password) if parts.password else None
        db = parts.path.lstrip("/")
        self._db = int(db) if db else 0
        self._timeout = timeout

    def set_ex(self, key: str, ttl: int) -> None:
        commands: list[list[str]] = []
        if self._password is not None:
            user = [] if self._username is None else [self._username]
            commands.append(["AUTH", *user, self._password])
        if self._db:
            commands.append(["SELECT", str(self._db)])
        commands.append(["SET", key, "1", "EX", str(ttl)])
        with self._connect() as sock, sock.makefile("rb") as reader:
            sock.sendall(b"".join(_resp_command(c) for c in commands))
            for command in commands:
                line = reader.readline()
                if not line.startswith(b"+"):
                    what = line.decode(errors="replace").strip() or "connection closed"
                    raise RuntimeError(f"Redis refused {command[0]}: {what}")

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self._host, self._port), timeout=self._timeout)
        if self._tls:
            return ssl.create_default_context().wrap_socket(sock, server_hostname=self._host)
        return sock


def _resp_command(args: Sequence[str]) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        raw = arg.encode()
        out.append(f"${len(raw)}\r\n".encode() + raw + b"\r\n")
    return b"".join(out)


# -- HTTP ------------------------------------------------------------------------------


class BackendServer(ThreadingHTTPServer):
    request_queue_size = 1024  # the default 5 resets connections under a burst
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        *,
        secret: str,
        signing_secret: str | None = None,
        ledger: ResetLedger | None = None,
        redis: MiniRedis | None = None,
        default_ttl: int = DEFAULT_TTL,
    ) -> None:
        super().__init__(address, _Handler)
        self.secret = secret
        self.signing_secret = signing_secret
        self.ledger = ledger if ledger is not None else ResetLedger()
        self.redis = redis
        self.default_ttl = default_ttl

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"


def make_server(
    host: str = "127.0.0.1",
    port: int = 3000,
    *,
    secret: str,
    signing_secret: str | None = None,
    redis_url: str | None = None,
    default_ttl: int = DEFAULT_TTL,
) -> BackendServer:
    """A bound server (port 0: a free one; see ``.url``); call ``serve_forever()``."""
    return BackendServer(
        (host, port),
        secret=secret,
        signing_secret=signing_secret,
        redis=MiniRedis(redis_url) if redis_url else None,
        default_ttl=default_ttl,
    )


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the worker's client expects
    timeout = 30.0  # idle keep-alive connections are closed after this
    server: BackendServer

    def log_message(self, format: str, *args: Any) -> None:
        """No access log: each reset is logged once, with its outcome."""

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._answer(200, {"ok": True})
        elif self.path == "/counters":
            self._answer(200, self.server.ledger.snapshot())
        else:
            self._answer(404, {"error": "not found"})

    def do_OPTIONS(self) -> None:
        if self._read_body() is None:
            return
        allowed = ALLOWED.get(self.path)
        if allowed is None:
            self._answer(404, {"error": "not found"})
            return
        self.send_response(204)  # no body, so no content-length (RFC 9110, 8.6)
        self.send_header("allow", allowed)
        if self.path in RESET_PATHS:
            self.send_header(DRY_RUN_HEADER, "supported")
        self.end_headers()

    def do_POST(self) -> None:
        body = self._read_body()
        if body is None:
            return
        if self.path in RESET_PATHS:
            self._reset(body)
        elif self.path == "/activity":
            self._activity(body)
        else:
            self._answer(404, {"error": "not found"})

    def _reset(self, body: bytes) -> None:
        server = self.server
        now = time.time()
        if not secret_matches(server.secret, self.headers.get("x-secret")):
            log.warning("reset refused: bad x-secret from %s", self.client_address[0])
            self._answer(401, {"error": "bad x-secret"})
            return
        if server.signing_secret is not None and not verify_signature(
            server.signing_secret, self.headers.get("x-signature"), body, now
        ):
            log.warning(
                "reset refused: missing, invalid or expired x-signature from %s",
                self.client_address[0],
            )
            self._answer(401, {"error": "bad x-signature"})
            return
        dry_run = self.headers.get(DRY_RUN_HEADER)
        if dry_run not in (None, "1"):
            # Never reset on a header we do not understand: the sender meant "don't".
            self._answer(400, {"error": f"{DRY_RUN_HEADER} must be 1 (or absent)"})
            return
        try:
            reset = Reset.from_json(body, self.headers.get("idempotency-key"))
        except ValueError as exc:
            self._answer(400, {"error": str(exc)})
            return
        if dry_run is not None:
            log.info(
                "dry run accepted: secret%s right, from replica %s",
                " and signature" if server.signing_secret is not None else "",
                reset.replica_id,
            )
            self._answer(200, {"status": "dry_run", "key": reset.key, "reset_id": reset.reset_id})
            return
        before = server.ledger.value(reset.key)
        status = server.ledger.apply(reset, now)
        log.info(
            "%s: key=%r reset_id=%s fencing_token=%d replica=%s counter_before=%d lag_ms=%.0f",
            "reset applied" if status == "reset" else f"reset ignored ({status})",
            reset.key,
            reset.reset_id,
            reset.fencing_token,
            reset.replica_id,
            before,
            (now - reset.expired_at) * 1000,
        )
        self._answer(200, {"status": status, "key": reset.key, "reset_id": reset.reset_id})

    def _activity(self, body: bytes) -> None:
        try:
            data = json.loads(body)
            key = data["key"]
            ttl = data.get("ttl", self.server.default_ttl)
            if not isinstance(key, str) or not key:
                raise ValueError("key must be a non-empty string")
            if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < 1:
                raise ValueError("ttl must be a positive integer (seconds)")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            self._answer(400, {"error": f'expected {{"key": "...", "ttl": 1200}}: {exc}'})
            return
        value = self.server.ledger.activity(key, time.time(), ttl)
        if self.server.redis is not None:
            try:
                self.server.redis.set_ex(key, ttl)
            except (OSError, RuntimeError) as exc:
                log.error("activity on %r counted, but SET in Redis failed: %s", key, exc)
                self._answer(502, {"error": f"redis: {exc}", "value": value})
                return
        self._answer(200, {"key": key, "value": value, "ttl": ttl})

    def _read_body(self) -> bytes | None:
        try:
            length = int(self.headers.get("content-length", "0"))
        except ValueError:
            length = -1
        if (
            length < 0
            or length > MAX_BODY
            or "chunked" in self.headers.get("transfer-encoding", "").lower()
        ):
            self.close_connection = True
            self._answer(
                400 if length <= MAX_BODY else 413,
                {"error": f"need a content-length up to {MAX_BODY} bytes"},
            )
            return None
        return self.rfile.read(length)

    def _answer(self, status: int, payload: object) -> None:
        raw = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (0.0.0.0 in a container) [127.0.0.1]"
    )
    parser.add_argument("--port", type=int, default=3000)
    # Secrets may come from the environment instead: they then stay out of `ps` output.
    env_secret = os.environ.get("RESET_SECRET") or None
    parser.add_argument(
        "--secret",
        default=env_secret,
        required=env_secret is None,
        help="expected x-secret; required unless the environment variable RESET_SECRET is set",
    )
    parser.add_argument(
        "--signing-secret",
        default=os.environ.get("RESET_SIGNING_SECRET") or None,
        help="require a valid x-signature [env RESET_SIGNING_SECRET]",
    )
    parser.add_argument(
        "--redis-url",
        default=None,
        help="also SET the activity key in this Redis on POST /activity",
    )
    parser.add_argument(
        "--ttl",
        type=int,
        default=DEFAULT_TTL,
        help=f"activity key TTL in seconds, unless /activity says [{DEFAULT_TTL}]",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    server = make_server(
        args.host,
        args.port,
        secret=args.secret,
        signing_secret=args.signing_secret,
        redis_url=args.redis_url,
        default_ttl=args.ttl,
    )
    log.info(
        "listening on %s (POST /reset, POST /activity, GET /counters); signatures %s; "
        "dry runs (%s: 1) supported",
        server.url,
        "required" if args.signing_secret else "not checked",
        DRY_RUN_HEADER,
    )
    # As PID 1 in a container SIGTERM would otherwise be ignored: stop like on Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()
