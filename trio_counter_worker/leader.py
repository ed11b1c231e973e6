"""What the leader does while it holds the lease: watch, schedule, claim, deliver.

Every counter key's deadline is known (read when the key is set or re-armed, and on
taking over) and recorded in Redis. At the deadline the leader asks Redis to decide
(the claim script touches the key, so Redis expires it at once instead of whenever its
background cycle finds it). Keyspace notifications only tell the leader *that* something
changed; Redis state read by the scripts is the truth.

Runs inside the leader scope: losing the lease cancels all of it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import NoReturn

import trio

from . import logs
from .config import Config
from .delivery import Attempt, ResetSender
from .election import Lease
from .errors import (
    FunctionsUnavailable,
    RedisRefused,
    RedisUnavailable,
    WorkerError,
    first_error,
)
from .keyspace import enable_hint, eviction_warning, shown_key
from .leader_state import WINDOW, LeaderState, Quarantine, Taken
from .metrics import Metrics
from .outage import OutageLog
from .outbox import Entry, Outbox
from .retry import Backoff, RetryPolicy
from .store import FailingNote, Message, PendingReset, Store

__all__ = ["LeaderDuties"]

log = logging.getLogger("trio_counter_worker.leader")

_BATCH = 500  # keys per script call: bounds the time Redis spends in one script
_DECIDERS = 8  # script calls in flight at once: keeps up over a slow link
# Of those, at most this many look at keys (TRACK): a claim due during a reconcile's
# looks finds a decider free, and few scripts ahead of it in Redis.
_LOOKS = 4
# Calls for less than a full batch in flight at once, per kind (claims, looks): more
# keys wait for one to return and go together. At a few keys a second each goes alone
# at once; at thousands a second, or with the leader's CPU busy, calls carry many keys
# each instead of one (per call: a thread hop and a script run).
_SMALL_CALLS = 4
_RECONCILE_AHEAD = 8 * _BATCH  # keys a reconcile queues ahead of the deciders, at most
_WINDOW_MS = round(WINDOW * 1000)
_RESCAN_EVERY = 5.0  # without notifications, how often to look for new keys
_VERIFY_FLAGS_EVERY = 1.0  # how often the leader checks that notifications are still on
_NOTE_EVERY = 0.5  # failing-reset notes are written to Redis at most this often
_POISON_LIMIT = 3  # single keys failing in a row before the failure counts as the leader's


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
        quarantine: Quarantine | None = None,
        policy: RetryPolicy | None = None,
        outage: OutageLog | None = None,
    ) -> None:
        self._outage = outage or OutageLog(log)
        self._metrics = metrics or Metrics()
        self._config = config
        self._store = store
        self._sender = sender
        self._holder = holder
        self._lease = lease
        self._state = LeaderState(config.keys, quarantine)
        self._sleep: trio.CancelScope | None = None
        # Retries use at most half the couriers: failing resets never starve fresh ones.
        self._outbox = Outbox(max(1, config.max_in_flight // 2), config.reset_give_up_after)
        self._policy = policy or RetryPolicy()
        self._work = trio.lowlevel.ParkingLot()  # couriers wait here for a reset to send
        self._retry_timer: trio.CancelScope | None = None
        self._delivered: list[tuple[Entry, Attempt]] = []  # awaiting mark_sent
        self._delivered_lot = trio.lowlevel.ParkingLot()
        self._notes: dict[str, FailingNote] = {}  # to write to Redis, newest per reset
        self._burials: list[FailingNote] = []  # given up on: to move to the dead letters
        self._notes_lot = trio.lowlevel.ParkingLot()
        self._poison_streak = 0
        self._queued = trio.lowlevel.ParkingLot()  # the dispatcher waits here for keys
        self._looks = trio.Semaphore(_LOOKS)
        self._small = {True: 0, False: 0}  # small calls in flight: claims, looks
        self._decided = trio.lowlevel.ParkingLot()  # a reconcile waits here for room
        self._events: trio.MemoryReceiveChannel[list[Message]] | None = None
        self._functions_note = ""
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
            deliveries.start_soon(self._run_retry_timer)
            deliveries.start_soon(self._noter)
            backoff = Backoff()
            while True:
                try:
                    await self._watch(backoff)
                except* RedisUnavailable as group:
                    self._metrics.redis_errors.inc()
                    await self._after_redis_error(first_error(group), backoff)
        raise AssertionError("unreachable")

    async def hand_over(self) -> None:
        """Before a graceful release: decide the keys that only an `expired` event vouches
        for (queued, or received and not yet read). The next leader finds every other key
        by itself (a scan, the recorded deadlines), but not these: they would be lost.
        Their resets stay pending in Redis for the next leader to send.

        Call it shielded, with a deadline; it gives up quietly if the lease or Redis is
        gone (the scripts check the lease: nothing is claimed without it).
        """
        if self._events is not None:
            while True:
                try:
                    self._state.on_events(self._events.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
        reported = self._state.take_reported()
        try:
            for i in range(0, len(reported), _BATCH):
                batch = reported[i : i + _BATCH]
                await self._store.claim(
                    self._holder, [k for k, _ in batch], [after for _, after in batch]
                )
        except Exception as exc:  # the release must go on, whatever this does
            log.warning(
                "handing over: %d key(s) reported expired could not be decided "
                "(%s); the next leader may not see them",
                len(reported),
                exc,
            )
            return
        if reported:
            log.info("handing over: decided %d key(s) reported expired", len(reported))

    async def _after_redis_error(self, exc: Exception, backoff: Backoff) -> None:
        """Wait before resynchronising: the backoff for a refusal (out of memory, a missing
        permission: retrying at once would only hammer Redis); for a lost connection,
        only until Redis answers again, so the leader is not blind longer than Redis was
        away."""
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
        status = await self._store.ensure_notifications()
        if status.changed:
            log.info("enabled keyspace notifications: notify-keyspace-events=%r", status.flags)
        if not status.ok:
            missing = None if status.flags is None else status.missing
            log.error("%s (Redis said: %s)", enable_hint(missing), status.error)
        if (warning := eviction_warning(await self._store.memory_policy())) is not None:
            log.warning(warning, extra={"event": "eviction_policy"})
        await self._install_functions()
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
            batches, ready = trio.open_memory_channel[tuple[Taken, bool]](0)
            for _ in range(_DECIDERS):
                nursery.start_soon(self._decider, ready)
            nursery.start_soon(self._dispatch, batches)
            nursery.start_soon(self._run_timer)
            nursery.start_soon(self._consume, receive)
            await self._load_pending()
            await self._read_window()  # the recorded deadlines first: the due ones
            nursery.start_soon(self._keep_window)
            await self._reconcile()
            backoff.reset()
            if status.ok:
                nursery.start_soon(self._verify_flags, nursery)
            else:
                nursery.start_soon(self._rescan)

    async def _install_functions(self) -> None:
        """The touch library, for apps that mark activity with FCALL tcw_touch. Optional:
        where Redis has no Functions (6.2, Cluster) or refuses them, plain SETs work as
        ever; said once per leadership."""
        try:
            version = await self._store.install_functions()
        except FunctionsUnavailable as exc:
            note = f"touch functions (FCALL tcw_touch) not available: {exc}"
        else:
            note = f"touch functions ready: library tcw version {version}"
        if note != self._functions_note:
            self._functions_note = note
            log.info(note, extra={"event": "functions"})

    async def _load_pending(self) -> None:
        """Every pending reset, with what earlier leaders learnt of its failures."""
        history = await self._store.failing()
        for reset in await self._store.pending():
            note = history.get(reset.reset_id)
            if note is None:
                self._spawn_delivery(reset)
            else:
                self._spawn_delivery(reset, note)

    async def _consume(self, receive: trio.MemoryReceiveChannel[list[Message]]) -> None:
        async for batch in receive:
            heard = self._state.on_events(batch)
            self._queued_more()
            self._metrics.activity.labels("notification").inc(heard.notified)
            self._metrics.activity.labels("touch").inc(heard.touched)
            if heard.redeliver:
                log.info("redeliver requested: reading pending resets")
                await self._load_pending()

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

    # -- deciding -----------------------------------------------------------------------

    def _queued_more(self) -> None:
        """The state queued keys: wake the deciders."""
        self._queued.unpark_all()
        self._metrics.decision_backlog.set(len(self._state.queue))

    def _rescheduled(self) -> None:
        """The schedule changed: wake the timer if the next deadline came nearer."""
        self._metrics.watched.set(len(self._state.schedule))
        nxt = self._state.schedule.next_deadline()
        if self._sleep is not None and nxt is not None and nxt < self._sleep.deadline:
            self._sleep.deadline = nxt

    async def _read_window(self) -> None:
        """Read in the recorded deadlines that fall due within the window, page by page,
        earliest first (at a takeover, including those that passed while nobody led:
        the first on-time resets must not wait for a scan of every key)."""
        while True:
            sent = trio.current_time()
            page = await self._store.tracked(self._holder, self._state.read_from, _WINDOW_MS)
            self._state.tracked(page, (sent + trio.current_time()) / 2)
            self._rescheduled()
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
            self._queued_more()
            while len(self._state.queue) > _RECONCILE_AHEAD:
                await self._decided.park()
            if cursor == 0:
                break
        log.info(
            "reconciled: %d counter keys tracked; %d due within %.0f s held in memory",
            found,
            len(self._state.schedule),
            WINDOW,
        )

    async def _rescan(self) -> None:
        while True:
            await trio.sleep(_RESCAN_EVERY)
            await self._reconcile()

    async def _dispatch(self, batches: trio.MemorySendChannel[tuple[Taken, bool]]) -> NoReturn:
        """Form the script calls: claims first, at most _LOOKS looks and _SMALL_CALLS
        small calls of each kind in flight. Hands each to a free decider."""
        self._looks = trio.Semaphore(_LOOKS)  # a resync starts with nothing in flight
        self._small = {True: 0, False: 0}
        while True:
            full = len(self._state.queue) >= _BATCH
            taken = self._state.take(
                _BATCH,
                claims=full or self._small[True] < _SMALL_CALLS,
                looks=self._looks.value > 0 and (full or self._small[False] < _SMALL_CALLS),
            )
            if taken is None:
                await self._queued.park()
                continue
            small = len(taken.keys) < _BATCH
            self._small[taken.claim] += small
            if not taken.claim:
                self._looks.acquire_nowait()
            await batches.send((taken, small))

    async def _decider(self, ready: trio.MemoryReceiveChannel[tuple[Taken, bool]]) -> None:
        """Decide the batches the dispatcher forms, one script call at a time;
        _DECIDERS of these run at once, never two on the same key."""
        async for taken, small in ready:
            decided = False
            try:
                await self._decide(taken)
                decided = True
            finally:
                self._state.done(taken, decided)
                self._small[taken.claim] -= small
                if not taken.claim:
                    self._looks.release()
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
                outcomes = await self._store.claim(self._holder, taken.keys, taken.expired_after)
            else:
                outcomes = await self._store.track(self._holder, taken.keys)
        except WorkerError:
            raise
        except Exception as exc:
            if len(taken.keys) > 1:
                for half in _halves(taken):
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
        try:
            for reset in self._state.apply(outcomes, (start + trio.current_time()) / 2):
                self._spawn_delivery(reset)
        finally:
            self._rescheduled()

    async def _run_timer(self) -> NoReturn:
        while True:
            nxt = self._state.schedule.next_deadline()
            with trio.CancelScope(deadline=math.inf if nxt is None else nxt) as self._sleep:
                await trio.sleep_forever()
            self._sleep = None
            self._state.due(trio.current_time())
            self._queued_more()

    # -- delivery -----------------------------------------------------------------------

    def _spawn_delivery(self, reset: PendingReset, history: FailingNote | None = None) -> None:
        if history is None:
            added = self._outbox.add(reset)
        else:
            added = self._outbox.add(
                reset,
                attempts=history.attempts,
                failing_since=history.failing_since,
                last_error=history.last_error,
            )
        if added:
            self._metrics.pending.set(len(self._outbox))
            self._work.unpark()

    async def _courier(self, lane: int) -> NoReturn:
        while True:
            entry = self._outbox.take()
            if entry is None:
                await self._work.park()
                continue
            was_retry = entry.retry
            try:
                attempt = await self._sender.attempt(entry.reset, self._lease.epoch, lane)
            except WorkerError:
                raise
            except Exception as exc:  # a bug, or a reset it cannot even build: set it aside
                self._set_aside(entry, exc)
                continue
            if attempt.done:
                self._outbox.succeeded(entry.reset.reset_id)
                self._delivered.append((entry, attempt))
                self._delivered_lot.unpark()
            else:
                self._failed(entry, attempt)
            if was_retry:
                self._work.unpark()  # a retry slot is free again

    def _set_aside(self, entry: Entry, exc: Exception) -> None:
        reset = entry.reset
        self._outbox.remove(reset.reset_id)
        self._metrics.quarantined.inc()
        self._metrics.pending.set(len(self._outbox))
        log.error(
            "reset set aside: key=%r reset_id=%s: sending it failed unexpectedly; it "
            "stays pending in Redis for the next leader",
            shown_key(reset.key),
            reset.reset_id,
            exc_info=exc,
            extra={"event": "reset_quarantined", "reset_id": reset.reset_id},
        )

    def _failed(self, entry: Entry, attempt: Attempt) -> None:
        reset = entry.reset
        delay = self._policy.delay(entry.attempts + 1, attempt.verdict, attempt.retry_after)
        verdict = self._outbox.failed(
            reset.reset_id,
            now=trio.current_time(),
            wall=time.time(),
            delay=delay,
            error=attempt.error,
        )
        note = FailingNote(
            reset.reset_id,
            entry.attempts,
            entry.failing_since or time.time(),
            attempt.error,
            shown_key(reset.key),
        )
        if verdict == "dead":
            self._outbox.remove(reset.reset_id)
            self._burials.append(note)
        else:
            self._notes[reset.reset_id] = note
            if self._retry_timer is not None and entry.retry_at < self._retry_timer.deadline:
                self._retry_timer.deadline = entry.retry_at
        self._notes_lot.unpark()
        self._metrics.failing.set(len(self._outbox.failing()))
        level = logging.WARNING if attempt.verdict == "retry" else logging.ERROR
        log.log(
            level,
            "reset not delivered: key=%r reset_id=%s attempt=%d: %s; %s",
            shown_key(reset.key),
            reset.reset_id,
            entry.attempts,
            attempt.error,
            "giving up (RESET_GIVE_UP_AFTER): moving it to the dead letters"
            if verdict == "dead"
            else f"retrying in {delay:.2f} s",
        )

    async def _run_retry_timer(self) -> NoReturn:
        """Wake couriers when failed resets come due: no courier waits on a retry."""
        while True:
            with trio.CancelScope(deadline=self._outbox.next_retry_at()) as self._retry_timer:
                await trio.sleep_forever()
            self._retry_timer = None
            for _ in range(self._outbox.promote(trio.current_time())):
                self._work.unpark()

    async def _noter(self) -> NoReturn:
        """Write why resets are failing, and bury those given up on, in batches."""
        while True:
            while not self._notes and not self._burials:
                await self._notes_lot.park()
            notes, self._notes = list(self._notes.values()), {}
            burials, self._burials = self._burials, []
            await self._with_retries(
                "note failing resets", partial(self._store.note_failing, self._holder, notes)
            )
            for note in burials:
                await self._with_retries(
                    "give up on a reset", partial(self._store.bury, self._holder, note)
                )
                self._metrics.dead.inc()
                log.error(
                    "reset given up on after failing since %s: key=%r reset_id=%s "
                    "attempts=%d last error: %s; `trio-counter-worker redeliver` "
                    "sends it again",
                    time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(note.failing_since)),
                    note.key,
                    note.reset_id,
                    note.attempts,
                    note.last_error,
                    extra={"event": "reset_dead", "reset_id": note.reset_id},
                )
            self._metrics.pending.set(len(self._outbox))
            await trio.sleep(_NOTE_EVERY)

    async def _with_retries(self, what: str, call: Callable[[], Awaitable[object]]) -> None:
        backoff = Backoff()
        while True:
            try:
                await call()
                return
            except RedisUnavailable as exc:
                self._outage.failed(f"could not {what}", exc, trio.current_time())
                await trio.sleep(backoff.next())

    async def _marker(self) -> NoReturn:
        """Mark delivered resets sent, many per script call: under a burst this saves a
        round trip per reset. A reset stays in the outbox until marked, so a resync does
        not send it again."""
        while True:
            while not self._delivered:
                await self._delivered_lot.park()
            batch, self._delivered = self._delivered[:_BATCH], self._delivered[_BATCH:]
            ids = [entry.reset.reset_id for entry, _ in batch]
            await self._with_retries(
                f"mark {len(batch)} reset(s) sent",
                partial(self._store.mark_sent, self._holder, *ids),
            )
            emit = logs.line_logger(log, logging.INFO)
            failed_before = False
            epoch = self._lease.epoch
            for entry, done in batch:
                reset = entry.reset
                self._outbox.remove(reset.reset_id)
                failed_before = failed_before or entry.attempts > 0
                attempts = entry.attempts + 1
                if emit is not None:
                    key = shown_key(reset.key)
                    latency_ms = done.latency * 1000
                    emit(
                        "reset sent: key=%r reset_id=%s fencing_token=%d status=%d "
                        "attempts=%d latency_ms=%.1f",
                        (key, reset.reset_id, epoch, done.status, attempts, latency_ms),
                        {
                            "event": "reset_sent",
                            "key": key,
                            "reset_id": reset.reset_id,
                            "fencing_token": epoch,
                            "attempts": attempts,
                            "latency_ms": round(latency_ms, 1),
                        },
                    )
                self._on_reset(reset, attempts)
            self._metrics.pending.set(len(self._outbox))
            if failed_before:  # only a reset that had failed was counted as failing
                self._metrics.failing.set(len(self._outbox.failing()))


def _halves(taken: Taken) -> list[Taken]:
    half = len(taken.keys) // 2
    after = taken.expired_after
    return [
        Taken(taken.claim, taken.keys[:half], after and after[:half]),
        Taken(taken.claim, taken.keys[half:], after and after[half:]),
    ]


async def _listen(
    store: Store,
    patterns: list[str],
    channels: list[str],
    send: trio.MemorySendChannel[list[Message]],
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    await store.listen(patterns=patterns, channels=channels, send=send, task_status=task_status)
