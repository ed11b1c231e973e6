"""The names of a deployment's own Redis keys and channels, in one place.

A deployment is the set of replicas sharing a ``COUNTER_KEY``. Everything it keeps in
Redis lives under ``tcw:{<COUNTER_KEY>}:``: the braces make one hash tag, so on a
cluster all of it shares one slot and the lease scripts run as on one Redis; and no
``COUNTER_KEY`` may match that prefix (config refuses it), so no key of any deployment is
ever taken for a counter. The touch library (:mod:`trio_counter_worker.functions`)
builds the same names in Lua from a namespace and the suffixes below.
"""

from __future__ import annotations

import attrs

__all__ = ["HANDED_HINT", "OWN_KEY_PREFIX", "REGISTRY", "Keys", "keyspace_pattern"]

OWN_KEY_PREFIX = "tcw:{"

# Every deployment the touch library serves: namespace -> COUNTER_KEY (a hash). Under the
# prefix, so no COUNTER_KEY can match it either.
REGISTRY = f"{OWN_KEY_PREFIX}registry}}"

# Suffixes after the namespace, each one key or channel (see the properties below).
LEASE, EPOCH, DEADLINES, PENDING, CLAIMED = ":lease", ":epoch", ":deadlines", ":pending", ":claimed"
FAILING, DEAD, SEEN, PREFLIGHT, PAYLOADS = ":failing", ":dead", ":seen", ":preflight", ":payloads"
HANDED = ":handed"
RELEASED, REDELIVER, CLAIMS, TOUCHED = ":released", ":redeliver", ":claims", ":touched"
ALIVE = ":alive:"

# Published on the redeliver channel when a former leader hands keys over (HAND_OVER);
# anything else published there asks for the pending resets to be read again.
HANDED_HINT = "handed"


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

    # -- keys -------------------------------------------------------------------------

    @property
    def lease(self) -> str:
        """Hash (holder, replica, epoch, since_ms, alive) with a PEXPIRE: who leads."""
        return self.namespace + LEASE

    @property
    def epoch(self) -> str:
        """Counter: the last fencing token handed out."""
        return self.namespace + EPOCH

    @property
    def deadlines(self) -> str:
        """Zset counter key -> recorded deadline (Redis ms)."""
        return self.namespace + DEADLINES

    @property
    def pending(self) -> str:
        """Hash reset_id -> pending reset record (JSON), until the backend accepts it."""
        return self.namespace + PENDING

    @property
    def claimed(self) -> str:
        """Zset counter key -> its last claim (Redis ms): tombstones, spec.TOMBSTONE_MS."""
        return self.namespace + CLAIMED

    @property
    def failing(self) -> str:
        """Hash reset_id -> why it is not delivered yet (JSON)."""
        return self.namespace + FAILING

    @property
    def dead(self) -> str:
        """Hash reset_id -> a reset given up on (RESET_GIVE_UP_AFTER), and why."""
        return self.namespace + DEAD

    @property
    def seen(self) -> str:
        """Zset counter key -> time of the last facts applied (Cluster only)."""
        return self.namespace + SEEN

    @property
    def handed(self) -> str:
        """Zset counter key -> Redis ms: keys a former leader saw, that may have expired
        unheard and that it could not decide (handover.py); the next leader decides them."""
        return self.namespace + HANDED

    @property
    def preflight(self) -> str:
        """Scratch key of the start-up permission check (deleted again)."""
        return self.namespace + PREFLIGHT

    @property
    def payloads(self) -> str:
        """Hash counter key -> the payload of its episode (tcw_touch)."""
        return self.namespace + PAYLOADS

    # -- channels ---------------------------------------------------------------------

    def alive(self, subscription: str) -> str:
        """A replica's liveness channel: nothing is published there; Redis counts its one
        subscriber (``PUBSUB NUMSUB``), and drops it within milliseconds of the
        replica's death. ``subscription`` is unique per subscription, never reused."""
        return self.namespace + ALIVE + subscription

    @property
    def released(self) -> str:
        """The leader announces a release here: standbys take over at once."""
        return self.namespace + RELEASED

    @property
    def redeliver(self) -> str:
        """`redeliver` asks the leader to read dead resets put back in the queue, and keys
        handed over by a former leader."""
        return self.namespace + REDELIVER

    @property
    def claims(self) -> str:
        """A marker per claim, "<claimed_ms> <key>": tells echoes from new expiries."""
        return self.namespace + CLAIMS

    @property
    def touched(self) -> str:
        """A counter key's name, after each tcw_touch and tcw_done."""
        return self.namespace + TOUCHED

    def keyspace(self, db: int) -> str:
        """The keyspace-notification pattern of the counter keys in database ``db``."""
        return keyspace_pattern(db, self.counter_key)
