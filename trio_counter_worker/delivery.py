"""Sending a reset to the backend: the request, and retrying it until it lands."""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from urllib.parse import urlsplit

import attrs
import httpx
import trio

from .config import Config
from .http_client import (
    Answer,
    Connection,
    Endpoint,
    HttpError,
    HttpxLane,
    Lane,
    Transport,
    header_value,
    tls_context,
    uses_proxy,
)
from .keyspace import wire_text
from .metrics import Metrics
from .outbox import requests_at_once
from .retry import Verdict, classify, parse_retry_after
from .store import PendingReset

__all__ = ["Attempt", "Limit", "ResetSender", "build_request", "open_lanes", "safe_url", "sign"]

_quoted = json.encoder.encode_basestring_ascii  # a JSON string, as json.dumps writes it

_HINTS = {
    401: "check RESET_SECRET: the backend rejected it",
    403: "check RESET_SECRET: the backend rejected it",
    404: "check RESET_ENDPOINT_URL: the backend has no such path",
    405: "check RESET_ENDPOINT_URL: that path does not accept POST",
}


def sign(signing_secret: str, body: bytes, timestamp: int) -> str:
    """The x-signature header: ``t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>." + body>``.

    The same scheme as Stripe's webhook signatures: the backend recomputes it, compares
    in constant time, and rejects a timestamp too far from its own clock (replays).
    """
    mac = hmac.new(signing_secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def build_request(
    reset: PendingReset,
    *,
    secret: str,
    replica_id: str,
    fencing_token: int,
    signing_secret: str | None = None,
    now: float | None = None,
) -> tuple[dict[str, str], bytes]:
    """Headers and JSON body of the reset request (the wire format in the README).

    ``fencing_token`` is the sender's current epoch: a new leader re-delivering an old
    pending reset sends its own, higher token, so a backend that ignores stale tokens
    still applies it, and dedupes it by ``reset_id``.
    """
    raw = request_body(reset, replica_id=replica_id, fencing_token=fencing_token)
    sent = reset_headers(
        reset, raw, fencing_token=fencing_token, signing_secret=signing_secret, now=now
    )
    headers = fixed_headers(secret) + [(k.decode("ascii"), v.decode("ascii")) for k, v in sent]
    return dict(headers), raw


def fixed_headers(secret: str) -> list[tuple[str, str]]:
    """The headers every reset request carries, first."""
    return [("x-secret", secret), ("content-type", "application/json")]


def reset_headers(
    reset: PendingReset,
    body: bytes,
    *,
    fencing_token: int,
    signing_secret: str | None,
    now: float | None = None,
) -> list[tuple[bytes, bytes]]:
    """The headers of one reset request, after :func:`fixed_headers`, as sent: a value
    httpx could not send raises as httpx would (:func:`~.http_client.header_value`)."""
    headers = [
        (b"idempotency-key", header_value(reset.reset_id)),
        (b"x-fencing-token", b"%d" % fencing_token),
    ]
    if signing_secret is not None:
        timestamp = int(time.time() if now is None else now)
        headers.append((b"x-signature", sign(signing_secret, body, timestamp).encode("ascii")))
    return headers


def request_body(reset: PendingReset, *, replica_id: str, fencing_token: int) -> bytes:
    """The JSON body of the reset request (see :func:`build_request`): what
    ``json.dumps(..., separators=(",", ":"))`` writes of its fields, in this order, written
    field by field (no dict, no encoder object: a reset costs less than half the time).
    ``tests/test_logic.py`` holds the two to the same bytes."""
    key, key_base64 = wire_text(reset.key)
    # float and int as json writes them (repr); strings by json's own escaping.
    text = (
        f'{{"key":{_quoted(key)},"reset_id":{_quoted(reset.reset_id)},'
        f'"expired_at":{reset.expired_at!r},"fencing_token":{fencing_token:d},'
        f'"replica_id":{_quoted(replica_id)}'
    )
    if key_base64 is not None:  # the exact bytes of a name that is not UTF-8
        text += ',"key_base64":' + _quoted(key_base64)
    if reset.payload is not None:  # the episode's tcw_touch payload, the same way
        payload, payload_base64 = wire_text(reset.payload)
        text += ',"payload":' + _quoted(payload)
        if payload_base64 is not None:
            text += ',"payload_base64":' + _quoted(payload_base64)
    return (text + "}").encode("ascii")


@attrs.frozen
class Attempt:
    """How one request for a reset went."""

    verdict: Verdict
    status: int | None  # None: no answer (network error or timeout)
    error: str = ""  # what went wrong, for logs and `status`; "" when done
    retry_after: float | None = None
    latency: float = 0.0  # seconds from the key's deadline to the 2xx (wall clocks)

    @property
    def done(self) -> bool:
        return self.verdict == "done"


class Limit:
    """How a courier bounds its attempts without a cancel scope (and a deadline) each:
    ``scope`` is a cancel scope the courier is in, which the courier's watch cancels
    (:meth:`expire`) once ``due`` (trio time) has passed. :meth:`ResetSender.attempt`
    sets ``due`` to its attempt's deadline while it waits for the answer's head
    (:meth:`until`), telling ``watch`` each time. Once expired the limit is ``spent``:
    a new one (and scope) for the next attempts. While only the rest of a judged answer is
    read (``rest``), expiring cuts that read, not the attempt: its verdict stands."""

    __slots__ = ("_watch", "due", "rest", "scope", "spent")

    def __init__(self, scope: trio.CancelScope, watch: Callable[[float], None]) -> None:
        self.scope = scope
        self.due = math.inf
        self.spent = False  # scope.cancel_called, without asking trio for the time
        self.rest: trio.CancelScope | None = None
        self._watch = watch

    def until(self, due: float) -> Limit:
        """``with limit.until(due):`` bounds the block by ``due``."""
        self.due = due
        self._watch(due)
        return self

    def __enter__(self) -> None:
        pass

    def __exit__(self, *exc_info: object) -> None:
        self.due = math.inf

    def expire(self) -> None:
        """Cut the attempt in the air: its time has passed, or it is abandoned for room.
        If its answer is already judged, only the read of the rest is cut: a 2xx whose
        body drips is delivered, not sent again."""
        if self.rest is not None:
            self.rest.cancel()
            return
        self.due = math.inf
        self.spent = True
        self.scope.cancel()


class ResetSender:
    """Sends one attempt of a reset at a time. Never follows redirects: the secret stays
    with the URL. Retrying is the caller's business (see :mod:`.outbox`), so a reset that
    keeps failing never holds a connection while it waits.

    One lane per courier, each a connection of its own and a
    :class:`~.http_client.Transport`: what :func:`open_lanes` makes.
    """

    def __init__(
        self, config: Config, lanes: Sequence[Transport], metrics: Metrics | None = None
    ) -> None:
        self._config = config
        self._metrics = metrics or Metrics()
        # One connection per lane (courier): a shared pool of 32 cost httpcore a poll()
        # of every pooled connection on every request, the worker's main cost in a burst.
        self._lanes = list(lanes)
        self._where = safe_url(config.reset_endpoint_url)
        resets = self._metrics.resets
        self._outcomes = {
            verdict: resets.labels(outcome)
            for verdict, outcome in (
                ("done", "delivered"),
                ("retry", "retried"),
                ("redirect", "redirect"),
                ("rejected", "rejected"),
            )
        }

    async def attempt(
        self, reset: PendingReset, fencing_token: int, lane: int = 0, limit: Limit | None = None
    ) -> Attempt:
        """POST ``reset`` once. RESET_TIMEOUT_MS bounds the whole attempt (connect, send,
        status line and headers), and at most ``BODY_CAP`` bytes of the answer are read:
        a slow, dripping or endless answer costs one timeout and constant memory.

        ``limit`` (a courier's): the attempt is bounded by it instead of a cancel scope
        of its own; if its time passes first, ``limit.scope`` is cancelled (Cancelled is
        raised) and the caller counts the attempt :meth:`timed_out`.

        Cancellation: the usual way this stops early, when leadership is lost; the reset
        stays pending in Redis and the next leader sends it under the same reset_id.
        """
        on = self._lanes[lane % len(self._lanes)]
        deadline = trio.current_time() + self._config.reset_timeout
        if limit is None:
            with trio.CancelScope(deadline=deadline) as own:
                answer = await self._ask(on, reset, fencing_token)
            if own.cancelled_caught:
                return self.timed_out()
            cut = False
        else:
            with limit.until(deadline):
                answer = await self._ask(on, reset, fencing_token)
            # Its time passed as the answer came: the courier's scope is spent.
            cut = limit.spent
        if isinstance(answer, Attempt):
            attempt = answer
        else:
            attempt = self._judge(reset, answer.status, answer.header)
            if not answer.complete:
                await self._finish(on, answer, deadline, cut, limit)
        self._outcomes[attempt.verdict].inc()
        if attempt.done:
            self._metrics.reset_latency.observe(max(0.0, attempt.latency))
        return attempt

    def abandoned(self, after: float) -> Attempt:
        """An attempt cut short after ``after`` s without an answer, to free a place for
        others (:mod:`.outbox`: more requests hung than the slow pool holds), counted."""
        self._outcomes["retry"].inc()
        return Attempt(
            "retry",
            None,
            f"no answer from {self._where} after {after:.2f} s, abandoned to free its place: "
            "more requests hung at once than the slow pool holds (max(MAX_IN_FLIGHT, 4)); "
            "it may still have applied the reset",
        )

    def timed_out(self) -> Attempt:
        """An attempt that got no answer within RESET_TIMEOUT_MS, counted."""
        self._outcomes["retry"].inc()
        return Attempt(
            "retry",
            None,
            f"no answer within RESET_TIMEOUT_MS={round(self._config.reset_timeout * 1000)} "
            f"from {self._where} (it may still have applied the reset)",
        )

    async def _ask(
        self, lane: Transport, reset: PendingReset, fencing_token: int
    ) -> Answer | Attempt:
        """Send the request and read the answer's head; an Attempt if there is none."""
        config = self._config
        # Built per attempt: a signature carries the time it was made.
        body = request_body(reset, replica_id=config.replica_id, fencing_token=fencing_token)
        try:
            headers = reset_headers(
                reset, body, fencing_token=fencing_token, signing_secret=config.reset_signing_secret
            )
            return await lane.post(headers, body)
        except HttpError as exc:  # refused, reset, DNS, protocol errors
            return self._no_answer(exc.kind, str(exc))

    async def _finish(
        self, lane: Transport, answer: Answer, deadline: float, cut: bool, limit: Limit | None
    ) -> None:
        """Only the status matters. Reading a small answer to its end lets the connection
        be reused; anything longer or slower closes it, by the attempt's deadline, but as
        the rest of an answer, not as an attempt timing out. ``cut``: the caller's scope
        is cancelled (the deadline has passed): the connection is closed at once.
        ``limit``: expiring it meanwhile (abandoned for room) closes it too."""
        with trio.CancelScope(shield=cut), trio.move_on_at(deadline) as rest:
            if limit is None:
                await lane.finish(answer)
                return
            limit.rest = rest
            try:
                await lane.finish(answer)
            finally:
                limit.rest = None

    def _no_answer(self, kind: str, message: str) -> Attempt:
        return Attempt(
            "retry", None, f"{kind} talking to {self._where}{': ' + message if message else ''}"
        )

    def _judge(
        self, reset: PendingReset, status: int, header: Callable[[str], str | None]
    ) -> Attempt:
        verdict = classify(status)
        if verdict == "done":
            return Attempt("done", status, latency=time.time() - reset.expired_at)
        what = f"HTTP {status} from {self._where}"
        if verdict == "redirect":
            location = (header("location") or "?")[:200]
            what += (
                f" redirecting to {location!r}: redirects are not followed, so the secret"
                " is never sent elsewhere; set RESET_ENDPOINT_URL to the final URL"
            )
        elif verdict == "rejected":
            what += ": " + _HINTS.get(status, "the backend refused the request")
        retry_after = parse_retry_after(header("retry-after"))
        return Attempt(verdict, status, what, retry_after)


@asynccontextmanager
async def open_lanes(
    config: Config, *, connect: Callable[[], Awaitable[Connection]] | None = None
) -> AsyncIterator[list[Transport]]:
    """One lane per request in flight (:func:`~.outbox.requests_at_once`), closed on exit: a
    :class:`~.http_client.Lane` each, or, with a proxy configured in the environment
    (which httpx honours), an :class:`~.http_client.HttpxLane` each. One TLS context
    shared by all, as httpx would build it (certifi's CAs). ``connect`` (tests): the
    lanes' connections, instead of TCP to the endpoint."""
    tls = tls_context()
    fixed = fixed_headers(config.reset_secret)
    lanes: list[Transport]
    if uses_proxy() and connect is None:
        lanes = [
            HttpxLane(
                httpx.AsyncClient(
                    timeout=httpx.Timeout(config.reset_timeout),
                    limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
                    verify=tls,
                    follow_redirects=False,
                ),
                config.reset_endpoint_url,
                fixed,
            )
            for _ in range(requests_at_once(config.max_in_flight))
        ]
    else:
        endpoint = Endpoint(config.reset_endpoint_url, fixed)
        lanes = [
            Lane(endpoint, tls, connect=connect)
            for _ in range(requests_at_once(config.max_in_flight))
        ]
    async with AsyncExitStack() as stack:
        for lane in lanes:
            stack.push_async_callback(lane.aclose)
        yield lanes


def safe_url(url: str) -> str:
    """The endpoint without userinfo or query, for logs."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"
