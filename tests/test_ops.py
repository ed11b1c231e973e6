"""`check` and `status` against a real redis-server and a real HTTP backend on loopback."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from pathlib import Path

import attrs
import pytest
import trio

from tests.support.backend import Behaviour, Received, RecordingBackend, Respond
from tests.support.in_process import leading
from tests.support.procs import run_cli
from tests.support.redis_server import RedisServer, free_port
from trio_counter_worker import Config
from trio_counter_worker.acl import acl_rule
from trio_counter_worker.keys import Keys
from trio_counter_worker.ops import (
    Check,
    print_checks,
    print_status,
    run_checks,
    run_status,
    server_name,
)

SECRET = "ops-secret-XYZ-321"


def config(server: RedisServer, url: str, **kw: object) -> Config:
    return Config(
        reset_endpoint_url=url,
        reset_secret=SECRET,
        counter_key="c:*",
        redis_port=server.port,
        lease_ttl_ms=1000,
        replica_id="ops-1",
        **kw,  # type: ignore[arg-type]
    )


def states(checks: list[Check]) -> dict[str, str]:
    return {c.name: c.state for c in checks}


async def test_check_passes_with_redis_and_backend_up(
    redis_server: RedisServer, backend: RecordingBackend
) -> None:
    checks = await run_checks(config(redis_server, backend.url))
    assert states(checks) == {
        "configuration": "ok",
        "redis": "ok",
        "permissions": "ok",
        "takeover": "ok",
        "eviction": "ok",
        "notifications": "ok",
        "endpoint dns": "ok",
        "endpoint tcp": "ok",
        "endpoint path": "ok",
        "endpoint secret": "warn",
    }
    out = io.StringIO()
    assert print_checks(checks, out) == 0
    assert "all checks passed" in out.getvalue()
    assert "not verified" in out.getvalue()  # the secret: said plainly
    assert [r.method for r in backend.requests] == ["OPTIONS"]  # no reset was sent


def dry_run_backend(secret: str) -> Callable[[Received], Behaviour | None]:
    """A backend that supports the documented dry run (as examples/reference_backend.py)."""

    def choose(request: Received) -> Behaviour | None:
        if request.method == "OPTIONS":
            return Respond(204, {"x-reset-dry-run": "supported", "allow": "POST, OPTIONS"})
        if request.headers.get("x-reset-dry-run") == "1":
            return Respond(200 if request.headers.get("x-secret") == secret else 401)
        return Respond(500)  # a real reset: the check must never send one

    return choose


async def test_check_verifies_the_secret_with_the_dry_run(
    redis_server: RedisServer, backend: RecordingBackend
) -> None:
    backend.behave(dry_run_backend(SECRET))
    checks = await run_checks(config(redis_server, backend.url))
    assert states(checks)["endpoint secret"] == "ok", checks
    backend.behave(dry_run_backend("another-secret"))
    checks = await run_checks(config(redis_server, backend.url))
    assert states(checks)["endpoint secret"] == "fail"
    out = io.StringIO()
    assert print_checks(checks, out) == 1
    assert "RESET_SECRET" in out.getvalue()
    assert SECRET not in out.getvalue()
    assert all(
        r.headers.get("x-reset-dry-run") == "1" for r in backend.requests if r.method == "POST"
    )


async def test_check_fails_on_a_wrong_path(
    redis_server: RedisServer, backend: RecordingBackend
) -> None:
    backend.behave(lambda request: Respond(404))
    checks = await run_checks(config(redis_server, backend.url))
    assert states(checks)["endpoint path"] == "fail"
    out = io.StringIO()
    assert print_checks(checks, out) == 1
    assert "RESET_ENDPOINT_URL" in out.getvalue()
    assert [r.method for r in backend.requests] == ["OPTIONS"]


async def test_check_names_a_missing_redis_permission(
    redis_server: RedisServer, backend: RecordingBackend
) -> None:
    with redis_server.client() as c:
        major = int(str(c.info("server")["redis_version"]).split(".")[0])
        rule = acl_rule("c:*", Keys("c:*").namespace, 0, major) + " -scan"
        c.execute_command("ACL", "SETUSER", "weak", "on", ">pw", *rule.split())
    cfg = config(redis_server, backend.url, redis_username="weak", redis_password="pw")
    checks = await run_checks(cfg)
    assert states(checks)["permissions"] == "fail"
    out = io.StringIO()
    assert print_checks(checks, out) == 1
    assert "+scan" in out.getvalue()
    assert "ACL SETUSER" in out.getvalue()


async def test_without_pubsub_numsub_fast_takeover_is_off_and_said_so(
    redis_server: RedisServer, backend: RecordingBackend, caplog: pytest.LogCaptureFixture
) -> None:
    """PUBSUB NUMSUB is optional: `check` warns, the worker runs and says once at start
    that a dying leader is replaced only when its lease expires."""
    with redis_server.client() as c:
        major = int(str(c.info("server")["redis_version"]).split(".")[0])
        rule = acl_rule("c:*", Keys("c:*").namespace, 0, major).replace(" +pubsub|numsub", "")
        c.execute_command("ACL", "SETUSER", "nonumsub", "on", ">pw", *rule.split())
    cfg = config(redis_server, backend.url, redis_username="nonumsub", redis_password="pw")
    checks = await run_checks(cfg)
    assert states(checks)["permissions"] == "ok"
    assert states(checks)["takeover"] == "warn"
    out = io.StringIO()
    assert print_checks(checks, out) == 0
    assert "+pubsub|numsub" in out.getvalue()
    with trio.fail_after(15):
        async with leading(cfg):
            status = await run_status(config(redis_server, backend.url))
    [line] = [r.getMessage() for r in caplog.records if "fast takeover off" in r.getMessage()]
    assert "+pubsub|numsub" in line
    assert "LEASE_TTL_MS=1000" in line
    assert status["takeover"].startswith("at the lease's end (the leader runs without liveness")


async def test_an_eviction_policy_that_can_take_the_workers_keys_is_a_warning(
    redis_server: RedisServer, backend: RecordingBackend, caplog: pytest.LogCaptureFixture
) -> None:
    with redis_server.client() as c:
        c.config_set("maxmemory-policy", "allkeys-lru")
    checks = await run_checks(config(redis_server, backend.url))
    assert states(checks)["eviction"] == "warn"
    out = io.StringIO()
    assert print_checks(checks, out) == 0  # a warning, not a failure
    assert "allkeys-lru" in out.getvalue()
    assert "volatile-*" in out.getvalue()
    # ... and a WARNING at every takeover.
    caplog.set_level(logging.WARNING, logger="trio_counter_worker")
    with trio.fail_after(10):
        async with leading(config(redis_server, backend.url)):
            while not any(
                "maxmemory-policy is allkeys-lru" in r.getMessage() for r in caplog.records
            ):
                await trio.sleep(0.01)


async def test_check_reports_each_failure_with_a_hint(redis_server: RedisServer) -> None:
    with redis_server.client() as c:
        c.config_set("requirepass", "right-pass")
    try:
        url = f"http://127.0.0.1:{free_port()}/reset"
        checks = await run_checks(config(redis_server, url, redis_password="wrong-pass-XYZ"))
        assert states(checks)["redis"] == "fail"
        assert states(checks)["endpoint tcp"] == "fail"
        out = io.StringIO()
        assert print_checks(checks, out) == 1
        text = out.getvalue()
        assert "authentication failed" in text
        assert text.count("REDIS_PASSWORD") == 1  # the message says it; no second hint
        assert "RESET_ENDPOINT_URL" in text
        assert "wrong-pass-XYZ" not in text
        assert SECRET not in text
    finally:
        with redis_server.client(password="right-pass") as c:
            c.config_set("requirepass", "")


async def test_check_unresolvable_host_and_refused_config(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "r", extra_args=["--rename-command", "CONFIG", ""]) as server:
        checks = await run_checks(config(server, "https://no-such-host.invalid/reset"))
    assert states(checks)["notifications"] == "warn"  # cannot know: not a failure
    assert states(checks)["endpoint dns"] == "fail"
    out = io.StringIO()
    assert print_checks(checks, out) == 1
    assert "notify-keyspace-events" in out.getvalue()


async def test_status_shows_the_leader_and_its_work(
    redis_server: RedisServer, backend: RecordingBackend
) -> None:
    cfg = config(redis_server, backend.url)
    with trio.fail_after(15):
        async with leading(cfg):
            with redis_server.client() as c:
                c.set("c:later", 1, ex=600)
            while (status := await run_status(cfg))["watched_counters"] < 1:
                await trio.sleep(0.01)
    assert status["leader"] == "ops-1"
    assert isinstance(status["fencing_token"], int)
    assert status["fencing_token"] >= 1
    assert 0 < status["lease_ms_left"] <= 1000
    assert status["pending_resets"] == 0
    assert status["next_deadline"]["key"] == "c:later"
    assert 590_000 < status["next_deadline"]["in_ms"] <= 600_000
    assert set("Kg$x") <= set(status["notify_keyspace_events"])
    out = io.StringIO()
    print_status(status, False, out)
    assert "leader:            ops-1" in out.getvalue()
    assert "takeover:          fast: the leader's connection is watched" in out.getvalue()
    assert out.getvalue().startswith(f"server:            {status['server']}\n")
    assert status["server"].startswith(("Redis ", "Valkey "))


@pytest.mark.parametrize(
    ("info", "name"),
    [
        ({"redis_version": "7.0.15", "redis_mode": "standalone"}, "Redis 7.0.15"),
        (
            {"redis_version": "7.2.4", "valkey_version": "9.0.0", "server_name": "valkey"},
            "Valkey 9.0.0 (Redis 7.2.4 compatible)",
        ),
        ({}, "Redis ?"),
    ],
)
def test_the_server_is_named_exactly(info: dict[str, str], name: str) -> None:
    assert server_name(info) == name


async def test_check_names_the_server_and_warns_about_misnamed_settings(
    redis_server: RedisServer, backend: RecordingBackend
) -> None:
    cfg = attrs.evolve(config(redis_server, backend.url), notices=("a notice", "another"))
    checks = await run_checks(cfg)
    with redis_server.client() as client:
        info = client.info("server")
    redis = next(c for c in checks if c.name == "redis")
    assert redis.detail.endswith(f"answers ({server_name(info)})")
    assert [(c.state, c.detail) for c in checks if c.name == "setting names"] == [
        ("warn", "a notice"),
        ("warn", "another"),
    ]


def test_status_cli_json_and_exit_codes(redis_server: RedisServer, tmp_path: Path) -> None:
    env = {
        "REDIS_PORT": str(redis_server.port),
        "RESET_ENDPOINT_URL": "http://127.0.0.1:1/r",
        "RESET_SECRET": SECRET,
        "COUNTER_KEY": "c:*",
    }
    with redis_server.client() as c:
        c.hset(Keys("c:*").lease, mapping={"holder": "x#1", "replica": "web-7", "epoch": 12})
        c.pexpire(Keys("c:*").lease, 60_000)  # outlives a CLI start on a loaded machine
    result = run_cli(["status", "--json"], env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    status = json.loads(lines[0])
    assert status["leader"] == "web-7"
    assert status["fencing_token"] == 12
    assert SECRET not in result.stdout + result.stderr

    down = run_cli(["status"], {**env, "REDIS_PORT": str(free_port())}, cwd=tmp_path)
    assert down.returncode == 1
    assert "REDIS_PORT" in down.stderr
    with redis_server.client() as c:
        c.config_set("requirepass", "right-pass")
    try:
        denied = run_cli(["status"], {**env, "REDIS_PASSWORD": "wrong-XYZ"}, cwd=tmp_path)
    finally:
        with redis_server.client(password="right-pass") as c:
            c.config_set("requirepass", "")
    assert denied.returncode == 2, denied.stderr  # a bad setting, as the README says
    assert denied.stderr.count("\n") == 1
    assert "REDIS_PASSWORD" in denied.stderr
    assert "REDIS_HOST" not in denied.stderr  # no contradictory second hint
    assert "wrong-XYZ" not in denied.stderr
    (tmp_path / ".env").write_text("LEASE_TLL_MS=1000\n")
    typo = run_cli(["check"], env, cwd=tmp_path)
    assert (
        "[warn] setting names  '.env' sets 'LEASE_TLL_MS', which is no setting (did you "
        "mean LEASE_TTL_MS?); ignored" in typo.stdout
    )
    check = run_cli(["check"], env, cwd=tmp_path)
    assert check.returncode == 1  # nothing listens on port 1
    assert "[FAIL] endpoint tcp" in check.stdout
    assert SECRET not in check.stdout + check.stderr
