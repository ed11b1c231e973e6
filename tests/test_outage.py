"""One account of a Redis outage for all the loops of a replica: plain logic."""

from __future__ import annotations

import logging

import pytest

from trio_counter_worker.outage import OutageLog


def test_one_line_down_a_summary_at_most_every_period_one_line_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="test.outage")
    log = OutageLog(logging.getLogger("test.outage"), every=10.0)
    err = ConnectionError("refused")
    for t in (0.0, 0.1, 0.2, 3.0, 9.9):  # three loops failing, again and again
        for what in ("campaign", "release watch", "leader"):
            log.failed(what, err, t)
    assert log.down
    log.failed("campaign", err, 10.0)
    log.failed("campaign", err, 12.0)
    log.recovered(12.5)
    log.recovered(13.0)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "Redis unavailable (campaign: refused); retrying with backoff",
        "Redis still unavailable after 10 s (16 failed calls; last: refused)",
        "Redis answers again after 12.5 s (17 failed calls)",
    ]
    assert not log.down
    log.failed("leader", err, 20.0, hint="it resynchronises as soon as Redis answers")
    assert (
        caplog.records[-1]
        .getMessage()
        .endswith("(it resynchronises as soon as Redis answers); retrying with backoff")
    )


def test_a_refusal_is_an_error(caplog: pytest.LogCaptureFixture) -> None:
    from trio_counter_worker.errors import RedisRefused

    caplog.set_level(logging.INFO, logger="test.outage")
    OutageLog(logging.getLogger("test.outage")).failed(
        "campaign", RedisRefused("lack of permission", "permission"), 0.0
    )
    assert caplog.records[0].levelno == logging.ERROR
