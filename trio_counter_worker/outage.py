"""Logging a Redis outage without a flood: plain logic, time passed in.

Several loops of a replica (the campaign, the renewer, the release watch, the leader)
each notice the same outage and retry on their own backoff. One ``OutageLog`` per
replica turns that into one WARNING when Redis becomes unreachable, at most one summary
per ``every`` seconds while it stays away, and one line when it answers again.
"""

from __future__ import annotations

import logging

from .errors import RedisRefused

__all__ = ["OutageLog"]


class OutageLog:
    """See the module docstring. ``failed`` and ``recovered`` are cheap to call often."""

    def __init__(self, logger: logging.Logger, every: float = 10.0) -> None:
        self._log = logger
        self._every = every
        self._since: float | None = None  # start of the current outage
        self._last_line = 0.0
        self._failures = 0

    @property
    def down(self) -> bool:
        return self._since is not None

    def failed(self, what: str, exc: BaseException, now: float, hint: str = "") -> None:
        """A call failed because Redis is unreachable (or refused it)."""
        self._failures += 1
        text = _plain(exc)
        if self._since is None:
            self._since = self._last_line = now
            # A refusal (out of memory, a permission, credentials) needs someone to act.
            level = logging.ERROR if isinstance(exc, RedisRefused) else logging.WARNING
            self._log.log(
                level,
                "Redis unavailable (%s: %s)%s; retrying with backoff",
                what,
                text,
                f" ({hint})" if hint else "",
                extra={"event": "redis_down"},
            )
        elif now - self._last_line >= self._every:
            self._last_line = now
            self._log.warning(
                "Redis still unavailable after %.0f s (%d failed calls; last: %s)",
                now - self._since,
                self._failures,
                text,
                extra={"event": "redis_down"},
            )

    def recovered(self, now: float) -> None:
        """A call succeeded."""
        if self._since is None:
            return
        self._log.info(
            "Redis answers again after %.1f s (%d failed calls)",
            now - self._since,
            self._failures,
            extra={"event": "redis_up"},
        )
        self._since = None
        self._failures = 0


def _plain(exc: BaseException) -> str:
    """The error without a repeated "Redis unavailable: " in front."""
    return str(exc).removeprefix("Redis unavailable: ")
