"""The outbox as plain logic: which reset goes next, retries kept off the couriers."""

from __future__ import annotations

import math

import pytest

from trio_counter_worker.outbox import Outbox
from trio_counter_worker.store import PendingReset


def reset(n: int, deadline_ms: int | None = None) -> PendingReset:
    return PendingReset(f"id{n}", f"c:{n}", deadline_ms if deadline_ms is not None else n, 1)


def test_fresh_resets_go_oldest_deadline_first_and_once() -> None:
    box = Outbox(retry_slots=1)
    for n in (3, 1, 2):
        assert box.add(reset(n))
    assert not box.add(reset(1)), "a reset already here is not queued twice"
    taken = [box.take() for _ in range(4)]
    assert [e.reset.reset_id if e else None for e in taken] == ["id1", "id2", "id3", None]
    assert len(box) == 3  # still here until marked sent


def test_a_failed_reset_waits_outside_the_couriers_until_its_retry_time() -> None:
    box = Outbox(retry_slots=1)
    box.add(reset(1))
    entry = box.take()
    assert entry is not None
    assert box.failed("id1", now=10.0, wall=1000.0, delay=2.0, error="HTTP 500") == "retry"
    assert entry.attempts == 1
    assert entry.last_error == "HTTP 500"
    assert entry.failing_since == 1000.0
    assert box.take() is None
    assert box.next_retry_at() == 12.0
    assert box.promote(11.9) == 0
    assert box.promote(12.0) == 1
    assert box.next_retry_at() == math.inf
    again = box.take()
    assert again is entry
    assert again.retry


def test_fresh_resets_go_before_due_retries() -> None:
    box = Outbox(retry_slots=4)
    box.add(reset(1))
    assert box.take() is not None
    box.failed("id1", now=0.0, wall=0.0, delay=1.0, error="x")
    box.promote(5.0)
    box.add(reset(9))
    first, second = box.take(), box.take()
    assert first is not None
    assert first.reset.reset_id == "id9"
    assert second is not None
    assert second.reset.reset_id == "id1"


def test_retries_never_take_more_than_their_slots() -> None:
    box = Outbox(retry_slots=2)
    for n in range(5):
        box.add(reset(n))
        assert box.take() is not None
        box.failed(f"id{n}", now=0.0, wall=0.0, delay=1.0, error="hang")
    box.promote(1.0)
    taken = [box.take() for _ in range(3)]
    assert [e is not None for e in taken] == [True, True, False]
    # A fresh reset still gets a courier while both retry slots are busy.
    box.add(reset(99))
    fresh = box.take()
    assert fresh is not None
    assert fresh.reset.reset_id == "id99"
    # A retry that ends frees its slot.
    assert taken[0] is not None
    box.failed(taken[0].reset.reset_id, now=1.0, wall=1.0, delay=5.0, error="hang")
    assert box.take() is not None


def test_succeeded_then_removed() -> None:
    box = Outbox(retry_slots=1)
    box.add(reset(1))
    assert box.take() is not None
    entry = box.succeeded("id1")
    assert entry.state == "sent"
    assert box.failing() == []
    box.remove("id1")
    assert "id1" not in box
    assert len(box) == 0


def test_give_up_after_declares_a_reset_dead() -> None:
    box = Outbox(retry_slots=1, give_up_after=60.0)
    box.add(reset(1), attempts=4, failing_since=1000.0, last_error="HTTP 404")
    entry = box.take()
    assert entry is not None
    assert box.failed("id1", now=0.0, wall=1059.0, delay=1.0, error="HTTP 404") == "retry"
    box.promote(1.0)
    assert box.take() is entry
    assert box.failed("id1", now=2.0, wall=1060.0, delay=1.0, error="HTTP 404") == "dead"
    assert entry.attempts == 6, "the history of an earlier leader carries over"
    box.remove("id1")
    assert len(box) == 0
    assert box.take() is None


def test_failing_lists_failed_resets_oldest_deadline_first() -> None:
    box = Outbox(retry_slots=1)
    for n in (5, 2, 7):
        box.add(reset(n))
    for _ in range(3):
        entry = box.take()
        assert entry is not None
        if entry.reset.reset_id != "id7":
            box.failed(entry.reset.reset_id, now=0.0, wall=0.0, delay=1.0, error="e")
    assert [e.reset.reset_id for e in box.failing()] == ["id2", "id5"]


def test_a_reset_not_being_sent_cannot_be_reported() -> None:
    box = Outbox(retry_slots=1)
    box.add(reset(1))
    with pytest.raises(RuntimeError, match="not being sent"):
        box.succeeded("id1")
    with pytest.raises(ValueError, match="retry_slots"):
        Outbox(retry_slots=0)
