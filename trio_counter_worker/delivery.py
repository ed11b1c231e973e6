"""Sending a reset to the backend: the request, and retrying it until it lands."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections.abc import Sequence
from urllib.parse import urlsplit

import attrs
import httpx
import trio

from .config import Config
from .metrics import Metrics
from .retry import RetryPolicy, Verdict, classify, parse_retry_after
from .store import PendingReset

__all__ = ["ResetSender", "build_request", "sign"]

log = logging.getLogger("trio_counter_worker.delivery")

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
    body = {
        "key": reset.key,
        "reset_id": reset.reset_id,
        "expired_at": reset.expired_at,
        "fencing_token": fencing_token,
        "replica_id": replica_id,
    }
    headers = {
        "x-secret": secret,
        "content-type": "application/json",
        "idempotency-key": reset.reset_id,
        "x-fencing-token": str(fencing_token),
    }
    raw = json.dumps(body, separators=(",", ":")).encode()
    if signing_secret is not None:
        headers["x-signature"] = sign(signing_secret, raw, int(time.time() if now is None else now))
    return headers, raw


@attrs.frozen
class Delivered:
    attempts: int
    status: int
    latency: float  # seconds from the key's deadline to the 2xx answer (wall clocks)


class ResetSender:
    """POSTs resets with retries. Never follows redirects: the secret stays with the URL."""

    def __init__(
        self,
        config: Config,
        client: httpx.AsyncClient | Sequence[httpx.AsyncClient],
        policy: RetryPolicy | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._config = config
        self._metrics = metrics or Metrics()
        # One client per lane (courier): a pool of one connection each. httpcore scans
        # every pooled connection, with a poll() each, on every request: one shared
        # pool of 32 made that scan the worker's main cost under a burst.
        self._clients = [client] if isinstance(client, httpx.AsyncClient) else list(client)
        self._policy = policy or RetryPolicy()
        self._where = _safe_url(config.reset_endpoint_url)

    async def deliver(self, reset: PendingReset, fencing_token: int, lane: int = 0) -> Delivered:
        """Send ``reset`` until the backend answers 2xx; return how it went.

        Cancellation: the usual way this stops early, when leadership is lost; the reset
        stays pending in Redis and the next leader sends it under the same reset_id.
        """
        attempt = 0
        while True:
            attempt += 1
            # Built per attempt: a signature carries the time it was made.
            headers, body = build_request(
                reset,
                secret=self._config.reset_secret,
                replica_id=self._config.replica_id,
                fencing_token=fencing_token,
                signing_secret=self._config.reset_signing_secret,
            )
            retry_after: float | None = None
            verdict: Verdict
            try:
                response = await self._clients[lane % len(self._clients)].post(
                    self._config.reset_endpoint_url, content=body, headers=headers
                )
            except httpx.TransportError as exc:  # timeouts, refused, reset, DNS
                verdict = "retry"
                what = f"{type(exc).__name__} talking to {self._where}"
            else:
                verdict = classify(response.status_code)
                if verdict == "done":
                    latency = time.time() - reset.expired_at
                    self._metrics.resets.labels("delivered").inc()
                    self._metrics.reset_latency.observe(max(0.0, latency))
                    return Delivered(attempt, response.status_code, latency)
                retry_after = parse_retry_after(response.headers.get("retry-after"))
                what = f"HTTP {response.status_code} from {self._where}"
                if verdict == "redirect":
                    what += (
                        f" redirecting to {response.headers.get('location', '?')!r}: redirects"
                        " are not followed, so the secret is never sent elsewhere; set"
                        " RESET_ENDPOINT_URL to the final URL"
                    )
                elif verdict == "rejected":
                    hint = _HINTS.get(response.status_code, "the backend refused the request")
                    what += f": {hint}; the reset is kept and retried"
            self._metrics.resets.labels("retried" if verdict == "retry" else verdict).inc()
            delay = self._policy.delay(attempt, verdict, retry_after)
            level = logging.WARNING if verdict == "retry" else logging.ERROR
            log.log(
                level,
                "reset not delivered: key=%r reset_id=%s attempt=%d: %s; retrying in %.2f s",
                reset.key, reset.reset_id, attempt, what, delay,
            )
            await trio.sleep(delay)


def _safe_url(url: str) -> str:
    """The endpoint without userinfo or query, for logs."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"
