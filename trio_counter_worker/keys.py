"""The names of a deployment's own Redis keys and channels, in one place.

A deployment is the set of replicas sharing a ``COUNTER_KEY``. Everything it keeps in
Redis lives under ``tcw:{<COUNTER_KEY>}:``: the braces make one hash tag, so on a
cluster all of it shares one slot and the lease scripts run as on one Redis; and no
``COUNTER_KEY`` may match that prefix (config refuses it), so no key of any deployment is
ever taken for a counter.
"""

from __future__ import annotations

import attrs

__all__ = ["OWN_KEY_PREFIX", "Keys", "keyspace_pattern"]

OWN_KEY_PREFIX = "tcw:{"


def keyspace_pattern(db: int, counter_key: str) -> str:
    """The keyspace-notification channel pattern of a deployment's counter keys."""
    return f"__keyspace@{db}__:{counter_key}"


@attrs.frozen
class Keys:
    """Every key and channel of the deployment whose ``COUNTER_KEY`` is ``counter_key``."""

    counter_key: str

    @property
    def namespace(self) -> str:
        """The prefix of them all, without the final colon (also in the reset_id)."""
        return f"{OWN_KEY_PREFIX}{self.counter_key}}}"

    def _key(self, name: str) -> str:
        return f"{self.namespace}:{name}"

    # -- keys -------------------------------------------------------------------------

    @property
    def lease(self) -> str:
        """Hash (holder, replica, epoch, since_ms) with a PEXPIRE: who leads."""
        return self._key("lease")

    @property
    def epoch(self) -> str:
        """Counter: the last fencing token handed out."""
        return self._key("epoch")

    @property
    def deadlines(self) -> str:
        """Zset counter key -> recorded deadline (Redis ms)."""
        return self._key("deadlines")

    @property
    def pending(self) -> str:
        """Hash reset_id -> pending reset record (JSON), until the backend accepts it."""
        return self._key("pending")

    @property
    def claimed(self) -> str:
        """Zset counter key -> its last claim (Redis ms): tombstones, spec.TOMBSTONE_MS."""
        return self._key("claimed")

    @property
    def failing(self) -> str:
        """Hash reset_id -> why it is not delivered yet (JSON)."""
        return self._key("failing")

    @property
    def dead(self) -> str:
        """Hash reset_id -> a reset given up on (RESET_GIVE_UP_AFTER), and why."""
        return self._key("dead")

    @property
    def seen(self) -> str:
        """Zset counter key -> time of the last facts applied (Cluster only)."""
        return self._key("seen")

    @property
    def preflight(self) -> str:
        """Scratch key of the start-up permission check (deleted again)."""
        return self._key("preflight")

    @property
    def state_keys(self) -> list[str]:
        """Every key the deployment writes: what `chaos --redis-url` cleans up."""
        return [self.lease, self.epoch, self.deadlines, self.pending, self.claimed,
                self.failing, self.dead, self.seen, self.preflight]

    # -- channels ---------------------------------------------------------------------

    @property
    def released(self) -> str:
        """The leader announces a release here: standbys take over at once."""
        return self._key("released")

    @property
    def redeliver(self) -> str:
        """`redeliver` asks the leader to read dead resets put back in the queue."""
        return self._key("redeliver")

    @property
    def claims(self) -> str:
        """A marker per claim, "<claimed_ms> <key>": tells echoes from new expiries."""
        return self._key("claims")

    def keyspace(self, db: int) -> str:
        return keyspace_pattern(db, self.counter_key)
