"""The settings of the election: the lease, fast takeover, and this replica's name.

One group of :class:`~trio_counter_worker.config.Config`'s fields (see there).
"""

from __future__ import annotations

import os
import socket
from typing import Any

import attrs

from .errors import ConfigError
from .setting import env_var, int_in, integer, setting_of, shown

__all__ = ["ElectionSettings", "default_replica_id"]


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _replica_id(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if not value or len(value) > 128 or not value.isprintable() or any(c.isspace() for c in value):
        raise ConfigError(
            f"{setting_of(attribute).name} must be 1-128 printable characters "
            f"without spaces, got {shown(value)}"
        )


@attrs.frozen(kw_only=True, slots=False)  # slots=False: see Config
class ElectionSettings:
    """How long a lease lasts, how soon a standby notices a dead leader, who this is."""

    lease_ttl_ms: int = attrs.field(
        default=3000,
        validator=int_in(500, 5000, " ms"),
        metadata=env_var(
            "LEASE_TTL_MS",
            "leader lease length in ms (500-5000): a crashed leader is replaced within this time",
            parse=integer,
        ),
    )
    takeover_check_ms: int = attrs.field(
        default=25,
        validator=int_in(0, 1000, " ms (0: off)"),
        metadata=env_var(
            "TAKEOVER_CHECK_MS",
            "how often a standby asks Redis whether the leader's connection is gone, in ms "
            "(0-1000): a leader that dies is replaced within about this and a short grace; "
            "0: only when its lease expires",
            parse=integer,
        ),
    )
    replica_id: str = attrs.field(
        factory=default_replica_id,
        validator=_replica_id,
        metadata=env_var(
            "REPLICA_ID",
            "this replica's name in the lease, logs and requests",
            default="hostname-pid",
        ),
    )

    @property
    def lease_ttl(self) -> float:
        return self.lease_ttl_ms / 1000

    @property
    def takeover_check(self) -> float | None:
        """Seconds between a standby's liveness checks; None: fast takeover off."""
        return self.takeover_check_ms / 1000 or None
