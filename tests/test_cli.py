"""The command line as an operator meets it: real ``python -m trio_counter_worker`` processes.

Policy: every child runs through ``run_cli`` or ``spawn_worker`` (host REDIS_*/RESET_*/...
variables stripped, an empty working directory unless a test gives one) and every wait
is bounded. A bad configuration, including credentials Redis refuses, ends with exit
code 2 and exactly one line on stderr; an unreachable Redis is not a configuration
error, the worker waits for it. Secret values never reach the output.

Each child costs ~0.3 s of interpreter start-up, so the bad-configuration cases (one
per row of ``tests.test_config.BAD_CASES``) are started together, once per module,
and each parametrized test checks its own result.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support.procs import SpawnWorker, WorkerProcess, clean_env, run_cli
from tests.support.redis_server import RedisServer, free_port
from tests.test_config import (
    BAD_CASES,
    ENDPOINT,
    REDIS_SECRET,
    SECRET,
    SECRETS,
    URL_SECRET,
    BadCase,
    bad_env,
)
from trio_counter_worker import __version__
from trio_counter_worker.config import SETTINGS

PREFIX = "trio-counter-worker: error:"
CLI_TIMEOUT = 15.0  # a run that should fail at once; generous for a loaded machine
WAIT = 30.0  # a worker start on a loaded machine (10 s ran out with 8 test processes)
AUTH_MESSAGE = "authentication failed"
RIGHT_PASSWORD = "right-pass"
WRONG_PASSWORD = "wrong-pass-XYZ-321"
ACL_PASSWORD = "bad-pass-XYZ"

# clean_env strips the REDIS_/RESET_/COUNTER_/LEASE_/REPLICA_ prefixes only: pin the
# other two settings so a developer's shell cannot change what these tests see.
PINNED = {"LOG_LEVEL": "INFO", "MAX_IN_FLIGHT": "32"}


def cli_env(env: Mapping[str, str]) -> dict[str, str]:
    return {**PINNED, **env}


def assert_config_failure(
    result: subprocess.CompletedProcess[str], *names: str, secrets: tuple[str, ...] = SECRETS
) -> str:
    """Exit 2, one ``PREFIX`` line on stderr containing every name, no traceback, no secret."""
    shown = f"exit={result.returncode}\nstdout={result.stdout!r}\nstderr={result.stderr!r}"
    assert result.returncode == 2, shown
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, shown
    line = lines[0]
    assert line.startswith(PREFIX), shown
    for name in names:
        assert name in line, shown
    for stream in (result.stdout, result.stderr):
        assert "Traceback" not in stream, shown
        for secret in secrets:
            assert secret not in stream, f"secret {secret!r} printed\n{shown}"
    return line


# --- bad configuration -----------------------------------------------------------


@pytest.fixture(scope="module")
def bad_config_runs() -> Iterator[dict[str, Future[subprocess.CompletedProcess[str]]]]:
    """Every BAD_CASES row run as ``run``, concurrently; each test reads its own result."""
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="bad-config") as pool:
        runs = {
            case.id: pool.submit(run_cli, ["run"], cli_env(bad_env(case)), CLI_TIMEOUT)
            for case in BAD_CASES
        }
        yield runs


@pytest.mark.parametrize("case", BAD_CASES, ids=[c.id for c in BAD_CASES])
def test_bad_config_exits_2_with_one_line(
    case: BadCase, bad_config_runs: dict[str, Future[subprocess.CompletedProcess[str]]]
) -> None:
    # run_cli's own timeout bounds this; the extra margin covers the queue ahead of it.
    result = bad_config_runs[case.id].result(timeout=CLI_TIMEOUT * len(BAD_CASES))
    assert_config_failure(result, case.variable)


def test_bad_config_without_command_runs_by_default() -> None:
    env = cli_env({"RESET_ENDPOINT_URL": ENDPOINT, "REDIS_PASSWORD": REDIS_SECRET})
    assert_config_failure(run_cli([], env, CLI_TIMEOUT), "RESET_SECRET")


def test_a_bad_setting_exits_before_trio_redis_and_httpx_are_imported(tmp_path: Path) -> None:
    """A typo costs ~0.1 s, not the ~0.5 s of loading the worker (and the suite runs
    this path a hundred times)."""
    probe = (
        "import sys\n"
        "from trio_counter_worker.cli import main\n"
        "code = main(['run'])\n"
        "loaded = sorted({'trio', 'redis', 'httpx'} & set(sys.modules))\n"
        "print(code, loaded)\n"
    )
    env = clean_env({"RESET_ENDPOINT_URL": ENDPOINT})  # no RESET_SECRET: exit 2
    done = subprocess.run(
        [sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert done.stdout.strip() == "2 []", (done.stdout, done.stderr)
    assert "RESET_SECRET" in done.stderr


# --- help and version --------------------------------------------------------------


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"]], ids=["top", "run"])
def test_help_lists_every_setting(args: list[str]) -> None:
    result = run_cli(args, {}, CLI_TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    missing = [s.name for s in SETTINGS if s.name not in result.stdout]
    assert not missing, f"not in {' '.join(args)}:\n{result.stdout}"


def test_version() -> None:
    result = run_cli(["--version"], {}, CLI_TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"trio-counter-worker {__version__}"


# --- credentials Redis refuses ------------------------------------------------------


@pytest.fixture
def locked_redis(redis_server: RedisServer) -> RedisServer:
    """A server whose default user needs RIGHT_PASSWORD.

    Set at run time rather than with ``--requirepass``: RedisServer's readiness probe
    is an unauthenticated PING, which such a server answers with -NOAUTH, so start()
    would wait out its 10 s deadline.
    """
    with redis_server.client() as client:
        client.config_set("requirepass", RIGHT_PASSWORD)
    return redis_server


def redis_env(server: RedisServer, **extra: str) -> dict[str, str]:
    return cli_env({
        "RESET_ENDPOINT_URL": ENDPOINT,
        "RESET_SECRET": SECRET,
        "REDIS_PORT": str(server.port),
        **extra,
    })  # fmt: skip


@pytest.mark.parametrize("password", [WRONG_PASSWORD, None], ids=["wrong-password", "no-password"])
def test_refused_password_exits_2(locked_redis: RedisServer, password: str | None) -> None:
    extra = {} if password is None else {"REDIS_PASSWORD": password}
    result = run_cli(["run"], redis_env(locked_redis, **extra), CLI_TIMEOUT)
    assert_config_failure(
        result, AUTH_MESSAGE, "REDIS_PASSWORD", secrets=(*SECRETS, WRONG_PASSWORD, RIGHT_PASSWORD)
    )


def test_unknown_acl_user_exits_2(redis_server: RedisServer) -> None:
    url = f"redis://nobody:{ACL_PASSWORD}@127.0.0.1:{redis_server.port}/0"
    # Without REDIS_PORT, which REDIS_URL would override with a warning (a second line).
    env = {k: v for k, v in redis_env(redis_server, REDIS_URL=url).items() if k != "REDIS_PORT"}
    result = run_cli(["run"], env, CLI_TIMEOUT)
    assert_config_failure(result, AUTH_MESSAGE, "REDIS_URL", secrets=(*SECRETS, ACL_PASSWORD))


def wait_until_exit_or_output(worker: WorkerProcess, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while worker.alive and text not in worker.output():
        if time.monotonic() >= deadline:
            raise AssertionError(f"{worker!r}: neither exited nor printed {text!r}")
        time.sleep(0.05)


def test_password_for_server_without_one_exits_2(
    redis_server: RedisServer, spawn_worker: SpawnWorker
) -> None:
    # A worker that wrongly starts runs forever: stop watching once it says so.
    worker = spawn_worker(redis_env(redis_server, REDIS_PASSWORD=WRONG_PASSWORD), "nopass")
    wait_until_exit_or_output(worker, "started", WAIT)
    assert not worker.alive, f"the worker started:\n{worker.output()}"
    output = worker.output()
    assert worker.returncode == 2, output
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    assert lines[0].startswith(PREFIX), output
    assert AUTH_MESSAGE in lines[0], output
    assert WRONG_PASSWORD not in output


# --- unreachable Redis ----------------------------------------------------------------


def wait_for_count(worker: WorkerProcess, text: str, count: int, timeout: float) -> str:
    """Poll the log until ``text`` occurs ``count`` times; fail if the worker exits first."""
    deadline = time.monotonic() + timeout
    while True:
        output = worker.wait_for_output(text, timeout=max(0.0, deadline - time.monotonic()))
        if output.count(text) >= count:
            return output
        if time.monotonic() >= deadline:
            raise AssertionError(f"{text!r} printed fewer than {count} times:\n{output}")
        time.sleep(0.05)


def test_unreachable_redis_is_waited_for_not_a_config_error(spawn_worker: SpawnWorker) -> None:
    env = cli_env({
        "RESET_ENDPOINT_URL": ENDPOINT,
        "RESET_SECRET": SECRET,
        "REDIS_PASSWORD": REDIS_SECRET,
        "REDIS_PORT": str(free_port()),  # nothing listens there
        "LEASE_TLL_MS": "1000",  # a typo: warned about, not fatal
    })  # fmt: skip
    worker = spawn_worker(env, "unreachable")
    worker.wait_for_output(
        "WARNING trio_counter_worker: environment variable 'LEASE_TLL_MS' is no setting "
        "(did you mean LEASE_TTL_MS?); ignored",
        timeout=WAIT,
    )
    worker.wait_for_output("unreachable", timeout=WAIT)
    assert worker.alive, worker.output()

    worker.terminate()
    assert worker.wait(timeout=WAIT) == 0
    output = worker.output()
    assert "received SIGTERM" in output
    # one WARNING for the outage, not one per retry (tests/test_outage.py counts them)
    assert output.count("Redis unavailable (") == 1, output
    assert "(check REDIS_HOST/REDIS_PORT or REDIS_URL); retrying with backoff" in output
    assert PREFIX not in output
    assert "Traceback" not in output
    for secret in SECRETS:
        assert secret not in output


# --- .env ------------------------------------------------------------------------------


def test_dotenv_in_working_directory_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(f"RESET_ENDPOINT_URL=ftp://bad\nRESET_SECRET={SECRET}\n")
    result = run_cli(["run"], cli_env({"REDIS_PASSWORD": REDIS_SECRET}), CLI_TIMEOUT, tmp_path)
    line = assert_config_failure(result, "RESET_ENDPOINT_URL")
    assert "ftp://bad" in line  # the value came from the file


def test_environment_wins_over_dotenv(tmp_path: Path) -> None:
    # Both values are bad, so the error line shows which one was used.
    (tmp_path / ".env").write_text("RESET_ENDPOINT_URL=ftp://from-dotenv\n")
    env = cli_env({"RESET_ENDPOINT_URL": "gopher://from-env", "RESET_SECRET": SECRET})
    line = assert_config_failure(run_cli(["run"], env, CLI_TIMEOUT, tmp_path), "RESET_ENDPOINT_URL")
    assert "gopher://from-env" in line
    assert "from-dotenv" not in line


def test_env_file_option(tmp_path: Path) -> None:
    (tmp_path / "prod.env").write_text(f"REDIS_URL=redis://u:{URL_SECRET}@h:notaport\n")
    env = cli_env({"RESET_ENDPOINT_URL": ENDPOINT, "RESET_SECRET": SECRET})
    result = run_cli(["--env-file", str(tmp_path / "prod.env"), "run"], env, CLI_TIMEOUT)
    assert_config_failure(result, "REDIS_URL")


def test_missing_env_file_option_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "prod.env"
    env = cli_env({"RESET_ENDPOINT_URL": ENDPOINT, "RESET_SECRET": SECRET})
    line = assert_config_failure(
        run_cli(["--env-file", str(missing), "run"], env, CLI_TIMEOUT), "--env-file"
    )
    assert str(missing) in line


def test_dotenv_not_utf8_exits_2(tmp_path: Path) -> None:
    latin1 = f"RESET_SECRET={SECRET}\nCOUNTER_KEY=caf\xe9\n".encode("latin-1")
    (tmp_path / ".env").write_bytes(latin1)
    env = cli_env({"RESET_ENDPOINT_URL": ENDPOINT})
    line = assert_config_failure(run_cli(["run"], env, CLI_TIMEOUT, tmp_path), ".env", "UTF-8")
    assert str(tmp_path) in line


def test_missing_setting_without_dotenv_says_where_it_looked(tmp_path: Path) -> None:
    env = cli_env({"RESET_SECRET": SECRET})
    line = assert_config_failure(run_cli(["run"], env, CLI_TIMEOUT, tmp_path), "RESET_ENDPOINT_URL")
    assert f"no .env file in {tmp_path}; pass --env-file" in line


# --- settings only the running worker can check -------------------------------------------


def test_health_port_in_use_exits_2(redis_server: RedisServer) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = redis_env(redis_server, HEALTH_HOST="127.0.0.1", HEALTH_PORT=str(port))
        line = assert_config_failure(run_cli(["run"], env, CLI_TIMEOUT), "HEALTH_PORT")
    assert f"HEALTH_PORT {port} is already in use" in line
    assert "unset HEALTH_PORT" in line


def test_health_host_that_does_not_resolve_exits_2(redis_server: RedisServer) -> None:
    env = redis_env(redis_server, HEALTH_HOST="health.invalid", HEALTH_PORT="0")
    line = assert_config_failure(run_cli(["run"], env, CLI_TIMEOUT), "HEALTH_HOST")
    assert "'health.invalid' does not resolve" in line


def test_redis_url_override_is_logged_once(
    redis_server: RedisServer, spawn_worker: SpawnWorker
) -> None:
    env = redis_env(
        redis_server,
        REDIS_URL=f"redis://127.0.0.1:{redis_server.port}/0",
        REDIS_PASSWORD=REDIS_SECRET,
        REDIS_HOST="ignored.example",
    )
    worker = spawn_worker(env, "override")
    output = worker.wait_for_output("started", timeout=WAIT)
    worker.terminate()
    assert worker.wait(timeout=WAIT) == 0
    warning = "REDIS_URL overrides REDIS_HOST, REDIS_PORT, REDIS_PASSWORD: their values are ignored"
    assert output.count(warning) == 1, output
    assert output.index(warning) < output.index("started")
    assert REDIS_SECRET not in worker.output()


# --- status needs Redis only ------------------------------------------------------------


def test_status_needs_no_endpoint_or_secret(redis_server: RedisServer) -> None:
    env = cli_env({"REDIS_PORT": str(redis_server.port)})
    result = run_cli(["status", "--json"], env, CLI_TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert json.loads(result.stdout)["leader"] is None


def test_status_still_checks_redis_settings() -> None:
    assert_config_failure(
        run_cli(["status"], cli_env({"REDIS_PORT": "x"}), CLI_TIMEOUT), "REDIS_PORT"
    )


def test_demo_help_gives_units() -> None:
    result = run_cli(["demo", "--help"], {}, CLI_TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert "--replicas N" in result.stdout
    assert "in seconds" in result.stdout
