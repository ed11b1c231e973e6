"""The delivery side alone, through its interface: ``deliver(reset, history)`` in,
requests out through a scripted sender, Redis updated through the fake store.

Trio's autojump clock, every time asserted exactly (the fake store answers at once).
"""

from __future__ import annotations

import logging
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
from trio_counter_worker.delivery import Attempt
from trio_counter_worker.metrics import Metrics
from trio_counter_worker.outage import OutageLog
from trio_counter_worker.retry import RetryPolicy
from trio_counter_worker.store import FailingNote, PendingReset

pytestmark = pytest.mark.fail_after(600)

HOLDER = "h1"
OK = Attempt("done", 200)
BUSY = Attempt("retry", 503, "HTTP 503", retry_after=1.0)  # retry_after: no jitter


@attrs.define
class ScriptedSender:
    """Answers each attempt with the next scripted one, then OK; records what it sent."""

    answers: list[Attempt] = attrs.Factory(list)
    sent: list[tuple[float, str, int, int]] = attrs.Factory(list)  # time, id, token, lane

    async def attempt(self, reset: PendingReset, fencing_token: int, lane: int = 0) -> Attempt:
        await trio.lowlevel.checkpoint()
        self.sent.append((trio.current_time(), reset.reset_id, fencing_token, lane))
        return self.answers.pop(0) if self.answers else OK


@attrs.define
class Rig:
    store: FakeStore
    sender: ScriptedSender
    deliveries: Deliveries
    metrics: Metrics
    resets: list[tuple[PendingReset, int]]  # what on_reset heard

    def gauge(self, name: str) -> float | None:
        return self.metrics.registry.get_sample_value(name)


@asynccontextmanager
async def delivering(
    answers: list[Attempt], give_up_after: float | None = None, max_in_flight: int = 4
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
    sender = ScriptedSender(answers)
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
