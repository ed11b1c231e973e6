"""This replica's liveness subscription, as the campaign and the leader see it.

Redis drops a dead process's connections within milliseconds, and with them its
subscriptions: ``PUBSUB NUMSUB`` of a replica's own channel tells standbys whether the
leader is alive, not merely slow (:mod:`trio_counter_worker.lease_spec`). The
subscription rides on the release watch's connection, which carries almost nothing, so
Redis never closes it for falling behind the way it may close the leader's busy event
subscription. Each subscription gets a new channel name: one that read 0 never comes
back.
"""

from __future__ import annotations

from typing import Protocol

import trio

from .config import Config
from .keys import Keys

__all__ = ["ACL_REFUSED", "Liveness", "off_by_setting", "off_reason"]

ACL_REFUSED = "the Redis user may not run PUBSUB NUMSUB: add +pubsub|numsub to its ACL"


class _Asks(Protocol):
    async def takeover_allowed(self) -> bool: ...


def off_by_setting(config: Config) -> str | None:
    """Why the settings leave fast takeover off (a leader that dies is then replaced when
    its lease expires), or None."""
    if config.takeover_check is None:
        return "TAKEOVER_CHECK_MS=0"
    if config.redis_cluster_nodes:
        # Channels are subscribed on any node there, and counted per node.
        return "not on Redis Cluster"
    return None


async def off_reason(bridge: _Asks, config: Config) -> str | None:
    """Why fast takeover is off here, settings and Redis's ACL both asked, or None."""
    return off_by_setting(config) or (None if await bridge.takeover_allowed() else ACL_REFUSED)


class Liveness:
    """Which liveness channel this replica is subscribed to now ('' while none is).

    The worker's release watch calls :meth:`next_channel`, then :meth:`up` once Redis
    confirmed the subscription and :meth:`down` when it ends; the campaign and the
    leader wait on it.
    """

    def __init__(self, keys: Keys, holder: str) -> None:
        self.channel = ""
        self._keys = keys
        self._holder = holder
        self._count = 0
        self._changed = trio.Event()

    def next_channel(self) -> str:
        """The channel name for the next subscription (never one used before)."""
        self._count += 1
        return self._keys.alive(f"{self._holder}:{self._count}")

    def up(self, channel: str) -> None:
        self._set(channel)

    def down(self) -> None:
        self._set("")

    def _set(self, channel: str) -> None:
        if channel != self.channel:
            self.channel = channel
            self._changed.set()
            self._changed = trio.Event()

    async def wait_up(self) -> None:
        """Until a subscription is up (at once if one is)."""
        while not self.channel:
            await self._changed.wait()

    async def wait_lost(self, channel: str) -> None:
        """Until ``channel``'s subscription has ended."""
        while self.channel == channel:
            await self._changed.wait()
