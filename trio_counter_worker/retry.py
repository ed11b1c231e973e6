"""When to try a reset request again: plain logic, no I/O."""

from __future__ import annotations

import email.utils
import random
import time
from typing import Literal

import attrs

__all__ = ["Backoff", "RetryPolicy", "Verdict", "backoff_delay", "classify", "parse_retry_after"]

Verdict = Literal["done", "retry", "redirect", "rejected"]


def classify(status: int) -> Verdict:
    """What an HTTP status means for a reset.

    2xx done; 408, 429 and 5xx are transient; 3xx is a configuration error (the secret is
    never sent on to another URL); other 4xx are rejected — kept and retried slowly, since
    dropping a reset silently is worse than asking an operator to fix the URL or secret.
    """
    if 200 <= status < 300:
        return "done"
    if status in (408, 429) or status >= 500:
        return "retry"
    if 300 <= status < 400:
        return "redirect"
    return "rejected"


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Capped exponential backoff with "equal jitter": a random wait in [ceiling/2,
    ceiling], where the ceiling doubles from ``base`` at each ``attempt`` (counting from 1)
    up to ``cap``. The certain half keeps the waits growing; the random half keeps callers
    that failed together from retrying together."""
    ceiling = min(cap, base * 2 ** min(attempt - 1, 30))
    return (rng or random).uniform(ceiling / 2, ceiling)


@attrs.define
class Backoff:
    """Capped exponential backoff with jitter for reconnecting to Redis; ``reset()`` on success."""

    base: float = 0.1
    cap: float = 5.0
    attempt: int = 0

    def next(self) -> float:
        self.attempt += 1
        return backoff_delay(self.attempt, self.base, self.cap)

    def reset(self) -> None:
        self.attempt = 0


@attrs.frozen
class RetryPolicy:
    """How long to wait before retrying a reset: :func:`backoff_delay`, slower for
    requests the backend rejected, or what the backend asked for (Retry-After)."""

    base: float = 0.1
    cap: float = 10.0
    rejected_base: float = 2.0  # 3xx and other 4xx: slower from the start, someone must act
    rejected_cap: float = 60.0
    retry_after_cap: float = 300.0

    def delay(
        self,
        attempt: int,
        verdict: Verdict = "retry",
        retry_after: float | None = None,
        rng: random.Random | None = None,
    ) -> float:
        """Seconds to wait before attempt ``attempt + 1`` (``attempt`` counts from 1)."""
        if retry_after is not None:
            return min(retry_after, self.retry_after_cap)
        base, cap = (
            (self.base, self.cap) if verdict == "retry" else (self.rejected_base, self.rejected_cap)
        )
        return backoff_delay(attempt, base, cap, rng)
