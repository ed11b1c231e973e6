"""Arbitrary text in every setting: a Config, or one ConfigError line; nothing else, ever.

In process, hypothesis feeds ``Config.from_env(environ=..., env_file=None)`` text with
control characters, lone surrogates (what ``os.environ`` holds for bytes that are not
UTF-8), non-ASCII and very long values, for each setting alone and in combinations, mixed
with near-valid values (URL schemes, numbers, host:port lists, glob patterns) so that the
checks past the first one are reached too. The result must be a Config, or a ConfigError
whose message is one line, names a setting and holds no secret value. DNS is replaced by
a fake, so the examples are fast and need no network.

As processes, a few dozen fixed values that must fail are run as ``python -m
trio_counter_worker run``: exit code 2, one line on stderr, no traceback. Only values that
must fail are used: a valid one would start a worker that waits for Redis forever (the
run_cli timeout would then fail the test rather than hang it).
"""

from __future__ import annotations

import re
import socket
import string
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.procs import run_cli
from trio_counter_worker.config import SETTINGS, Config
from trio_counter_worker.errors import ConfigError

NAMES = [s.name for s in SETTINGS]
SECRET_NAMES = [s.name for s in SETTINGS if s.secret]
VALID = {"RESET_ENDPOINT_URL": "https://backend.example/reset", "RESET_SECRET": "sekrit-XYZ"}
FUZZ = settings(max_examples=250, deadline=2000)

# -- values -------------------------------------------------------------------------------

any_char = st.characters(exclude_categories=())  # surrogates and control characters too
short_text = st.text(any_char, max_size=12)
text = st.one_of(
    st.text(any_char, max_size=40),
    st.text(st.characters(codec="ascii"), max_size=20),
    st.text(st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF), min_size=1, max_size=4),
    st.builds(lambda t, n: t * n, short_text, st.integers(100, 3000)),  # very long
)


def glued(*parts: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.tuples(*parts).map("".join)


numbers = st.one_of(
    st.integers(-10, 70_000).map(str),
    st.integers().map(str),
    st.sampled_from(["²", "٣", "\uff11", "1_000", "+5", " 7 ", "0x10", "1e3"]),
)
hosts = st.one_of(
    st.sampled_from(
        ["h", "127.0.0.1", "::1", "[::1]", "a..b", "x" * 70, "bü.example", "[abc]", "h:"]
    ),
    short_text,
)
ports = st.one_of(numbers, short_text)
near_valid: dict[str, st.SearchStrategy[str]] = {
    "RESET_ENDPOINT_URL": glued(
        st.sampled_from(["http://", "https://", "https://u:p@", "HTTP://", "ftp://", "", "//"]),
        hosts,
        st.sampled_from(["", ":"]),
        st.one_of(st.just(""), ports),
        st.sampled_from(["", "/", "/reset", "?q", "#f"]),
        st.one_of(st.just(""), short_text),
    ),
    "REDIS_URL": glued(
        st.sampled_from(["redis://", "rediss://", "redis://u:p@", "redis://:", "http://", ""]),
        hosts,
        st.sampled_from(["", ":"]),
        st.one_of(st.just(""), ports),
        st.sampled_from(["", "/", "/0", "/x"]),
        st.one_of(st.just(""), numbers, short_text),
    ),
    "COUNTER_KEY": st.text(st.sampled_from("tcw:{}*?[]^-\\xé"), max_size=10),
    "REDIS_SENTINELS": st.lists(glued(hosts, st.just(":"), ports), max_size=3).map(",".join),
    "REDIS_CLUSTER_NODES": st.lists(glued(hosts, st.just(":"), ports), max_size=3).map(",".join),
    "ALLOW_INSECURE_HTTP": st.sampled_from(["1", "0", "yes", "OFF", "maybe", "\uff11"]),
    "LOG_LEVEL": st.sampled_from(["debug", "INFO", "warn", "ERROR ", "\u0131nfo"]),
    "LOG_FORMAT": st.sampled_from(["json", "TEXT", "xml"]),
    "REDIS_CA_FILE": st.sampled_from(["/", "/nonexistent", __file__, "."]),
    "REDIS_HOST": hosts,
    "HEALTH_HOST": hosts,
}
for _name in (
    "REDIS_PORT",
    "REDIS_DB",
    "LEASE_TTL_MS",
    "RESET_TIMEOUT_MS",
    "MAX_IN_FLIGHT",
    "HEALTH_PORT",
):
    near_valid[_name] = numbers


def values_for(name: str) -> st.SearchStrategy[str]:
    return st.one_of(text, near_valid[name]) if name in near_valid else text


# -- the property -----------------------------------------------------------------------------

# Letters and digits shifted: a value keeps its kind (visible ASCII, UTF-8 or not, spaces).
_SHIFT = str.maketrans(
    string.ascii_lowercase + string.ascii_uppercase + string.digits,
    "nopqrstuvwxyzabcdefghijklm" + "NOPQRSTUVWXYZABCDEFGHIJKLM" + "5678901234",
)


def secret_part(name: str, value: str) -> tuple[str, str]:
    """The secret in ``value`` and ``value`` with that secret shifted. For REDIS_URL the
    secret is the password between ``user:`` and ``@``."""
    if name != "REDIS_URL":
        return value.strip(), value.translate(_SHIFT)
    authority = value.partition("://")[2].partition("@")
    password = authority[0].partition(":")[2] if authority[1] else ""
    return password, value.replace(f":{password}@", f":{password.translate(_SHIFT)}@", 1)


def error_of(env: Mapping[str, str]) -> str | None:
    try:
        Config.from_env(env, env_file=None)
    except ConfigError as exc:
        return str(exc)
    return None


def fake_getaddrinfo(host: str, *_args: object, **_kwargs: object) -> list[Any]:
    if host.startswith("loop"):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 0))]
    if host.startswith("h"):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.1", 0))]
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


def check(env: Mapping[str, str]) -> None:
    """Config or one clean ConfigError line; any other exception fails the test."""
    with mock.patch.object(socket, "getaddrinfo", fake_getaddrinfo):
        message = error_of(env)
        if message is None:
            return
        assert message.splitlines() == [message], message  # no line break of any kind
        assert any(name in message for name in NAMES), message
        for name in SECRET_NAMES:
            if name not in env:
                continue
            secret, shifted_value = secret_part(name, env[name])
            if len(secret) < 4 or secret not in message:
                continue
            # Generated text can occur in a message by chance ("0000" in "1000000", or in
            # an echoed non-secret value): a leak is text that changes with the secret.
            other = error_of({**env, name: shifted_value})
            assert other is not None, f"{name} leaked into: {message!r}"
            assert secret in other, f"{name} leaked into: {message!r}"


@FUZZ
@given(st.data(), st.sampled_from(NAMES), st.booleans())
def test_each_setting_alone(data: st.DataObject, name: str, with_valid_base: bool) -> None:
    value = data.draw(values_for(name), label=name)
    check({**(VALID if with_valid_base else {}), name: value})


@st.composite
def environments(draw: st.DrawFn) -> dict[str, str]:
    names = draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=8))
    env = dict(VALID) if draw(st.booleans()) else {}
    env.update({name: draw(values_for(name), label=name) for name in names})
    return env


@FUZZ
@given(environments())
def test_settings_in_combination(env: dict[str, str]) -> None:
    check(env)


@FUZZ
@given(st.dictionaries(st.sampled_from(SECRET_NAMES), text, min_size=1))
def test_secrets_never_shown(secrets: dict[str, str]) -> None:
    # A bad value elsewhere too, so some message is printed whatever the secrets are.
    check({**VALID, **secrets, "LEASE_TTL_MS": "x"})


# -- names that are no setting --------------------------------------------------------

VALUE = "value-XYZ-never-shown"  # the value each misnamed variable holds
near_names = st.one_of(
    st.text(any_char, min_size=1, max_size=30),
    # one edit away from a setting: the names a typo gives
    st.builds(
        lambda name, i, c: name[:i] + c + name[i + 1 :],
        st.sampled_from(NAMES),
        st.integers(0, 20),
        st.characters(codec="ascii"),
    ),
    st.sampled_from(NAMES).map(str.lower),
)


@given(st.lists(near_names, max_size=5), st.booleans())
@FUZZ
def test_any_name_gives_a_config_and_one_line_notices_without_the_value(
    names: list[str], in_file: bool
) -> None:
    """Any variable name, in the environment or in a .env file: never a crash, and a
    notice is one line that never shows the value it was set to."""
    misnamed = {n: VALUE for n in names if n not in NAMES}
    if in_file:
        # what a .env file can hold: NAME=value lines, names of letters, digits, _ . -
        misnamed = {n: v for n, v in misnamed.items() if _dotenv_name(n)}
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / ".env"
            path.write_text("".join(f"{n}={v}\n" for n, v in misnamed.items()))
            config = Config.from_env(VALID, env_file=path)
        assert len(config.notices) == len(misnamed)
    else:
        config = Config.from_env({**VALID, **misnamed}, env_file=None)
    for notice in config.notices:
        assert "\n" not in notice
        assert VALUE not in notice
        assert "no setting" in notice


def _dotenv_name(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", name))


def test_the_leak_check_sees_a_leak() -> None:
    """check() must fail on a message that echoes a secret, or it proves nothing."""
    env = {**VALID, "RESET_SECRET": "sekrit é"}

    def leaky(environ: Mapping[str, str], **_kwargs: object) -> Config:
        raise ConfigError(f"RESET_SECRET is bad: {environ['RESET_SECRET'].strip()}")

    with mock.patch.object(Config, "from_env", leaky), pytest.raises(AssertionError, match="leak"):
        check(env)


# -- as processes ------------------------------------------------------------------------------

CLI_TIMEOUT = 15.0
# Each must fail whatever else is set; surrogates only in \udc80-\udcff, the range that
# os.environ uses for undecodable bytes (so they survive the trip through a real env).
NASTY: list[tuple[str, str]] = [
    ("RESET_ENDPOINT_URL", "http://127.0.0.1:99999/x"),
    ("RESET_ENDPOINT_URL", "http://127.0.0.1:3OOO/x"),
    ("RESET_ENDPOINT_URL", "http://[::1/x"),
    ("RESET_ENDPOINT_URL", "https://h.example:-1/x"),
    ("RESET_ENDPOINT_URL", "https://h.example:٣/x"),
    ("RESET_ENDPOINT_URL", "http://\udcff/x"),
    ("RESET_ENDPOINT_URL", "https://h.example/\x01"),
    ("RESET_ENDPOINT_URL", f"https://{'a' * 70}.example/"),
    ("RESET_ENDPOINT_URL", "http://localhsot.invalid/x"),
    ("RESET_ENDPOINT_URL", "x" * 50_000),
    ("RESET_SECRET", "sécrèt-€"),
    ("RESET_SECRET", "two\nlines"),
    ("RESET_SECRET", "with space"),
    ("RESET_SECRET", "del\x7f"),
    ("RESET_SECRET", "\udcff\udcfe-sekrit"),
    ("RESET_SIGNING_SECRET", "sign-\udcff"),
    ("REDIS_PASSWORD", "pass-\udc80"),
    ("REDIS_SENTINEL_PASSWORD", "pass-\udc80"),
    ("COUNTER_KEY", "*"),
    ("COUNTER_KEY", "tcw:{x}"),
    ("COUNTER_KEY", "key-\udcff"),
    ("REDIS_PORT", "²"),
    ("REDIS_PORT", "9" * 5000),  # more digits than int() takes
    ("REDIS_DB", "٣"),
    ("LEASE_TTL_MS", "1" * 200),
    ("HEALTH_PORT", "\uff18\uff10\uff18\uff10"),  # fullwidth 8080: int() would take it
    ("HEALTH_PORT", "65536"),
    ("REDIS_URL", "redis://h/²"),
    ("REDIS_URL", "redis://\udcff/0"),
    ("REDIS_URL", "redis://[::1/0"),
    ("REDIS_URL", "redis://h:99999/0"),
    ("REDIS_HOST", "a..b"),
    ("REDIS_HOST", "x" * 300),
    ("REDIS_HOST", "host-\udcff"),
    ("HEALTH_HOST", "two words"),
    ("REDIS_SENTINELS", "h:0"),
    ("REDIS_CLUSTER_NODES", ","),
    ("REDIS_SENTINEL_MASTER", "only-the-master"),
    ("ALLOW_INSECURE_HTTP", "\udcff"),
    ("LOG_LEVEL", "INFO\u2028DEBUG"),
    ("LOG_FORMAT", "json\x1ctext"),
    ("REPLICA_ID", "zero\u200bwidth"),
    ("REDIS_CA_FILE", "\udcff.pem"),
    ("REDIS_CA_FILE", __file__),  # a file, but no certificate in it
]
NASTY_IDS = [f"{name}-{i}" for i, (name, _) in enumerate(NASTY)]


@pytest.fixture(scope="module")
def nasty_runs() -> Iterator[dict[str, Future[subprocess.CompletedProcess[str]]]]:
    env = {"LOG_LEVEL": "INFO", "MAX_IN_FLIGHT": "32", **VALID}
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="nasty") as pool:
        yield {
            case_id: pool.submit(run_cli, ["run"], {**env, name: value}, CLI_TIMEOUT)
            for case_id, (name, value) in zip(NASTY_IDS, NASTY, strict=True)
        }


@pytest.mark.parametrize(("name", "value"), NASTY, ids=NASTY_IDS)
def test_nasty_value_exits_2_with_one_line(
    name: str,
    value: str,
    request: pytest.FixtureRequest,
    nasty_runs: dict[str, Future[subprocess.CompletedProcess[str]]],
) -> None:
    result = nasty_runs[request.node.callspec.id].result(timeout=CLI_TIMEOUT * len(NASTY))
    shown = f"exit={result.returncode}\nstdout={result.stdout!r}\nstderr={result.stderr!r}"
    assert result.returncode == 2, shown
    assert len(result.stderr.splitlines()) == 1, shown
    assert result.stderr.startswith("trio-counter-worker: error: "), shown
    assert name in result.stderr, shown
    assert "Traceback" not in result.stderr + result.stdout, shown
    assert result.stdout == "", shown
    if name in SECRET_NAMES:
        assert value not in result.stderr, shown
