"""LOG_RESETS=summary: one line per interval instead of one per reset sent."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from trio_counter_worker.logs import LineBudget, ResetSummary, configure_logging


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def sent(log: logging.Logger, attempts: int, latency_ms: float) -> None:
    log.info(
        "reset sent: key=%r",
        "c:1",
        extra={"event": "reset_sent", "key": "c:1", "attempts": attempts, "latency_ms": latency_ms},
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def summary(caplog: pytest.LogCaptureFixture, clock: Clock) -> Iterator[ResetSummary]:
    """A 10 s summary on caplog's handler, for this test only: pytest keeps one caplog
    handler for the whole session, and a filter left on it would swallow the next tests'
    "reset sent" lines."""
    summary = ResetSummary(logging.getLogger("test.summary"), every=10.0, clock=clock)
    caplog.handler.addFilter(summary)
    caplog.set_level(logging.INFO)
    yield summary
    caplog.handler.removeFilter(summary)


def test_resets_are_counted_and_summed_up_once_per_interval(
    caplog: pytest.LogCaptureFixture, clock: Clock, summary: ResetSummary
) -> None:
    log = logging.getLogger("test.resets")
    for i in range(800):  # 800 a second for 10 s
        clock.now = 100.0 + i / 80
        sent(log, attempts=2 if i % 100 == 0 else 1, latency_ms=float(i % 50))
    log.info("another line")  # not a reset: passes untouched
    clock.now = 110.0
    sent(log, attempts=1, latency_ms=61.5)  # the 801st, after the interval: the summary
    sent(log, attempts=1, latency_ms=1.0)
    clock.now = 113.0
    summary.flush()
    summary.flush()  # nothing left: no line
    lines = [(r.name, r.getMessage()) for r in caplog.records]
    assert lines == [
        ("test.resets", "another line"),
        (
            "test.resets",
            "resets sent in the last 10 s: 801 (8 after a retry), slowest 61.5 ms",
        ),
        ("test.summary", "resets sent in the last 3 s: 1 (0 after a retry), slowest 1.0 ms"),
    ]
    first = caplog.records[1]
    assert vars(first)["event"] == "resets_sent"
    assert vars(first)["sent"] == 801
    assert "key" not in vars(first)


def test_a_finished_interval_no_reset_carried_is_written_by_the_tick(
    caplog: pytest.LogCaptureFixture, clock: Clock, summary: ResetSummary
) -> None:
    """A burst's tail: counted, then quiet. The tick writes it once its interval is over,
    not before, and a quiet worker's tick writes nothing."""
    log = logging.getLogger("test.resets")
    summary.tick()  # nothing counted: nothing written
    sent(log, attempts=1, latency_ms=3.0)
    clock.now = 105.0
    summary.tick()  # the interval is not over
    assert caplog.records == []
    clock.now = 110.0
    summary.tick()
    summary.tick()  # written once
    assert [r.getMessage() for r in caplog.records] == [
        "resets sent in the last 10 s: 1 (0 after a retry), slowest 3.0 ms"
    ]


def test_configure_logging_installs_the_summary_only_when_asked() -> None:
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    try:
        assert configure_logging("INFO", "text", "each") is None
        assert isinstance(configure_logging("INFO", "json", "summary"), ResetSummary)
        (handler,) = root.handlers
        assert any(isinstance(f, ResetSummary) for f in handler.filters)
        configure_logging("INFO")
        (handler,) = root.handlers
        assert not handler.filters
    finally:
        root.handlers[:] = saved
        root.setLevel(level)


def test_a_line_budget_lets_its_lines_go_then_says_once_that_it_ran_out() -> None:
    budget = LineBudget(lines=2, every=10.0)
    assert [budget.take(t) for t in (0.0, 1.0, 2.0, 3.0, 9.9)] == [
        "line",
        "line",
        "ran_out",
        "held",
        "held",
    ]
    assert [budget.take(t) for t in (10.0, 10.0, 10.0)] == ["line", "line", "ran_out"]
    assert budget.take(25.0) == "line"  # a quiet window: all its room again
