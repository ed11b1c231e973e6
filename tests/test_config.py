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

import certifi
import pytest

from trio_counter_worker.config import OWN_KEY_PREFIX, SETTINGS, Config
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
    BadCase("takeover-x", {"TAKEOVER_CHECK_MS": "1001"}, "TAKEOVER_CHECK_MS"),
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
        {"RESET_ENDPOINT_URL": "http://192.0.2.10/reset"},  # TEST-NET-1: no DNS involved
        "ALLOW_INSECURE_HTTP",
    ),
    # Each used to escape as a ValueError from urlsplit: a traceback and exit 1.
    BadCase(
        "endpoint-port-99999",
        {"RESET_ENDPOINT_URL": "http://127.0.0.1:99999/x"},
        "RESET_ENDPOINT_URL",
    ),
    BadCase(
        "endpoint-port-3OOO",
        {"RESET_ENDPOINT_URL": "http://127.0.0.1:3OOO/x"},
        "RESET_ENDPOINT_URL",
    ),
    BadCase(
        "endpoint-port-0", {"RESET_ENDPOINT_URL": "https://h.example:0/x"}, "RESET_ENDPOINT_URL"
    ),
    BadCase("endpoint-bracket", {"RESET_ENDPOINT_URL": "http://[::1/x"}, "RESET_ENDPOINT_URL"),
    BadCase(
        "endpoint-bracket-not-ip", {"RESET_ENDPOINT_URL": "https://[abc]/x"}, "RESET_ENDPOINT_URL"
    ),
    BadCase(
        "endpoint-label-too-long",
        {"RESET_ENDPOINT_URL": f"https://{'a' * 64}.example/"},
        "RESET_ENDPOINT_URL",
    ),
    BadCase(
        "endpoint-control-char",
        {"RESET_ENDPOINT_URL": "https://h.example/\x01"},
        "RESET_ENDPOINT_URL",
    ),
    # .invalid never resolves (RFC 6761), whatever the resolver's search domains.
    BadCase(
        "endpoint-unresolvable",
        {"RESET_ENDPOINT_URL": "http://localhsot.invalid/x"},
        "RESET_ENDPOINT_URL",
    ),
    # Each used to pass, then fail on every request (UnicodeEncodeError, invalid header).
    BadCase("secret-non-ascii", {"RESET_SECRET": "sécrèt-€"}, "RESET_SECRET"),
    BadCase("secret-newline", {"RESET_SECRET": "sekrit\nXYZ"}, "RESET_SECRET"),
    BadCase("secret-space", {"RESET_SECRET": "sekrit XYZ"}, "RESET_SECRET"),
    BadCase(
        "signing-secret-undecodable",
        {"RESET_SIGNING_SECRET": "sekrit-\udcff"},
        "RESET_SIGNING_SECRET",
    ),
    BadCase("counter-key-star", {"COUNTER_KEY": "*"}, "COUNTER_KEY"),
    BadCase("counter-key-t-star", {"COUNTER_KEY": "t*"}, "COUNTER_KEY"),
    BadCase("counter-key-own-prefix", {"COUNTER_KEY": "tcw:*"}, "COUNTER_KEY"),
    BadCase("counter-key-question", {"COUNTER_KEY": "?cw:{x}"}, "COUNTER_KEY"),
    BadCase("counter-key-class", {"COUNTER_KEY": "[t]cw:*"}, "COUNTER_KEY"),
    BadCase("port-superscript", {"REDIS_PORT": "²"}, "REDIS_PORT"),
    BadCase("redis-url-db-superscript", {"REDIS_URL": f"redis://u:{URL_SECRET}@h/²"}, "REDIS_URL"),
    BadCase("redis-url-bad-host", {"REDIS_URL": f"redis://u:{URL_SECRET}@a..b/0"}, "REDIS_URL"),
    BadCase(
        "sentinel-port-superscript",
        {"REDIS_SENTINELS": "h:²", "REDIS_SENTINEL_MASTER": "m"},
        "REDIS_SENTINELS",
    ),
    BadCase("redis-host-space", {"REDIS_HOST": "redis host"}, "REDIS_HOST"),
    BadCase("health-host-space", {"HEALTH_HOST": "0.0.0.0 8080"}, "HEALTH_HOST"),
    BadCase("ca-file-not-pem", {"REDIS_CA_FILE": __file__}, "REDIS_CA_FILE"),
    BadCase("allow-insecure-maybe", {"ALLOW_INSECURE_HTTP": "maybe"}, "ALLOW_INSECURE_HTTP"),
    BadCase("log-format-xml", {"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
    BadCase("log-resets-every", {"LOG_RESETS": "every"}, "LOG_RESETS"),
    BadCase("health-port-big", {"HEALTH_PORT": "70000"}, "HEALTH_PORT"),
    BadCase(
        "sentinels-bad",
        {"REDIS_SENTINELS": "h1:26379,h2", "REDIS_SENTINEL_MASTER": "m"},
        "REDIS_SENTINELS",
    ),
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
    ("TAKEOVER_CHECK_MS", "0", "takeover_check_ms", 0),
    ("REPLICA_ID", "replica-a", "replica_id", "replica-a"),
    ("RESET_TIMEOUT_MS", "2500", "reset_timeout_ms", 2500),
    ("MAX_IN_FLIGHT", "7", "max_in_flight", 7),
    ("RESET_GIVE_UP_AFTER", "30m", "reset_give_up_after", 1800.0),
    ("LOG_LEVEL", "WARNING", "log_level", "WARNING"),
    ("LOG_FORMAT", "json", "log_format", "json"),
    ("LOG_RESETS", "Summary", "log_resets", "summary"),
    ("RESET_SIGNING_SECRET", SIGNING_SECRET, "reset_signing_secret", SIGNING_SECRET),
    ("ALLOW_INSECURE_HTTP", "1", "allow_insecure_http", True),
    ("REDIS_CA_FILE", certifi.where(), "redis_ca_file", certifi.where()),
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
        ({"reset_secret": "sécrèt"}, "RESET_SECRET"),
        ({"reset_endpoint_url": "http://[::1/x"}, "RESET_ENDPOINT_URL"),
        ({"counter_key": "tcw:{c:*}:lease"}, "COUNTER_KEY"),
        ({"health_host": "a b"}, "HEALTH_HOST"),
        ({"redis_password": "p\udcff"}, "REDIS_PASSWORD"),
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
        ("RESET_ENDPOINT_URL", "http://127.0.0.1:65535/reset"),
        ("RESET_ENDPOINT_URL", "http://[::1]:1/reset"),
        ("RESET_ENDPOINT_URL", "https://bücher.example/zurücksetzen"),
        ("RESET_SECRET", "".join(map(chr, range(0x21, 0x7F)))),  # every visible ASCII
        ("RESET_SIGNING_SECRET", "clé-€ with spaces"),  # HMAC key: any UTF-8 text
        ("COUNTER_KEY", "c:*"),
        ("COUNTER_KEY", "tenant:*:room"),
        ("COUNTER_KEY", "tcw"),  # no key of the worker's is exactly this
        ("COUNTER_KEY", "tcw:[^{]*"),
        ("HEALTH_HOST", "::"),
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


def test_every_secret_setting_is_kept_out_of_the_repr() -> None:
    """Secrecy is declared once, with the setting: each secret field is hidden. REDIS_URL
    is secret as a whole, but of its parts only the password is."""
    sentinel_secret = "sentinel-sekrit-XYZ-111"
    config = Config(
        reset_endpoint_url=ENDPOINT,
        reset_secret=SECRET,
        redis_password=REDIS_SECRET,
        reset_signing_secret=SIGNING_SECRET,
        redis_sentinel_password=sentinel_secret,
        redis_username="worker-user",
    )
    assert {s.name for s in SETTINGS if s.secret} == {
        "RESET_SECRET",
        "REDIS_PASSWORD",
        "REDIS_URL",
        "RESET_SIGNING_SECRET",
        "REDIS_SENTINEL_PASSWORD",
    }
    assert_no_secret(repr(config))
    assert sentinel_secret not in repr(config)
    assert "worker-user" in repr(config)


def test_sentinel_settings() -> None:
    config = load(
        {**MINIMAL, "REDIS_SENTINELS": "s1:26379, [::1]:26380", "REDIS_SENTINEL_MASTER": "mymaster"}
    )
    assert config.redis_sentinels == (("s1", 26379), ("::1", 26380))
    assert config.redis_sentinel_master == "mymaster"
    assert config.redis_location == "sentinel://s1:26379,::1:26380/mymaster/0"


def test_cluster_settings() -> None:
    config = load({**MINIMAL, "REDIS_CLUSTER_NODES": "n1:7000,n2:7001"})
    assert config.redis_cluster_nodes == (("n1", 7000), ("n2", 7001))
    assert config.redis_location == "redis-cluster://n1:7000,n2:7001"
    with pytest.raises(ConfigError, match="exclude each other"):
        load(
            {
                **MINIMAL,
                "REDIS_CLUSTER_NODES": "n1:7000",
                "REDIS_SENTINELS": "s:1",
                "REDIS_SENTINEL_MASTER": "m",
            }
        )


# --- what used to fail only later --------------------------------------------------


def test_own_key_prefix_is_the_namespace_prefix() -> None:
    config = load({**MINIMAL, "COUNTER_KEY": "c:*"})
    assert config.namespace == "tcw:{c:*}"
    assert config.namespace.startswith(OWN_KEY_PREFIX)


def test_counter_key_that_could_match_own_keys_says_why() -> None:
    with pytest.raises(ConfigError) as info:
        load({**MINIMAL, "COUNTER_KEY": "t*"})
    message = str(info.value)
    assert "COUNTER_KEY 't*'" in message
    assert OWN_KEY_PREFIX in message
    assert "'counter:*'" in message


def test_secret_error_says_what_is_allowed_and_hides_the_value() -> None:
    with pytest.raises(ConfigError) as info:
        load({**MINIMAL, "RESET_SECRET": "sekrit-XYZ-123-é"})
    message = str(info.value)
    assert "0x21-0x7E" in message
    assert "x-secret" in message
    assert "sekrit" not in message


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://127.0.0.1:99999/x", "invalid port"),
        ("http://127.0.0.1:3OOO/x", "invalid port"),
        ("http://[::1/x", "brackets"),
        ("gopher://h/x", "http:// or https://"),
        ("https:///x", "name a host"),
    ],
)
def test_endpoint_url_errors_name_the_problem(url: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load({**MINIMAL, "RESET_ENDPOINT_URL": url})
    assert str(info.value).startswith("RESET_ENDPOINT_URL")
    assert problem in str(info.value)


def test_endpoint_url_credentials_are_masked() -> None:
    with pytest.raises(ConfigError) as info:
        load({**MINIMAL, "RESET_ENDPOINT_URL": f"https://user:{SECRET}@h.example:0/x"})
    assert SECRET not in str(info.value)
    assert "***@h.example:0" in str(info.value)


def test_long_values_are_cut_short_in_messages() -> None:
    with pytest.raises(ConfigError) as info:
        load({**MINIMAL, "LOG_LEVEL": "x" * 10_000})
    assert len(str(info.value)) < 300
    assert "10000 characters" in str(info.value)


def fake_getaddrinfo(table: Mapping[str, list[str]]) -> Any:
    """A socket.getaddrinfo that answers from ``table`` (host -> addresses)."""

    def getaddrinfo(host: str, *_args: object, **_kwargs: object) -> list[Any]:
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, 0))
            for a in table[host]
        ]

    return getaddrinfo


RESOLVER = {
    "loopback-name": ["127.0.0.1", "::1"],
    "lan-name": ["10.0.0.7"],
    "mixed-name": ["127.0.0.1", "10.0.0.7"],
}


@pytest.mark.parametrize("host", ["loopback-name", "localhost", "127.0.0.2", "[::1]"])
def test_plain_http_to_loopback_is_allowed(host: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo(RESOLVER))
    load({**MINIMAL, "RESET_ENDPOINT_URL": f"http://{host}:8080/reset"})


@pytest.mark.parametrize("host", ["lan-name", "mixed-name", "10.0.0.7"])
def test_plain_http_elsewhere_needs_allow_insecure_http(
    host: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo(RESOLVER))
    env = {**MINIMAL, "RESET_ENDPOINT_URL": f"http://{host}/reset"}
    with pytest.raises(ConfigError, match=r"not loopback.*ALLOW_INSECURE_HTTP=1"):
        load(env)
    assert load({**env, "ALLOW_INSECURE_HTTP": "1"}).allow_insecure_http


def test_plain_http_to_a_name_that_does_not_resolve_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo(RESOLVER))
    with pytest.raises(ConfigError) as info:
        load({**MINIMAL, "RESET_ENDPOINT_URL": "http://localhsot:3000/reset"})
    message = str(info.value)
    assert message.startswith("RESET_ENDPOINT_URL's host 'localhsot' does not resolve")
    assert "not loopback" not in message


def test_plain_http_with_allow_insecure_http_resolves_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(*_args: object, **_kwargs: object) -> list[Any]:
        raise AssertionError("resolved a name it did not need")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    for url in ("http://anything.internal/reset", "https://backend.example/reset"):
        load({**MINIMAL, "RESET_ENDPOINT_URL": url, "ALLOW_INSECURE_HTTP": "1"})


def test_real_resolver_on_a_name_that_cannot_exist() -> None:
    with pytest.raises(ConfigError, match="does not resolve"):
        load({**MINIMAL, "RESET_ENDPOINT_URL": "http://localhsot.invalid/reset"})


# --- REDIS_URL overriding ------------------------------------------------------------


def test_redis_url_reports_what_it_overrode() -> None:
    config = load({**MINIMAL, **REDIS_PARTS, "REDIS_URL": "redis://only-host/0"})
    assert config.overridden == ("REDIS_HOST", "REDIS_PORT", "REDIS_PASSWORD", "REDIS_DB")
    partial = load(
        {
            **MINIMAL,
            "REDIS_PASSWORD": REDIS_SECRET,
            "REDIS_HOST": " ",
            "REDIS_URL": "redis://only-host/0",
        }
    )
    assert partial.overridden == ("REDIS_PASSWORD",)  # blank means unset
    assert load({**MINIMAL, **REDIS_PARTS}).overridden == ()
    assert load({**MINIMAL, "REDIS_URL": "redis://only-host/0"}).overridden == ()


# --- status: Redis settings only --------------------------------------------------------


def test_redis_only_needs_no_endpoint_or_secret() -> None:
    config = Config.from_env({"REDIS_PORT": "7001"}, env_file=None, redis_only=True)
    assert config.redis_port == 7001
    # Bad delivery settings are not its business either; bad Redis ones still are.
    bad_delivery = {
        "RESET_ENDPOINT_URL": "ftp://x",
        "RESET_SECRET": "é",
        "MAX_IN_FLIGHT": "0",
        "RESET_TIMEOUT_MS": "x",
        "ALLOW_INSECURE_HTTP": "maybe",
    }
    Config.from_env(bad_delivery, env_file=None, redis_only=True)
    with pytest.raises(ConfigError, match="REDIS_PORT"):
        Config.from_env({"REDIS_PORT": "x"}, env_file=None, redis_only=True)


# --- .env problems ------------------------------------------------------------------------


def test_env_file_not_utf8(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_bytes(b"RESET_SECRET=caf\xe9\n")  # Latin-1
    with pytest.raises(ConfigError) as info:
        load(MINIMAL, env_file=env_file)
    message = str(info.value)
    assert str(env_file) in message
    assert "not UTF-8" in message
    assert "line 1 has byte 0xe9" in message


def test_env_file_that_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / ".env").mkdir()
    with pytest.raises(ConfigError, match="cannot be read: Is a directory"):
        load(MINIMAL, env_file=tmp_path / ".env")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_env_file_not_readable(tmp_path: Path) -> None:
    env_file = write_env_file(tmp_path / ".env", RESET_SECRET=SECRET)
    env_file.chmod(0)
    with pytest.raises(ConfigError, match="cannot be read: Permission denied"):
        load(MINIMAL, env_file=env_file)


def test_env_file_line_that_does_not_parse(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(f"REDIS_PORT=7001\nRESET_SECRET='{SECRET}\n")  # unclosed quote
    with pytest.raises(ConfigError) as info:
        load(MINIMAL, env_file=env_file)
    assert "line 2 is not NAME=value" in str(info.value)
    assert_no_secret(str(info.value))


def test_required_env_file_must_exist(tmp_path: Path) -> None:
    missing = tmp_path / "prod.env"
    with pytest.raises(ConfigError) as info:
        Config.from_env(MINIMAL, env_file=missing, required_file=True)
    assert str(info.value) == f"--env-file {str(missing)!r}: no such file"


def test_missing_setting_says_no_dotenv_was_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        Config.from_env({"RESET_SECRET": SECRET})
    assert str(info.value) == (
        "RESET_ENDPOINT_URL is required: set it to the http(s) URL of your backend's reset "
        f"endpoint (no .env file in {tmp_path}; pass --env-file or set the environment)"
    )
    # A .env that is there but lacks the setting: no such hint.
    write_env_file(tmp_path / ".env", REDIS_PORT="7001")
    with pytest.raises(ConfigError) as info:
        Config.from_env({"RESET_SECRET": SECRET})
    assert "no .env" not in str(info.value)
    # No file asked for at all: none either.
    with pytest.raises(ConfigError) as info:
        load({"RESET_SECRET": SECRET})
    assert "no .env" not in str(info.value)


def test_a_misspelt_name_in_the_env_file_is_named_with_the_right_one(tmp_path: Path) -> None:
    path = write_env_file(
        tmp_path / ".env", **MINIMAL, LEASE_TLL_MS="1000", COMPOSE_PROJECT_NAME=REDIS_SECRET
    )
    config = load({}, env_file=path)
    assert config.lease_ttl_ms == 3000  # ignored, as the notice says
    assert config.notices == (
        f"{str(path)!r} sets 'LEASE_TLL_MS', which is no setting (did you mean "
        "LEASE_TTL_MS?); ignored",
        f"{str(path)!r} sets 'COMPOSE_PROJECT_NAME', which is no setting (`--help` lists "
        "the settings); ignored",
    )
    assert_no_secret(" ".join(config.notices))


def test_an_environment_variable_close_to_a_setting_is_named() -> None:
    env = {
        **MINIMAL,
        "REDIS_PASS": REDIS_SECRET,
        "lease_ttl_ms": "1000",
        # not ours: the shell's, and Kubernetes' service variables for a "redis" service
        "PATH": "/usr/bin",
        "HOSTNAME": "pod-1",
        "REDIS_SERVICE_HOST": "10.0.0.1",
        "REDIS_PORT_6379_TCP_ADDR": "10.0.0.1",
    }
    assert load(env).notices == (
        "environment variable 'REDIS_PASS' is no setting (did you mean REDIS_PASSWORD?); ignored",
        "environment variable 'lease_ttl_ms' is no setting (did you mean LEASE_TTL_MS?); ignored",
    )


def test_right_names_give_no_notice(tmp_path: Path) -> None:
    path = write_env_file(tmp_path / ".env", **MINIMAL, LEASE_TTL_MS="1000")
    assert load({"LOG_LEVEL": "DEBUG"}, env_file=path).notices == ()
