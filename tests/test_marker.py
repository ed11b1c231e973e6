"""The marker's account of delivered resets: one INFO line per reset, with its fields,
logged many at a time (logs.line_logger), and the failing gauge kept right.

A fake store and an in-memory backend behind the production lanes, under trio's
autojump clock (as test_leader.py).
"""

from __future__ import annotations

import json
import logging

import httpx
import pytest
import trio
import trio.testing

from tests.fakes import FakeStore
from tests.support.memory_http import memory_backend
from trio_counter_worker import Config, Hooks, Worker, open_worker
from trio_counter_worker.delivery import open_lanes
from trio_counter_worker.logs import JsonFormatter, line_logger
from trio_counter_worker.store import PendingReset

pytestmark = pytest.mark.fail_after(600)


def config() -> Config:
    return Config(
        reset_endpoint_url="https://backend.test/reset",
        reset_secret="s3cret",
        counter_key="c:*",
        replica_id="r1",
    )


async def run_until_reset(
    store: FakeStore, statuses: list[int], keys: list[str]
) -> tuple[Worker, list[tuple[PendingReset, int]]]:
    """Lead, let ``keys`` expire, answer ``statuses`` then 200, until each key is reset."""
    resets: list[tuple[PendingReset, int]] = []

    def backend(request: httpx.Request) -> httpx.Response:
        return httpx.Response(statuses.pop(0) if statuses else 200)

    hooks = Hooks(on_reset=lambda reset, attempts: resets.append((reset, attempts)))
    cfg = config()
    async with (
        open_lanes(cfg, connect=memory_backend(backend)) as lanes,
        open_worker(cfg, store=store, http_client=lanes, hooks=hooks) as worker,
        trio.open_nursery() as nursery,
    ):
        await nursery.start(worker.run)
        for key in keys:
            store.set_key(key, 5)
        while len(resets) < len(keys):
            await trio.sleep(0.001)
        nursery.cancel_scope.cancel()
    return worker, resets


def sent_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == "reset_sent"]


async def test_one_line_per_reset_with_its_fields(
    caplog: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock
) -> None:
    caplog.set_level(logging.INFO, logger="trio_counter_worker")
    store = FakeStore("c:*")
    _, resets = await run_until_reset(store, [500], ["c:1", "c:\udcff"])
    lines = sorted(sent_lines(caplog), key=lambda r: str(getattr(r, "key", "")))
    assert [r.levelno for r in lines] == [logging.INFO] * 2
    by_key = {reset.key: (reset, attempts) for reset, attempts in resets}
    for record, shown in zip(lines, ["c:1", "c:\\xff"], strict=True):
        reset, attempts = by_key["c:1" if shown == "c:1" else "c:\udcff"]
        fields = {
            k: getattr(record, k)
            for k in ("event", "key", "reset_id", "fencing_token", "attempts", "latency_ms")
        }
        assert fields == {
            "event": "reset_sent",
            "key": shown,
            "reset_id": reset.reset_id,
            "fencing_token": 1,
            "attempts": attempts,
            "latency_ms": fields["latency_ms"],
        }
        latency_ms = fields["latency_ms"]
        assert isinstance(latency_ms, float)
        assert record.getMessage() == (
            f"reset sent: key={shown!r} reset_id={reset.reset_id} fencing_token=1 status=200 "
            f"attempts={attempts} latency_ms={latency_ms:.1f}"
        )
        assert record.name == "trio_counter_worker.leader"
        assert (record.funcName, record.module) == ("_marked", "delivering")
    assert sorted(attempts for _, attempts in resets) == [1, 2]  # one failed once


async def test_no_line_below_info_and_the_failing_gauge_comes_back_to_zero(
    caplog: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock
) -> None:
    caplog.set_level(logging.WARNING, logger="trio_counter_worker")
    store = FakeStore("c:*")
    worker, resets = await run_until_reset(store, [503], ["c:1"])
    assert [attempts for _, attempts in resets] == [2]
    assert sent_lines(caplog) == []
    assert worker.metrics.registry.get_sample_value("tcw_failing_resets") == 0.0
    assert worker.metrics.registry.get_sample_value("tcw_pending_resets") == 0.0


def test_line_logger_makes_the_record_log_would_make(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="test.lines")
    logger = logging.getLogger("test.lines")
    emit = line_logger(logger, logging.INFO)
    assert emit is not None
    emit("a=%r b=%d", ("x", 2), {"event": "e", "n": 1})
    logger.info("a=%r b=%d", "x", 2, extra={"event": "e", "n": 1})
    by_lines, by_log = caplog.records
    for name in ("name", "levelno", "msg", "args", "event", "n", "funcName", "pathname"):
        assert getattr(by_lines, name) == getattr(by_log, name)
    assert by_lines.lineno < by_log.lineno  # the line that asked for the line logger
    lines, logged = (json.loads(JsonFormatter().format(r)) for r in (by_lines, by_log))
    assert {k: v for k, v in lines.items() if k != "ts"} == {
        k: v for k, v in logged.items() if k != "ts"
    }
    assert line_logger(logger, logging.DEBUG) is None
