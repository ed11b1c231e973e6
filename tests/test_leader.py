"""Leader duties under trio's autojump clock: when resets fire, what they carry.

A trio-native fake store stands in for Redis and an in-memory backend behind the
production lanes (tests/support/memory_http.py) for the HTTP one, so no thread runs and
every time is exact. Real-Redis behaviour is in test_redis_bridge.py.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import attrs
import httpx
import pytest
import trio
import trio.testing

from tests.fakes import FakeLease, FakeStore
from tests.support.memory_http import memory_backend
from trio_counter_worker import Config, Hooks, Worker, open_worker
from trio_counter_worker.deciding import CLAIM_EVERY
from trio_counter_worker.delivery import open_lanes
from trio_counter_worker.leader_state import EARLY, WINDOW
from trio_counter_worker.store import PendingReset

# Every test runs under the autojump clock: a hang reaches this at once and fails.
pytestmark = pytest.mark.fail_after(600)


@attrs.define
class Backend:
    """Records (trio time, request); answers from a script, then 200."""

    statuses: list[int] = attrs.Factory(list)
    headers: dict[str, str] = attrs.Factory(dict)
    seen: list[tuple[float, httpx.Request]] = attrs.Factory(list)
    arrived: trio.Event = attrs.Factory(trio.Event)

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append((trio.current_time(), request))
        self.arrived.set()
        return httpx.Response(self.statuses.pop(0) if self.statuses else 200, headers=self.headers)

    async def wait(self, n: int) -> None:
        while len(self.seen) < n:
            self.arrived = trio.Event()
            await self.arrived.wait()

    @property
    def bodies(self) -> list[dict[str, object]]:
        return [json.loads(r.content) for _, r in self.seen]

    @property
    def times(self) -> list[float]:
        return [round(t, 6) for t, _ in self.seen]


def config(**kw: object) -> Config:
    base: dict[str, object] = {
        "reset_endpoint_url": "https://backend.test/reset",
        "reset_secret": "s3cret",
        "counter_key": "c:*",
        "replica_id": "r1",
        "lease_ttl_ms": 3000,
    }
    return Config(**(base | kw))  # type: ignore[arg-type]


@attrs.define
class Harness:
    store: FakeStore
    backend: Backend
    elected: list[tuple[float, int]] = attrs.Factory(list)
    resets: list[tuple[float, PendingReset, int]] = attrs.Factory(list)

    def hooks(self) -> Hooks:
        return Hooks(
            on_elected=lambda epoch: self.elected.append((trio.current_time(), epoch)),
            on_reset=lambda r, attempts: self.resets.append((trio.current_time(), r, attempts)),
        )


@pytest.fixture
def harness() -> Harness:
    return Harness(FakeStore("c:*"), Backend())


async def start_worker(nursery: trio.Nursery, h: Harness, **kw: object) -> Worker:
    cfg = config(**kw)
    worker_box: list[Worker] = []

    async def run(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with (
            open_lanes(cfg, connect=memory_backend(h.backend)) as lanes,
            open_worker(cfg, store=h.store, http_client=lanes, hooks=h.hooks()) as worker,
        ):
            worker_box.append(worker)
            await worker.run(task_status=task_status)

    await nursery.start(run)
    return worker_box[0]


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Under the autojump clock a 1 ms poll costs no real time and keeps times exact."""
    while not predicate():
        await trio.sleep(0.001)


async def test_reset_fires_at_the_ttl_deadline(
    harness: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    async with trio.open_nursery() as nursery:
        await start_worker(nursery, harness)
        await trio.sleep(1)
        harness.store.set_key("c:1", 10)
        await wait_until(lambda: bool(harness.resets))
        nursery.cancel_scope.cancel()
    assert harness.backend.times == [11 + EARLY]
    (request,) = [r for _, r in harness.backend.seen]
    body = harness.backend.bodies[0]
    assert body == {
        "key": "c:1",
        "reset_id": body["reset_id"],
        "expired_at": 11.0,
        "fencing_token": 1,
        "replica_id": "r1",
    }
    assert request.headers["idempotency-key"] == body["reset_id"]
    assert request.headers["x-fencing-token"] == "1"
    assert request.headers["x-secret"] == "s3cret"
    assert request.headers["content-type"] == "application/json"
    assert harness.store.pending_resets == {}  # marked sent


async def test_rearmed_key_is_rescheduled_not_reset(
    harness: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    async with trio.open_nursery() as nursery:
        await start_worker(nursery, harness)
        harness.store.set_key("c:1", 10)
        await trio.sleep(5)
        harness.store.set_key("c:1", 10)  # activity: the episode goes on
        await trio.sleep(7)
        harness.store.set_key("c:1", 10)
        await harness.backend.wait(1)
        await trio.sleep(30)
        nursery.cancel_scope.cancel()
    assert harness.backend.times == [22 + EARLY]


async def test_key_deleted_before_its_deadline_is_not_reset(
    harness: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    async with trio.open_nursery() as nursery:
        await start_worker(nursery, harness)
        harness.store.set_key("c:1", 10)
        harness.store.set_key("c:2", 10)
        await trio.sleep(4)
        harness.store.delete_key("c:1")
        await harness.backend.wait(1)
        await trio.sleep(30)
        nursery.cancel_scope.cancel()
    assert [b["key"] for b in harness.backend.bodies] == ["c:2"]


async def test_key_without_ttl_is_not_watched(
    harness: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    async with trio.open_nursery() as nursery:
        await start_worker(nursery, harness)
        harness.store.set_key("c:1", 10)
        await trio.sleep(1)
        harness.store.set_key("c:1", None)  # SET without EX: no inactivity deadline
        await trio.sleep(30)
        nursery.cancel_scope.cancel()
    assert harness.backend.seen == []
    assert harness.store.deadlines == {}


async def test_many_counters_each_reset_once_in_deadline_order(
    harness: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    async with trio.open_nursery() as nursery:
        await start_worker(nursery, harness)
        for i in range(50):
            harness.store.set_key(f"c:{i}", 5 + (i % 10) / 10)
        harness.store.set_key("other", 1)  # not matching COUNTER_KEY
        await harness.backend.wait(50)
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    bodies = harness.backend.bodies
    assert sorted(str(b["key"]) for b in bodies) == sorted(f"c:{i}" for i in range(50))
    assert len({b["reset_id"] for b in bodies}) == 50
    for t, body in zip(harness.backend.times, bodies, strict=True):
        assert t == round(float(str(body["expired_at"])) + EARLY, 6)


async def test_expiry_while_no_leader_is_reset_by_the_next_leader(
    harness: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    store = harness.store
    async with trio.open_nursery() as nursery:
        # A crashed leader: its lease runs until 3.0 and it recorded c:1's deadline (1.0).
        store.lease = FakeLease("dead#1", "dead", 7, 3000)
        store.epoch = 7
        store.keys["c:1"] = 1000
        store.deadlines["c:1"] = 1000
        await start_worker(nursery, harness)
        await harness.backend.wait(1)
        nursery.cancel_scope.cancel()
    ((elected_at, epoch),) = harness.elected
    assert elected_at == 3.001
    assert epoch == 8
    assert harness.backend.times == [3.001]
    assert harness.backend.bodies[0]["fencing_token"] == 8
    assert harness.backend.bodies[0]["expired_at"] == 1.0


async def test_pending_reset_is_redelivered_under_its_reset_id(
    harness: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    store = harness.store
    old = PendingReset("abc123", "c:9", 500, fencing_token=4)
    store.pending_resets[old.reset_id] = old
    store.epoch = 4
    async with trio.open_nursery() as nursery:
        await start_worker(nursery, harness)
        await wait_until(lambda: bool(harness.resets))
        nursery.cancel_scope.cancel()
    (body,) = harness.backend.bodies
    assert body["reset_id"] == "abc123"
    assert body["fencing_token"] == 5  # the sender's own, current token
    assert store.pending_resets == {}


class SlowPending(FakeStore):
    """Reading the pending resets takes 1 s (a large hash on a slow link)."""

    async def pending(self) -> list[PendingReset]:
        self.calls.append((trio.current_time(), "pending"))
        await trio.sleep(1)
        return await super().pending()


async def test_a_flood_of_redeliver_requests_holds_up_no_counter(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Anyone who may publish on the redeliver channel can flood it. The requests that
    come while the pending resets are read are one read, at most one per 0.5 s, beside
    the events: a counter set meanwhile is reset at its deadline."""
    harness = Harness(SlowPending("c:*"), Backend())
    store = harness.store
    async with trio.open_nursery() as nursery:
        await start_worker(nursery, harness)
        await wait_until(lambda: "pending" in [op for _, op in store.calls])
        await trio.sleep(2)  # the takeover's own read is done
        for _ in range(50):
            store._publish_to(store.own.redeliver, "flood")
        store.set_key("c:1", 1)
        armed = trio.current_time()
        await harness.backend.wait(1)
        nursery.cancel_scope.cancel()
    assert harness.backend.times == [pytest.approx(armed + 1 + EARLY, abs=0.01)]
    reads = [t for t, op in store.calls if op == "pending" and t > armed - 0.5]
    assert 1 <= len(reads) <= 2  # fifty requests, read once (twice: one came after)


async def test_backend_errors_are_retried_with_one_reset_id(
    harness: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    harness.backend.statuses = [500, 503, 200]
    async with trio.open_nursery() as nursery:
        await start_worker(nursery, harness)
        harness.store.set_key("c:1", 1)
        await harness.backend.wait(3)
        await wait_until(lambda: bool(harness.resets))
        nursery.cancel_scope.cancel()
    keys = {r.headers["idempotency-key"] for _, r in harness.backend.seen}
    assert len(keys) == 1
    assert harness.resets[0][2] == 3  # attempts
    assert harness.store.pending_resets == {}


async def test_a_backend_failing_many_resets_at_once_gets_a_budget_of_lines(
    harness: Harness, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A backend down behind a backlog fails every reset within moments: 20 of them are
    logged one by one per 10 s, then one line says the rest are not (each is still
    retried, counted and listed by `status`)."""
    caplog.set_level(logging.INFO, logger="trio_counter_worker")
    harness.backend.statuses = [503] * 60
    async with trio.open_nursery() as nursery:
        await start_worker(nursery, harness)
        for n in range(60):
            harness.store.set_key(f"c:{n}", 1)
        await harness.backend.wait(60)
        await wait_until(lambda: len(harness.resets) == 60)  # retried: all delivered
        nursery.cancel_scope.cancel()
    failed = [r for r in caplog.records if r.getMessage().startswith("reset not delivered")]
    said = [r for r in caplog.records if getattr(r, "event", None) == "failures_not_logged"]
    assert len(failed) == 20
    assert len(said) == 1
    assert len(harness.backend.seen) == 120  # every failure was retried all the same


async def test_rejected_reset_is_kept_pending(
    harness: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    harness.backend.statuses = [401] * 100
    async with trio.open_nursery() as nursery:
        await start_worker(nursery, harness)
        harness.store.set_key("c:1", 1)
        await harness.backend.wait(3)
        nursery.cancel_scope.cancel()
    assert len(harness.store.pending_resets) == 1
    assert harness.resets == []


async def test_losing_the_lease_cancels_delivery(
    harness: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    harness.backend.statuses = [500] * 1000
    async with trio.open_nursery() as nursery:
        worker = await start_worker(nursery, harness)
        harness.store.set_key("c:1", 1)
        await harness.backend.wait(2)
        harness.store.lease = FakeLease("other#1", "other", 50, 100_000)
        await wait_until(lambda: not worker.is_leader)
        sent = len(harness.backend.seen)
        await trio.sleep(20)
        nursery.cancel_scope.cancel()
    assert len(harness.backend.seen) == sent  # nothing sent once deposed
    assert len(harness.store.pending_resets) == 1  # left for the next leader


async def test_cancel_releases_the_lease(
    harness: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    async with trio.open_nursery() as nursery:
        worker = await start_worker(nursery, harness)
        await wait_until(lambda: worker.is_leader)
        nursery.cancel_scope.cancel()
    assert harness.store.lease is None
    assert [op for _, op in harness.store.calls][-1] == "release"


async def test_redirect_is_not_followed_and_the_reset_is_kept(
    harness: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    harness.backend.statuses = [307] * 100
    harness.backend.headers = {"location": "https://elsewhere.test/steal"}
    async with trio.open_nursery() as nursery:
        await start_worker(nursery, harness)
        harness.store.set_key("c:1", 1)
        await harness.backend.wait(3)
        nursery.cancel_scope.cancel()
    assert {str(r.url) for _, r in harness.backend.seen} == {"https://backend.test/reset"}
    assert len(harness.store.pending_resets) == 1


async def test_retry_after_is_honoured(
    harness: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    harness.backend.statuses = [429]
    harness.backend.headers = {"retry-after": "7"}
    async with trio.open_nursery() as nursery:
        await start_worker(nursery, harness)
        harness.store.set_key("c:1", 1)
        await harness.backend.wait(2)
        nursery.cancel_scope.cancel()
    first, second = harness.backend.times
    assert second - first == 7.0


async def test_backlog_is_sent_oldest_first_within_max_in_flight(
    harness: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    for i, deadline in enumerate([500, 100, 400, 200, 300]):
        reset = PendingReset(f"id{i}", f"c:{i}", deadline, fencing_token=1)
        harness.store.pending_resets[reset.reset_id] = reset
    harness.store.epoch = 1
    async with trio.open_nursery() as nursery:
        await start_worker(nursery, harness, max_in_flight=1)
        await wait_until(lambda: len(harness.resets) == 5)
        nursery.cancel_scope.cancel()
    assert [b["expired_at"] for b in harness.backend.bodies] == [0.1, 0.2, 0.3, 0.4, 0.5]


async def test_key_expired_before_its_ttl_was_read_is_still_reset(
    harness: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    """Events backlogged (a takeover reconcile, a mass re-arm): the key's `set` is read
    after it expired, so no deadline was ever recorded; its `expired` event proves the
    episode ended."""
    async with trio.open_nursery() as nursery:
        await start_worker(nursery, harness)
        await trio.sleep(2)
        harness.store.expire_unseen("c:late")
        await wait_until(lambda: bool(harness.resets))
        harness.store.set_key("c:other", 1)  # and a normal one: its echo is not reset twice
        await wait_until(lambda: len(harness.resets) == 2)
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    assert [b["key"] for b in harness.backend.bodies] == ["c:late", "c:other"]
    assert harness.backend.bodies[0]["expired_at"] == 2.0  # when it was seen to expire


# -- a hostile world, in exact time ------------------------------------------------------


async def test_a_failing_reset_does_not_hold_a_courier(
    harness: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    """MAX_IN_FLIGHT=2 and two resets whose requests hang forever: once they wait for
    their retries, at most one courier is theirs, and the next reset goes at its deadline."""
    hung: list[float] = []

    async def backend(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content)["key"].startswith("c:bad"):
            hung.append(trio.current_time())
            await trio.sleep_forever()
        harness.backend.seen.append((trio.current_time(), request))
        return httpx.Response(200)

    cfg = config(max_in_flight=2, reset_timeout_ms=2000)
    async with (
        open_lanes(cfg, connect=memory_backend(backend)) as lanes,
        open_worker(cfg, store=harness.store, http_client=lanes, hooks=harness.hooks()) as worker,
        trio.open_nursery() as nursery,
    ):
        await nursery.start(worker.run)
        harness.store.set_key("c:bad1", 1)
        harness.store.set_key("c:bad2", 1)
        harness.store.set_key("c:good", 10)
        await wait_until(lambda: bool(harness.resets))
        assert len(hung) >= 4, "the bad ones kept being retried meanwhile"
        nursery.cancel_scope.cancel()
    assert harness.backend.times == [10 + EARLY]
    notes = harness.store.failing_notes.values()
    assert {n.key for n in notes} == {"c:bad1", "c:bad2"}
    assert all("RESET_TIMEOUT_MS=2000" in n.last_error for n in notes)


class PoisonStore(FakeStore):
    """A store whose decision raises for one key: a stand-in for an item no code expects."""

    async def claim(
        self,
        holder: str,
        keys: list[str],
        expired_after: list[int] | None = None,
        heard: bool = False,
    ) -> list[Any]:
        if "c:poison" in keys:
            raise ValueError("cannot decide c:poison")
        return await super().claim(holder, keys, expired_after, heard)


async def test_a_key_whose_decision_fails_is_set_aside_and_the_others_go_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    harness = Harness(PoisonStore("c:*"), Backend())
    async with trio.open_nursery() as nursery:
        worker = await start_worker(nursery, harness)
        harness.store.set_key("c:poison", 1)
        harness.store.set_key("c:ok", 1)
        harness.store.set_key("c:later", 5)
        await wait_until(lambda: len(harness.resets) >= 2)
        assert worker.is_leader
        assert worker.metrics.quarantined._value.get() == 1
        nursery.cancel_scope.cancel()
    assert [r.key for _, r, _ in harness.resets] == ["c:ok", "c:later"]
    # (on_reset comes with the mark: a trickle is marked 5 ms after its delivery)
    assert [round(t, 3) for t, _, _ in harness.resets] == [1.006, 5.006]


async def test_leader_work_that_fails_gives_the_lease_back_and_campaigns_again(
    harness: Harness,
    autojump_clock: trio.testing.MockClock,
) -> None:
    failures = [True]

    def on_reset(reset: PendingReset, attempts: int) -> None:
        harness.resets.append((trio.current_time(), reset, attempts))
        if failures:
            failures.pop()
            raise RuntimeError("a bug in a hook")

    hooks = Hooks(
        on_elected=lambda e: harness.elected.append((trio.current_time(), e)), on_reset=on_reset
    )
    cfg = config()
    async with (
        open_lanes(cfg, connect=memory_backend(harness.backend)) as lanes,
        open_worker(cfg, store=harness.store, http_client=lanes, hooks=hooks) as worker,
        trio.open_nursery() as nursery,
    ):
        await nursery.start(worker.run)
        harness.store.set_key("c:1", 1)
        await wait_until(lambda: len(harness.elected) >= 2)
        harness.store.set_key("c:2", 1)
        await wait_until(lambda: len(harness.resets) >= 2)
        assert worker.metrics.leader_crashes._value.get() == 1
        nursery.cancel_scope.cancel()
    assert [e for _, e in harness.elected] == [1, 2]  # released, then won again
    assert [r.key for _, r, _ in harness.resets] == ["c:1", "c:2"]


async def test_flags_rewritten_are_restored_within_a_second(
    harness: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    async with trio.open_nursery() as nursery:
        worker = await start_worker(nursery, harness)
        await wait_until(lambda: worker.is_leader)
        await trio.sleep(5.5)
        harness.store.flags = ""
        scans = [t for t, op in harness.store.calls if op == "scan"]
        await wait_until(lambda: "K" in harness.store.flags)
        restored = trio.current_time()
        await wait_until(
            lambda: len([t for t, op in harness.store.calls if op == "scan"]) > len(scans)
        )
        nursery.cancel_scope.cancel()
    assert 5.5 < restored <= 6.5
    assert worker.metrics.flags_restored._value.get() == 1


async def test_an_eviction_policy_changed_while_leading_is_said_within_a_recheck(
    harness: Harness, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """CONFIG SET maxmemory-policy allkeys-lru mid-leadership: said (once while it lasts)
    and the gauge set by the next look, every 5 s; put back, the gauge falls."""
    async with trio.open_nursery() as nursery:
        worker = await start_worker(nursery, harness)
        await wait_until(lambda: worker.is_leader)
        unsafe = worker.metrics.eviction_unsafe
        await trio.sleep(1.0)
        assert unsafe._value.get() == 0
        harness.store.maxmemory_policy = "allkeys-lru"
        await wait_until(lambda: unsafe._value.get() == 1)
        seen = trio.current_time()
        await trio.sleep(11)  # two more looks
        harness.store.maxmemory_policy = "noeviction"
        await wait_until(lambda: unsafe._value.get() == 0)
        nursery.cancel_scope.cancel()
    assert 1.0 < seen <= 6.0
    assert caplog.text.count("maxmemory-policy is allkeys-lru") == 1


# -- echoes and handoffs, in exact time ------------------------------------------------


class ScanHook(FakeStore):
    """Runs ``on_scan`` once, at the next leader's first SCAN: after it subscribed and
    before it has read the keys (what the app did meanwhile shows only as events)."""

    on_scan: Callable[[], None] | None = None

    async def scan(self, pattern: str, cursor: int) -> tuple[int, list[str]]:
        hook, self.on_scan = self.on_scan, None
        if hook is not None:
            hook()
        return await super().scan(pattern, cursor)


async def test_a_key_claimed_then_set_and_expired_across_a_handoff_is_reset_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The handoff miss: c:1's episode was claimed at 2 s (tombstone), the app set it
    again while no leader listened, and it expired before the next leader's scan found it.
    Its `expired` event was published after the next leader subscribed, so after the
    claim: a new episode, not the echo of the old one."""
    store = ScanHook("c:*")
    harness = Harness(store, Backend())
    with trio.fail_after(200):
        async with trio.open_nursery() as first:
            await start_worker(first, harness, replica_id="a")
            store.set_key("c:1", 2)
            await wait_until(lambda: bool(harness.resets))  # delivered and marked sent
            await trio.sleep(1)
            first.cancel_scope.cancel()
        store.keys["c:1"] = None  # set again, unseen; then it expires, unseen too
        store.on_scan = lambda: store.expire_unseen("c:1")
        async with trio.open_nursery() as second:
            await start_worker(second, harness, replica_id="b")
            await harness.backend.wait(2)
            await trio.sleep(70)  # past the tombstone: nothing else comes
            second.cancel_scope.cancel()
    first_body, second_body = harness.backend.bodies
    assert second_body["key"] == "c:1"
    # When the next leader saw it expire, and sent at once.
    assert harness.backend.times == [2 + EARLY, second_body["expired_at"]]
    assert second_body["reset_id"] != first_body["reset_id"]


async def test_a_stale_future_deadline_does_not_hide_an_expiry_across_a_handoff(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """c:2 was recorded with a deadline at 31 s; during the handoff the app re-armed it
    with a short TTL, unseen, and it expired before the scan: the report ends the
    episode when it is seen, and the stale deadline does not fire again."""
    store = ScanHook("c:*")
    harness = Harness(store, Backend())
    with trio.fail_after(60):
        async with trio.open_nursery() as first:
            worker = await start_worker(first, harness, replica_id="a")
            store.set_key("c:2", 30)
            await wait_until(lambda: "c:2" in store.deadlines and worker.is_leader)
            await trio.sleep(1)
            first.cancel_scope.cancel()
        store.on_scan = lambda: store.expire_unseen("c:2")
        async with trio.open_nursery() as second:
            await start_worker(second, harness, replica_id="b")
            await harness.backend.wait(1)
            await trio.sleep(40)  # past the stale deadline
            second.cancel_scope.cancel()
    (body,) = harness.backend.bodies
    assert harness.backend.times == [body["expired_at"]]  # seen, and sent at once
    assert body["expired_at"] == pytest.approx(1.0, abs=0.01)  # not the stale 31 s
    assert store.deadlines == {}


async def test_our_own_claims_echo_costs_no_script_call(
    harness: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await start_worker(nursery, harness)
            harness.store.set_key("c:1", 1)
            await harness.backend.wait(1)
            await trio.sleep(5)
            nursery.cancel_scope.cancel()
    assert [op for _, op in harness.store.calls].count("claim") == 1


async def test_deadlines_close_behind_one_another_share_a_claim(
    harness: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    """The deadline timer fires at most every CLAIM_EVERY: a deadline after a quiet
    spell is claimed at once, those close behind it together at the next firing."""
    ttls = {"c:1": 10.0, "c:2": 10.002, "c:3": 10.003, "c:4": 10.5}
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await start_worker(nursery, harness)
            await trio.sleep(1)
            for key, ttl in ttls.items():
                harness.store.set_key(key, ttl)
            await harness.backend.wait(4)
            nursery.cancel_scope.cancel()
    at = {
        str(b["key"]): t for t, b in zip(harness.backend.times, harness.backend.bodies, strict=True)
    }
    first = 11 + EARLY
    assert at == {
        "c:1": first,
        "c:2": round(first + CLAIM_EVERY, 6),
        "c:3": round(first + CLAIM_EVERY, 6),
        "c:4": 11.5 + EARLY,
    }
    assert [op for _, op in harness.store.calls].count("claim") == 3


class SlowOnce(FakeStore):
    """The first reported claim takes 5 s (a slow link): a leader stopped meanwhile
    still holds that key's report."""

    slow = True

    async def claim(
        self,
        holder: str,
        keys: list[str],
        expired_after: list[int] | None = None,
        heard: bool = False,
    ) -> list[Any]:
        if expired_after is not None and self.slow:
            self.slow = False
            self.calls.append((trio.current_time(), "slow claim"))
            await trio.sleep(5)
        return await super().claim(holder, keys, expired_after, heard)


async def _stopped_while_deciding_an_unseen_expiry(
    harness: Harness, store: SlowOnce, then: Callable[[], None] = lambda: None
) -> None:
    """Replica "a" leads; c:x expires before its TTL was read; the leader is stopped
    while its claim of it is slow (``then`` runs just before the stop)."""
    async with trio.open_nursery() as first:
        await start_worker(first, harness, replica_id="a")
        await trio.sleep(1)
        store.expire_unseen("c:x")
        await wait_until(lambda: "slow claim" in [op for _, op in store.calls])
        then()
        first.cancel_scope.cancel()
    assert store.lease is None


async def test_a_graceful_stop_hands_over_what_only_it_has_seen(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """c:x expired before its TTL was read: only its `expired` event shows the episode.
    The leader is stopped while deciding it; before releasing the lease it decides it
    (the reset stays pending), and the next leader sends it."""
    store = SlowOnce("c:*")
    harness = Harness(store, Backend())
    with trio.fail_after(60):
        await _stopped_while_deciding_an_unseen_expiry(harness, store)
        assert [r.key for r in store.pending_resets.values()] == ["c:x"]
        async with trio.open_nursery() as second:
            await start_worker(second, harness, replica_id="b")
            await harness.backend.wait(1)
            second.cancel_scope.cancel()
    assert [b["key"] for b in harness.backend.bodies] == ["c:x"]
    assert harness.backend.bodies[0]["expired_at"] == 1.001  # decided as the leader stopped


async def test_a_graceful_stop_marks_sent_what_it_delivered(
    harness: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    """A trickle is marked sent 5 ms after its delivery, to go together; a leader stopped
    in between marks it as it stops, so the next leader does not send it again."""
    async with trio.open_nursery() as first:
        await start_worker(first, harness)
        harness.store.set_key("c:1", 1)
        await harness.backend.wait(1)
        await trio.sleep(0.002)  # delivered: the marker gathers
        assert harness.store.pending_resets
        first.cancel_scope.cancel()
    assert not harness.store.pending_resets
    assert [r.key for _, r, _ in harness.resets] == ["c:1"]
    async with trio.open_nursery() as second:
        await start_worker(second, harness, replica_id="b")
        await wait_until(lambda: len(harness.elected) == 2)
        await trio.sleep(2)
        second.cancel_scope.cancel()
    assert len(harness.backend.seen) == 1


async def test_a_stop_while_redis_is_away_leaves_the_delivered_reset_to_be_sent_again(
    harness: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    """As above, but Redis is unreachable as the leader stops: the final mark fails, the
    stop does not wait for Redis, and the next leader sends the reset again under the
    same reset_id (allowed: the backend dedupes by it), with a higher fencing token."""
    store = harness.store
    async with trio.open_nursery() as first:
        await start_worker(first, harness)
        store.set_key("c:1", 1)
        await harness.backend.wait(1)
        await trio.sleep(0.002)  # delivered: the marker gathers
        store.down = True
        stopped_at = trio.current_time()
        first.cancel_scope.cancel()
    assert trio.current_time() - stopped_at < 5  # bounded: the hand-over's deadline
    assert [r.key for r in store.pending_resets.values()] == ["c:1"]
    assert not harness.resets  # never confirmed: no hook, no "reset sent"
    store.down = False
    async with trio.open_nursery() as second:
        await start_worker(second, harness, replica_id="b")
        await harness.backend.wait(2)
        await wait_until(lambda: not store.pending_resets)
        second.cancel_scope.cancel()
    first_post, again = harness.backend.bodies
    assert first_post["reset_id"] == again["reset_id"]
    assert int(str(again["fencing_token"])) > int(str(first_post["fencing_token"]))


async def test_a_graceful_stop_decides_an_expiry_it_heard_though_the_key_is_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """As above, and the app sets c:x again before the stop: the expiry the leader heard
    ended an episode all the same; decided as it stops, the reset stays pending."""
    store = SlowOnce("c:*")
    with trio.fail_after(60):
        # Active again, its next episode begins.
        await _stopped_while_deciding_an_unseen_expiry(
            Harness(store, Backend()), store, then=lambda: store.set_key("c:x", 60)
        )
    assert [(r.key, r.deadline_ms) for r in store.pending_resets.values()] == [("c:x", 1_001)]
    assert store.deadlines["c:x"] == 61_001  # and the new life recorded


async def test_a_takeover_reads_recorded_deadlines_page_by_page(
    harness: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    """Pages of 2 (a million recorded deadlines in one reply would outlast any timeout):
    every deadline, the passed ones and the tied ones, is reset once, on time."""
    store = harness.store
    store.page_size = 2
    for n, deadline_ms in enumerate([500, 500, 500, 1_000, 2_000, 2_000, 3_000]):
        store.keys[f"c:{n}"] = deadline_ms
        store.deadlines[f"c:{n}"] = deadline_ms
    async with trio.open_nursery() as nursery:
        await trio.sleep(0.8)  # three deadlines pass while no replica leads
        await start_worker(nursery, harness)
        await harness.backend.wait(7)
        nursery.cancel_scope.cancel()
    assert sorted(str(b["key"]) for b in harness.backend.bodies) == [f"c:{n}" for n in range(7)]
    assert harness.backend.times[3:] == [1 + EARLY, 2 + EARLY, 2 + EARLY, 3 + EARLY]
    assert [op for _, op in store.calls].count("tracked") == 3  # 0-2 | 3-5 | 6: ties whole


@pytest.mark.fail_after(1_800)  # 20 minutes of deadlines, under the autojump clock
async def test_counters_due_far_beyond_the_window_are_reset_on_time(
    harness: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    """Only the next minute of deadlines is held in memory; the rest are read in from
    the recorded deadlines as time advances. Recorded ones and ones only a scan finds
    (set while nobody led), re-armed nearer or farther meanwhile: each once, on time."""
    store = harness.store
    store.page_size = 7
    for n in range(60):  # recorded, due over the next 20 minutes
        store.keys[f"c:r{n}"] = store.deadlines[f"c:r{n}"] = 20_000 * (n + 1)
    for n in range(20):  # never recorded: the takeover's scan finds them
        store.keys[f"c:s{n}"] = 61_000 * (n + 1)
    async with trio.open_nursery() as nursery:
        await start_worker(nursery, harness)
        await trio.sleep(10)
        harness.store.set_key("c:r59", 90)  # 20 min away -> nearer: 100 s
        harness.store.set_key("c:r1", 600)  # 40 s away -> farther: 610 s
        await harness.backend.wait(80)
        nursery.cancel_scope.cancel()
    due = {f"c:r{n}": 20.0 * (n + 1) for n in range(60)}
    due |= {f"c:s{n}": 61.0 * (n + 1) for n in range(20)}
    due |= {"c:r59": 100.0, "c:r1": 610.0}
    at = {
        str(b["key"]): t for t, b in zip(harness.backend.times, harness.backend.bodies, strict=True)
    }
    assert len(harness.backend.bodies) == 80
    assert at == {k: round(t + EARLY, 6) for k, t in due.items()}
    refills = [t for t, op in store.calls if op == "tracked"]
    assert len(refills) >= 1_200 / (WINDOW / 2) - 1  # read in as time went on (quiet reads)
