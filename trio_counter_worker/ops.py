"""Operator commands: ``check`` (can this replica work?), ``status`` (what is going on?),
``redeliver`` and ``install-functions`` (load the touch library).

``check`` and ``status`` send no reset and change nothing in Redis.
"""

from __future__ import annotations

import json
import ssl
import sys
import time
from collections.abc import Mapping
from typing import Any, Literal, TextIO
from urllib.parse import urlsplit

import attrs
import certifi
import httpx
import trio

from . import functions, redis_reads, touch_spec
from .acl import acl_rule
from .config import Config
from .delivery import build_request
from .errors import FunctionsUnavailable, RedisRefused, RedisUnavailable
from .keys import REGISTRY
from .keyspace import NEEDED_FLAGS, enable_hint, eviction_warning, missing_flags, shown_key
from .liveness import ACL_REFUSED, off_reason
from .redis_bridge import RedisBridge, make_client
from .redis_replies import translate
from .store import PendingReset
from .topology import make_bridge

__all__ = [
    "Check",
    "install_command",
    "print_checks",
    "print_status",
    "run_checks",
    "run_redeliver",
    "run_status",
    "server_name",
]

State = Literal["ok", "warn", "fail"]


@attrs.frozen
class Check:
    name: str
    state: State
    detail: str
    hint: str = ""


async def run_checks(config: Config, *, dry_run_request: bool = False) -> list[Check]:
    """Every check, in order; endpoint checks stop at the first failure.

    ``dry_run_request``: send the dry-run POST (``x-reset-dry-run: 1``) even if the backend
    does not advertise it. Nothing here ever resets a counter or changes Redis state.
    """
    checks = [Check("configuration", "ok", "all settings valid")]
    checks += [Check("setting names", "warn", notice) for notice in config.notices]
    checks += await _redis_checks(config)
    endpoint = await _endpoint_checks(config)
    checks += endpoint
    if all(c.state == "ok" for c in endpoint):
        checks += await _request_checks(config, dry_run_request)
    return checks


async def _redis_checks(config: Config) -> list[Check]:
    bridge = make_bridge(config)
    try:
        probe = await redis_reads.probe(bridge)
        server = await _server(bridge)
        takeover = _takeover_check(config, await off_reason(bridge, config))
    except RedisRefused as exc:  # its message says what to do: no second hint
        return [Check("redis", "fail", f"{config.redis_location}: {exc}")]
    except RedisUnavailable as exc:
        return [
            Check(
                "redis",
                "fail",
                f"{config.redis_location}: {exc}",
                "check REDIS_HOST/REDIS_PORT or REDIS_URL, and that Redis is running",
            )
        ]
    finally:
        await bridge.aclose()
    out = [Check("redis", "ok", f"{config.redis_location} answers ({server})")]
    out.append(await _permission_check(config))
    out.append(takeover)
    policy = probe.get("policy")
    if (warning := eviction_warning(policy)) is not None:
        out.append(Check("eviction", "warn", f"maxmemory-policy={policy}", warning))
    elif policy is not None:
        out.append(
            Check("eviction", "ok", f"maxmemory-policy={policy}: the worker's keys are not evicted")
        )
    flags = probe["flags"]
    if flags is None:
        out.append(
            Check(
                "notifications",
                "warn",
                "cannot read notify-keyspace-events (CONFIG refused)",
                enable_hint(None),
            )
        )
    elif not (missing := missing_flags(flags)):
        out.append(
            Check(
                "notifications", "ok", f"notify-keyspace-events={flags!r} includes {NEEDED_FLAGS!r}"
            )
        )
    elif probe["can_set"]:
        out.append(
            Check(
                "notifications",
                "ok",
                f"notify-keyspace-events={flags!r} lacks {missing!r}; the leader "
                "will add it (CONFIG SET allowed)",
            )
        )
    else:
        out.append(
            Check(
                "notifications",
                "fail",
                f"notify-keyspace-events={flags!r} lacks {missing!r} and CONFIG SET is refused",
                enable_hint(missing),
            )
        )
    return out


async def _endpoint_checks(config: Config) -> list[Check]:
    parts = urlsplit(config.reset_endpoint_url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    out: list[Check] = []
    try:
        with trio.fail_after(config.reset_timeout):
            infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_STREAM)
    except (OSError, trio.TooSlowError) as exc:
        return [
            Check(
                "endpoint dns",
                "fail",
                f"cannot resolve {host}: {exc}",
                "check the host name in RESET_ENDPOINT_URL",
            )
        ]
    addresses = sorted({str(info[4][0]) for info in infos})
    out.append(Check("endpoint dns", "ok", f"{host} -> {', '.join(addresses)}"))
    try:
        with trio.fail_after(config.reset_timeout):
            stream = await trio.open_tcp_stream(host, port)
    except (OSError, trio.TooSlowError) as exc:
        out.append(
            Check(
                "endpoint tcp",
                "fail",
                f"cannot connect to {host}:{port}: {exc or 'timed out'}",
                "is the backend running and reachable from here? (RESET_ENDPOINT_URL)",
            )
        )
        return out
    out.append(Check("endpoint tcp", "ok", f"connected to {host}:{port}"))
    try:
        if parts.scheme == "https":
            tls = trio.SSLStream(stream, ssl.create_default_context(), server_hostname=host)
            try:
                with trio.fail_after(config.reset_timeout):
                    await tls.do_handshake()
                out.append(Check("endpoint tls", "ok", f"certificate valid for {host}"))
            except (trio.BrokenResourceError, ssl.SSLError, trio.TooSlowError) as exc:
                cause = exc.__cause__ or exc
                out.append(
                    Check(
                        "endpoint tls",
                        "fail",
                        f"TLS handshake failed: {type(cause).__name__}: {cause}",
                        "the certificate must be valid for the host in "
                        "RESET_ENDPOINT_URL and trusted by this machine",
                    )
                )
    finally:
        await stream.aclose()
    return out


async def _permission_check(config: Config) -> Check:
    bridge = make_bridge(config)
    try:
        await bridge.preflight()
    except RedisRefused as exc:
        rule = acl_rule(config.counter_key, config.namespace, config.redis_db)
        return Check("permissions", "fail", str(exc), f"ACL SETUSER <user> on ><password> {rule}")
    except RedisUnavailable as exc:
        return Check("permissions", "fail", f"could not check: {exc}")
    finally:
        await bridge.aclose()
    return Check("permissions", "ok", "every command, key and channel the worker needs")


DRY_RUN_HEADER = "x-reset-dry-run"  # a backend that supports it answers without resetting


def _takeover_check(config: Config, why_off: str | None) -> Check:
    """Whether a leader that dies is replaced within milliseconds or at its lease's end."""
    if why_off is None:
        return Check(
            "takeover",
            "ok",
            "a leader that dies is replaced within about TAKEOVER_CHECK_MS and a short grace "
            f"({config.takeover_check_ms} ms)",
        )
    lease_only = (
        f"a leader that dies is replaced only when its lease expires ({config.lease_ttl_ms} ms)"
    )
    if why_off == ACL_REFUSED:
        return Check(
            "takeover", "warn", f"PUBSUB NUMSUB refused: {lease_only}", "add +pubsub|numsub"
        )
    return Check("takeover", "ok", f"{why_off}: {lease_only}")


async def _request_checks(config: Config, dry_run_request: bool) -> list[Check]:
    """Ask the endpoint things that cannot reset anything: OPTIONS tells a wrong path
    (404) from a right one; the dry run, where supported, checks RESET_SECRET."""
    url = config.reset_endpoint_url
    async with httpx.AsyncClient(
        timeout=config.reset_timeout,
        follow_redirects=False,
        verify=ssl.create_default_context(cafile=certifi.where()),
    ) as client:
        try:
            answer = await client.options(url)
        except httpx.HTTPError as exc:
            return [
                Check(
                    "endpoint path",
                    "fail",
                    f"OPTIONS failed: {type(exc).__name__}: {exc}",
                    "is the backend an HTTP server? (RESET_ENDPOINT_URL)",
                )
            ]
        if answer.status_code == 404:
            return [
                Check(
                    "endpoint path",
                    "fail",
                    "the backend answers 404 Not Found for this path",
                    "check the path in RESET_ENDPOINT_URL",
                )
            ]
        if 300 <= answer.status_code < 400:
            return [
                Check(
                    "endpoint path",
                    "fail",
                    f"the backend redirects (HTTP "
                    f"{answer.status_code}); redirects are never followed",
                    "set RESET_ENDPOINT_URL to the final URL",
                )
            ]
        out = [Check("endpoint path", "ok", f"OPTIONS answered HTTP {answer.status_code}")]
        advertised = answer.headers.get(DRY_RUN_HEADER, "").lower() == "supported"
        if not (advertised or dry_run_request):
            out.append(
                Check(
                    "endpoint secret",
                    "warn",
                    "not verified: the backend does not "
                    f"advertise the dry run ({DRY_RUN_HEADER}: supported on "
                    "OPTIONS)",
                    "see the README's 'Dry run' to support it, or pass "
                    "--dry-run-request if your backend does",
                )
            )
            return out
        probe = PendingReset("dry-run", "dry-run", int(time.time() * 1000), 0)
        headers, body = build_request(
            probe,
            secret=config.reset_secret,
            replica_id=config.replica_id,
            fencing_token=0,
            signing_secret=config.reset_signing_secret,
        )
        headers[DRY_RUN_HEADER] = "1"
        try:
            dry = await client.post(url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            out.append(
                Check("endpoint secret", "fail", f"dry run failed: {type(exc).__name__}: {exc}")
            )
            return out
        if 200 <= dry.status_code < 300:
            out.append(Check("endpoint secret", "ok", "dry run accepted: RESET_SECRET is right"))
        elif dry.status_code in (401, 403):
            out.append(
                Check(
                    "endpoint secret",
                    "fail",
                    f"dry run refused with HTTP {dry.status_code}",
                    "check RESET_SECRET (and RESET_SIGNING_SECRET): the backend rejected it",
                )
            )
        else:
            out.append(
                Check(
                    "endpoint secret",
                    "fail",
                    f"dry run answered HTTP {dry.status_code}",
                    "see the backend's logs",
                )
            )
        return out


def print_checks(checks: list[Check], out: TextIO) -> int:
    """The checklist; returns the exit code (0 only if nothing failed)."""
    marks = {"ok": "[ ok ]", "warn": "[warn]", "fail": "[FAIL]"}
    for c in checks:
        out.write(f"{marks[c.state]} {c.name:<14} {c.detail}\n")
        if c.hint and c.state != "ok":
            out.write(f"       {'':<14} -> {c.hint}\n")
    failed = sum(c.state == "fail" for c in checks)
    out.write("all checks passed\n" if not failed else f"{failed} check(s) failed\n")
    return 1 if failed else 0


async def run_status(config: Config) -> dict[str, Any]:
    bridge = make_bridge(config)
    try:
        return await redis_reads.status(bridge) | {"server": await _server(bridge)}
    finally:
        await bridge.aclose()


def server_name(info: Mapping[str, Any]) -> str:
    """The server as INFO server names it: Valkey reports its own version beside the
    Redis version it is compatible with (``redis_version``)."""
    redis = info.get("redis_version", "?")
    if (valkey := info.get("valkey_version")) is not None:
        return f"Valkey {valkey} (Redis {redis} compatible)"
    return f"Redis {redis}"


async def _server(bridge: RedisBridge) -> str:
    return server_name(await bridge.call(_info_server, bridge.client))


def _info_server(client: Any) -> Mapping[str, Any]:
    info: Mapping[str, Any] = client.info("server")
    return info


async def run_redeliver(config: Config, reset_ids: list[str]) -> int:
    """Dead resets back to pending (all with no ids); the leader is told at once."""
    bridge = make_bridge(config)
    try:
        return await redis_reads.redeliver(bridge, reset_ids)
    finally:
        await bridge.aclose()


def print_status(status: dict[str, Any], as_json: bool, out: TextIO) -> None:
    if as_json:
        out.write(json.dumps(status, sort_keys=True) + "\n")
        return
    nxt = status["next_deadline"]
    lines = [
        ("server", status["server"]),
        ("leader", status["leader"] or "none"),
        ("leader's endpoint", status["leader_endpoint"] or "-"),
        (
            "fencing token",
            status["fencing_token"]
            if status["fencing_token"] is not None
            else f"none (last {status['last_fencing_token']})",
        ),
        (
            "lease left",
            f"{status['lease_ms_left']} ms" if status["lease_ms_left"] is not None else "-",
        ),
        ("takeover", status["takeover"]),
        ("pending resets", status["pending_resets"]),
        ("watched counters", status["watched_counters"]),
        ("next deadline", f"{nxt['key']} in {nxt['in_ms'] / 1000:.1f} s" if nxt else "-"),
        (
            "notifications",
            repr(status["notify_keyspace_events"])
            if status["notify_keyspace_events"] is not None
            else "unknown (CONFIG refused)",
        ),
    ]
    touch = status["touch"]
    lines.append(
        (
            "touch functions",
            "not loaded (plain SETs only)"
            if touch["library"] is None
            else f"tcw version {touch['library']}, this deployment "
            f"{'registered' if touch['registered'] else 'NOT registered'}, "
            f"{touch['payloads']} payload(s) held",
        )
    )
    failing, dead = status["failing_resets"], status["dead_resets"]
    lines += [("failing resets", failing["count"]), ("dead resets", dead["count"])]
    for name, value in lines:
        out.write(f"{name + ':':<18} {value}\n")
    for title, rows in (("failing", failing), ("dead", dead)):
        for row in rows["oldest"]:
            out.write(
                f"  {title}: {row.get('key', '?')} reset_id={row['reset_id']} "
                f"attempts={row.get('attempts', '?')}: {row['last_error']}\n"
            )
        if rows["count"] > len(rows["oldest"]):
            out.write(f"  ... and {rows['count'] - len(rows['oldest'])} more {title}\n")
    if dead["count"]:
        out.write("  (`trio-counter-worker redeliver` queues dead resets again)\n")


def install_command(
    config: Config, counter_key: str | None, out: TextIO = sys.stdout, err: TextIO = sys.stderr
) -> int:
    """``trio-counter-worker install-functions``: 0 done, 2 refused (one line on ``err``
    saying what to do), 1 Redis unreachable."""

    def fail(message: str, code: int = 2) -> int:
        err.write(f"trio-counter-worker: error: {message}\n")
        return code

    if config.redis_cluster_nodes:
        return fail(
            "the tcw library does not support Redis Cluster yet: mark activity "
            "with SET <key> 1 EX <ttl> there"
        )
    client = make_client(config)
    try:
        done = functions.install_details(client, counter_key)
    except (FunctionsUnavailable, ValueError) as exc:
        return fail(str(exc))
    except Exception as exc:
        translated = translate(exc)
        if isinstance(translated, RedisRefused) and translated.kind != "oom":
            return fail(str(translated))
        if isinstance(translated, RedisUnavailable):
            return fail(
                f"{config.redis_location}: {translated} (check REDIS_HOST/REDIS_PORT or REDIS_URL)",
                1,
            )
        raise
    finally:
        client.close()
    was = f"replaced version {done.previous}" if done.previous else "new"
    out.write(
        f"loaded library {functions.LIBRARY_NAME} version {done.version} ({was}) on "
        f"{config.redis_location}, Redis {done.redis_version}\n"
    )
    if counter_key is not None:
        out.write(
            f"registered COUNTER_KEY {shown_key(counter_key)!r} "
            f"({shown_key(functions.namespace_of(counter_key))})\n"
        )
        out.write(
            f"app's Redis user, with ACLs: ACL SETUSER <app> on ><password> "
            f"{shown_key(functions.app_acl_rule(counter_key))}\n"
        )
    if not done.registry:
        out.write(
            f"no deployment registered in {REGISTRY}: tcw_touch sets keys but "
            "records no deadline until one is (--counter-key PATTERN)\n"
        )
    for ns, pattern in sorted(done.registry.items()):
        out.write(f"deployment {shown_key(ns)}: COUNTER_KEY {shown_key(pattern)!r}\n")
    out.write("apps call: " + touch_spec.USAGE["tcw_touch"] + "\n")
    return 0
