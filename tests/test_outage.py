"""One account of a Redis outage for all the loops of a replica: plain logic."""

from __future__ import annotations

import logging
import re

import pytest
import redis
import trio
import trio.testing

from trio_counter_worker.config import Config
from trio_counter_worker.errors import RedisUnavailable
from trio_counter_worker.outage import OutageLog
from trio_counter_worker.worker import _start_on_redis


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


class _DownThenUp:
    """A bridge whose ping fails until ``up_at`` (trio time), then works."""

    def __init__(self, up_at: float) -> None:
        self.up_at = up_at
        self.pings = 0

    async def ping(self) -> None:
        self.pings += 1
        if trio.current_time() < self.up_at:
            raise RedisUnavailable("Redis unavailable: Error 111 connecting: Connection refused")

    async def preflight(self) -> None:
        return None

    async def takeover_allowed(self) -> bool:
        return True


async def test_redis_unreachable_at_start_is_one_warning_and_a_summary_every_10_s(
    caplog: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock
) -> None:
    caplog.set_level(logging.INFO, logger="trio_counter_worker")
    bridge = _DownThenUp(up_at=35.0)
    config = Config(reset_endpoint_url="https://backend.test/reset", reset_secret="s3cr3t")
    await _start_on_redis(config, lambda _: bridge)  # type: ignore[arg-type, return-value]
    records = [r for r in caplog.records if r.name == "trio_counter_worker"]
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert warnings[0] == (
        "Redis unavailable (redis://127.0.0.1:6379/0 unreachable: Error 111 connecting: "
        "Connection refused) (check REDIS_HOST/REDIS_PORT or REDIS_URL); retrying with backoff"
    )
    assert all(w.startswith("Redis still unavailable after ") for w in warnings[1:])
    assert 1 < len(warnings) <= 1 + 35 // 10 < bridge.pings - 1
    # Back at the first ping after 35 s: the clock may jump on while a thread runs the
    # client's connect (autojump sees no task to run), so no upper bound is exact.
    back = re.fullmatch(
        r"Redis answers again after ([\d.]+) s \(\d+ failed calls\)", records[-1].getMessage()
    )
    assert back is not None
    assert float(back.group(1)) >= 35.0


async def test_a_client_that_cannot_even_be_made_is_waited_for_like_an_unreachable_redis(
    caplog: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock
) -> None:
    """Redis Cluster's client connects as it is made: made while a startup node it picks
    is down, it raises. That is Redis unavailable at start, waited out, not a crash."""
    caplog.set_level(logging.INFO, logger="trio_counter_worker")
    bridge = _DownThenUp(up_at=0.0)
    attempts: list[Config] = []

    def connect(config: Config) -> _DownThenUp:  # in a thread, as redis-py would block
        attempts.append(config)
        if len(attempts) < 3:
            raise redis.ConnectionError(
                "Error 111 connecting to 127.0.0.1:7000. Connection refused."
            )
        return bridge

    config = Config(reset_endpoint_url="https://backend.test/reset", reset_secret="s3cr3t")
    made, takeover = await _start_on_redis(config, connect)  # type: ignore[arg-type]
    made_as: object = made
    assert made_as is bridge
    assert takeover
    assert len(attempts) == 3
    messages = [r.getMessage() for r in caplog.records if r.name == "trio_counter_worker"]
    assert "Error 111 connecting to 127.0.0.1:7000" in messages[0]
    assert messages[-1].startswith("Redis answers again after ")
