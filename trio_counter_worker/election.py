"""Leader election on a Redis lease.

The timing rules are plain values (:class:`LeaseTiming`); :class:`Elector` carries them
out against a :class:`~trio_counter_worker.store.Store`:

- a standby reads how long the current lease has left and sleeps that long, or until the
  leader announces a release (pushed over pub/sub): a graceful handoff in milliseconds;
- with liveness on (TAKEOVER_CHECK_MS, :mod:`~trio_counter_worker.lease_spec`), a
  standby also watches every TAKEOVER_CHECK_MS whether the leader's connection is still
  there (:meth:`~.store.Store.wait_leader_gone`: one thread, no script), and steals the
  lease from a leader that is gone (seen gone twice, a grace apart, the second time by
  the acquire script): a leader that dies is replaced in tens of milliseconds, not at
  the end of its lease. A leader whose own subscription drops steps down at once;
- a leader renews every third of the TTL and steps down on its own monotonic deadline,
  before the lease can expire in Redis, if renewals keep failing; at once if a renewal
  shows another holder.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import NoReturn

import attrs
import trio

from .errors import LeaseLost, RedisRefused, RedisUnavailable
from .liveness import Liveness
from .metrics import Metrics
from .outage import OutageLog
from .retry import Backoff
from .store import LeaseView, Store, Watched

__all__ = ["Elector", "Lease", "LeaseTiming"]

log = logging.getLogger("trio_counter_worker.election")

# The least time a holder must have been seen gone before a standby steals its lease. A
# live holder whose connection was cut learns it from the RST within a round trip (the
# grace also takes 4 round trips), then stops at once (Elector.guard).
_MIN_GRACE = 0.010


@attrs.frozen
class LeaseTiming:
    """When to renew and when to give up, for a lease of ``ttl`` seconds."""

    ttl: float

    @property
    def renew_every(self) -> float:
        return self.ttl / 3

    @property
    def retry_every(self) -> float:
        """Pause between renew attempts after a failed one."""
        return self.ttl / 10

    @property
    def step_down_after(self) -> float:
        """How long a renewal sent at t keeps us leader: Redis starts its TTL after t,
        and 10 % covers clock-rate differences between hosts."""
        return self.ttl * 0.9

    def step_down_at(self, sent_at: float) -> float:
        return sent_at + self.step_down_after


@attrs.define
class Lease:
    """The lease while we hold it. ``step_down_at`` is in trio's clock."""

    epoch: int
    renewed_at: float  # when the last successful acquire/renew was sent
    step_down_at: float
    alive: str = ""  # the liveness channel recorded with it: its loss ends the lease
    taken_from: str = ""  # the replica it was stolen from (gone), if it was


@attrs.define
class _Suspect:
    """A holder's liveness channel seen gone, and when it was first seen so."""

    channel: str
    since: float


class Elector:
    """Acquire, hold and release the lease for one replica.

    ``holder`` is unique per process (two processes given the same REPLICA_ID still
    differ); ``replica_id`` is the human name shown to others.
    """

    def __init__(
        self,
        store: Store,
        timing: LeaseTiming,
        holder: str,
        replica_id: str,
        metrics: Metrics | None = None,
        outage: OutageLog | None = None,
        liveness: Liveness | None = None,
        check_every: float = 0.025,
        settle: float = 0.0,
        endpoint: str = "",
    ) -> None:
        self._store = store
        # Where this replica sends resets (no secrets in it): recorded with a lease it
        # takes, and compared with the leader's by a standby.
        self.endpoint = endpoint
        self._differs: tuple[str, str] | None = None  # (leader, its endpoint) last said
        # Fast takeover (None: off, the lease decides); how often a standby looks at the
        # leader's liveness; the least time a leader must have been seen gone before it
        # is stolen from (Sentinel: time for a live leader to follow a moved master too).
        self.liveness = liveness
        self._check_every = check_every
        self._settle = settle
        self._metrics = metrics or Metrics()
        self._outage = outage or OutageLog(log)
        self.last_ok: float | None = None  # trio time of the last answered lease call
        self.timing = timing
        self.holder = holder
        self.replica_id = replica_id
        self.epoch_seen = 0  # highest fencing token seen: new epochs never go below it
        self._released = trio.lowlevel.ParkingLot()
        self._release_count = 0
        # The last answered acquires' round trips: the least of them is the link's, not
        # a moment when this process was slow to run (which would stretch the grace).
        self._round_trips: deque[float] = deque(maxlen=8)
        self._unseen_noted = False
        self._watch_failed = False

    @property
    def _ttl_ms(self) -> int:
        return round(self.timing.ttl * 1000)

    def notify_released(self) -> None:
        """Called when a release announcement arrives: wake the waiting campaign."""
        self._release_count += 1
        self._released.unpark_all()

    async def acquire(self) -> Lease:
        """Wait until this replica holds the lease; return it.

        Cancellation: safe at any point; an acquire that lands after cancellation simply
        expires after one TTL (or is released by the caller's cleanup).
        """
        backoff = Backoff()
        suspect: _Suspect | None = None
        unseen_since: float | None = None  # our subscription not seen by Redis since
        while True:
            mine = await self._own_channel()
            # Subscribed, but not seen where the scripts run for a lease (a moved
            # master?): campaign without liveness rather than not at all.
            if (
                mine
                and unseen_since is not None
                and trio.current_time() - unseen_since >= self.timing.ttl
            ):
                self._note_unseen()
                mine = ""
            seen = self._release_count
            sent = trio.current_time()
            steal = ""
            if suspect is not None and sent - suspect.since >= self._grace(suspect):
                steal = suspect.channel
            try:
                view = await self._store.acquire(
                    self.holder,
                    self.replica_id,
                    self._ttl_ms,
                    self.epoch_seen,
                    mine,
                    steal,
                    self.endpoint,
                )
            except RedisUnavailable as exc:
                self._metrics.redis_errors.inc()
                self._outage.failed("campaign", exc, trio.current_time())
                # Back off, but campaign again as soon as Redis answers (a promoted
                # replica, a restarted Redis): a standby must not sleep out a backoff
                # of seconds while nobody leads. The floor keeps a Redis that answers
                # PING but refuses the script from turning this into a busy loop.
                delay = backoff.next()
                with trio.move_on_after(delay):
                    await trio.sleep(min(delay, self.timing.retry_every))
                    await self._store.wait_until_reachable()
                continue
            backoff.reset()
            self.last_ok = trio.current_time()
            self._round_trips.append(self.last_ok - sent)
            self._outage.recovered(self.last_ok)
            self.epoch_seen = max(self.epoch_seen, view.epoch)
            self._metrics.fencing_token.set(self.epoch_seen)
            if view.ready:
                unseen_since = None
            elif unseen_since is None:
                unseen_since = sent
            self._compare_endpoint(view)
            if view.acquired:
                return Lease(
                    view.epoch, sent, self.timing.step_down_at(sent), mine, view.holder_replica
                )
            if seen != self._release_count:
                continue  # a release was announced while we asked: try again now
            # Just past the lease's end (PTTL is whole ms).
            wait = view.pttl_ms / 1000 + 0.001 if view.pttl_ms > 0 else self.timing.retry_every
            watch = ""  # the leader's liveness channel, watched until it has no subscriber
            if mine:
                if view.liveness == "gone" and view.alive:
                    if suspect is None or suspect.channel != view.alive:
                        suspect = _Suspect(view.alive, sent)
                    left = suspect.since + self._grace(suspect) - trio.current_time()
                    wait = min(wait, max(left, 0.0))
                else:
                    suspect = None
                    if view.liveness == "alive" and view.ready and view.alive:
                        watch = view.alive
                    elif view.liveness == "alive" or not view.ready:
                        wait = min(wait, self._check_every)
            woke: Watched | None = None
            with trio.move_on_after(wait):
                woke = await self._until_woken(watch)
            if woke == "gone":  # a first sighting, as ACQUIRE's: steal after the grace
                suspect = _Suspect(watch, trio.current_time())
                with trio.move_on_after(self._grace(suspect)):
                    await self._released.park()

    async def _until_woken(self, watch: str) -> Watched | None:
        """Until a release is announced (None) or, with ``watch``, the leader's liveness
        channel has no subscriber or the lease is gone (what the store saw): ACQUIRE
        then looks. If Redis cannot be asked, after TAKEOVER_CHECK_MS (None), as
        without ``watch``."""
        woke: Watched | None = None

        async def watch_leader() -> None:
            nonlocal woke
            try:
                woke = await self._store.wait_leader_gone(watch, self._check_every)
            except Exception as exc:
                # Redis away: ACQUIRE meets it too, and says so. Refused, or an answer
                # the watch cannot read: ACQUIRE may still work, so it is said here.
                refused = isinstance(exc, RedisRefused) and exc.kind == "permission"
                if refused or not isinstance(exc, RedisUnavailable):
                    self._watch_refused(exc)
                await trio.sleep(self._check_every)
            nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            if watch:
                nursery.start_soon(watch_leader)
            await self._released.park()
            nursery.cancel_scope.cancel()
        return woke

    def _compare_endpoint(self, view: LeaseView) -> None:
        """A leader that sends resets elsewhere than this replica would: two deployments
        sharing COUNTER_KEY on one Redis (one election: each gets the resets only while
        it leads), or a change of RESET_ENDPOINT_URL half rolled out. Said once per leader
        and endpoint, and as a gauge while it lasts."""
        theirs = view.endpoint  # ('' when acquired: ours)
        differs = bool(theirs and self.endpoint and theirs != self.endpoint)
        self._metrics.leader_endpoint_differs.set(1 if differs else 0)
        if not differs:
            self._differs = None
            return
        said = (view.holder_replica, theirs)
        if said == self._differs:
            return
        self._differs = said
        log.warning(
            "replica %r leads this deployment and sends its resets to %r, this replica to "
            "%r: replicas that share COUNTER_KEY (and REDIS_DB) on one Redis are one "
            "deployment, and only the leader's RESET_ENDPOINT_URL gets resets; give them "
            "the same RESET_ENDPOINT_URL, or each deployment its own COUNTER_KEY",
            view.holder_replica[:100],
            theirs[:200],
            self.endpoint,
            extra={"event": "leader_endpoint_differs"},
        )

    def _watch_refused(self, exc: Exception) -> None:
        """Once: the watch cannot run, so each look is an acquire script (~4 % of a core
        for a standby, against ~1 %)."""
        if not self._watch_failed:
            self._watch_failed = True
            log.warning(
                "watching the leader's liveness failed (%s: %s): the lease script looks "
                "every TAKEOVER_CHECK_MS while it does, at more CPU; for a refused "
                "command, give the Redis user the rule `check` prints",
                type(exc).__name__,
                exc,
            )

    def _note_unseen(self) -> None:
        if not self._unseen_noted:
            self._unseen_noted = True
            log.warning(
                "Redis does not see this replica's liveness subscription although it is "
                "subscribed (a moved master?): campaigning without it, so a failover "
                "waits for the lease (LEASE_TTL_MS)"
            )

    async def _own_channel(self) -> str:
        """Our liveness channel, once subscribed: a replica campaigns only when Redis can
        see it alive, so after a Redis restart nobody takes a lease that the others would
        steal at once. If the subscription does not come within a lease (SUBSCRIBE
        failing), campaign without: failover then waits for the lease to expire."""
        if self.liveness is None:
            return ""
        with trio.move_on_after(self.timing.ttl):
            await self.liveness.wait_up()
        return self.liveness.channel

    def _grace(self, suspect: _Suspect) -> float:
        """How long a holder must have been seen gone before its lease is stolen: time
        for a live holder whose connection was cut to notice and stop (a few round
        trips), at least _MIN_GRACE."""
        link = min(self._round_trips, default=0.0)
        return max(_MIN_GRACE, 4 * link, self._settle)

    async def guard(self, lease: Lease) -> None:
        """Raise :class:`LeaseLost` the moment the liveness subscription recorded with
        ``lease`` drops: a standby may then steal the lease within a grace, and a leader
        that cannot know whether one did must not go on. Returns at once for a lease
        recorded without liveness. Run it beside :meth:`hold`."""
        if not lease.alive or self.liveness is None:
            return
        await self.liveness.wait_lost(lease.alive)
        raise LeaseLost(
            "this replica's liveness subscription to Redis dropped: stepping down at once "
            "(a standby may take over within about TAKEOVER_CHECK_MS and a short grace)"
        )

    async def hold(self, lease: Lease) -> NoReturn:
        """Renew ``lease`` until it is lost, then raise :class:`LeaseLost`.

        Never returns. Run it beside the leader-only work so that losing the lease
        cancels that work.
        """
        timing = self.timing
        next_renew = lease.renewed_at + timing.renew_every
        while True:
            await trio.sleep_until(min(next_renew, lease.step_down_at))
            if trio.current_time() >= lease.step_down_at:
                raise LeaseLost(
                    f"could not renew the lease within {timing.step_down_after:.2f} s "
                    "(Redis unreachable or slow): stepping down before it can expire"
                )
            sent = trio.current_time()
            with trio.move_on_at(lease.step_down_at):
                try:
                    renewed = await self._store.renew(self.holder, self._ttl_ms)
                except RedisUnavailable as exc:
                    self._metrics.redis_errors.inc()
                    self._outage.failed("lease renewal", exc, trio.current_time())
                    next_renew = sent + timing.retry_every
                    continue
                if renewed == "unseen":
                    raise LeaseLost(
                        "lease renewal: Redis no longer sees this replica's liveness "
                        "subscription: stepping down (a standby may take over)"
                    )
                if renewed != "renewed":
                    raise LeaseLost("lease renewal shows another holder or an expired lease")
                self.last_ok = trio.current_time()
                self._outage.recovered(self.last_ok)
                self._metrics.renewal.observe(self.last_ok - sent)
                lease.renewed_at = sent
                lease.step_down_at = timing.step_down_at(sent)
                next_renew = sent + timing.renew_every

    async def release(self) -> bool:
        """Compare-and-delete the lease and announce it; False if it was not ours."""
        return await self._store.release(self.holder, self.replica_id)
