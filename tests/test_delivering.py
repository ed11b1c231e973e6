"""The delivery side alone, through its interface: ``deliver(reset, history)`` in,
requests out through a scripted sender, Redis updated through the fake store.

Trio's autojump clock, every time asserted exactly (the fake store answers at once).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import attrs
import pytest
import trio
import trio.testing

from tests.fakes import FakeLease, FakeStore
from trio_counter_worker import Config
from trio_counter_worker.delivering import Deliveries
from trio_counter_worker.delivery import Attempt, Limit
from trio_counter_worker.metrics import Metrics
from trio_counter_worker.outage import OutageLog
from trio_counter_worker.outbox import requests_at_once
from trio_counter_worker.retry import RetryPolicy
from trio_counter_worker.store import FailingNote, PendingReset

pytestmark = pytest.mark.fail_after(600)

HOLDER = "h1"
OK = Attempt("done", 200)
BUSY = Attempt("retry", 503, "HTTP 503", retry_after=1.0)  # retry_after: no jitter
TIMEOUT = 5.0  # RESET_TIMEOUT_MS's default
TIMED_OUT = Attempt("retry", None, "no answer within RESET_TIMEOUT_MS=5000")


def abandoned(after: float) -> Attempt:
    return Attempt("retry", None, f"abandoned after {after:.2f} s")


@attrs.define
class FakeSender:
    """What the fake senders share: what they sent, and how a cut attempt reads."""

    # time, id, token, lane
    sent: list[tuple[float, str, int, int]] = attrs.field(factory=list, kw_only=True)

    def record(self, reset: PendingReset, fencing_token: int, lane: int) -> None:
        self.sent.append((trio.current_time(), reset.reset_id, fencing_token, lane))

    def times(self, reset_id: str) -> list[float]:
        return [t for t, sent_id, *_ in self.sent if sent_id == reset_id]

    def timed_out(self) -> Attempt:
        return TIMED_OUT

    def abandoned(self, after: float) -> Attempt:
        return abandoned(after)


@attrs.define
class ScriptedSender(FakeSender):
    """Answers each attempt with the next scripted one, then OK; records what it sent."""

    answers: list[Attempt] = attrs.Factory(list)

    async def attempt(
        self,
        reset: PendingReset,
        fencing_token: int,
        lane: int = 0,
        limit: Limit | None = None,
    ) -> Attempt:
        await trio.lowlevel.checkpoint()
        self.record(reset, fencing_token, lane)
        return self.answers.pop(0) if self.answers else OK


@attrs.define
class TimedSender(FakeSender):
    """A backend taking ``takes[reset_id]`` s to answer each reset (0 unless listed):
    OK, or a timeout once that reaches TIMEOUT (the courier's ``limit``, as ResetSender
    sets it). Checks that no lane carries two requests at once (a lane is one
    connection) and counts the requests in the air."""

    takes: dict[str, float]
    busy_lanes: set[int] = attrs.Factory(set)
    most_in_air: int = 0

    async def attempt(
        self,
        reset: PendingReset,
        fencing_token: int,
        lane: int = 0,
        limit: Limit | None = None,
    ) -> Attempt:
        assert lane not in self.busy_lanes, f"two requests at once on lane {lane}"
        self.busy_lanes.add(lane)
        self.most_in_air = max(self.most_in_air, len(self.busy_lanes))
        self.record(reset, fencing_token, lane)
        assert limit is not None, "couriers bound their attempts"
        try:
            with limit.until(trio.current_time() + TIMEOUT):
                await trio.sleep(self.takes.get(reset.reset_id, 0.0))
        finally:
            self.busy_lanes.discard(lane)
        return OK


@attrs.define
class Rig:
    store: FakeStore
    sender: ScriptedSender | TimedSender
    deliveries: Deliveries
    metrics: Metrics
    resets: list[tuple[PendingReset, int]]  # what on_reset heard

    def gauge(self, name: str) -> float | None:
        return self.metrics.registry.get_sample_value(name)


@asynccontextmanager
async def delivering(
    answers: list[Attempt] | TimedSender,
    give_up_after: float | None = None,
    max_in_flight: int = 4,
) -> AsyncIterator[Rig]:
    store = FakeStore("c:*")
    view = await store.acquire(HOLDER, "r1", 3_600_000, 0)
    config = Config(
        reset_endpoint_url="https://backend.test/reset",
        reset_secret="s3cret",
        counter_key="c:*",
        replica_id="r1",
        max_in_flight=max_in_flight,
        reset_give_up_after=give_up_after,
    )
    sender = answers if isinstance(answers, TimedSender) else ScriptedSender(answers)
    metrics = Metrics()
    resets: list[tuple[PendingReset, int]] = []
    deliveries = Deliveries(
        config,
        store,
        sender,
        HOLDER,
        FakeLease(HOLDER, "r1", view.epoch, 0),
        lambda reset, attempts: resets.append((reset, attempts)),
        metrics,
        RetryPolicy(),
        OutageLog(logging.getLogger("test.delivering")),
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(deliveries.run)
        yield Rig(store, sender, deliveries, metrics, resets)
        nursery.cancel_scope.cancel()


def pending(store: FakeStore, key: str) -> PendingReset:
    """A reset as the claim script leaves it: pending in Redis."""
    reset = PendingReset(f"id-{key}", key, 1_000, 1)
    store.pending_resets[reset.reset_id] = reset
    return reset


async def wait_for(predicate: Callable[[], object]) -> None:
    while not predicate():
        await trio.sleep(0.01)


async def test_a_stored_reset_marked_sent_while_it_is_read_is_not_sent_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A takeover claims a due counter and reads the pending resets at once: the claimed
    one can be sent, marked and gone from the outbox between the read and its handing
    over. Read before it was marked, it is not sent a second time; the others are."""
    async with delivering([]) as rig:
        claimed = pending(rig.store, "c:due")
        left = pending(rig.store, "c:left")  # an earlier leader's

        async def read() -> list[tuple[PendingReset, FailingNote | None]]:
            # Both pending when read.
            snapshot: list[tuple[PendingReset, FailingNote | None]] = [
                (claimed, None),
                (left, None),
            ]
            rig.deliveries.deliver(claimed)
            await wait_for(lambda: claimed.reset_id not in rig.store.pending_resets)
            return snapshot

        await rig.deliveries.deliver_stored(read)
        await wait_for(lambda: not rig.store.pending_resets)
        await trio.sleep(1)
        assert rig.resets == [(claimed, 1), (left, 1)]


async def test_a_reset_is_sent_under_the_lease_then_marked_sent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with delivering([]) as rig:
        reset = pending(rig.store, "c:1")
        rig.deliveries.deliver(reset)
        rig.deliveries.deliver(reset)  # already on its way: not sent twice
        await wait_for(lambda: rig.resets)
        assert rig.resets == [(reset, 1)]
        assert [(r, token) for _, r, token, _ in rig.sender.sent] == [(reset.reset_id, 1)]
        assert rig.store.pending_resets == {}
        assert rig.gauge("tcw_pending_resets") == 0.0


async def test_the_history_of_earlier_leaders_carries_over(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with delivering([]) as rig:
        reset = pending(rig.store, "c:1")
        rig.deliveries.deliver(reset, FailingNote(reset.reset_id, 2, 1.0, "HTTP 503", "c:1"))
        await wait_for(lambda: rig.resets)
        assert rig.resets == [(reset, 3)]  # two failed before this leader, one sent


async def test_a_failed_reset_is_noted_in_redis_and_retried_when_due(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with delivering([BUSY]) as rig:
        reset = pending(rig.store, "c:1")
        rig.deliveries.deliver(reset)
        await wait_for(lambda: reset.reset_id in rig.store.failing_notes)
        note = rig.store.failing_notes[reset.reset_id]
        assert (note.attempts, note.last_error, note.key) == (1, "HTTP 503", "c:1")
        assert rig.gauge("tcw_failing_resets") == 1.0
        await wait_for(lambda: rig.resets)
        assert rig.resets == [(reset, 2)]
        assert [t for t, *_ in rig.sender.sent] == [0.0, 1.0]  # Retry-After: 1 s
        assert rig.store.failing_notes == {}
        assert rig.gauge("tcw_failing_resets") == 0.0


async def test_a_reset_failing_past_the_limit_is_buried_in_the_dead_letters(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The limit counts from the first failure, by any leader (wall clock): an hour ago.
    history = FailingNote("id-c:1", 5, time.time() - 3600, "HTTP 503", "c:1")
    async with delivering([BUSY], give_up_after=60.0) as rig:
        reset = pending(rig.store, "c:1")
        rig.deliveries.deliver(reset, history)
        await wait_for(lambda: rig.store.dead)
        buried, note = rig.store.dead[reset.reset_id]
        assert buried == reset
        assert (note.attempts, note.failing_since) == (6, history.failing_since)
        assert len(rig.sender.sent) == 1  # not retried
        assert rig.resets == []
        assert rig.gauge("tcw_dead_resets_total") == 1.0
        assert rig.gauge("tcw_pending_resets") == 0.0


async def test_thousands_failing_at_once_are_noted_a_batch_at_a_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A backend down behind a backlog fails thousands of resets between two writes of
    their notes: at most 500 notes go in one script call (as claims and marks do), so
    no single call holds Redis long, or outlasts the socket timeout and is tried again
    whole, and again."""
    async with delivering([BUSY] * 1_200, max_in_flight=32) as rig:
        sizes: list[int] = []
        write = rig.store.note_failing

        async def note_failing(holder: str, notes: list[FailingNote]) -> None:
            sizes.append(len(notes))
            await write(holder, notes)

        rig.store.note_failing = note_failing  # type: ignore[method-assign]
        for n in range(1_200):
            rig.deliveries.deliver(pending(rig.store, f"c:{n}"))
        await wait_for(lambda: len(rig.store.failing_notes) == 1_200)
    assert max(sizes) == 500
    assert sum(sizes) >= 1_200


async def test_resets_given_up_on_at_once_get_a_budget_of_lines(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Thousands of resets can pass RESET_GIVE_UP_AFTER together (a backend down for
    that long behind a backlog): 20 lines per 10 s name them, then one says the rest are
    not named; all of them are buried and counted."""
    caplog.set_level(logging.INFO, logger="trio_counter_worker")
    failing_since = time.time() - 3600
    async with delivering([BUSY] * 30, give_up_after=60.0) as rig:
        for n in range(30):
            reset = pending(rig.store, f"c:{n}")
            rig.deliveries.deliver(reset, FailingNote(reset.reset_id, 5, failing_since, "", ""))
        await wait_for(lambda: len(rig.store.dead) == 30)
    named = [r for r in caplog.records if r.getMessage().startswith("reset given up on")]
    said = [r for r in caplog.records if getattr(r, "event", None) == "dead_not_logged"]
    assert (len(named), len(said)) == (20, 1)
    assert rig.gauge("tcw_dead_resets_total") == 30.0


# --- attempts that hang give their courier back ----------------------------------------


@pytest.mark.parametrize("hanging", [1, 3])
async def test_a_healthy_reset_is_not_held_behind_hanging_ones(
    autojump_clock: trio.testing.MockClock, hanging: int
) -> None:
    """MAX_IN_FLIGHT 1: each hanging request gives the one courier back 0.1 s after it
    began (each went at 0.0, 0.1, 0.2), and goes on in the slow pool. Before, the
    healthy reset waited for the first timeout (5 s)."""
    hangs = [f"id-c:h{n}" for n in range(hanging)]
    sender = TimedSender(dict.fromkeys(hangs, math.inf))
    async with delivering(sender, max_in_flight=1) as rig:
        for n in range(hanging):
            rig.deliveries.deliver(pending(rig.store, f"c:h{n}"))
        due = 0.1 * hanging - 0.05  # while the last hanging request holds the courier
        await trio.sleep(due)
        healthy = pending(rig.store, "c:ok")
        rig.deliveries.deliver(healthy)
        await wait_for(lambda: rig.resets)
        assert [sender.times(h)[0] for h in hangs] == pytest.approx(
            [0.1 * n for n in range(hanging)]
        )
        (sent_at,) = sender.times(healthy.reset_id)
        assert sent_at - due <= 0.1
        assert sent_at == pytest.approx(0.1 * hanging)
        assert rig.resets == [(healthy, 1)]
        # The hanging requests time out in the slow pool and are retried, as before.
        await wait_for(lambda: all(len(sender.times(h)) >= 2 for h in hangs))
        assert all(sender.times(h)[1] >= TIMEOUT for h in hangs)
        assert sender.most_in_air <= requests_at_once(1)
        await wait_for(lambda: set(rig.store.failing_notes) == set(hangs))


async def test_a_slow_attempt_that_succeeds_is_marked_sent_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sender = TimedSender({"id-c:slow": 2.0})
    async with delivering(sender, max_in_flight=1) as rig:
        slow = pending(rig.store, "c:slow")
        rig.deliveries.deliver(slow)
        await trio.sleep(0.5)
        rig.deliveries.deliver(slow)  # heard again while it is slow: still one request
        other = pending(rig.store, "c:other")
        rig.deliveries.deliver(other)
        await wait_for(lambda: len(rig.resets) == 2)
        assert rig.resets == [(other, 1), (slow, 1)]
        assert [(t, r) for t, r, *_ in sender.sent] == [(0.0, slow.reset_id), (0.5, other.reset_id)]
        assert rig.store.pending_resets == {}
        assert rig.store.failing_notes == {}


async def test_past_the_slow_pool_the_oldest_hanging_attempt_is_abandoned(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """MAX_IN_FLIGHT 1, a slow pool of 4, 5 hanging resets: the fifth holds the courier
    until the oldest slow one has been out 1 s (nothing has succeeded yet to tell the
    backend's usual time); that one is cut short and retried like a timeout, and the
    healthy reset goes then, not at RESET_TIMEOUT_MS. Never more than 5 requests at once."""
    hangs = [f"id-c:h{n}" for n in range(5)]
    sender = TimedSender(dict.fromkeys(hangs, math.inf))
    async with delivering(sender, max_in_flight=1) as rig:
        for n in range(5):
            rig.deliveries.deliver(pending(rig.store, f"c:h{n}"))
        await trio.sleep(0.5)
        healthy = pending(rig.store, "c:ok")
        rig.deliveries.deliver(healthy)
        await wait_for(lambda: rig.resets)
        assert sender.most_in_air == requests_at_once(1) == 5
        assert sender.times(healthy.reset_id) == [pytest.approx(1.0)]
        await wait_for(lambda: "id-c:h0" in rig.store.failing_notes)
        assert rig.store.failing_notes["id-c:h0"].last_error == "abandoned after 1.00 s"
        # Retried at the retry policy's pace, as after a timeout.
        await wait_for(lambda: len(sender.times("id-c:h0")) >= 2)
        assert sender.times("id-c:h0")[1] > 1.0
