"""Logging setup: readable lines by default, or one JSON object a line (LOG_FORMAT=json).

Key events pass structured fields with ``extra={"event": ..., ...}``; the JSON format
emits them as top-level fields, so logs can be queried without parsing messages.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["JsonFormatter", "LineLogger", "configure_logging", "line_logger"]

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


def configure_logging(level: str, fmt: str = "text") -> None:
    """Log to stderr at ``level`` in ``fmt`` ("text" or "json")."""
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
