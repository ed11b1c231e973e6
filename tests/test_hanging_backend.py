"""Requests the backend hangs on never hold healthy resets (issue 21 item 4), with a real
worker process, a real redis-server and a real HTTP backend on loopback.

On 68e5110, with MAX_IN_FLIGHT=2 and three counters whose backend never answers, 4 of 6
healthy counters were reset more than 1 s late (up to RESET_TIMEOUT_MS). Now each
hanging request gives its courier back 0.1 s after it began and goes on in the slow
pool, so a healthy reset waits at most that 0.1 s behind them; and past the slow pool
the oldest hanging attempt is abandoned for room (cut short, retried like a timeout)
instead of holding the courier until RESET_TIMEOUT_MS.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from tests.support.backend import (
    Behaviour,
    Hang,
    HeadersThenNothing,
    Received,
    RecordingBackend,
    by_key,
)
from tests.support.polling import wait_until
from tests.support.procs import SpawnWorker, WorkerProcess
from tests.support.redis_server import RedisServer
from tests.support.replicas import Replicas

pytestmark = pytest.mark.slow

START = 15.0  # interpreter start + connect + first election, on a loaded machine
RESET_TIMEOUT_MS = 3000
# Lateness allowed a healthy reset: the 0.1 s a hanging request may hold the courier,
# plus a margin generous for a loaded 2-core machine; well under the 1 s+ it was.
LATE = 0.5
HANGING = [f"c:hang-{n}" for n in range(3)]
NEVER = Hang(float("inf"))  # no answer at all


def start_leader(
    spawn_worker: SpawnWorker,
    redis_server: RedisServer,
    backend: RecordingBackend,
    hanging: list[str],
    behaviour: Behaviour = NEVER,
    **settings: str,
) -> Iterator[WorkerProcess]:
    """One worker, leading, against a backend that never answers (``behaviour``) for the
    ``hanging`` counters and answers every other at once."""
    backend.behave(by_key(dict.fromkeys(hanging, behaviour)))
    replicas = Replicas(redis_server, backend, spawn_worker, lease_ttl_ms=3000)
    worker = replicas.spawn("r1", **settings)
    worker.wait_for_output("reconciled:", START)
    yield worker
    replicas.assert_secret_kept()
    assert "Traceback" not in worker.output()


@pytest.fixture
def leader(
    redis_server: RedisServer, backend: RecordingBackend, spawn_worker: SpawnWorker
) -> Iterator[WorkerProcess]:
    """MAX_IN_FLIGHT=2, three counters that hang."""
    yield from start_leader(
        spawn_worker,
        redis_server,
        backend,
        HANGING,
        MAX_IN_FLIGHT="2",
        RESET_TIMEOUT_MS=str(RESET_TIMEOUT_MS),
    )


def requests_for(backend: RecordingBackend, key: str) -> list[Received]:
    return [r for r in backend.requests if r.key == key]


def set_healthy(client: redis.Redis, names: list[str], first_in: float) -> dict[str, float]:
    """Healthy counters due 0.2 s apart from ``first_in`` s from now; their deadlines."""
    start = time.time() + first_in
    deadlines = {key: start + 0.2 * n for n, key in enumerate(names)}
    for key, due in deadlines.items():
        client.set(key, 1, pxat=int(due * 1000))
    return {key: int(due * 1000) / 1000 for key, due in deadlines.items()}


def lateness(backend: RecordingBackend, deadlines: dict[str, float]) -> dict[str, float]:
    """Each healthy reset's lateness (backend receipt - deadline), once all arrived."""

    def arrived() -> dict[str, list[Received]] | None:
        got = {key: requests_for(backend, key) for key in deadlines}
        return got if all(got.values()) else None

    got = wait_until(arrived, "every healthy reset", 10.0)
    return {key: got[key][0].received_at - due for key, due in deadlines.items()}


def hang(client: redis.Redis, backend: RecordingBackend, keys: list[str]) -> None:
    """Let ``keys`` fall due; return once the backend holds a first request for each."""
    for key in keys:
        client.set(key, 1, px=100)
    wait_until(
        lambda: {r.key for r in backend.requests} >= set(keys),
        "a first (hanging) request for every hanging counter",
        10.0,
    )


def test_healthy_resets_are_not_held_behind_requests_that_hang(
    leader: WorkerProcess, redis_server: RedisServer, backend: RecordingBackend
) -> None:
    with redis_server.client() as client:
        hang(client, backend, HANGING)
        # Due while all three hang (RESET_TIMEOUT_MS 3 s): on 68e5110 they waited.
        first = lateness(backend, set_healthy(client, [f"c:ok-{n}" for n in range(6)], 0.3))
        assert_prompt(first)
        # Then due while the hanging counters' retries are in the air or waiting.
        wait_until(
            lambda: all(len(requests_for(backend, key)) >= 2 for key in HANGING),
            "a retry of every hanging counter",
            RESET_TIMEOUT_MS / 1000 + 10.0,
        )
        second = lateness(backend, set_healthy(client, [f"c:again-{n}" for n in range(6)], 0.1))
        assert_prompt(second)
    for key in first | second:
        assert len(requests_for(backend, key)) == 1, f"{key} was sent more than once"
    assert leader.alive


def assert_prompt(lateness: dict[str, float], within: float = LATE) -> None:
    late = {key: round(x, 3) for key, x in lateness.items() if x > within}
    assert late == {}, f"healthy resets more than {within} s late: {late}"


# MAX_IN_FLIGHT 1 holds requests_at_once(1) = 5 requests: the courier and a slow pool of 4.
PAST_THE_POOL = [f"c:stuck-{n}" for n in range(5)]
LONG_TIMEOUT_MS = 14_000  # what a healthy reset would wait for without abandoning
# Lateness allowed: the 0.25 s an attempt must be out before it is abandoned (the
# backend's usual time known), the 0.1 s steps, and a loaded machine's margin.
LATE_PAST_THE_POOL = 2.0


@pytest.fixture
def lone_courier(
    request: pytest.FixtureRequest,
    redis_server: RedisServer,
    backend: RecordingBackend,
    spawn_worker: SpawnWorker,
) -> Iterator[WorkerProcess]:
    """MAX_IN_FLIGHT=1, five counters whose backend never ends its answer (the
    parameter): as many requests as the worker may have in the air."""
    yield from start_leader(
        spawn_worker,
        redis_server,
        backend,
        PAST_THE_POOL,
        request.param,
        MAX_IN_FLIGHT="1",
        RESET_TIMEOUT_MS=str(LONG_TIMEOUT_MS),
    )


def fill_the_pool_then_time_healthy(
    redis_server: RedisServer, backend: RecordingBackend
) -> dict[str, float]:
    """Warm up, let the PAST_THE_POOL counters take every place, then time healthy ones."""
    with redis_server.client() as client:
        # One healthy reset first, so the backend's usual time is known (abandon at 0.25 s).
        assert_prompt(lateness(backend, set_healthy(client, ["c:warm"], 0.1)))
        hang(client, backend, PAST_THE_POOL)
        # The courier and the whole slow pool now hang, for RESET_TIMEOUT_MS (14 s).
        late = lateness(backend, set_healthy(client, [f"c:ok-{n}" for n in range(3)], 0.1))
    assert_prompt(late, within=LATE_PAST_THE_POOL)
    for key in late:
        assert len(requests_for(backend, key)) == 1, f"{key} was sent more than once"
    return late


@pytest.mark.parametrize("lone_courier", [NEVER], indirect=True)
def test_past_the_slow_pool_the_oldest_hanging_attempt_is_abandoned(
    lone_courier: WorkerProcess, redis_server: RedisServer, backend: RecordingBackend
) -> None:
    fill_the_pool_then_time_healthy(redis_server, backend)
    lone_courier.wait_for_output("abandoned to free its place", 10.0)
    assert lone_courier.alive


@pytest.mark.parametrize("lone_courier", [HeadersThenNothing(status=200)], indirect=True)
def test_an_answer_judged_2xx_stands_when_its_body_is_cut_for_room(
    lone_courier: WorkerProcess, redis_server: RedisServer, backend: RecordingBackend
) -> None:
    """The stalled answers said 200 before their bodies stalled: the one cut for room is
    delivered (its reset logged sent), not abandoned and sent again."""
    fill_the_pool_then_time_healthy(redis_server, backend)
    lone_courier.wait_for_output("reset sent: key='c:stuck-", 10.0)
    assert "abandoned to free its place" not in lone_courier.output()
    for key in PAST_THE_POOL:
        assert len(requests_for(backend, key)) == 1, f"{key} was sent more than once"
    assert lone_courier.alive
