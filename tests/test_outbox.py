"""The outbox as plain logic: which reset goes next, retries kept off the couriers, slow
attempts moved off them."""

from __future__ import annotations

import heapq
import math
import statistics
from typing import Literal

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_counter_worker.outbox import (
    ABANDON_MIN,
    SLOW_AFTER,
    SLOW_MIN,
    Entry,
    Outbox,
    p90_of_sorted,
    requests_at_once,
)
from trio_counter_worker.store import PendingReset

COURIERS = 100  # more than these tests take at once: only retry slots limit them


def reset(n: int, deadline_ms: int | None = None) -> PendingReset:
    return PendingReset(f"id{n}", f"c:{n}", deadline_ms if deadline_ms is not None else n, 1)


def test_fresh_resets_go_oldest_deadline_first_and_once() -> None:
    box = Outbox(COURIERS, retry_slots=1)
    for n in (3, 1, 2):
        assert box.add(reset(n))
    assert not box.add(reset(1)), "a reset already here is not queued twice"
    taken = [box.take(0.0) for _ in range(4)]
    assert [e.reset.reset_id if e else None for e in taken] == ["id1", "id2", "id3", None]
    assert len(box) == 3  # still here until marked sent


def test_a_failed_reset_waits_outside_the_couriers_until_its_retry_time() -> None:
    box = Outbox(COURIERS, retry_slots=1)
    box.add(reset(1))
    entry = box.take(0.0)
    assert entry is not None
    assert box.failed("id1", now=10.0, wall=1000.0, delay=2.0, error="HTTP 500") == "retry"
    assert entry.attempts == 1
    assert entry.last_error == "HTTP 500"
    assert entry.failing_since == 1000.0
    assert box.take(0.0) is None
    assert box.next_retry_at() == 12.0
    assert box.promote(11.9) == 0
    assert box.promote(12.0) == 1
    assert box.next_retry_at() == math.inf
    again = box.take(0.0)
    assert again is entry
    assert again.retry


def test_fresh_resets_go_before_due_retries() -> None:
    box = Outbox(COURIERS, retry_slots=4)
    box.add(reset(1))
    assert box.take(0.0) is not None
    box.failed("id1", now=0.0, wall=0.0, delay=1.0, error="x")
    box.promote(5.0)
    box.add(reset(9))
    first, second = box.take(0.0), box.take(0.0)
    assert first is not None
    assert first.reset.reset_id == "id9"
    assert second is not None
    assert second.reset.reset_id == "id1"


def test_retries_never_take_more_than_their_slots() -> None:
    box = Outbox(COURIERS, retry_slots=2)
    for n in range(5):
        box.add(reset(n))
        assert box.take(0.0) is not None
        box.failed(f"id{n}", now=0.0, wall=0.0, delay=1.0, error="hang")
    box.promote(1.0)
    taken = [box.take(0.0) for _ in range(3)]
    assert [e is not None for e in taken] == [True, True, False]
    # A fresh reset still gets a courier while both retry slots are busy.
    box.add(reset(99))
    fresh = box.take(0.0)
    assert fresh is not None
    assert fresh.reset.reset_id == "id99"
    # A retry that ends frees its slot.
    assert taken[0] is not None
    box.failed(taken[0].reset.reset_id, now=1.0, wall=1.0, delay=5.0, error="hang")
    assert box.take(0.0) is not None


def test_succeeded_then_removed() -> None:
    box = Outbox(COURIERS, retry_slots=1)
    box.add(reset(1))
    assert box.take(0.0) is not None
    entry = box.succeeded("id1")
    assert entry.state == "sent"
    assert box.failing() == []
    box.remove("id1")
    assert "id1" not in box
    assert len(box) == 0


def test_give_up_after_declares_a_reset_dead() -> None:
    box = Outbox(COURIERS, retry_slots=1, give_up_after=60.0)
    box.add(reset(1), attempts=4, failing_since=1000.0, last_error="HTTP 404")
    assert box.failing_count == 1  # failing already, by its history
    entry = box.take(0.0)
    assert entry is not None
    assert box.failed("id1", now=0.0, wall=1059.0, delay=1.0, error="HTTP 404") == "retry"
    box.promote(1.0)
    assert box.take(0.0) is entry
    assert box.failed("id1", now=2.0, wall=1060.0, delay=1.0, error="HTTP 404") == "dead"
    assert entry.attempts == 6, "the history of an earlier leader carries over"
    assert box.failing_count == 1
    box.remove("id1")
    assert box.failing_count == 0
    assert len(box) == 0
    assert box.take(0.0) is None


def test_failing_lists_failed_resets_oldest_deadline_first() -> None:
    box = Outbox(COURIERS, retry_slots=1)
    for n in (5, 2, 7):
        box.add(reset(n))
    for _ in range(3):
        entry = box.take(0.0)
        assert entry is not None
        if entry.reset.reset_id != "id7":
            box.failed(entry.reset.reset_id, now=0.0, wall=0.0, delay=1.0, error="e")
    assert [e.reset.reset_id for e in box.failing()] == ["id2", "id5"]
    assert box.failing_count == 2
    box.promote(1.0)
    entry = box.take(1.0)
    assert entry is not None
    box.succeeded(entry.reset.reset_id)  # sent at last: failing no more, still here
    assert box.failing_count == len(box.failing()) == 1
    box.remove(entry.reset.reset_id)
    box.remove("id7")
    assert box.failing_count == 1


def test_a_reset_not_being_sent_cannot_be_reported() -> None:
    box = Outbox(COURIERS, retry_slots=1)
    box.add(reset(1))
    with pytest.raises(RuntimeError, match="not being sent"):
        box.succeeded("id1")
    with pytest.raises(ValueError, match="retry_slots"):
        Outbox(1, retry_slots=0)
    with pytest.raises(ValueError, match="couriers"):
        Outbox(0)


# --- slow attempts give their couriers back -------------------------------------------


def taken_id(entry: Entry | None) -> str | None:
    return entry.reset.reset_id if entry is not None else None


def test_an_attempt_in_the_air_past_slow_after_gives_its_courier_back() -> None:
    box = Outbox(1, slow_slots=2)
    box.add(reset(1))
    hanging = box.take(0.0)
    assert hanging is not None
    box.add(reset(2))
    assert box.take(0.05) is None, "the one courier is busy"
    assert box.next_slow_at() == SLOW_AFTER
    assert box.slowdown(0.09) == 0
    assert box.slowdown(0.1) == 1
    assert hanging.slow
    assert box.in_air == (0, 1)
    assert taken_id(box.take(0.1)) == "id2"
    assert box.in_air == (1, 1)
    # The slow attempt still ends as any other: here with a 2xx, once.
    assert box.succeeded("id1") is hanging
    assert not hanging.slow
    assert box.in_air == (1, 0)
    assert box.take(0.2) is None


def test_a_full_slow_pool_makes_room_when_a_slow_attempt_ends() -> None:
    box = Outbox(1, slow_slots=1)
    for n in (1, 2, 3):
        box.add(reset(n))
    assert taken_id(box.take(0.0)) == "id1"
    assert box.slowdown(0.1) == 1
    assert taken_id(box.take(0.1)) == "id2"
    # Full: id1 may be abandoned only once it has been out ABANDON_UNKNOWN (1 s: nothing
    # has succeeded yet to tell the backend's usual time).
    assert box.next_slow_at() == pytest.approx(1.0)
    assert box.slowdown(0.5) == 0
    assert box.take(0.5) is None
    # id1's request times out first: its slow slot goes to id2, whose courier takes id3.
    assert box.failed("id1", now=0.6, wall=0.6, delay=1.0, error="timeout") == "retry"
    assert box.next_slow_at() == pytest.approx(0.2)
    assert box.slowdown(0.6) == 1
    assert box.take_abandoned() == []
    assert taken_id(box.take(0.6)) == "id3"
    assert box.in_air == (1, 1)


def test_a_full_slow_pool_abandons_its_oldest_attempt_for_room() -> None:
    """However many hang, a courier is free again within about abandon_after: the
    oldest slow attempt is cut short (the caller cancels it; it fails and is retried)."""
    box = Outbox(1, slow_slots=2, slow_after=SLOW_AFTER)
    box.add(reset(0))
    assert box.take(0.0) is not None
    box.succeeded("id0", now=0.01)  # the backend answers in 10 ms: abandon after 0.25 s
    assert box.abandon_after() == ABANDON_MIN
    for n in (1, 2, 3, 4):
        box.add(reset(n))
    assert taken_id(box.take(1.0)) == "id1"
    assert box.slowdown(1.125) == 1
    assert taken_id(box.take(1.125)) == "id2"
    assert box.slowdown(1.25) == 1
    assert taken_id(box.take(1.25)) == "id3"  # the pool is full: id3 keeps its courier
    assert box.next_slow_at() == pytest.approx(1.35)  # id3 slow; id1 out >= 0.25 s
    assert box.slowdown(1.3) == 0
    assert box.slowdown(1.375) == 1
    assert box.take_abandoned() == ["id1"]
    assert box.take_abandoned() == []
    assert box.in_air == (0, 2)
    assert taken_id(box.take(1.375)) == "id4"
    # The abandoned attempt, cancelled, fails like one that timed out.
    assert box.failed("id1", now=1.4, wall=1.4, delay=1.0, error="abandoned") == "retry"
    assert box.in_air == (1, 2)


@pytest.mark.parametrize(
    ("answers_in", "slow_after"),
    [(None, SLOW_AFTER), (0.001, SLOW_MIN), (0.01, 0.04), (0.02, 0.08), (0.5, SLOW_AFTER)],
)
def test_an_attempt_turns_slow_sooner_against_a_backend_that_answers_fast(
    answers_in: float | None, slow_after: float
) -> None:
    """4 x the p90 of its recent answers, between SLOW_MIN and SLOW_AFTER (SLOW_AFTER
    before any answer): a hanging request holds a courier 20 ms, not 100, against a
    backend that answers in a few ms."""
    box = Outbox(1)
    if answers_in is not None:
        box.add(reset(0))
        assert box.take(0.0) is not None
        box.succeeded("id0", now=answers_in)
    box.add(reset(1))
    assert box.take(1.0) is not None
    assert box.slow_after() == pytest.approx(slow_after)
    assert box.next_slow_at() == pytest.approx(1.0 + slow_after)
    assert box.slowdown(1.0 + slow_after) == 1


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0.0, 60.0), min_size=1, max_size=200))
def test_the_p90_is_statistics_own_over_the_last_answers(times: list[float]) -> None:
    """The outbox keeps its window sorted as answers come and go (no sort per success);
    the p90, and so slow_after(), is what ``statistics.quantiles`` gives for the window."""
    box = Outbox(1)
    for n, took in enumerate(times):
        box.add(reset(n))
        assert box.take(0.0) is not None
        box.succeeded(f"id{n}", now=took)
    window = times[-64:]
    p90 = statistics.quantiles(window, n=10)[-1] if len(window) > 1 else window[0]
    assert p90_of_sorted(sorted(window)) == p90
    assert box.slow_after() == min(SLOW_AFTER, max(SLOW_MIN, 4 * p90))


def test_a_backend_slow_for_everyone_is_never_cut_short() -> None:
    """Abandoning is for outliers: with every answer taking 2 s, a slow attempt is kept
    until it is 8 s old (4 x the p90), past any RESET_TIMEOUT_MS it can have."""
    box = Outbox(1, slow_slots=1)
    for n in range(20):
        box.add(reset(n))
        assert box.take(float(n)) is not None
        box.succeeded(f"id{n}", now=n + 2.0)
    assert box.abandon_after() == pytest.approx(8.0, rel=0.01)


def test_a_slow_retry_frees_its_retry_slot() -> None:
    box = Outbox(2, retry_slots=1, slow_slots=2)
    for n in (1, 2):
        box.add(reset(n))
        assert box.take(0.0) is not None
        box.failed(f"id{n}", now=0.0, wall=0.0, delay=1.0, error="timeout")
    assert box.promote(1.0) == 2
    first = box.take(1.0)
    assert first is not None
    assert first.retry
    assert box.take(1.0) is None, "one retry slot, taken"
    assert box.slowdown(1.1) == 1
    assert not first.retry
    second = box.take(1.1)
    assert second is not None
    assert second.retry
    assert box.in_air == (1, 1)


def test_a_reset_in_the_air_is_never_taken_again() -> None:
    box = Outbox(1, slow_slots=4)
    box.add(reset(1))
    entry = box.take(0.0)
    assert entry is not None
    assert box.slowdown(0.1) == 1
    assert not box.add(reset(1)), "already here"
    assert box.take(0.2) is None
    box.failed("id1", now=3.0, wall=3.0, delay=1.0, error="timeout")
    assert box.take(3.0) is None, "it waits for its retry"
    box.promote(4.0)
    assert box.take(4.0) is entry


def test_requests_at_once_counts_the_slow_pool() -> None:
    assert [requests_at_once(m) for m in (1, 2, 4, 32, 1000)] == [5, 6, 8, 64, 2000]
    assert Outbox(32).slow_slots == 32
    assert Outbox(1).slow_slots == 4


# --- any mix of healthy, failing and hanging resets ------------------------------------

Kind = Literal["healthy", "failing", "hanging"]
HANG = 1.0  # a hanging attempt's request times out after this
QUICK = 0.05  # healthy and failing backends answer within this: never slow


@attrs.frozen
class Job:
    arrive: float
    kind: Kind
    answer_in: float  # healthy, failing: how long the backend takes
    retry_delay: float


@attrs.frozen
class Workload:
    couriers: int
    slow_slots: int
    jobs: list[Job]


def workloads(*, hanging_at_most_slow_slots: bool) -> st.SearchStrategy[Workload]:
    @st.composite
    def build(draw: st.DrawFn) -> Workload:
        couriers = draw(st.integers(1, 4))
        slow_slots = draw(st.integers(1, 6))
        jobs = draw(
            st.lists(
                st.builds(
                    Job,
                    arrive=st.floats(0.0, 2.0),
                    kind=st.sampled_from(["healthy", "failing", "hanging"]),
                    answer_in=st.floats(0.0, QUICK),
                    retry_delay=st.floats(0.1, 1.0),
                ),
                max_size=30,
            )
        )
        if hanging_at_most_slow_slots:
            hanging = [n for n, job in enumerate(jobs) if job.kind == "hanging"]
            for n in hanging[slow_slots:]:
                jobs[n] = attrs.evolve(jobs[n], kind="healthy")
        return Workload(couriers, slow_slots, jobs)

    return build()


@attrs.define
class Run:
    added: dict[str, float] = attrs.Factory(dict)
    first_taken: dict[str, float] = attrs.Factory(dict)
    takes: list[tuple[float, str]] = attrs.Factory(list)
    sent: set[str] = attrs.Factory(set)
    abandoned: int = 0


def simulate(w: Workload, horizon: float = 60.0, hang: float = HANG) -> Run:
    """Drive an outbox as the couriers and the timer do, event by event, checking at
    each moment the invariants any workload must keep."""
    box = Outbox(w.couriers, slow_slots=w.slow_slots)
    run = Run()
    arrivals = sorted((job.arrive, n) for n, job in enumerate(w.jobs))
    ends: list[tuple[float, str, float]] = []  # (when the attempt ends, reset_id, began)
    started: dict[str, float] = {}  # attempts in the air
    failures: dict[str, int] = {}
    now = 0.0

    def fail(reset_id: str) -> None:
        failures[reset_id] += 1
        delay = w.jobs[int(reset_id[2:])].retry_delay * 2 ** failures[reset_id]  # as RetryPolicy
        box.failed(reset_id, now=now, wall=now, delay=delay, error="e")

    while now <= horizon:
        while arrivals and arrivals[0][0] <= now:
            _, n = arrivals.pop(0)
            assert box.add(PendingReset(f"id{n}", f"c:{n}", int(w.jobs[n].arrive * 1000), 1))
            run.added[f"id{n}"] = now
        while ends and ends[0][0] <= now:
            _, reset_id, began = heapq.heappop(ends)
            if started.get(reset_id) != began:
                continue  # abandoned: it ended then
            del started[reset_id]
            job = w.jobs[int(reset_id[2:])]
            # Failing resets fail twice, then are taken; hanging ones hang every time.
            if job.kind == "healthy" or (job.kind == "failing" and failures[reset_id] >= 2):
                box.succeeded(reset_id, now)
                box.remove(reset_id)
                run.sent.add(reset_id)
            else:
                fail(reset_id)
        box.promote(now)
        box.slowdown(now)
        for reset_id in box.take_abandoned():  # cancelled: it fails now, no answer
            assert w.jobs[int(reset_id[2:])].kind == "hanging", "only outliers are cut short"
            del started[reset_id]
            run.abandoned += 1
            fail(reset_id)
        while (entry := box.take(now)) is not None:
            reset_id = entry.reset.reset_id
            assert reset_id not in started, "a reset sent twice at once"
            assert reset_id not in run.sent, "a reset sent again after the backend took it"
            started[reset_id] = now
            failures.setdefault(reset_id, 0)
            run.first_taken.setdefault(reset_id, now)
            run.takes.append((now, reset_id))
            job = w.jobs[int(reset_id[2:])]
            answer_in = hang if job.kind == "hanging" else job.answer_in
            heapq.heappush(ends, (now + answer_in, reset_id, now))
        on_couriers, slow = box.in_air
        assert box.failing_count == len(box.failing())
        assert on_couriers <= w.couriers
        assert slow <= w.slow_slots
        assert on_couriers + slow == len(started)
        if on_couriers == w.couriers and slow < w.slow_slots:
            # Every courier is busy, but only with attempts too young to be slow.
            assert box.next_slow_at() > now
        moments = [box.next_slow_at(), box.next_retry_at()]
        assert min(moments) > now, "the outbox would have work now: it must be done"
        moments += [arrivals[0][0]] if arrivals else []
        moments += [ends[0][0]] if ends else []
        now = min(moments)
    return run


@settings(max_examples=300, deadline=None)
@given(workloads(hanging_at_most_slow_slots=False))
def test_any_mix_keeps_every_bound_and_sends_every_healthy_reset(w: Workload) -> None:
    run = simulate(w)
    expected = {f"id{n}" for n, job in enumerate(w.jobs) if job.kind != "hanging"}
    assert run.sent == expected


@settings(max_examples=300, deadline=None)
@given(workloads(hanging_at_most_slow_slots=True))
def test_hanging_resets_never_hold_a_fresh_one_past_slow_after(w: Workload) -> None:
    """While no more resets hang than the slow pool holds, a fresh reset waits at most
    SLOW_AFTER, plus SLOW_AFTER for each MAX_IN_FLIGHT (couriers) resets taken before
    it (fresh ones due earlier): never for a hanging request to time out."""
    run = simulate(w)
    for reset_id, added in run.added.items():
        taken = run.first_taken[reset_id]
        ahead = sum(1 for t, other in run.takes if added <= t <= taken and other != reset_id)
        assert taken - added <= (ahead // w.couriers + 1) * SLOW_AFTER + 1e-9, (
            reset_id,
            taken - added,
            ahead,
        )


@settings(max_examples=300, deadline=None)
@given(workloads(hanging_at_most_slow_slots=False))
def test_however_many_hang_a_fresh_reset_waits_at_most_the_abandon_time(w: Workload) -> None:
    """Any number of hanging resets: a fresh one never waits for a hanging request to time
    out, only for hanging ones taken before it to be abandoned, slow_slots at a time (1 s
    before any success, 0.25 s once the backend's time is known), plus SLOW_AFTER per
    round of MAX_IN_FLIGHT resets taken before it. Hanging requests time out after 30 s."""
    run = simulate(w, hang=30.0)
    for reset_id, added in run.added.items():
        taken = run.first_taken[reset_id]
        ahead = [other for t, other in run.takes if added <= t <= taken and other != reset_id]
        hanging = sum(1 for other in ahead if w.jobs[int(other[2:])].kind == "hanging")
        rounds = -(-hanging // w.slow_slots)
        bound = 1.0 * (rounds + 1) + (len(ahead) // w.couriers + 2) * SLOW_AFTER
        assert taken - added <= bound + 1e-9, (reset_id, taken - added, len(ahead), hanging)
