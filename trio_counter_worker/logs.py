"""Logging setup: readable lines by default, or one JSON object a line (LOG_FORMAT=json).

Key events pass structured fields with ``extra={"event": ..., ...}``; the JSON format
emits them as top-level fields, so logs can be queried without parsing messages.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

__all__ = [
    "JsonFormatter",
    "LineBudget",
    "LineLogger",
    "ResetSummary",
    "configure_logging",
    "line_logger",
]

# Attributes every LogRecord has; anything else came from ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts, level, logger, message, the extra fields, and exc."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


LineLogger = Callable[[str, tuple[object, ...], Mapping[str, object]], None]


def line_logger(logger: logging.Logger, level: int) -> LineLogger | None:
    """For lines logged many at a time (one per reset): a function that logs
    ``(msg, args, extra)`` as ``logger.log(level, msg, *args, extra=extra)`` would, except
    that the caller is looked up once, here (each record names the line that called
    this), not per line. None when ``level`` is off, so nothing need be built."""
    if not logger.isEnabledFor(level):
        return None
    caller = sys._getframe(1)
    path, line, function = caller.f_code.co_filename, caller.f_lineno, caller.f_code.co_name

    def emit(msg: str, args: tuple[object, ...], extra: Mapping[str, object]) -> None:
        logger.handle(
            logger.makeRecord(logger.name, level, path, line, msg, args, None, function, extra)
        )

    return emit


class LineBudget:
    """At most ``lines`` lines of one kind per ``every`` seconds (plain logic, time passed
    in). :meth:`take` for each line that could be logged: "line" while the window has
    room, "ran_out" for the first one past it (say, once, that the rest are not logged),
    "held" for the others until the next window."""

    __slots__ = ("_every", "_lines", "_start", "_used")

    def __init__(self, lines: int = 20, every: float = 10.0) -> None:
        self._lines = lines
        self._every = every
        self._start = -math.inf
        self._used = 0

    @property
    def lines(self) -> int:
        return self._lines

    @property
    def every(self) -> float:
        return self._every

    def take(self, now: float) -> Literal["line", "ran_out", "held"]:
        if now - self._start >= self._every:
            self._start, self._used = now, 0
        self._used += 1
        if self._used <= self._lines:
            return "line"
        return "ran_out" if self._used == self._lines + 1 else "held"


Clock = Callable[[], float]


class ResetSummary(logging.Filter):
    """LOG_RESETS=summary: instead of one "reset sent" line per reset, at most one line
    per ``every`` seconds, counting them. A filter on the log handler, matching the lines'
    ``event`` field (whichever module logs them): the line carrying the summary is the
    first reset sent after each interval (so a quiet worker writes nothing); ``tick``,
    called every ``every`` seconds, writes a finished interval's count that no reset
    carried (a burst's tail is not held until the next reset, hours later), and
    ``flush`` writes what is left, at exit."""

    def __init__(self, logger: logging.Logger, every: float = 10.0, clock: Clock = time.monotonic):
        super().__init__()
        self._log, self._every, self._clock = logger, every, clock
        self._since = clock()
        self._sent = self._retried = 0
        self._slowest = 0.0

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "event", None) != "reset_sent":
            return True
        self._sent += 1
        self._retried += getattr(record, "attempts", 1) > 1
        self._slowest = max(self._slowest, getattr(record, "latency_ms", 0.0))
        if self._clock() - self._since < self._every:
            return False
        record.msg, record.args = self._summary()
        for name in ("key", "reset_id", "fencing_token", "attempts", "latency_ms"):
            vars(record).pop(name, None)
        vars(record).update(self._fields())
        self._restart()
        return True

    @property
    def every(self) -> float:
        return self._every

    def tick(self) -> None:
        """Log the count if the interval is over and something was counted."""
        if self._sent and self._clock() - self._since >= self._every:
            self.flush()

    def flush(self) -> None:
        """Log what was counted since the last summary, if anything."""
        if self._sent:
            msg, args = self._summary()
            self._log.info(msg, *args, extra=self._fields())
        self._restart()

    def _summary(self) -> tuple[str, tuple[object, ...]]:
        return (
            "resets sent in the last %.0f s: %d (%d after a retry), slowest %.1f ms",
            (self._clock() - self._since, self._sent, self._retried, self._slowest),
        )

    def _fields(self) -> dict[str, object]:
        return {
            "event": "resets_sent",
            "sent": self._sent,
            "retried": self._retried,
            "slowest_ms": self._slowest,
        }

    def _restart(self) -> None:
        self._since = self._clock()
        self._sent = self._retried = 0
        self._slowest = 0.0


def configure_logging(level: str, fmt: str = "text", resets: str = "each") -> ResetSummary | None:
    """Log to stderr at ``level`` in ``fmt`` ("text" or "json"); with ``resets`` "summary"
    (LOG_RESETS), returns the installed :class:`ResetSummary`, to flush at exit."""
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request at INFO; the worker logs each reset once, itself.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if resets != "summary":
        return None
    summary = ResetSummary(logging.getLogger("trio_counter_worker"))
    handler.addFilter(summary)
    return summary
