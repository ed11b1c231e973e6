"""What the leader does while it holds the lease: watch, schedule, claim, deliver.

Every counter key's deadline is known (read when the key is set or re-armed, and on
taking over) and recorded in Redis. At the deadline the leader asks Redis to decide
(the claim script touches the key, so Redis expires it at once instead of whenever its
background cycle finds it). Keyspace notifications only tell the leader *that* something
changed; Redis state read by the scripts is the truth.

Runs inside the leader scope: losing the lease cancels all of it.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Awaitable, Callable, Iterable
from typing import NoReturn

import trio

from .config import Config
from .delivery import Delivered, ResetSender
from .election import Backoff, Lease
from .errors import RedisUnavailable, first_error
from .keyspace import enable_hint, key_from_channel, keyspace_pattern
from .metrics import Metrics
from .schedule import Schedule
from .store import KeyOutcome, Message, PendingReset, Store

__all__ = ["LeaderDuties"]

log = logging.getLogger("trio_counter_worker.leader")

_BATCH = 500  # keys per script call: bounds the time Redis spends in one script
_EARLY = 0.001  # fire just after the deadline, so the key is already due in Redis
_RESCAN_EVERY = 5.0  # without notifications, how often to look for new keys


class LeaderDuties:
    """The leader-only work for one lease. ``run()`` until cancelled."""

    def __init__(
        self,
        config: Config,
        store: Store,
        sender: ResetSender,
        holder: str,
        lease: Lease,
        on_reset: Callable[[PendingReset, int], None],
        metrics: Metrics | None = None,
    ) -> None:
        self._metrics = metrics or Metrics()
        self._config = config
        self._store = store
        self._sender = sender
        self._holder = holder
        self._lease = lease
        self._schedule = Schedule()
        self._sleep: trio.CancelScope | None = None
        self._in_flight: set[str] = set()
        # Claimed resets waiting for a courier, oldest deadline first.
        self._backlog: list[tuple[int, str, PendingReset]] = []
        self._backlog_lot = trio.lowlevel.ParkingLot()
        self._delivered: list[tuple[PendingReset, Delivered]] = []  # awaiting mark_sent
        self._delivered_lot = trio.lowlevel.ParkingLot()
        self._own_prefix = config.namespace + ":"
        self._on_reset = on_reset

    async def run(self) -> NoReturn:
        """Lead until cancelled. Redis connection loss: resynchronise, with backoff.

        Cancellation: in-flight requests are abandoned; their resets stay pending in
        Redis and the next leader sends them under the same reset_id.
        """
        async with trio.open_nursery() as deliveries:
            # MAX_IN_FLIGHT couriers: at most that many requests at once, and no task
            # per reset however large a burst is.
            for lane in range(self._config.max_in_flight):
                deliveries.start_soon(self._courier, lane)
            deliveries.start_soon(self._marker)
            backoff = Backoff()
            while True:
                try:
                    await self._watch(backoff)
                except* RedisUnavailable as group:
                    self._metrics.redis_errors.inc()
                    delay = backoff.next()
                    log.warning(
                        "leader lost its Redis connection (%s); resynchronising in %.1f s",
                        first_error(group), delay,
                    )
                    await trio.sleep(delay)
        raise AssertionError("unreachable")

    async def _watch(self, backoff: Backoff) -> None:
        status = await self._store.ensure_notifications()
        if status.changed:
            log.info("enabled keyspace notifications: notify-keyspace-events=%r", status.flags)
        if not status.ok:
            missing = None if status.flags is None else status.missing
            log.error("%s (Redis said: %s)", enable_hint(missing), status.error)
        send, receive = trio.open_memory_channel[list[Message]](64)
        pattern = keyspace_pattern(self._config.redis_db, self._config.counter_key)
        async with trio.open_nursery() as nursery:
            # Subscribe first, then read state: nothing that changes in between is missed.
            await nursery.start(_listen, self._store, [pattern], send)
            # Deadlines and events are served while the reconcile runs (2 s for 100k
            # counters): every script reads Redis's current state, so the order in which
            # they land does not matter; at worst a key is looked at once more.
            nursery.start_soon(self._run_timer)
            nursery.start_soon(self._consume, receive)
            for reset in await self._store.pending():
                self._spawn_delivery(reset)
            await self._reconcile()
            backoff.reset()
            if not status.ok:
                nursery.start_soon(self._rescan)

    async def _consume(self, receive: trio.MemoryReceiveChannel[list[Message]]) -> None:
        async for batch in receive:
            await self._on_events(batch)

    # -- state --------------------------------------------------------------------------

    def _at(self, key: str, when: float) -> None:
        self._schedule.set(key, when)
        if self._sleep is not None and when < self._sleep.deadline:
            self._sleep.deadline = when

    async def _reconcile(self) -> None:
        """Bring the local schedule in line with Redis: every matching key, every
        recorded deadline (including those that passed while nobody led)."""
        cursor = 0
        while True:
            cursor, keys = await self._store.scan(self._config.counter_key, cursor)
            await self._track(keys)
            if cursor == 0:
                break
        start = trio.current_time()
        rows = await self._store.tracked(self._holder)
        base = (start + trio.current_time()) / 2
        for key, pttl_ms in rows:
            self._at(key, base + pttl_ms / 1000 + _EARLY)
        log.info("reconciled: %d counter keys tracked", len(self._schedule))

    async def _rescan(self) -> None:
        while True:
            await trio.sleep(_RESCAN_EVERY)
            await self._reconcile()

    async def _track(self, keys: Iterable[str]) -> None:
        mine = [k for k in dict.fromkeys(keys) if not k.startswith(self._own_prefix)]
        for i in range(0, len(mine), _BATCH):
            await self._decide(self._store.track(self._holder, mine[i : i + _BATCH]))

    async def _decide(self, call: Awaitable[list[KeyOutcome]]) -> None:
        """Await one script call and act on its outcomes. Its pttls count from the middle
        of the round trip: the best local estimate of when Redis read them."""
        start = trio.current_time()
        outcomes = await call
        self._apply(outcomes, (start + trio.current_time()) / 2)

    def _apply(self, outcomes: list[KeyOutcome], base: float) -> None:
        try:
            self._apply_each(outcomes, base)
        finally:
            self._metrics.watched.set(len(self._schedule))

    def _apply_each(self, outcomes: list[KeyOutcome], base: float) -> None:
        for o in outcomes:
            if o.kind == "alive":
                self._at(o.key, base + o.pttl_ms / 1000 + _EARLY)
            elif o.kind == "due":
                self._at(o.key, base)
            elif o.kind == "claimed" and o.reset is not None:
                self._schedule.remove(o.key)
                self._spawn_delivery(o.reset)
            else:
                self._schedule.remove(o.key)

    async def _on_events(self, batch: list[Message]) -> None:
        changed: list[str] = []
        unscheduled: list[str] = []
        now = trio.current_time()
        for msg in batch:
            key = key_from_channel(msg.channel)
            if msg.data == "expired":
                if key in self._schedule:
                    self._at(key, now)  # Redis expired it before our timer: claim now
                elif not key.startswith(self._own_prefix):
                    # Usually the echo of our own claim; but a key set and expired before
                    # we read its TTL (events backlogged) has only this to show for it.
                    unscheduled.append(key)
            else:
                changed.append(key)
        await self._track(changed)
        for i in range(0, len(unscheduled), _BATCH):
            chunk = unscheduled[i : i + _BATCH]
            await self._decide(self._store.claim(self._holder, chunk, reported=True))

    async def _run_timer(self) -> NoReturn:
        while True:
            nxt = self._schedule.next_deadline()
            with trio.CancelScope(deadline=math.inf if nxt is None else nxt) as self._sleep:
                await trio.sleep_forever()
            self._sleep = None
            while due := self._schedule.pop_due(trio.current_time(), limit=_BATCH):
                await self._decide(self._store.claim(self._holder, due))

    # -- delivery -----------------------------------------------------------------------

    def _spawn_delivery(self, reset: PendingReset) -> None:
        if reset.reset_id in self._in_flight:
            return
        self._in_flight.add(reset.reset_id)
        self._metrics.pending.set(len(self._in_flight))
        heapq.heappush(self._backlog, (reset.deadline_ms, reset.reset_id, reset))
        self._backlog_lot.unpark()

    async def _courier(self, lane: int) -> NoReturn:
        while True:
            while not self._backlog:
                await self._backlog_lot.park()
            _, _, reset = heapq.heappop(self._backlog)
            done = await self._sender.deliver(reset, self._lease.epoch, lane)
            self._delivered.append((reset, done))
            self._delivered_lot.unpark()

    async def _marker(self) -> NoReturn:
        """Mark delivered resets sent, many per script call: under a burst this saves a
        round trip per reset. A reset stays in flight until marked, so a resync does not
        send it again."""
        while True:
            while not self._delivered:
                await self._delivered_lot.park()
            batch, self._delivered = self._delivered[:_BATCH], self._delivered[_BATCH:]
            backoff = Backoff()
            while True:
                try:
                    await self._store.mark_sent(self._holder, *(r.reset_id for r, _ in batch))
                    break
                except RedisUnavailable as exc:
                    delay = backoff.next()
                    log.warning("could not mark %d reset(s) sent (%s); retrying in %.1f s",
                                len(batch), exc, delay)
                    await trio.sleep(delay)
            for reset, done in batch:
                self._in_flight.discard(reset.reset_id)
                log.info(
                    "reset sent: key=%r reset_id=%s fencing_token=%d status=%d attempts=%d "
                    "latency_ms=%.1f",
                    reset.key, reset.reset_id, self._lease.epoch, done.status, done.attempts,
                    done.latency * 1000,
                    extra={"event": "reset_sent", "key": reset.key,
                           "reset_id": reset.reset_id, "fencing_token": self._lease.epoch,
                           "attempts": done.attempts,
                           "latency_ms": round(done.latency * 1000, 1)},
                )
                self._on_reset(reset, done.attempts)
            self._metrics.pending.set(len(self._in_flight))


async def _listen(
    store: Store,
    patterns: list[str],
    send: trio.MemorySendChannel[list[Message]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    await store.listen(patterns=patterns, channels=[], send=send, task_status=task_status)
