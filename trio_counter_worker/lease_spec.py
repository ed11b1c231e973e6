"""The lease decisions, as an executable specification of ACQUIRE and RENEW.

Lua (:mod:`trio_counter_worker.scripts`) is the atomic truth at run time; this module
states the same rules as plain functions of what the scripts read, for reading in one
place, for the fake store, and for ``tests/test_lease_contract.py``, which runs one table
of cases through both on a real Redis.

Liveness. Every replica keeps one subscription on a channel of its own
(:meth:`~trio_counter_worker.keys.Keys.alive`, a new name for every subscription, never
reused) on a connection that carries nothing else. The lease records the holder's
channel. When a process dies its sockets close and Redis drops the subscription within
milliseconds, so ``PUBSUB NUMSUB`` of that channel reads 0: the holder is gone, not
slow. A standby that saw it gone once (``suspect``) and sees it gone again steals the
lease with a new epoch, without waiting out its TTL. A channel that read 0 never comes
back (its name is not reused), so two looks some time apart prove the holder has been
gone at least that long: time enough for a live holder whose connection was cut to
notice and stop (it steps down the moment its own subscription drops).

Where Redis refuses ``PUBSUB`` (an ACL), or the caller or holder runs without liveness,
nothing is stolen: the lease's TTL decides, as before.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import attrs

__all__ = ["AcquireOutcome", "LeaseRecord", "Liveness", "Renewal", "acquire", "renew"]

# alive/gone: PUBSUB NUMSUB of the holder's channel; unknown: PUBSUB refused;
# off: the holder or the caller has no liveness channel.
Liveness = Literal["alive", "gone", "unknown", "off"]
# renewed; lost: another holder or no lease; unseen: ours, but our liveness channel has
# no subscriber at Redis (the connection dropped): not renewed, step down.
Renewal = Literal["renewed", "lost", "unseen"]


@attrs.frozen
class LeaseRecord:
    """The lease hash as the scripts read it."""

    holder: str
    replica: str
    epoch: int
    alive: str = ""  # the holder's liveness channel; '' where it has none
    endpoint: str = ""  # where the holder sends resets (its URL without secrets); '' unknown


@attrs.frozen
class AcquireOutcome:
    """What ACQUIRE decided, and the lease and epoch counter after it."""

    acquired: bool
    epoch: int
    lease: LeaseRecord | None
    epoch_counter: int
    liveness: Liveness = "off"  # the other holder's, when not acquired
    alive: str = ""  # the other holder's channel: what ``suspect`` must name to steal
    ready: bool = True  # False: the caller's own channel has no subscriber at Redis
    taken_from: str = ""  # acquired by stealing: the replica that held it
    endpoint: str = ""  # the other holder's, when not acquired ('' unknown)


def _count(subscribers: Mapping[str, int] | None, channel: str) -> int | None:
    return None if subscribers is None else subscribers.get(channel, 0)


def acquire(
    lease: LeaseRecord | None,
    epoch_counter: int,
    *,
    holder: str,
    replica: str,
    epoch_floor: int,
    mine: str = "",
    suspect: str = "",
    subscribers: Mapping[str, int] | None = None,
    endpoint: str = "",
) -> AcquireOutcome:
    """Take the lease if it is free, ours, or held by a holder proven gone.

    ``mine``: the caller's liveness channel ('' without liveness); ``suspect``: the
    holder's channel as the caller saw it gone before; ``subscribers``: what ``PUBSUB
    NUMSUB`` would answer per channel (None: refused). The caller must be seen
    subscribed to take or keep a lease, so a holder is never recorded with a channel that
    would make it look dead (after a Redis restart, replicas campaign only once their own
    subscription is back: no stampede). ``endpoint``: where the caller sends resets,
    recorded with a lease it takes, and told to the others (replicas that disagree on it
    are a misconfiguration, said by :mod:`.election`).
    """
    mine_count = _count(subscribers, mine) if mine else None
    ready = mine_count is None or mine_count > 0
    if lease is not None and lease.holder == holder:
        if not ready:
            return AcquireOutcome(False, lease.epoch, lease, epoch_counter, ready=False)
        kept = attrs.evolve(lease, alive=mine or lease.alive)
        return AcquireOutcome(True, lease.epoch, kept, epoch_counter)
    if lease is not None:
        liveness: Liveness = "off"
        if lease.alive and mine:
            theirs = _count(subscribers, lease.alive)
            liveness = "unknown" if theirs is None else "alive" if theirs > 0 else "gone"
        # Whether Redis sees the caller matters (and is asked) only to steal.
        seen = ready or liveness != "gone"
        if not (liveness == "gone" and suspect == lease.alive and ready):
            return AcquireOutcome(
                False,
                lease.epoch,
                lease,
                epoch_counter,
                liveness=liveness,
                alive=lease.alive,
                ready=seen,
                endpoint=lease.endpoint,
            )
    elif not ready:
        return AcquireOutcome(False, 0, None, epoch_counter, ready=False)
    # The epoch only grows: above the counter and above the highest the caller has seen,
    # so a Redis that lost its data does not hand out old fencing tokens.
    epoch = max(epoch_counter + 1, epoch_floor + 1)
    taken = LeaseRecord(holder, replica, epoch, mine, endpoint)
    return AcquireOutcome(True, epoch, taken, epoch, taken_from=lease.replica if lease else "")


def renew(
    lease: LeaseRecord | None, *, holder: str, subscribers: Mapping[str, int] | None = None
) -> Renewal:
    """Extend the lease if it is ours and our liveness channel is still subscribed."""
    if lease is None or lease.holder != holder:
        return "lost"
    if lease.alive and _count(subscribers, lease.alive) == 0:
        return "unseen"
    return "renewed"
