"""The trust boundary of the README, with a real worker, Redis and backend (issue #21).

The app's user, with exactly the documented ACL (functions.app_acl_rule), touches its
counters through the library and publishes where it may; what it may not publish on is
refused by Redis. Forged claim markers published by a user with every channel (what the
ACL does not grant the app) still make no counter reset twice.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator

import pytest
import redis

from tests.support.backend import RecordingBackend
from tests.support.procs import SpawnWorker, worker_env
from tests.support.redis_server import RedisServer
from trio_counter_worker.functions import LIBRARY_VERSION, app_acl_rule, install
from trio_counter_worker.keys import Keys

pytestmark = pytest.mark.fail_after(60)

KEYS = Keys("c:*")


@pytest.fixture
def admin(redis_server: RedisServer) -> Iterator[redis.Redis]:
    with redis_server.client() as client:
        if int(str(client.info("server")["redis_version"]).split(".")[0]) < 7:
            pytest.skip("Redis Functions need Redis 7.0+")
        assert install(client, "c:*") == LIBRARY_VERSION
        client.execute_command(  # type: ignore[no-untyped-call, unused-ignore]
            "ACL", "SETUSER", "app", "on", ">pw", *app_acl_rule("c:*").split()
        )
        yield client


def test_the_app_may_publish_only_where_tcw_touch_does(
    admin: redis.Redis, redis_server: RedisServer
) -> None:
    """The app's user publishes on the touched channel (as tcw_touch does) and nowhere
    else of the worker's: not claim markers, not redelivery requests, not a liveness
    channel; and it may subscribe to none."""
    with redis_server.client(username="app", password="pw") as app:
        assert app.fcall("tcw_touch", 1, "c:1", 5000)[1] == 1
        assert app.publish(KEYS.touched, "c:1") == 0
        for channel in (KEYS.claims, KEYS.redeliver, KEYS.released, f"{KEYS.namespace}:alive:x"):
            with pytest.raises(redis.exceptions.NoPermissionError):
                app.publish(channel, "9999999999999 c:1")
    for channel in (KEYS.touched, KEYS.claims):
        dry = admin.execute_command("ACL", "DRYRUN", "app", "SUBSCRIBE", channel)  # type: ignore[no-untyped-call, unused-ignore]
        assert dry != "OK"
        with pytest.raises(redis.exceptions.NoPermissionError):
            app.publish("__keyspace@0__:c:1", "expired")


def test_forged_markers_do_not_reset_a_counter_twice(
    admin: redis.Redis,
    redis_server: RedisServer,
    backend: RecordingBackend,
    spawn_worker: SpawnWorker,
) -> None:
    """Issue #21's attack, by a user the ACL does not limit: a forged marker
    `9999999999999 <key>` per counter, and garbage, around 30 counters' resets (half
    touched through the library, half SET), and touched-channel hints for keys that are
    not counters: every counter reset once. (A marker naming the exact millisecond of a
    claim, published before it, is not caught: see the README's trust boundary.)"""
    worker = spawn_worker(worker_env(redis_server, backend), "leader")
    worker.wait_for_output("reconciled:", 10.0)
    keys = [f"c:{n}" for n in range(30)]
    with admin.pipeline(transaction=False) as pipe:
        for n, key in enumerate(keys):
            pipe.publish(KEYS.claims, f"9999999999999 {key}")
            if n % 2:
                pipe.fcall("tcw_touch", 1, key, 300 + 10 * n)
            else:
                pipe.set(key, 1, px=300 + 10 * n)
        pipe.execute()
    stop = time.monotonic() + 1.5
    while time.monotonic() < stop:  # forgeries all through the resets and their echoes
        with admin.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.publish(KEYS.claims, f"9999999999999 {key}")
                pipe.publish(KEYS.claims, f"{int(time.time() * 1000) - 1_000} {key}")
            pipe.publish(KEYS.claims, b"\xff junk")
            pipe.publish(KEYS.touched, "session:42")
            pipe.execute()
    backend.wait_for_count(len(keys), 10.0)
    time.sleep(1.0)  # a second reset would come within a claim round trip: none does
    sent = Counter(q.json["key"] for q in backend.requests)
    assert sent == Counter(dict.fromkeys(keys, 1))
    assert len({q.json["reset_id"] for q in backend.requests}) == len(keys)
