"""What the leader looks at: the subscription, the recorded deadlines, reconciles.

Every counter key's deadline is known (read when the key is set or re-armed, and on
taking over) and recorded in Redis. Keyspace notifications only tell the leader *that*
something changed; Redis state read by the scripts is the truth. The watch queues keys
in the :class:`~.leader_state.LeaderState` for the :class:`~.deciding.Deciders`, and
hands the pending resets it reads to the couriers. Losing Redis: resynchronise (a new
subscription, the state read again), with backoff.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import NoReturn

import trio

from .config import Config
from .deciding import BATCH, Deciders
from .delivering import ReadStored
from .errors import (
    FunctionsUnavailable,
    RedisRefused,
    RedisUnavailable,
    SubscriptionOverflow,
    first_error,
)
from .keyspace import enable_hint
from .leader_state import WINDOW, LeaderState
from .metrics import Metrics
from .outage import OutageLog
from .retry import Backoff
from .store import FailingNote, Message, NotificationStatus, PendingReset, Store

__all__ = ["Watch"]

# The leader's log, whichever of its parts speaks: operators filter on this name.
log = logging.getLogger("trio_counter_worker.leader")

_RECONCILE_AHEAD = 8 * BATCH  # keys a reconcile queues ahead of the deciders, at most
_WINDOW_MS = round(WINDOW * 1000)
_HANDED_PAGE = 1_000  # handed-over keys taken per call
_RESCAN_EVERY = 5.0  # without notifications, how often to look for new keys
_VERIFY_FLAGS_EVERY = 1.0  # how often the leader checks that notifications are still on
# how often it looks again at what an operator may change at any time: the eviction
# policy (CONFIG SET maxmemory-policy) and the touch library (FUNCTION FLUSH)
_RECHECK_EVERY = 5.0
# Redeliver requests (`trio-counter-worker redeliver`, a message on the redeliver
# channel) read the pending resets at most this often, however many come.
_REDELIVER_EVERY = 0.5


class Watch:
    """Watch the counter keys for one lease: :meth:`run` until cancelled."""

    def __init__(
        self,
        config: Config,
        store: Store,
        holder: str,
        state: LeaderState,
        deciders: Deciders,
        deliver_stored: Callable[[ReadStored], Awaitable[None]],
        metrics: Metrics,
        outage: OutageLog,
    ) -> None:
        self._config = config
        self._store = store
        self._holder = holder
        self._state = state
        self._deciders = deciders
        self._deliver_stored = deliver_stored
        self._metrics = metrics
        self._outage = outage
        self._events: trio.MemoryReceiveChannel[list[Message]] | None = None
        self._functions_note = ""
        self._redeliver = trio.Event()  # set: asked to read the pending resets again

    async def run(self) -> NoReturn:
        """Watch, and run the deciders, until cancelled. Redis connection loss:
        resynchronise, with backoff."""
        backoff = Backoff()
        while True:
            try:
                await self._watch(backoff)
            except* RedisUnavailable as group:
                self._metrics.redis_error(first_error(group))
                await self._after_redis_error(first_error(group), backoff)

    def drain(self) -> None:
        """Queue the events received and not yet read (before a graceful handoff)."""
        if self._events is None:
            return
        while True:
            try:
                self._state.on_events(self._events.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return

    async def _after_redis_error(self, exc: Exception, backoff: Backoff) -> None:
        """Wait before resynchronising: the backoff for a refusal (out of memory, a missing
        permission: retrying at once would only hammer Redis); for a lost connection,
        only until Redis answers again, so the leader is not blind longer than Redis was
        away."""
        if isinstance(exc, SubscriptionOverflow):
            # Redis is up and the leader is blind until it resubscribes: at once.
            log.warning("%s", exc, extra={"event": "subscription_overflow"})
            return
        delay = backoff.next()
        if isinstance(exc, RedisRefused):
            log.error("leader: %s; resynchronising in %.1f s", exc, delay)
            await trio.sleep(delay)
            return
        self._outage.failed(
            "leader", exc, trio.current_time(), "it resynchronises as soon as Redis answers"
        )
        with trio.move_on_after(delay):
            await self._store.wait_until_reachable()

    async def _watch(self, backoff: Backoff) -> None:
        self._metrics.reconciled.set(0)
        # First, always: on a Cluster this also refreshes the topology and loads the
        # scripts on every primary (one promoted since, say); on one Redis, one round trip.
        status = await self._notifications()
        self.drain()  # what the last subscription heard is kept over the resync
        send, receive = trio.open_memory_channel[list[Message]](64)
        self._events = receive
        pattern = self._config.keys.keyspace(self._config.redis_db)
        async with trio.open_nursery() as nursery:
            # Subscribe first, then read state: nothing that changes in between is missed.
            since = await nursery.start(_listen, self._store, [pattern], self._state.channels, send)
            # Deadlines and events are served while the reconcile runs (2 s for 100k
            # counters): every script reads Redis's current state, so the order in which
            # they land does not matter; at worst a key is looked at once more.
            self._state.resubscribed(since)
            nursery.start_soon(self._deciders.run)
            nursery.start_soon(self._consume, receive)
            # A takeover's first resets before anything that gates none of them: the
            # recorded deadlines, the due first, then what the last leader left pending
            # (thousands, after a crash mid-burst), queued while the first are sent.
            await self._read_window()
            nursery.start_soon(self._load_pending)
            nursery.start_soon(self._take_handed)
            nursery.start_soon(self._redeliveries)
            nursery.start_soon(self._keep_window)
            nursery.start_soon(self._memory_and_functions)
            nursery.start_soon(self._reconcile_after_overflow)
            await self._reconcile()
            backoff.reset()
            if status.ok:
                nursery.start_soon(self._verify_flags, nursery)
            else:
                nursery.start_soon(self._rescan)

    async def _notifications(self) -> NotificationStatus:
        status = await self._store.ensure_notifications()
        if status.changed:
            log.info(
                "enabled keyspace notifications: notify-keyspace-events=%r",
                status.flags,
                extra={"event": "flags_enabled", "flags": status.flags},
            )
        if not status.ok:
            missing = None if status.flags is None else status.missing
            log.error("%s (Redis said: %s)", enable_hint(missing), status.error)
        return status

    async def _memory_and_functions(self) -> NoReturn:
        """The eviction policy and the touch library, at the takeover and every
        _RECHECK_EVERY after. A policy that may evict the worker's keys is said when it
        is first seen; while the library is gone (a FUNCTION FLUSH) every app's FCALL
        tcw_touch fails, so it is loaded again, as a takeover would, and said."""
        said: str | None = None
        loaded: bool | None = None  # the library, once the takeover's load was tried
        while True:
            warning = self._metrics.eviction(await self._store.memory_policy())
            if warning is not None and warning != said:
                log.warning(warning, extra={"event": "eviction_policy"})
            said = warning
            if loaded is None:
                loaded = await self._install_functions()
            elif loaded and await self._store.functions_gone() and await self._install_functions():
                log.warning(
                    "the touch library tcw was gone from Redis (a FUNCTION FLUSH?): loaded "
                    "it again; FCALL tcw_touch failed for apps meanwhile",
                    extra={"event": "functions_restored"},
                )
            await trio.sleep(_RECHECK_EVERY)

    async def _install_functions(self) -> bool:
        """The touch library, for apps that mark activity with FCALL tcw_touch. Optional:
        where Redis has no Functions (6.2, Cluster) or refuses them, plain SETs work as
        ever; said once per leadership. Whether it is loaded."""
        try:
            version = await self._store.install_functions()
        except FunctionsUnavailable as exc:
            ready, note = False, f"touch functions (FCALL tcw_touch) not available: {exc}"
        else:
            ready, note = True, f"touch functions ready: library tcw version {version}"
        if note != self._functions_note:
            self._functions_note = note
            log.info(note, extra={"event": "functions"})
        return ready

    async def _load_pending(self) -> None:
        """Every pending reset, with what earlier leaders learnt of its failures."""
        await self._deliver_stored(self._read_pending)

    async def _read_pending(self) -> list[tuple[PendingReset, FailingNote | None]]:
        history = await self._store.failing()
        return [(reset, history.get(reset.reset_id)) for reset in await self._store.pending()]

    async def _take_handed(self) -> None:
        """Keys a former leader saw and could not decide (:mod:`.handover`): decided here
        as reported expiries."""
        while True:
            dropped, entries = await self._store.take_handed(self._holder, _HANDED_PAGE)
            if dropped:
                log.warning(
                    "%d key(s) handed over by a former leader waited too long to be "
                    "decided and were let go: if they expired unheard, they are not reset",
                    dropped,
                    extra={"event": "handover_dropped", "keys": dropped},
                )
            if entries:
                queued = self._state.adopt(entries)
                self._deciders.queued()
                log.info("took %d key(s) handed over by a former leader", queued)
            if len(entries) < _HANDED_PAGE:
                return

    async def _consume(self, receive: trio.MemoryReceiveChannel[list[Message]]) -> None:
        async for batch in receive:
            heard = self._state.on_events(batch)
            self._deciders.queued()
            self._metrics.activity.labels("notification").inc(heard.notified)
            self._metrics.activity.labels("touch").inc(heard.touched)
            if heard.redeliver:
                self._redeliver.set()
            if heard.handed:
                await self._take_handed()

    async def _redeliveries(self) -> NoReturn:
        """Read the pending resets again when asked, beside the events, not in their way:
        anyone who may publish on the redeliver channel could flood it, and a read per
        message would hold up every counter's events behind them. One read at a time,
        at most one per _REDELIVER_EVERY; the requests that come meanwhile are one."""
        while True:
            await self._redeliver.wait()
            self._redeliver = trio.Event()
            log.info("redeliver requested: reading pending resets")
            await self._load_pending()
            await trio.sleep(_REDELIVER_EVERY)

    async def _verify_flags(self, nursery: trio.Nursery) -> None:
        """Notifications are the leader's eyes: an app or operator may rewrite the flags
        at any time. Put them back (merged) and rescan for what was set meanwhile."""
        while True:
            await trio.sleep(_VERIFY_FLAGS_EVERY)
            status = await self._store.verify_notifications()
            if status.changed:
                self._metrics.flags_restored.inc()
                log.warning(
                    "notify-keyspace-events had been changed (it lacked %r): set it back "
                    "to %r; rescanning for counters set while notifications were off",
                    status.missing,
                    status.flags,
                    extra={"event": "flags_restored", "flags": status.flags},
                )
                await self._reconcile()
            elif not status.ok:
                missing = None if status.flags is None else status.missing
                log.error(
                    "keyspace notifications were turned off and could not be set "
                    "again: %s (Redis said: %s)",
                    enable_hint(missing),
                    status.error,
                )
                nursery.start_soon(self._rescan)
                return

    async def _read_window(self) -> None:
        """Read in the recorded deadlines that fall due within the window, page by page,
        earliest first (at a takeover, including those that passed while nobody led:
        the first on-time resets must not wait for a scan of every key)."""
        while True:
            sent = trio.current_time()
            page = await self._store.tracked(self._holder, self._state.read_from, _WINDOW_MS)
            self._state.tracked(page, (sent + trio.current_time()) / 2)
            self._deciders.rescheduled()
            if page.next is None:
                return

    async def _keep_window(self) -> NoReturn:
        while True:
            # At least a second apart, whatever Redis's clock does.
            await trio.sleep_until(max(self._state.refill_at, trio.current_time() + 1.0))
            await self._read_window()

    async def _reconcile(self) -> None:
        """Look at every matching key: those set while nobody watched (no leader, or
        notifications off) have no recorded deadline yet."""
        cursor = 0
        found = 0
        while True:
            cursor, keys = await self._store.scan(self._config.counter_key, cursor)
            found += len(keys)
            self._state.want(keys, "track")
            self._deciders.queued()
            await self._deciders.wait_for_room(_RECONCILE_AHEAD)
            if cursor == 0:
                break
        log.info(
            "reconciled: %d counter keys tracked; %d due within %.0f s held in memory",
            found,
            len(self._state.schedule),
            WINDOW,
        )
        self._metrics.reconciled.set(1)

    async def _reconcile_after_overflow(self) -> NoReturn:
        """Keys let go while Redis refused writes (past the bound): find them again."""
        while True:
            await self._deciders.wait_for_overflow()
            await self._reconcile()

    async def _rescan(self) -> None:
        while True:
            await trio.sleep(_RESCAN_EVERY)
            await self._reconcile()


async def _listen(
    store: Store,
    patterns: list[str],
    channels: list[str],
    send: trio.MemorySendChannel[list[Message]],
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    await store.listen(patterns=patterns, channels=channels, send=send, task_status=task_status)
