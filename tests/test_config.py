"""Settings: ``Config.from_env`` and ``Config(...)`` as plain synchronous tests.

Every ``from_env`` call names its ``env_file`` (or None), so a stray ``.env`` in the
directory pytest runs from can never leak in. Secret values are distinctive strings,
so "the secret is not in the message" cannot pass by accident.

``BAD_CASES`` is also imported by ``test_cli.py``: the command line must reject exactly
the same values, with the same variable named, in one line on stderr.
"""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from trio_counter_worker.config import SETTINGS, Config
from trio_counter_worker.errors import ConfigError, WorkerError

SECRET = "sekrit-XYZ-123"  # RESET_SECRET
REDIS_SECRET = "redis-sekrit-XYZ-456"  # REDIS_PASSWORD
URL_SECRET = "url-sekrit-XYZ-789"  # the password inside REDIS_URL
SIGNING_SECRET = "signing-sekrit-XYZ-000"  # RESET_SIGNING_SECRET
SECRETS = (SECRET, REDIS_SECRET, URL_SECRET, SIGNING_SECRET)

ENDPOINT = "https://backend.example/api/reset"
MINIMAL = {"RESET_ENDPOINT_URL": ENDPOINT, "RESET_SECRET": SECRET}
# MINIMAL plus a Redis password: a bad value elsewhere must not print either secret.
WITH_SECRETS = {**MINIMAL, "REDIS_PASSWORD": REDIS_SECRET, "RESET_SIGNING_SECRET": SIGNING_SECRET}


class BadCase(NamedTuple):
    """Settings laid over ``WITH_SECRETS`` (None removes one) that must be rejected."""

    id: str
    overrides: Mapping[str, str | None]
    variable: str  # the name the error message must contain


BAD_CASES: tuple[BadCase, ...] = (
    BadCase("endpoint-missing", {"RESET_ENDPOINT_URL": None}, "RESET_ENDPOINT_URL"),
    BadCase("endpoint-blank", {"RESET_ENDPOINT_URL": "   "}, "RESET_ENDPOINT_URL"),
    BadCase("secret-missing", {"RESET_SECRET": None}, "RESET_SECRET"),
    BadCase("endpoint-ftp", {"RESET_ENDPOINT_URL": "ftp://x"}, "RESET_ENDPOINT_URL"),
    BadCase("endpoint-not-a-url", {"RESET_ENDPOINT_URL": "not a url"}, "RESET_ENDPOINT_URL"),
    BadCase("port-abc", {"REDIS_PORT": "abc"}, "REDIS_PORT"),
    BadCase("port-0", {"REDIS_PORT": "0"}, "REDIS_PORT"),
    BadCase("port-70000", {"REDIS_PORT": "70000"}, "REDIS_PORT"),
    BadCase("lease-x", {"LEASE_TTL_MS": "x"}, "LEASE_TTL_MS"),
    BadCase("lease-100", {"LEASE_TTL_MS": "100"}, "LEASE_TTL_MS"),
    BadCase("lease-6000", {"LEASE_TTL_MS": "6000"}, "LEASE_TTL_MS"),
    BadCase("timeout-0", {"RESET_TIMEOUT_MS": "0"}, "RESET_TIMEOUT_MS"),
    BadCase("timeout-15000", {"RESET_TIMEOUT_MS": "15000"}, "RESET_TIMEOUT_MS"),
    BadCase("db-negative", {"REDIS_DB": "-1"}, "REDIS_DB"),
    BadCase("in-flight-0", {"MAX_IN_FLIGHT": "0"}, "MAX_IN_FLIGHT"),
    BadCase("replica-space", {"REPLICA_ID": "my replica"}, "REPLICA_ID"),
    BadCase("log-level-loud", {"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
    BadCase("redis-url-http", {"REDIS_URL": f"http://nobody:{URL_SECRET}@x"}, "REDIS_URL"),
    BadCase(
        "redis-url-bad-port",
        {"REDIS_URL": f"redis://nobody:{URL_SECRET}@h:notaport"},
        "REDIS_URL",
    ),
    BadCase("redis-url-bad-db", {"REDIS_URL": f"redis://nobody:{URL_SECRET}@h/db1"}, "REDIS_URL"),
    BadCase(
        "insecure-http",
        {"RESET_ENDPOINT_URL": "http://backend.example/reset"},
        "ALLOW_INSECURE_HTTP",
    ),
    BadCase("allow-insecure-maybe", {"ALLOW_INSECURE_HTTP": "maybe"}, "ALLOW_INSECURE_HTTP"),
    BadCase("log-format-xml", {"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
    BadCase("health-port-big", {"HEALTH_PORT": "70000"}, "HEALTH_PORT"),
    BadCase("sentinels-bad", {"REDIS_SENTINELS": "h1:26379,h2",
                              "REDIS_SENTINEL_MASTER": "m"}, "REDIS_SENTINELS"),
    BadCase("sentinels-no-master", {"REDIS_SENTINELS": "h1:26379"}, "REDIS_SENTINEL_MASTER"),
    BadCase("cluster-bad", {"REDIS_CLUSTER_NODES": "h1"}, "REDIS_CLUSTER_NODES"),
    BadCase("cluster-db", {"REDIS_CLUSTER_NODES": "h1:7000", "REDIS_DB": "2"}, "REDIS_DB"),
    BadCase("ca-file-missing", {"REDIS_CA_FILE": "/nonexistent/ca.pem"}, "REDIS_CA_FILE"),
)


def bad_env(case: BadCase) -> dict[str, str]:
    """The environment of ``case``: ``WITH_SECRETS`` with its overrides applied."""
    env: dict[str, str | None] = {**WITH_SECRETS, **case.overrides}
    return {k: v for k, v in env.items() if v is not None}


def load(env: Mapping[str, str], env_file: str | Path | None = None) -> Config:
    return Config.from_env(env, env_file=env_file)


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"secret {secret!r} leaked into: {text!r}"


# --- defaults and names --------------------------------------------------------


def test_defaults() -> None:
    config = load(MINIMAL)
    assert config.reset_endpoint_url == ENDPOINT
    assert config.reset_secret == SECRET
    assert config.counter_key == "contador_reset"
    assert config.redis_host == "127.0.0.1"
    assert config.redis_port == 6379
    assert config.redis_db == 0
    assert config.redis_username is None
    assert config.redis_password is None
    assert config.redis_tls is False
    assert config.lease_ttl_ms == 3000
    assert config.lease_ttl == 3.0
    assert config.reset_timeout_ms == 5000
    assert config.reset_timeout == 5.0
    assert config.max_in_flight == 32
    assert config.log_level == "INFO"
    assert config.replica_id == f"{socket.gethostname()}-{os.getpid()}"
    assert config.namespace == "tcw:{contador_reset}"
    assert config.redis_location == "redis://127.0.0.1:6379/0"
    # Building the class directly gives the same defaults as the loader.
    assert Config(reset_endpoint_url=ENDPOINT, reset_secret=SECRET) == config


def test_defaults_documented_in_settings_are_the_real_ones() -> None:
    """--help shows SETTINGS' defaults: they must be what an empty environment gives."""
    config = load(MINIMAL)
    documented = [s for s in SETTINGS if s.default is not None]
    assert documented
    for setting in documented:
        assert str(getattr(config, setting.name.lower())) == setting.default, setting.name


# Every setting except REDIS_URL (tested on its own below), set to a non-default value.
NAMED_VALUES: list[tuple[str, str, str, Any]] = [
    ("RESET_ENDPOINT_URL", "http://127.0.0.1:8080/reset", "reset_endpoint_url",
     "http://127.0.0.1:8080/reset"),
    ("RESET_SECRET", "another-secret", "reset_secret", "another-secret"),
    ("COUNTER_KEY", "counter:*", "counter_key", "counter:*"),
    ("REDIS_HOST", "redis.internal", "redis_host", "redis.internal"),
    ("REDIS_PORT", "6380", "redis_port", 6380),
    ("REDIS_PASSWORD", REDIS_SECRET, "redis_password", REDIS_SECRET),
    ("REDIS_DB", "3", "redis_db", 3),
    ("LEASE_TTL_MS", "1500", "lease_ttl_ms", 1500),
    ("REPLICA_ID", "replica-a", "replica_id", "replica-a"),
    ("RESET_TIMEOUT_MS", "2500", "reset_timeout_ms", 2500),
    ("MAX_IN_FLIGHT", "7", "max_in_flight", 7),
    ("LOG_LEVEL", "WARNING", "log_level", "WARNING"),
    ("LOG_FORMAT", "json", "log_format", "json"),
    ("RESET_SIGNING_SECRET", SIGNING_SECRET, "reset_signing_secret", SIGNING_SECRET),
    ("ALLOW_INSECURE_HTTP", "1", "allow_insecure_http", True),
    ("REDIS_CA_FILE", __file__, "redis_ca_file", __file__),
    ("HEALTH_PORT", "8080", "health_port", 8080),
    ("REDIS_SENTINEL_PASSWORD", "sentinel-pass", "redis_sentinel_password", "sentinel-pass"),
    ("HEALTH_HOST", "127.0.0.1", "health_host", "127.0.0.1"),
]  # fmt: skip


def test_every_setting_is_covered_here() -> None:
    """A new setting must get a row in NAMED_VALUES (REDIS_URL and the Sentinel pair have
    their own tests)."""
    own_tests = {"REDIS_URL", "REDIS_SENTINELS", "REDIS_SENTINEL_MASTER", "REDIS_CLUSTER_NODES"}
    assert {name for name, *_ in NAMED_VALUES} | own_tests == {s.name for s in SETTINGS}


@pytest.mark.parametrize(("name", "raw", "attribute", "expected"), NAMED_VALUES)
def test_variable_names(name: str, raw: str, attribute: str, expected: Any) -> None:
    config = load({**MINIMAL, name: raw})
    assert getattr(config, attribute) == expected


def test_values_are_stripped_and_blank_means_default() -> None:
    config = load({
        **MINIMAL,
        "REDIS_PORT": " 6381 ",
        "REDIS_HOST": "   ",
        "COUNTER_KEY": "",
        "LOG_LEVEL": "debug",
    })  # fmt: skip
    assert config.redis_port == 6381
    assert config.redis_host == "127.0.0.1"
    assert config.counter_key == "contador_reset"
    assert config.log_level == "DEBUG"  # case-insensitive


# --- REDIS_URL -------------------------------------------------------------------

# REDIS_* set to other values: REDIS_URL must override every one of them.
REDIS_PARTS = {
    "REDIS_HOST": "ignored.example",
    "REDIS_PORT": "7000",
    "REDIS_DB": "9",
    "REDIS_PASSWORD": REDIS_SECRET,
}


@pytest.mark.parametrize(
    ("url", "expected", "location"),
    [
        pytest.param(
            f"redis://user:{URL_SECRET}@redis.example:6390/4",
            ("redis.example", 6390, 4, "user", URL_SECRET, False),
            "redis://redis.example:6390/4",
            id="redis-full",
        ),
        pytest.param(
            "rediss://:p%40ss%2Fw@secure.example/2",
            ("secure.example", 6379, 2, None, "p@ss/w", True),
            "rediss://secure.example:6379/2",
            id="rediss-percent-encoded",
        ),
        pytest.param(
            "redis://only-host",
            ("only-host", 6379, 0, None, None, False),
            "redis://only-host:6379/0",
            id="host-only-drops-REDIS_PASSWORD",
        ),
        pytest.param(
            "redis://worker@10.1.2.3:6400/",
            ("10.1.2.3", 6400, 0, "worker", None, False),
            "redis://10.1.2.3:6400/0",
            id="user-without-password",
        ),
    ],
)
def test_redis_url_overrides_redis_settings(
    url: str, expected: tuple[str, int, int, str | None, str | None, bool], location: str
) -> None:
    config = load({**MINIMAL, **REDIS_PARTS, "REDIS_URL": url})
    got = (
        config.redis_host,
        config.redis_port,
        config.redis_db,
        config.redis_username,
        config.redis_password,
        config.redis_tls,
    )
    assert got == expected
    assert config.redis_location == location  # for logs: never the credentials


def test_redis_url_port_zero_is_rejected() -> None:
    with pytest.raises(ConfigError, match="REDIS_URL"):
        load({**MINIMAL, "REDIS_URL": f"redis://nobody:{URL_SECRET}@h:0/0"})


def test_redis_url_db_out_of_range_names_redis_url() -> None:
    with pytest.raises(ConfigError) as info:
        load({**MINIMAL, "REDIS_URL": f"redis://nobody:{URL_SECRET}@h/2000000"})
    assert "REDIS_URL" in str(info.value)
    assert_no_secret(str(info.value))


# --- .env --------------------------------------------------------------------------


def write_env_file(path: Path, **values: str) -> Path:
    path.write_text("".join(f"{name}={value}\n" for name, value in values.items()))
    return path


def test_env_file_is_read(tmp_path: Path) -> None:
    env_file = tmp_path / "settings.env"
    env_file.write_text(
        "# comments and quotes are .env syntax\n"
        f"RESET_ENDPOINT_URL={ENDPOINT}\n"
        f'RESET_SECRET="{SECRET}"\n'
        "REDIS_PORT=7001\n"
        "export COUNTER_KEY='counter:*'\n"
    )
    config = load({}, env_file=env_file)
    assert config.reset_endpoint_url == ENDPOINT
    assert config.reset_secret == SECRET
    assert config.redis_port == 7001
    assert config.counter_key == "counter:*"
    assert load({}, env_file=str(env_file)) == config  # a str path works too


def test_environment_wins_over_env_file(tmp_path: Path) -> None:
    env_file = write_env_file(
        tmp_path / ".env",
        RESET_ENDPOINT_URL="ftp://bad-from-dotenv",
        RESET_SECRET="dotenv-secret",
        REDIS_PORT="7001",
        REDIS_DB="5",
    )
    config = load({**MINIMAL, "REDIS_PORT": "7002"}, env_file=env_file)
    assert config.reset_endpoint_url == ENDPOINT  # the file's bad value is never validated
    assert config.reset_secret == SECRET
    assert config.redis_port == 7002
    assert config.redis_db == 5  # not in the environment: the file's value


def test_bad_value_in_env_file_is_named_without_secrets(tmp_path: Path) -> None:
    env_file = write_env_file(
        tmp_path / ".env", RESET_SECRET=SECRET, REDIS_PASSWORD=REDIS_SECRET, LEASE_TTL_MS="9"
    )
    with pytest.raises(ConfigError, match="LEASE_TTL_MS") as info:
        load({"RESET_ENDPOINT_URL": ENDPOINT}, env_file=env_file)
    assert_no_secret(str(info.value))


@pytest.mark.parametrize("env_file", ["missing", None], ids=["missing-file", "no-file"])
def test_env_file_missing_or_none_is_fine(tmp_path: Path, env_file: str | None) -> None:
    path = None if env_file is None else tmp_path / "does-not-exist.env"
    assert load(MINIMAL, env_file=path).reset_endpoint_url == ENDPOINT


def test_defaults_read_dotenv_in_cwd_and_os_environ(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for setting in SETTINGS:
        monkeypatch.delenv(setting.name, raising=False)
    monkeypatch.chdir(tmp_path)
    write_env_file(tmp_path / ".env", RESET_ENDPOINT_URL=ENDPOINT, REDIS_PORT="7001")
    monkeypatch.setenv("RESET_SECRET", SECRET)
    monkeypatch.setenv("REDIS_PORT", "7002")
    config = Config.from_env()
    assert (config.reset_endpoint_url, config.reset_secret) == (ENDPOINT, SECRET)
    assert config.redis_port == 7002


# --- invalid values ---------------------------------------------------------------


@pytest.mark.parametrize("case", BAD_CASES, ids=[c.id for c in BAD_CASES])
def test_invalid_value_is_a_config_error_naming_the_variable(case: BadCase) -> None:
    with pytest.raises(ConfigError) as info:
        load(bad_env(case))
    message = str(info.value)
    assert case.variable in message
    assert isinstance(info.value, WorkerError)
    # The whole printed traceback, chained exceptions included, holds no secret.
    assert_no_secret("".join(traceback.format_exception(info.value)))


@pytest.mark.parametrize(
    ("kwargs", "variable"),
    [
        ({"reset_endpoint_url": "ftp://x"}, "RESET_ENDPOINT_URL"),
        ({"reset_endpoint_url": "http://"}, "RESET_ENDPOINT_URL"),
        ({"reset_secret": " "}, "RESET_SECRET"),
        ({"counter_key": ""}, "COUNTER_KEY"),
        ({"redis_host": ""}, "REDIS_HOST"),
        ({"redis_port": 0}, "REDIS_PORT"),
        ({"redis_port": 65536}, "REDIS_PORT"),
        ({"redis_db": -1}, "REDIS_DB"),
        ({"lease_ttl_ms": 499}, "LEASE_TTL_MS"),
        ({"lease_ttl_ms": 5001}, "LEASE_TTL_MS"),
        ({"reset_timeout_ms": 99}, "RESET_TIMEOUT_MS"),
        ({"reset_timeout_ms": 15000}, "RESET_TIMEOUT_MS"),
        ({"max_in_flight": 1001}, "MAX_IN_FLIGHT"),
        ({"replica_id": ""}, "REPLICA_ID"),
        ({"replica_id": "x" * 129}, "REPLICA_ID"),
        ({"replica_id": "tab\there"}, "REPLICA_ID"),
        ({"log_level": "info"}, "LOG_LEVEL"),  # the class takes the canonical form only
    ],
)
def test_direct_construction_validates(kwargs: dict[str, Any], variable: str) -> None:
    base: dict[str, Any] = {
        "reset_endpoint_url": ENDPOINT,
        "reset_secret": SECRET,
        "redis_password": REDIS_SECRET,
    }
    with pytest.raises(ConfigError, match=variable) as info:
        Config(**{**base, **kwargs})
    assert_no_secret(str(info.value))


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("REDIS_PORT", "1"),
        ("REDIS_PORT", "65535"),
        ("REDIS_DB", "0"),
        ("LEASE_TTL_MS", "500"),
        ("LEASE_TTL_MS", "5000"),
        ("RESET_TIMEOUT_MS", "100"),
        ("RESET_TIMEOUT_MS", "14999"),
        ("MAX_IN_FLIGHT", "1"),
        ("MAX_IN_FLIGHT", "1000"),
        ("REPLICA_ID", "r" * 128),
        ("RESET_ENDPOINT_URL", "http://localhost/reset"),
        ("RESET_ENDPOINT_URL", "https://[::1]:8443/reset?x=1"),
    ],
)
def test_boundary_values_are_accepted(name: str, value: str) -> None:
    load({**MINIMAL, name: value})


# --- secrets ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "env",
    [
        pytest.param(WITH_SECRETS, id="REDIS_PASSWORD"),
        pytest.param(
            {**WITH_SECRETS, "REDIS_URL": f"rediss://worker:{URL_SECRET}@redis.example:6390/1"},
            id="REDIS_URL",
        ),
    ],
)
def test_secrets_not_in_repr(env: dict[str, str]) -> None:
    config = load(env)
    assert config.reset_secret == SECRET  # still there, just not shown
    assert config.redis_password in (REDIS_SECRET, URL_SECRET)
    assert_no_secret(repr(config))
    assert_no_secret(str(config))


def test_secrets_not_in_repr_of_direct_construction() -> None:
    config = Config(reset_endpoint_url=ENDPOINT, reset_secret=SECRET, redis_password=REDIS_SECRET)
    assert_no_secret(repr(config))


def test_sentinel_settings() -> None:
    config = load({**MINIMAL, "REDIS_SENTINELS": "s1:26379, [::1]:26380",
                   "REDIS_SENTINEL_MASTER": "mymaster"})
    assert config.redis_sentinels == (("s1", 26379), ("::1", 26380))
    assert config.redis_sentinel_master == "mymaster"
    assert config.redis_location == "sentinel://s1:26379,::1:26380/mymaster/0"


def test_cluster_settings() -> None:
    config = load({**MINIMAL, "REDIS_CLUSTER_NODES": "n1:7000,n2:7001"})
    assert config.redis_cluster_nodes == (("n1", 7000), ("n2", 7001))
    assert config.redis_location == "redis-cluster://n1:7000,n2:7001"
    with pytest.raises(ConfigError, match="exclude each other"):
        load({**MINIMAL, "REDIS_CLUSTER_NODES": "n1:7000", "REDIS_SENTINELS": "s:1",
              "REDIS_SENTINEL_MASTER": "m"})
