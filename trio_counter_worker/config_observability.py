"""The settings of what a replica tells its operators: logs, and the health endpoint.

One group of :class:`~trio_counter_worker.config.Config`'s fields (see there).
"""

from __future__ import annotations

import attrs

from .setting import env_var, host_or_ip, int_in, integer, lower, one_of, upper

__all__ = ["ObservabilitySettings"]

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_LOG_FORMATS = ("text", "json")
_LOG_RESETS = ("each", "summary")


@attrs.frozen(kw_only=True, slots=False)  # slots=False: see Config
class ObservabilitySettings:
    """How much is logged and in what form; where /healthz, /readyz and /metrics listen."""

    log_level: str = attrs.field(
        default="INFO",
        validator=one_of(_LOG_LEVELS),
        metadata=env_var("LOG_LEVEL", "DEBUG, INFO, WARNING or ERROR", parse=upper),
    )
    log_format: str = attrs.field(
        default="text",
        validator=one_of(_LOG_FORMATS),
        metadata=env_var(
            "LOG_FORMAT", "text (readable lines) or json (one JSON object a line)", parse=lower
        ),
    )
    log_resets: str = attrs.field(
        default="each",
        validator=one_of(_LOG_RESETS),
        metadata=env_var(
            "LOG_RESETS",
            "each (one INFO line per reset sent) or summary (at most one INFO line per "
            "10 s: how many were sent, how many after a retry, the slowest)",
            parse=lower,
        ),
    )
    health_port: int | None = attrs.field(
        default=None,
        validator=int_in(0, 65535),
        metadata=env_var(
            "HEALTH_PORT",
            "if set, serve /healthz, /readyz and /metrics on this port",
            parse=integer,
        ),
    )
    health_host: str = attrs.field(
        default="0.0.0.0",  # noqa: S104 - probes reach the pod on its own address
        validator=host_or_ip,
        metadata=env_var("HEALTH_HOST", "address the health endpoint listens on"),
    )
