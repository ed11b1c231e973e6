"""What a leadership saw and could not decide, kept past its end for whoever leads next.

Some keys only the leader's memory vouches for: seen set but not looked at yet, or
reported expired and not decided (:meth:`.LeaderState.take_reported`). Redis has no trace
of one that expires unheard (no recorded deadline, in no scan). A leader letting go
decides them under its lease; where it cannot — the lease lost to a Redis stall or a
partition, Redis not answering — they are kept here, in the worker, and written to Redis
(HAND_OVER) as soon as it answers. The leader, whoever it is, takes them (TAKE_HANDED)
when its subscription starts and when told on the redeliver channel, and decides them as
reported expiries: a key re-armed meanwhile is only looked at, one claimed meanwhile is
an echo, never a second reset. An `expired` event that was heard stays heard: it ended an
episode even if the key is set again by then (spec.claim).

Bounded: at most ``limit`` keys, each kept at most ``spec.HANDED_FOR_MS`` here and as long
again in Redis (past that, a claim made meanwhile may have lost its tombstone, and
deciding the key could reset it twice). What is let go is said in one WARNING.
"""

from __future__ import annotations

import logging
from typing import NoReturn

import trio

from .decisions import Report, latest_report
from .errors import RedisRefused, RedisUnavailable
from .outage import OutageLog
from .retry import Backoff
from .spec import HANDED_FOR_MS, handed_entries
from .store import Store

__all__ = ["HANDED_MAX", "Handover"]

log = logging.getLogger("trio_counter_worker")

HANDED_MAX = 10_000  # keys kept per process, at most (one leadership's unlooked keys)
_WRITE_BATCH = 1_000  # entries per HAND_OVER call


class Handover:
    """Keys a leadership of this process could not decide, until Redis has them."""

    def __init__(self, limit: int = HANDED_MAX, keep_for: float = HANDED_FOR_MS / 1000) -> None:
        self.limit = limit
        self._keep_for = keep_for
        # key -> ((after, heard), kept since: trio s)
        self._keys: dict[str, tuple[tuple[int, bool], float]] = {}
        self._changed = trio.Event()
        self.dropped = 0  # let go: past the bound, or kept too long

    def __len__(self) -> int:
        return len(self._keys)

    def keep(self, reported: list[Report], now: float) -> None:
        """Keep ``reported`` (key, after, heard) until decided or written to Redis."""
        for key, after, heard in reported:
            if key in self._keys:
                was, since = self._keys[key]
                # aged from its first sighting
                self._keys[key] = (latest_report(was, (after, heard)), since)
            elif len(self._keys) < self.limit:
                self._keys[key] = ((after, heard), now)
            else:
                self.dropped += 1
        if self._keys:
            self._changed.set()

    def decided(self, keys: list[str]) -> None:
        """The leader decided ``keys`` itself: nothing to hand over for them."""
        for key in keys:
            self._keys.pop(key, None)

    def due(self, now: float) -> list[Report]:
        """What to write now: every key kept, less those kept too long (let go)."""
        old = [k for k, (_, since) in self._keys.items() if now - since > self._keep_for]
        for key in old:
            del self._keys[key]
        self.dropped += len(old)
        return [(key, after, heard) for key, ((after, heard), _) in self._keys.items()]

    def written(self, reported: list[Report]) -> None:
        """Redis has ``reported``: forget each unless kept again since with a later
        report (a later time, or the same time heard)."""
        for key, after, heard in reported:
            kept = self._keys.get(key)
            if kept is not None and latest_report(kept[0], (after, heard)) == (after, heard):
                del self._keys[key]

    async def run(self, store: Store, outage: OutageLog) -> NoReturn:
        """Write what is kept to Redis whenever there is some, retrying with backoff
        until Redis takes it (or it is kept too long). Runs for the worker's life."""
        backoff = Backoff()
        while True:
            while not self._keys:
                await self._changed.wait()
                self._changed = trio.Event()
            now = trio.current_time()
            batch = self.due(now)[:_WRITE_BATCH]
            self._say_dropped()
            if not batch:
                continue
            try:
                await self._write(store, batch)
            except (RedisUnavailable, RedisRefused) as exc:
                outage.failed("handing over", exc, trio.current_time())
                await trio.sleep(backoff.next())
                continue
            backoff.reset()
            outage.recovered(trio.current_time())

    async def flush(self, store: Store) -> None:
        """The worker is stopping: write what is kept now, once (the caller bounds the
        time); what Redis does not take is let go, and said. Without this a leadership
        that ended just before the stop would take its undecided keys with the process."""
        try:
            while batch := self.due(trio.current_time())[:_WRITE_BATCH]:
                await self._write(store, batch)
        except (RedisUnavailable, RedisRefused):
            pass
        finally:
            self.dropped += len(self._keys)
            self._keys.clear()
            self._say_dropped()

    async def _write(self, store: Store, batch: list[Report]) -> None:
        """HAND_OVER ``batch``; forget it once Redis has it."""
        try:
            await store.hand_over([e for report in batch for e in handed_entries(*report)])
        except (RedisUnavailable, RedisRefused):
            raise  # run() retries; flush() lets go
        except Exception:  # a bug here must not end the replica: say it, let go
            log.exception("handing over %d key(s) failed: they are let go", len(batch))
            self.written(batch)
            return
        self.written(batch)
        log.info(
            "handed over %d key(s) seen by this replica's last leadership and not "
            "decided: the leader decides them",
            len(batch),
            extra={"event": "handed_over", "keys": len(batch)},
        )

    def _say_dropped(self) -> None:
        if self.dropped:
            log.warning(
                "%d key(s) seen by this replica's last leadership could not be handed over "
                "(more than %d kept, or Redis did not answer within %.0f s): if they expired "
                "unheard, they are not reset",
                self.dropped,
                self.limit,
                self._keep_for,
                extra={"event": "handover_dropped", "keys": self.dropped},
            )
            self.dropped = 0
