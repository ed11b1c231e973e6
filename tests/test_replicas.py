"""Several real replicas, one real Redis, one real HTTP backend: election, failover, handoff.

Every test here runs ``python -m trio_counter_worker`` processes against a throwaway
redis-server and a RecordingBackend. Waits are bounded and wait on something observable
(a request reaching the backend, a log line, Redis state polled with a deadline); the
only fixed-length waits are the "nothing more must happen" windows, which are
``backend.wait_for`` calls expected to time out.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import attrs
import pytest
import redis

from tests.support.backend import Received, RecordingBackend
from tests.support.polling import wait_until
from tests.support.procs import SpawnWorker, WorkerProcess
from tests.support.redis_server import RedisServer
from tests.support.replicas import Replicas
from trio_counter_worker.keys import Keys

pytestmark = pytest.mark.slow


LEASE_TTL_MS = 1000
LEASE_TTL = LEASE_TTL_MS / 1000
KEY_TTL_MS = 300
KEY_TTL = KEY_TTL_MS / 1000
COUNTER_KEY = "ctr:*"
KEY = "ctr:a"
KEYS = Keys(COUNTER_KEY)
LEASE_KEY = KEYS.lease
BODY_KEYS = {"key", "reset_id", "expired_at", "fencing_token", "replica_id"}
NEEDED_FLAGS = "Kg$x"

EXPIRED_AT_SLACK = 0.05  # expired_at vs. when the TTL was due (same host, same clock)
START_TIMEOUT = 15.0  # interpreter start + Redis connect + first election, on a loaded box
RESET_TIMEOUT = 3.0  # key due -> its POST arrives, while a leader is up
POLL = 0.002


# --- helpers -------------------------------------------------------------------------


def lease(client: redis.Redis) -> dict[str, str]:
    """The lease hash (holder, replica, epoch, since_ms), or {} when nobody holds it."""
    raw: Any = client.hgetall(LEASE_KEY)
    return {str(k): str(v) for k, v in raw.items()}


def holder_other_than(client: redis.Redis, replica_id: str) -> str | None:
    """The replica holding the lease, if one does and it is not ``replica_id``."""
    held = lease(client).get("replica")
    return held if held and held != replica_id else None


def set_key(client: redis.Redis, key: str = KEY, ttl_ms: int = KEY_TTL_MS) -> float:
    """SET key 1 PXAT (Redis's now + ttl_ms); return when the TTL is due, exactly: Redis's
    clock is this host's (a round trip's midpoint was 150 ms off under load)."""
    due = rearm_key(client, key, ttl_ms, existing=False)
    assert due is not None
    return due


def rearm_key(
    client: redis.Redis, key: str = KEY, ttl_ms: int = KEY_TTL_MS, *, existing: bool = True
) -> float | None:
    """:func:`set_key`; with ``existing``, only if the key is still there (SET XX): None
    if it expired first (this process was slower than its TTL: the episode ended)."""
    seconds, micros = client.time()
    due_ms = int(seconds) * 1000 + int(micros) // 1000 + ttl_ms
    if not client.set(key, "1", pxat=due_ms, xx=existing):
        return None
    return due_ms / 1000


def flags(client: redis.Redis) -> str:
    raw: Any = client.config_get("notify-keyspace-events")
    return str(raw.get("notify-keyspace-events", ""))


def check_reset(
    request: Received,
    *,
    secret: str,
    key: str,
    due: float,
    replica_id: str | None = None,
) -> dict[str, Any]:
    """The wire format of one reset POST; returns its body."""
    assert request.method == "POST"
    assert request.path == "/reset"
    body = request.json
    assert isinstance(body, dict), request.body
    assert set(body) == BODY_KEYS, body
    assert body["key"] == key
    assert isinstance(body["reset_id"], str)
    assert body["reset_id"]
    assert isinstance(body["fencing_token"], int)
    assert body["fencing_token"] >= 1
    if replica_id is not None:
        assert body["replica_id"] == replica_id
    headers = request.headers
    assert headers["x-secret"] == secret
    assert headers["content-type"] == "application/json"
    assert headers["idempotency-key"] == body["reset_id"]
    assert headers["x-fencing-token"] == str(body["fencing_token"])
    expired_at = body["expired_at"]
    assert isinstance(expired_at, int | float)
    assert abs(expired_at - due) <= EXPIRED_AT_SLACK, (
        f"expired_at {expired_at:.3f} is {(expired_at - due) * 1000:+.1f} ms from the TTL "
        f"deadline {due:.3f}"
    )
    # Never sent before the key was due.
    assert request.received_at >= expired_at - 0.005, (request.received_at, expired_at)
    return body


def assert_no_more(backend: RecordingBackend, count: int, window: float) -> None:
    """Over ``window`` seconds, no request beyond the first ``count`` arrives."""
    with pytest.raises(AssertionError, match="condition not met"):
        backend.wait_for(lambda requests: len(requests) > count, timeout=window)
    assert len(backend.requests) == count


@attrs.define
class Cluster:
    """Replicas by REPLICA_ID, plus the one that leads."""

    workers: dict[str, WorkerProcess]
    leader_id: str
    epoch: int

    @property
    def leader(self) -> WorkerProcess:
        return self.workers[self.leader_id]

    def others(self, replica_id: str) -> dict[str, WorkerProcess]:
        return {rid: w for rid, w in self.workers.items() if rid != replica_id}


@attrs.define
class Harness(Replicas):
    counter_key: str = COUNTER_KEY
    lease_ttl_ms: int = LEASE_TTL_MS

    def start(self, replica_ids: Sequence[str]) -> Cluster:
        """Spawn the replicas; return once all are started and exactly one leads, ready
        (subscribed to keyspace events and reconciled)."""
        workers = {rid: self.spawn(rid, LOG_LEVEL="INFO") for rid in replica_ids}
        for rid, worker in workers.items():
            worker.wait_for_output(f"replica {rid} started (standby)", START_TIMEOUT)
        with self.redis_server.client() as client:
            held = wait_until(
                lambda: lease(client).get("replica"), "a lease", START_TIMEOUT, interval=POLL
            )
            leader = workers[held]
            leader.wait_for_output(f"leader acquired: replica={held} ", START_TIMEOUT)
            leader.wait_for_output("reconciled:", START_TIMEOUT)
            current = lease(client)
        assert current["replica"] == held, current
        acquired = [rid for rid, w in workers.items() if "leader acquired" in w.output()]
        assert acquired == [held], f"exactly one replica should lead, got {acquired}"
        return Cluster(workers=workers, leader_id=held, epoch=int(current["epoch"]))


@pytest.fixture
def harness(
    redis_server: RedisServer, backend: RecordingBackend, spawn_worker: SpawnWorker
) -> Iterator[Harness]:
    """Point 5 of every test: RESET_SECRET reaches the backend, never a worker's output."""
    h = Harness(redis_server, backend, spawn_worker)
    yield h
    for worker in h.spawned:
        worker.cleanup()
    assert h.spawned, "the test spawned no worker"
    h.assert_secret_kept()


def _times(cluster: Cluster) -> Mapping[str, int]:
    return {rid: w.output().count("leader acquired") for rid, w in cluster.workers.items()}


# --- 1. one leader, exactly one POST per inactivity episode -----------------------------


def test_three_replicas_one_post_per_episode(harness: Harness) -> None:
    cluster = harness.start(["r0", "r1", "r2"])
    backend = harness.backend
    # How many times each episode is re-armed (SET again) before it is left to expire.
    rearms = [0, 0, 2, 0, 1, 0, 0, 3, 0, 0, 1, 0]
    bodies: list[dict[str, Any]] = []

    with harness.redis_server.client() as client:
        for episode, times in enumerate(rearms):
            due = set_key(client)
            for _ in range(times):
                # Re-arm before the TTL runs out (activity keeps it alive), with 200 ms to
                # spare: the leader claims at the deadline, and this process may be slow.
                wait_until(
                    lambda: 0 <= client.pttl(KEY) <= KEY_TTL_MS * 2 // 3,
                    "the key's TTL to run low before re-arming",
                    RESET_TIMEOUT,
                    interval=POLL,
                )
                rearmed = rearm_key(client)
                if rearmed is None:  # expired before the re-arm (a slow test): it ended
                    break
                due = rearmed
                assert len(backend.requests) == episode, "reset sent for a key kept alive"
            requests = backend.wait_for_count(episode + 1, timeout=RESET_TIMEOUT)
            assert len(requests) == episode + 1, "more than one POST for one episode"
            bodies.append(
                check_reset(
                    requests[episode],
                    secret=harness.secret,
                    key=KEY,
                    due=due,
                    replica_id=cluster.leader_id,
                )
            )

        # Nothing more: no duplicate, no late re-delivery, no phantom episode.
        assert_no_more(backend, len(rearms), 1.5 * LEASE_TTL)
        assert client.exists(KEY) == 0
        assert lease(client)["replica"] == cluster.leader_id

    assert len(bodies) == len(rearms)
    assert len({b["reset_id"] for b in bodies}) == len(rearms), "reset_ids must be distinct"
    assert {b["fencing_token"] for b in bodies} == {cluster.epoch}
    assert cluster.leader.output().count("reset sent: key='ctr:a'") == len(rearms)
    assert _times(cluster) == {rid: int(rid == cluster.leader_id) for rid in cluster.workers}
    for rid, worker in cluster.workers.items():
        assert worker.alive, f"{rid} died"
        if rid != cluster.leader_id:
            assert "reset sent" not in worker.output(), f"standby {rid} sent a reset"


def test_a_key_set_again_just_after_it_expired_is_reset_for_the_ended_episode(
    harness: Harness,
) -> None:
    """The app sets a key again a moment after it expired, before the leader has claimed
    it (here the leader is frozen over the deadline; in life it is the leader's few
    milliseconds, or a backlog). The `expired` event it then hears ended that episode:
    it is reset, and the key's new life is tracked and reset in its turn."""
    cluster = harness.start(["r0"])
    leader, backend = cluster.leader, harness.backend
    with harness.redis_server.client() as client:
        due = set_key(client, KEY, 400)
        wait_until(lambda: client.zscore(KEYS.deadlines, KEY), "the deadline recorded", 5.0)
        leader.signal(signal.SIGSTOP)  # within its 1 s lease: it keeps leading
        try:
            # Read past its deadline, Redis expires the key and publishes `expired`.
            wait_until(lambda: not client.exists(KEY), "the key expired", 5.0, interval=POLL)
            again = set_key(client, KEY, 1500)
        finally:
            leader.signal(signal.SIGCONT)
        backend.wait_for(lambda requests: len(requests) >= 1, timeout=RESET_TIMEOUT)
        first = backend.requests[0]
        assert first.received_at < again, "the ended episode waited for the next one"
        check_reset(first, secret=harness.secret, key=KEY, due=due)
        backend.wait_for(lambda requests: len(requests) >= 2, timeout=RESET_TIMEOUT + 1.5)
        second = check_reset(backend.requests[1], secret=harness.secret, key=KEY, due=again)
        assert second["reset_id"] != first.json["reset_id"]
        assert_no_more(backend, 2, 0.3)


# --- 2. SIGKILL the leader: another replica takes over -------------------------------------


def _failover(harness: Harness, cluster: Cluster, key_ttl_ms: int, key_before: bool) -> None:
    """SIGKILL the leader, then (or just before) arm a key; the new leader resets it."""
    backend = harness.backend
    killed = cluster.leader_id
    survivors = cluster.others(killed)
    acquired_before = _times(cluster)
    with harness.redis_server.client() as client:
        if key_before:
            due = set_key(client, ttl_ms=key_ttl_ms)
            # The old leader has recorded the deadline before it dies.
            wait_until(
                lambda: client.zscore(KEYS.deadlines, KEY),
                "the leader to record the key's deadline",
                RESET_TIMEOUT,
                interval=POLL,
            )
        wall_kill, t_kill = time.time(), time.monotonic()
        assert cluster.leader.kill() == -signal.SIGKILL
        if not key_before:
            due = set_key(client, ttl_ms=key_ttl_ms)

        new = wait_until(
            lambda: holder_other_than(client, killed),
            "another replica to hold the lease",
            LEASE_TTL + 5.0,
            interval=POLL,
        )
        t_lease = time.monotonic() - t_kill
        current = lease(client)
        assert current["replica"] == new
        assert new in survivors
        survivors[new].wait_for_output(f"leader acquired: replica={new} ", 5.0)
        t_log = time.monotonic() - t_kill
        # Taken over because Redis dropped the dead leader's connection, not because its
        # lease ran out.
        assert f"(taken over from {killed}: its connection to Redis is gone)" in (
            survivors[new].output()
        )
        assert _times(cluster)[new] == acquired_before[new] + 1

        print(
            f"\nSIGKILL failover ({'key armed before' if key_before else 'key armed after'} "
            f"the kill, key TTL {key_ttl_ms} ms, lease {LEASE_TTL_MS} ms): "
            f"lease held by {new} after {t_lease * 1000:.0f} ms, its 'leader acquired' "
            f"log seen after {t_log * 1000:.0f} ms"
        )

        budget = LEASE_TTL + key_ttl_ms / 1000 + 2.0  # lease runs out + key TTL + margin
        [request] = backend.wait_for_count(1, timeout=max(0.1, budget - t_log))
        t_reset = request.received_at - wall_kill
        print(f"SIGKILL failover: reset received {t_reset * 1000:.0f} ms after the kill")
        body = check_reset(request, secret=harness.secret, key=KEY, due=due, replica_id=new)
        assert body["replica_id"] != killed
        assert body["fencing_token"] == int(current["epoch"]) > cluster.epoch
        assert t_reset <= budget
        assert_no_more(backend, 1, 1.5 * LEASE_TTL)


def test_sigkill_leader_key_expiring_during_failover(harness: Harness) -> None:
    """A key the dead leader was tracking, due while nobody leads: the new leader sends it
    late, with its original expired_at and its own higher fencing token."""
    cluster = harness.start(["r0", "r1", "r2"])
    _failover(harness, cluster, key_ttl_ms=KEY_TTL_MS, key_before=True)


def test_sigkill_leader_key_outliving_failover(harness: Harness) -> None:
    """A key set right after the kill, due after the lease has moved: found by the new
    leader's reconcile and reset on time."""
    cluster = harness.start(["r0", "r1", "r2"])
    _failover(harness, cluster, key_ttl_ms=LEASE_TTL_MS + 500, key_before=False)


def liveness_connection(client: redis.Redis, replica_id: str) -> int:
    """CLIENT ID of ``replica_id``'s liveness subscription (the lease records its channel;
    that connection holds it and the release channel, nothing else)."""
    for row in client.client_list():
        if row["name"] == f"tcw:{replica_id}" and row["sub"] == "2" and row["psub"] == "0":
            return int(row["id"])
    raise AssertionError(f"no liveness connection for {replica_id}")


def stream(client: redis.Redis, prefix: str, count: int, spread_ms: int) -> set[str]:
    """``count`` counters expiring over ``spread_ms`` from now."""
    names = {f"ctr:{prefix}{i}" for i in range(count)}
    for i, name in enumerate(sorted(names)):
        client.set(name, "1", px=200 + spread_ms * i // count)
    return names


def exactly_once(backend: RecordingBackend, names: set[str], timeout: float) -> None:
    """Every counter reset, each under one reset id, and the fencing tokens the backend
    saw never went down."""
    backend.wait_for(
        lambda requests: {(q.json or {}).get("key") for q in requests} >= names, timeout=timeout
    )
    ids: dict[str, set[str]] = {}
    top = 0
    for q in backend.requests:
        body = q.json or {}
        ids.setdefault(str(body["key"]), set()).add(str(body["reset_id"]))
        assert int(body["fencing_token"]) >= top, "a fencing token went down"
        top = int(body["fencing_token"])
    assert {k for k, v in ids.items() if len(v) > 1} == set(), "two reset ids for a counter"


def test_a_leader_whose_connection_is_killed_steps_down_and_nothing_doubles(
    harness: Harness,
) -> None:
    """The process lives, but Redis closed its liveness connection (CLIENT KILL): a
    standby may steal the lease within milliseconds, so the leader must stop at once."""
    cluster = harness.start(["r0", "r1", "r2"])
    with harness.redis_server.client() as client:
        names = stream(client, "k", 60, 2000)
        time.sleep(0.5)  # a third of the counters are reset by the first leader
        client.client_kill_filter(_id=liveness_connection(client, cluster.leader_id))
        # The guard (the subscription dropped), a renewal in flight (Redis no longer counts
        # it) or, on a loaded machine, the next renewal after a standby stole the lease may
        # be first to say so: each at once, not at the lease's end (no timeout).
        said = cluster.leader.wait_for_output("leader lost: fencing_token=1", 5.0)
        why = said.split("leader lost: fencing_token=1")[1].splitlines()[0]
        assert "liveness subscription" in why or "another holder" in why, why
        exactly_once(harness.backend, names, RESET_TIMEOUT + 2.0)
        assert lease(client).get("replica")
    for rid, worker in cluster.workers.items():
        assert worker.alive, f"{rid} died"


def test_keys_set_as_a_stall_past_the_lease_begins_are_reset_once(harness: Harness) -> None:
    """DEBUG SLEEP outlasting the lease, sent the moment the app's SETs are acknowledged:
    the leader steps down with keys it saw set and could not look at, which expire
    during the stall (Redis has no trace of them after). Handed over, each is reset once."""
    cluster = harness.start(["r0", "r1"])
    with (
        harness.redis_server.client() as client,
        harness.redis_server.client(socket_timeout=10) as staller,
    ):
        names = stream(client, "s", 20, 600)
        edge = {f"ctr:edge{i}" for i in range(5)}
        pipe = client.pipeline(transaction=False)
        for name in sorted(edge):
            pipe.set(name, "1", px=300)
        pipe.execute()
        staller.execute_command("DEBUG", "SLEEP", str(2 * LEASE_TTL))
        exactly_once(harness.backend, names | edge, RESET_TIMEOUT + 2 * LEASE_TTL)
    for rid, worker in cluster.workers.items():
        assert worker.alive, f"{rid} died"


def test_a_frozen_standby_does_not_hold_up_the_takeover(harness: Harness) -> None:
    """SIGSTOP one standby, SIGKILL the leader: the other standby takes over through
    liveness; the frozen one, thawed, finds a live leader and stays a standby."""
    cluster = harness.start(["r0", "r1", "r2"])
    frozen_id, other_id = sorted(cluster.others(cluster.leader_id))
    frozen = cluster.workers[frozen_id]
    frozen.signal(signal.SIGSTOP)
    try:
        with harness.redis_server.client() as client:
            assert cluster.leader.kill() == -signal.SIGKILL
            names = stream(client, "f", 20, 500)
            cluster.workers[other_id].wait_for_output(
                f"(taken over from {cluster.leader_id}: its connection to Redis is gone)", 5.0
            )
            exactly_once(harness.backend, names, RESET_TIMEOUT + 2.0)
    finally:
        frozen.signal(signal.SIGCONT)
    with harness.redis_server.client() as client:
        names = stream(client, "g", 10, 200)
        exactly_once(harness.backend, names, RESET_TIMEOUT)
        assert lease(client)["replica"] == other_id
    assert "leader acquired" not in frozen.output()


# --- 3. SIGTERM the leader: graceful handoff ------------------------------------------------


def test_sigterm_leader_hands_over(harness: Harness) -> None:
    cluster = harness.start(["r0", "r1", "r2"])
    backend = harness.backend
    old = cluster.leader_id
    survivors = cluster.others(old)
    with harness.redis_server.client() as client:
        t_term = time.monotonic()
        cluster.leader.signal(signal.SIGTERM)
        new = wait_until(
            lambda: holder_other_than(client, old),
            "another replica to hold the lease",
            LEASE_TTL,
            interval=POLL,
        )
        t_handoff = time.monotonic() - t_term
        print(f"\nSIGTERM handoff: lease held by {new} {t_handoff * 1000:.1f} ms after SIGTERM")
        assert new in survivors
        current = lease(client)
        assert int(current["epoch"]) > cluster.epoch
        # Well inside one lease TTL: the release is announced, not left to expire.
        assert t_handoff < LEASE_TTL / 2

        assert cluster.leader.wait(5.0) == 0
        out = cluster.leader.output()
        assert "received SIGTERM: stopping" in out
        # Released, or (a loaded machine: the stop took a while) taken over just before.
        assert (
            f"lease released: fencing_token={cluster.epoch}" in out
            or f"lease already taken over: fencing_token={cluster.epoch}" in out
        ), out
        assert lease(client).get("replica") != old

        survivors[new].wait_for_output(f"leader acquired: replica={new} ", 5.0)
        survivors[new].wait_for_output("reconciled:", 5.0)
        due = set_key(client)
        [request] = backend.wait_for_count(1, timeout=RESET_TIMEOUT)
        body = check_reset(request, secret=harness.secret, key=KEY, due=due, replica_id=new)
        assert body["fencing_token"] == int(current["epoch"])
        assert_no_more(backend, 1, 1.5 * LEASE_TTL)
    for rid, worker in survivors.items():
        assert worker.alive, f"{rid} died"


# --- 4. Redis restarts empty: notifications re-enabled, resets continue --------------------


def test_single_replica_survives_redis_restart(harness: Harness) -> None:
    cluster = harness.start(["r0"])
    worker = cluster.leader
    backend = harness.backend
    server = harness.redis_server
    with server.client() as client:
        assert all(f in flags(client) for f in NEEDED_FLAGS), flags(client)
        due = set_key(client)
        [first] = backend.wait_for_count(1, timeout=RESET_TIMEOUT)
        check_reset(first, secret=harness.secret, key=KEY, due=due, replica_id="r0")
        # Let it finish the episode (mark the reset sent) before Redis goes away.
        worker.wait_for_output("reset sent: key='ctr:a'", RESET_TIMEOUT)

    t_restart = time.monotonic()
    server.restart()  # SIGKILL, then a fresh empty server on the same port
    t_up = time.monotonic() - t_restart

    with server.client() as client:
        wait_until(
            lambda: all(f in flags(client) for f in NEEDED_FLAGS),
            "the worker to re-enable keyspace notifications "
            "(notify-keyspace-events is '' on a fresh server)",
            10.0,
            interval=POLL,
        )
        t_flags = time.monotonic() - t_restart
        # The lease went with the data: the replica must win it again on the new server.
        wait_until(
            lambda: lease(client).get("replica") == "r0", "r0 to lead again", 10.0, interval=POLL
        )
        t_lease = time.monotonic() - t_restart
        # Ready again: a key living and dying wholly within the start-up is reset at its
        # heard expiry (Redis's lag), not at its deadline, which check_reset holds to 50 ms.
        wait_until(lambda: worker.output().count("reconciled:") == 2, "the second reconcile", 10.0)
        print(
            f"\nRedis restart (server up again after {t_up * 1000:.0f} ms): flags "
            f"re-enabled after {t_flags * 1000:.0f} ms, lease re-acquired after "
            f"{t_lease * 1000:.0f} ms"
        )
        due = set_key(client)
        requests = backend.wait_for_count(2, timeout=RESET_TIMEOUT)
        body = check_reset(requests[1], secret=harness.secret, key=KEY, due=due, replica_id="r0")
        assert body["fencing_token"] > first.json["fencing_token"]
        assert_no_more(backend, 2, 1.5 * LEASE_TTL)
    assert worker.alive


# --- 5. backend errors: retried under one idempotency key -----------------------------


def test_backend_500_twice_then_200_is_delivered_with_one_idempotency_key(
    harness: Harness,
) -> None:
    harness.start(["r0"])
    harness.backend.respond_with(500, 500)
    with harness.redis_server.client() as client:
        due = set_key(client)
        requests = harness.backend.wait_for_count(3, timeout=RESET_TIMEOUT)
        worker = harness.spawned[0]
        worker.wait_for_output("reset sent:", RESET_TIMEOUT)
        assert "attempts=3" in worker.output()
        wait_until(
            lambda: not client.exists(KEYS.pending),
            "the pending record to be cleared after the 2xx",
            RESET_TIMEOUT,
            interval=POLL,
        )
    assert len(requests) == 3
    bodies = [check_reset(q, secret=harness.secret, key=KEY, due=due) for q in requests]
    assert len({q.headers["idempotency-key"] for q in requests}) == 1
    assert len({b["reset_id"] for b in bodies}) == 1
    assert_no_more(harness.backend, 3, window=1.0)


def test_a_replica_that_sends_resets_elsewhere_than_the_leader_says_so(harness: Harness) -> None:
    """Two deployments sharing COUNTER_KEY on one Redis (or a new RESET_ENDPOINT_URL half
    rolled out) are one election: only the leader's endpoint gets resets. The standby
    says so, naming both endpoints without their query (where a token may be)."""
    cluster = harness.start(["r0"])
    elsewhere = harness.backend.url.rstrip("/") + "/elsewhere?token=QUERY-TOKEN"
    standby = harness.spawn("r1", LOG_LEVEL="INFO", RESET_ENDPOINT_URL=elsewhere)
    line = standby.wait_for_output("leads this deployment and sends its resets to", START_TIMEOUT)
    assert f"sends its resets to '{harness.backend.url}'" in line
    assert "/elsewhere'" in line
    for worker in (cluster.leader, standby):
        assert "QUERY-TOKEN" not in worker.output()
