"""The start-up permission check: everything the worker will need, tried harmlessly.

Each command, key and channel is tried once (scripts from inside a script, since ACLs
apply there too), and every one Redis refuses is named at once, with the ACL rule to
add (:mod:`trio_counter_worker.acl` holds the rule). Runs in a worker thread, from
:meth:`RedisBridge.preflight <trio_counter_worker.redis_bridge.RedisBridge.preflight>`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import redis.exceptions as rexc

from .acl import sample_key
from .config import Config
from .errors import RedisRefused
from .redis_replies import translate

__all__ = ["check_all"]

_SUBSCRIBE_TIMEOUT = 2.0  # how long Redis may take to confirm a subscription


def check_all(
    client: Any,
    pubsub_client: Callable[[], Any],
    config: Config,
    load_scripts: Callable[[], object],
    preflight_script: Callable[..., list[str]],
) -> None:
    """Raise :class:`RedisRefused` ("permission") naming each missing permission."""
    keys = config.keys
    missing: list[str] = []

    def check(rule: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except rexc.RedisError as exc:
            translated = translate(exc)
            if isinstance(translated, RedisRefused) and translated.kind == "permission":
                missing.append(rule)
                return
            raise translated from None

    check("+script|load", load_scripts)
    if not missing:
        refused: list[str] = []
        check(
            f"+evalsha and ~{config.namespace}:* (the worker's own keys)",
            lambda: refused.extend(preflight_script([keys.preflight], [keys.released])),
        )
        missing += [f"+{name}" for name in refused]
    check(f"+hgetall on ~{config.namespace}:*", lambda: client.hgetall(keys.pending))
    check(
        f"~{config.counter_key} (the counter keys) with +pttl",
        lambda: client.pttl(sample_key(config.counter_key)),
    )
    check("+scan", lambda: client.scan(0, config.counter_key, 10))
    missing += _subscribe_check(pubsub_client, config)
    if missing:
        raise RedisRefused(
            f"the Redis user may not do what the worker needs: add {', '.join(missing)} "
            "to its ACL (the full rule is in the README, section 'Redis permissions')",
            "permission",
        )


def _subscribe_check(pubsub_client: Callable[[], Any], config: Config) -> list[str]:
    """Subscribe to what the leader and standbys listen to, and unsubscribe."""
    pattern = config.keys.keyspace(config.redis_db)
    wanted = [
        ("psubscribe", pattern, f"+psubscribe and &{pattern}"),
        ("subscribe", config.keys.released, f"+subscribe and &{config.namespace}:*"),
    ]
    missing: list[str] = []
    for kind, name, rule in wanted:
        pubsub = pubsub_client().pubsub()
        try:
            getattr(pubsub, kind)(name)
            deadline = time.monotonic() + _SUBSCRIBE_TIMEOUT
            while time.monotonic() < deadline:
                msg = pubsub.get_message(timeout=0.1)
                if msg and msg["type"] == kind:
                    break
        except rexc.RedisError as exc:
            translated = translate(exc)
            if not (isinstance(translated, RedisRefused) and translated.kind == "permission"):
                raise translated from None
            missing.append(rule)
        finally:
            pubsub.close()
    return missing
