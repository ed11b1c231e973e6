"""The leader's couriers: send each claimed reset until the backend takes it, then mark
it sent; note why resets fail, and move those given up on to the dead letters.

Carries out the :class:`~.outbox.Outbox` (which reset next, when to retry, when to give
up). Resets come in through :meth:`Deliveries.deliver`, from the deciders (claimed) and
the watch (pending in Redis, with what earlier leaders learnt of their failures).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import NoReturn, Protocol

import trio

from . import logs
from .config import Config
from .delivery import Attempt, Limit
from .errors import LeaseLost, RedisRefused, RedisUnavailable, WorkerError
from .hints import with_hint
from .keyspace import shown_key
from .metrics import Metrics
from .outage import OutageLog
from .outbox import Entry, Outbox, requests_at_once
from .retry import Backoff, RetryPolicy
from .store import FailingNote, PendingReset, Store

__all__ = ["Deliveries", "Fencing", "Sender"]

# The leader's log, whichever of its parts speaks: operators filter on this name.
log = logging.getLogger("trio_counter_worker.leader")

_STORED_CHUNK = 200  # stored resets queued between two checkpoints (thousands at a takeover)
# Reads the pending resets stored in Redis, each with what earlier leaders learnt of its
# failures (see Deliveries.deliver_stored).
ReadStored = Callable[[], Awaitable[list[tuple[PendingReset, FailingNote | None]]]]
# Resets marked sent, or failing resets noted, per script call: bounds the time Redis
# spends in one.
_PER_SCRIPT = 500
_NOTE_EVERY = 0.5  # failing-reset notes are written to Redis at most this often
# A trickle of deliveries (a backend answering in tens of ms) is marked sent once per
# this, not with a thread hop and a script per reset; a full batch goes at once.
_MARK_GATHER = 0.005


class Sender(Protocol):
    """What the couriers send with (:class:`~.delivery.ResetSender`)."""

    async def attempt(
        self, reset: PendingReset, fencing_token: int, lane: int = 0, limit: Limit | None = None
    ) -> Attempt:
        """POST ``reset`` once, on courier ``lane``'s connection, bounded by ``limit``."""
        ...

    def timed_out(self) -> Attempt:
        """An attempt whose ``limit`` ran out: no answer in time."""
        ...

    def abandoned(self, after: float) -> Attempt:
        """An attempt cut short after ``after`` s to free its place (see .outbox)."""
        ...


class Fencing(Protocol):
    """The lease the resets go out under (:class:`~.election.Lease`)."""

    @property
    def epoch(self) -> int:
        """The fencing token every request carries."""
        ...


class Deliveries:
    """The delivery side of one lease: :meth:`run` until cancelled, and
    :meth:`deliver` to hand it a reset."""

    def __init__(
        self,
        config: Config,
        store: Store,
        sender: Sender,
        holder: str,
        lease: Fencing,
        on_reset: Callable[[PendingReset, int], None],
        metrics: Metrics,
        policy: RetryPolicy,
        outage: OutageLog,
    ) -> None:
        # One courier per connection (lane): MAX_IN_FLIGHT carry attempts under 0.1 s
        # old, the others slow ones (see .outbox).
        self._couriers = requests_at_once(config.max_in_flight)
        self._store = store
        self._sender = sender
        self._holder = holder
        self._lease = lease
        self._on_reset = on_reset
        self._metrics = metrics
        self._policy = policy
        self._outage = outage
        self._outbox = Outbox(config.max_in_flight, give_up_after=config.reset_give_up_after)
        self._work = trio.lowlevel.ParkingLot()  # couriers wait here for a reset to send
        self._in_air: list[Entry | None] = [None] * self._couriers  # each courier's attempt
        self._limits: list[Limit | None] = [None] * self._couriers  # and what bounds it
        self._abandoning: set[str] = set()  # reset_ids whose attempts are being cut short
        self._timer: trio.CancelScope | None = None  # retries due, attempts slow or out of time
        self._delivered: list[tuple[Entry, Attempt]] = []  # awaiting mark_sent
        self._delivered_lot = trio.lowlevel.ParkingLot()
        self._notes: dict[str, FailingNote] = {}  # to write to Redis, newest per reset
        self._burials: list[FailingNote] = []  # given up on: to move to the dead letters
        self._notes_lot = trio.lowlevel.ParkingLot()
        # A backend down behind thousands of pending resets fails them all within
        # seconds: their lines are budgeted (every attempt is still counted, and listed
        # by `status`).
        self._failure_lines = logs.LineBudget()
        self._burial_lines = logs.LineBudget()  # and theirs, given up on at once
        # One set per deliver_stored in progress: the resets marked sent meanwhile.
        self._marked_while_read: list[set[str]] = []

    async def run(self) -> NoReturn:
        """The couriers, the timer, the noter and the marker, until cancelled.

        Cancellation: in-flight requests are abandoned; their resets stay pending in
        Redis and the next leader sends them under the same reset_id.
        """
        async with trio.open_nursery() as nursery:
            # A fixed set of couriers, one per lane: a bounded number of requests at
            # once, and no task per reset however large a burst is.
            for lane in range(self._couriers):
                nursery.start_soon(self._courier, lane)
            nursery.start_soon(self._marker)
            nursery.start_soon(self._run_timer)
            await self._noter()

    async def deliver_stored(self, read: ReadStored) -> None:
        """Send the pending resets ``read`` returns from Redis (a takeover, a resync, a
        redelivery). One this leader marks sent while they are read and handed over was
        read before it was marked, and is not sent again: it has left the outbox, which
        alone would let it in again."""
        marked: set[str] = set()
        self._marked_while_read.append(marked)
        try:
            for i, (reset, history) in enumerate(await read()):
                if reset.reset_id not in marked:
                    self.deliver(reset, history)
                if i % _STORED_CHUNK == _STORED_CHUNK - 1:
                    await trio.lowlevel.checkpoint()  # the couriers start on the first ones
        finally:
            self._marked_while_read.remove(marked)

    def deliver(self, reset: PendingReset, history: FailingNote | None = None) -> None:
        """Send ``reset`` (unless it is already on its way), carrying over ``history``:
        what earlier leaders learnt of its failures."""
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
            if self._work:  # unpark() costs ~1 us with nobody parked: in a burst, none is
                self._work.unpark()
            else:  # every courier busy: a hanging one may have to make room (see .outbox)
                self._wind_timer(self._outbox.next_slow_at())

    async def _courier(self, lane: int) -> NoReturn:
        while True:
            # One cancel scope for a lane's attempts, which the timer cancels when the
            # attempt in the air has run out of time or is abandoned for room: no scope,
            # no deadline per attempt. Once cancelled it is spent: the next attempts get
            # a new one.
            with trio.CancelScope() as scope:
                limit = self._limits[lane] = Limit(scope, self._wind_timer)
                await self._carry(lane, limit)
            entry, self._in_air[lane] = self._in_air[lane], None
            if entry is None or not scope.cancelled_caught:
                continue
            if entry.reset.reset_id in self._abandoning:
                self._abandoning.discard(entry.reset.reset_id)
                self._after(entry, self._sender.abandoned(trio.current_time() - entry.started))
            else:
                self._after(entry, self._sender.timed_out())

    async def _carry(self, lane: int, limit: Limit) -> None:
        """Send resets on ``lane`` until ``limit`` is spent."""
        outbox = self._outbox
        while not limit.spent:
            entry = outbox.take(trio.current_time())
            if entry is None:
                await self._work.park()
                continue
            self._wind_timer(outbox.next_slow_at())
            self._in_air[lane] = entry
            try:
                attempt = await self._sender.attempt(entry.reset, self._lease.epoch, lane, limit)
            except WorkerError:
                raise
            except Exception as exc:  # a bug, or a reset it cannot even build: set it aside
                self._in_air[lane] = None
                self._abandoning.discard(entry.reset.reset_id)
                self._set_aside(entry, exc)
                continue
            self._in_air[lane] = None
            self._abandoning.discard(entry.reset.reset_id)  # it ended first
            self._after(entry, attempt)

    def _after(self, entry: Entry, attempt: Attempt) -> None:
        """Carry out how ``entry``'s attempt went."""
        outbox = self._outbox
        # Read before the outbox forgets: a retry still on its courier frees a retry
        # slot; a slow attempt, a slow slot (another attempt may turn slow now).
        was_retry, was_slow = entry.retry, entry.slow
        if attempt.done:
            outbox.succeeded(entry.reset.reset_id, trio.current_time())
            self._delivered.append((entry, attempt))
            if self._delivered_lot:  # else the marker is busy: it takes this one next
                self._delivered_lot.unpark()
        else:
            self._failed(entry, attempt)
        if was_retry:
            self._work.unpark()  # a retry slot is free again
        if was_slow or attempt.done:  # a success may shorten slow_after() too
            self._wind_timer(outbox.next_slow_at())

    def _set_aside(self, entry: Entry, exc: Exception) -> None:
        reset = entry.reset
        self._outbox.remove(reset.reset_id)
        self._wind_timer(self._outbox.next_slow_at())  # its slow slot, if any, is free
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
            self._wind_timer(entry.retry_at)
        self._notes_lot.unpark()
        self._metrics.failing.set(self._outbox.failing_count)
        if not _within(
            self._failure_lines,
            logging.WARNING,
            "resets not delivered",
            "`status` lists the failing resets, tcw_reset_attempts_total counts every attempt",
            "failures_not_logged",
        ):
            return
        level = logging.WARNING if attempt.verdict == "retry" else logging.ERROR
        log.log(
            level,
            "reset not delivered: key=%r reset_id=%s attempt=%d: %s; %s",
            shown_key(reset.key),
            reset.reset_id,
            entry.attempts,
            with_hint(attempt.status, attempt.error),
            "giving up (RESET_GIVE_UP_AFTER): moving it to the dead letters"
            if verdict == "dead"
            else f"retrying in {delay:.2f} s",
        )

    def _wind_timer(self, at: float) -> None:
        """Have the timer go off by ``at`` (trio time)."""
        timer = self._timer
        if timer is not None and at < timer.deadline:
            timer.deadline = at

    async def _run_timer(self) -> NoReturn:
        """Wake couriers when failed resets come due (no courier waits on a retry), and
        when attempts turn slow and give their couriers back; cut attempts that ran out
        of time, or that the outbox abandons for room (their couriers' limits)."""
        outbox = self._outbox
        while True:
            due = min((limit.due for limit in self._limits if limit is not None), default=math.inf)
            at = min(outbox.next_retry_at(), outbox.next_slow_at(), due)
            with trio.CancelScope(deadline=at) as self._timer:
                await trio.sleep_forever()
            self._timer = None
            now = trio.current_time()
            for limit in self._limits:
                if limit is not None and limit.due <= now:
                    limit.expire()
            woken = outbox.promote(now) + outbox.slowdown(now)
            self._cut_short(outbox.take_abandoned())
            if woken:
                self._work.unpark(count=woken)

    def _cut_short(self, reset_ids: list[str]) -> None:
        """Cancel the attempts the outbox abandoned for room; each then fails, and is
        retried, like one that got no answer (see :mod:`.outbox`)."""
        for reset_id in reset_ids:
            for lane, entry in enumerate(self._in_air):
                limit = self._limits[lane]
                if entry is not None and entry.reset.reset_id == reset_id and limit is not None:
                    self._abandoning.add(reset_id)
                    limit.expire()
                    break

    async def _noter(self) -> NoReturn:
        """Write why resets are failing, and bury those given up on, in batches."""
        while True:
            while not self._notes and not self._burials:
                await self._notes_lot.park()
            notes, self._notes = list(self._notes.values()), {}
            burials, self._burials = self._burials, []
            for start in range(0, len(notes), _PER_SCRIPT):
                batch = notes[start : start + _PER_SCRIPT]
                await self._with_retries(
                    "note failing resets", partial(self._store.note_failing, self._holder, batch)
                )
            for note in burials:
                await self._with_retries(
                    "give up on a reset", partial(self._store.bury, self._holder, note)
                )
                self._metrics.dead.inc()
                if not _within(
                    self._burial_lines,
                    logging.ERROR,
                    "resets given up on",
                    "`status` lists the dead letters, tcw_dead_resets_total counts them",
                    "dead_not_logged",
                ):
                    continue
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
            if len(self._delivered) < _PER_SCRIPT:
                await trio.sleep(_MARK_GATHER)
            batch, ids = self._next_marks()
            await self._with_retries(
                f"mark {len(batch)} reset(s) sent",
                partial(self._store.mark_sent, self._holder, *ids),
            )
            self._marked(batch, ids)

    async def mark_delivered(self) -> None:
        """As leading ends (the marker cancelled, maybe gathering): mark sent what was
        delivered, so that the next leader does not send it again. One try: what Redis
        does not take (the lease gone, Redis away) the next leader sends again, under
        the same reset_id."""
        while self._delivered:
            batch, ids = self._next_marks()
            try:
                await self._store.mark_sent(self._holder, *ids)
            except (RedisUnavailable, RedisRefused, LeaseLost):
                return
            self._marked(batch, ids)

    def _next_marks(self) -> tuple[list[tuple[Entry, Attempt]], list[str]]:
        """The next batch to mark sent, taken out of the delivered, and its reset_ids."""
        batch = self._delivered[:_PER_SCRIPT]
        self._delivered = self._delivered[_PER_SCRIPT:]
        return batch, [entry.reset.reset_id for entry, _ in batch]

    def _marked(self, batch: list[tuple[Entry, Attempt]], ids: list[str]) -> None:
        """Redis has ``batch`` marked sent: out of the outbox, logged, told to the hook."""
        for marked in self._marked_while_read:
            marked.update(ids)
        emit = logs.line_logger(log, logging.INFO)
        failed_before = False
        epoch = self._lease.epoch
        for entry, done in batch:
            reset = entry.reset
            self._outbox.remove(reset.reset_id)
            failed_before = failed_before or entry.attempts > 0
            attempts = entry.attempts + 1
            if emit is not None:
                _log_sent(emit, reset, done, epoch, attempts)
            self._on_reset(reset, attempts)
        self._metrics.pending.set(len(self._outbox))
        if failed_before:  # only a reset that had failed was counted as failing
            self._metrics.failing.set(self._outbox.failing_count)


def _within(budget: logs.LineBudget, level: int, what: str, counted: str, event: str) -> bool:
    """Whether a line of ``budget``'s kind may be logged now; the first past the budget
    says, once in its window, that the rest are not (and where they are ``counted``)."""
    taken = budget.take(trio.current_time())
    if taken == "ran_out":
        log.log(
            level,
            "more than %d %s within %.0f s: the next ones in that time are not logged one "
            "by one (%s)",
            budget.lines,
            what,
            budget.every,
            counted,
            extra={"event": event},
        )
    return taken == "line"


def _log_sent(
    emit: logs.LineLogger, reset: PendingReset, done: Attempt, epoch: int, attempts: int
) -> None:
    """The "reset sent" line (or its share of a LOG_RESETS=summary line)."""
    key = shown_key(reset.key)
    latency_ms = done.latency * 1000
    emit(
        "reset sent: key=%r reset_id=%s fencing_token=%d status=%d attempts=%d latency_ms=%.1f",
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
