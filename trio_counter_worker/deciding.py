"""The leader's deciders: script calls that ask Redis about the keys the state queues.

A dispatcher forms the calls (claims first, see :class:`~.decisions.CallLimits`) and hands
each to one of ``_DECIDERS`` deciders; a timer queues a claim for each deadline as it
comes. What a claim yields goes to ``deliver`` (the couriers, :mod:`.delivering`). A call
that fails unexpectedly is bisected until the key at fault is set aside.

What to look at (events, the window of recorded deadlines, reconciles) is
:mod:`.watching`'s business; it tells the deciders through :meth:`Deciders.queued` and
:meth:`Deciders.rescheduled`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import NoReturn

import trio

from .decisions import CallLimits
from .errors import RedisRefused, WorkerError
from .handover import Handover
from .keyspace import shown_key
from .leader_state import LeaderState, Taken
from .metrics import Metrics
from .pressure import Pressure
from .store import FailingNote, PendingReset, Store

__all__ = ["BATCH", "Deciders", "Deliver"]

# The leader's log, whichever of its parts speaks: operators filter on this name.
log = logging.getLogger("trio_counter_worker.leader")

BATCH = 500  # keys per script call: bounds the time Redis spends in one script
_DECIDERS = 8  # script calls in flight at once: keeps up over a slow link
# Of those, at most this many look at keys (TRACK): a claim due during a reconcile's
# looks finds a decider free, and few scripts ahead of it in Redis.
_LOOKS = 4
# Calls for less than a full batch in flight at once, per kind (claims, looks): more
# keys wait for one to return and go together. At a few keys a second each goes alone
# at once; at thousands a second, or with the leader's CPU busy, calls carry many keys
# each instead of one (per call: a thread hop and a script run).
_SMALL_CALLS = 4
_POISON_LIMIT = 3  # single keys failing in a row before the failure counts as the leader's
# The deadline timer fires at most this often: a deadline that comes sooner after the
# last firing waits for the next, with every other key due by then. A lone deadline is
# claimed at once; a steady trickle (hundreds a second) goes a few keys per claim, and
# the claim's hop, POST batch, mark and echoes are shared by them, for at most this much
# more lateness.
CLAIM_EVERY = 0.005

# Hands a claimed reset to the couriers, with what earlier leaders learnt of its failures.
Deliver = Callable[[PendingReset, FailingNote | None], None]


class Deciders:
    """Decide what ``state`` queues, one :meth:`run` per subscription; hand what is
    claimed to ``deliver``."""

    def __init__(
        self,
        store: Store,
        holder: str,
        state: LeaderState,
        deliver: Deliver,
        metrics: Metrics,
    ) -> None:
        self._store = store
        self._holder = holder
        self._state = state
        self._deliver = deliver
        self._metrics = metrics
        self._sleep: trio.CancelScope | None = None  # the timer's, while it waits
        self._fired = -math.inf  # when the timer last fired (trio time)
        self._queued = trio.lowlevel.ParkingLot()  # the dispatcher waits here for keys
        self._decided = trio.lowlevel.ParkingLot()  # a reconcile waits here for room
        self._relieved = trio.lowlevel.ParkingLot()  # the watch waits here to reconcile
        self._poison_streak = 0

    async def run(self) -> NoReturn:
        """The dispatcher, the deciders and the deadline timer, until cancelled. A
        resynchronisation starts them again, with nothing in flight."""
        calls = CallLimits(BATCH, _LOOKS, _SMALL_CALLS)
        batches, ready = trio.open_memory_channel[Taken](0)
        async with trio.open_nursery() as nursery:
            for _ in range(_DECIDERS):
                nursery.start_soon(self._decider, ready, calls)
            nursery.start_soon(self._run_timer)
            await self._dispatch(batches, calls)
        raise AssertionError("unreachable")

    def queued(self) -> None:
        """The state queued keys: wake the dispatcher."""
        if self._state.pressure.first_drop():
            log.warning(
                "Redis has refused the leader's writes so long that %d keys wait: more "
                "are let go; every counter key is looked at again once Redis accepts "
                "writes (keys that expire meanwhile are lost). Raise maxmemory or free "
                "memory",
                self._state.pressure.limit,
                extra={"event": "redis_oom_overflow"},
            )
        self._queued.unpark_all()
        self._metrics.decision_backlog.set(len(self._state.queue))

    def rescheduled(self) -> None:
        """The schedule changed: wake the timer if the next deadline came nearer."""
        self._metrics.watched.set(len(self._state.schedule))
        nxt = self._state.schedule.next_deadline()
        if self._sleep is not None and nxt is not None and nxt < self._sleep.deadline:
            self._sleep.deadline = max(nxt, self._fired + CLAIM_EVERY)

    async def wait_for_room(self, most: int) -> None:
        """Wait until at most ``most`` keys are queued."""
        while len(self._state.queue) > most:
            await self._decided.park()

    async def wait_for_overflow(self) -> None:
        """Wait until Redis accepts writes again after refusing them for so long that
        keys were let go (:mod:`.pressure`): the caller reconciles."""
        while not self._state.pressure.take_overflow():
            await self._relieved.park()

    async def hand_over(self, handover: Handover) -> None:
        """Decide the keys that only this leader can vouch for (see
        :meth:`.LeaderDuties.hand_over`). What it cannot decide (the lease or Redis gone,
        or cancelled at the caller's deadline) stays in ``handover``, for the next
        leader."""
        reported = self._state.take_reported()
        handover.keep(reported, trio.current_time())
        try:
            for heard in (True, False):
                alike = [(key, after) for key, after, h in reported if h == heard]
                for i in range(0, len(alike), BATCH):
                    batch = alike[i : i + BATCH]
                    keys = [k for k, _ in batch]
                    afters = [after for _, after in batch]
                    await self._store.claim(self._holder, keys, afters, heard)
                    handover.decided(keys)
        except Exception as exc:  # the release must go on, whatever this does
            log.warning(
                "handing over: %d key(s) seen or reported expired could not be decided "
                "(%s): handed to the next leader once Redis answers",
                len(handover),
                exc,
            )
            return
        if reported:
            log.info("handing over: decided %d key(s) reported expired", len(reported))

    async def _dispatch(
        self, batches: trio.MemorySendChannel[Taken], calls: CallLimits
    ) -> NoReturn:
        """Form the script calls ``calls`` allows; hand each to a free decider."""
        pressure = self._state.pressure
        while True:
            now = trio.current_time()
            self._settle(pressure, now)
            taken = None
            held_until = pressure.call_at()
            if held_until <= now:
                held_until = math.inf
                claims, looks = calls.allowed(len(self._state.queue))
                taken = self._state.take(BATCH, claims=claims, looks=looks)
            if taken is None:
                # Woken by keys queued or a call returning, or when a call may go again.
                with trio.move_on_at(min(held_until, pressure.settles_at())):
                    await self._queued.park()
                continue
            pressure.sent()
            calls.started(taken.claim, len(taken.keys))
            await batches.send(taken)

    async def _decider(self, ready: trio.MemoryReceiveChannel[Taken], calls: CallLimits) -> None:
        """Decide the batches the dispatcher forms, one script call at a time;
        _DECIDERS of these run at once, never two on the same key."""
        async for taken in ready:
            decided = False
            try:
                await self._decide(taken)
                decided = True
            finally:
                self._state.done(taken, decided)
                calls.finished(taken.claim, len(taken.keys))
                self._queued.unpark_all()  # its keys, or room for a call, may be taken
                self._decided.unpark_all()
                self._metrics.decision_backlog.set(len(self._state.queue))

    async def _decide(self, taken: Taken) -> None:
        """One script call for ``taken``, and act on its outcomes. Its pttls count from
        the middle of the round trip: the best local estimate of when Redis read them.

        An unexpected error (not Redis being away, not the lease) is bisected: the keys
        that fail alone are quarantined, the others decided. Several single keys failing
        in a row mean the fault is not in the data: it is raised, for the replica's
        crash barrier.
        """
        start = trio.current_time()
        try:
            if taken.claim:
                outcomes = await self._store.claim(
                    self._holder, taken.keys, taken.expired_after, taken.heard
                )
            else:
                outcomes = await self._store.track(self._holder, taken.keys)
        except RedisRefused as exc:
            if exc.kind != "oom":
                raise
            self._state.put_back(taken)
            self._refused(exc)
            return
        except WorkerError:
            raise
        except Exception as exc:
            if len(taken.keys) > 1:
                for half in taken.halves():
                    await self._decide(half)
                return
            self._poison_streak += 1
            if self._poison_streak > _POISON_LIMIT:
                raise
            key = taken.keys[0]
            self._state.set_aside(key, f"{type(exc).__name__}: {exc}")
            self._metrics.quarantined.inc()
            log.error(
                "counter key %r set aside: deciding it failed unexpectedly; the other "
                "counters go on",
                shown_key(key),
                exc_info=exc,
                extra={"event": "key_quarantined", "key": shown_key(key)},
            )
            return
        self._poison_streak = 0
        self._state.pressure.accepted(
            trio.current_time(), any(o.kind in ("alive", "claimed") for o in outcomes)
        )
        if not self._state.pressure.refusing:
            self._relieved.unpark_all()
        try:
            for reset in self._state.apply(outcomes, (start + trio.current_time()) / 2):
                self._deliver(reset, None)
        finally:
            self.rescheduled()

    def _refused(self, exc: RedisRefused) -> None:
        pressure = self._state.pressure
        if pressure.refused(trio.current_time()):
            log.warning(
                "Redis refuses the leader's writes for lack of memory (%s): what the "
                "leader has seen is held (up to %d keys) and tried again until Redis "
                "accepts. Raise maxmemory (CONFIG SET maxmemory) or free memory; "
                "maxmemory-policy noeviction refuses every write once maxmemory is reached",
                exc,
                pressure.limit,
                extra={"event": "redis_oom"},
            )

    def _settle(self, pressure: Pressure, now: float) -> None:
        if (relief := pressure.settle(now)) is None:
            return
        lost = ""
        if relief.dropped:
            lost = (
                f"; {relief.dropped} key(s) past the bound of {pressure.limit} were let "
                "go: every counter key is looked at again (keys that expired meanwhile "
                "are lost)"
            )
        log.info(
            "Redis accepts the leader's writes again after %.1f s (%d call(s) refused)%s",
            relief.lasted,
            relief.refused,
            lost,
            extra={"event": "redis_oom_over"},
        )

    async def _run_timer(self) -> NoReturn:
        while True:
            nxt = self._state.schedule.next_deadline()
            at = math.inf if nxt is None else max(nxt, self._fired + CLAIM_EVERY)
            with trio.CancelScope(deadline=at) as self._sleep:
                await trio.sleep_forever()
            self._sleep = None
            self._fired = trio.current_time()
            self._state.due(self._fired)
            self.queued()
