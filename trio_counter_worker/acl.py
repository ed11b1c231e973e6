"""The Redis permissions a worker needs, as an ACL rule, and what a refusal means: no I/O.

One list (``SCRIPT_COMMANDS``, ``CLIENT_COMMANDS``, ``TAKEOVER_COMMANDS``) feeds the rule
shown in the README and by ``check``, the start-up check, and the hint in every
permission error.
"""

from __future__ import annotations

from .keys import keyspace_pattern

__all__ = [
    "CLIENT_COMMANDS",
    "SCRIPT_COMMANDS",
    "TAKEOVER_COMMANDS",
    "acl_rule",
    "is_permission_error",
    "sample_key",
]

# Called from inside the worker's Lua scripts (ACLs apply there too).
SCRIPT_COMMANDS = (
    "hget",
    "hset",
    "hsetnx",
    "hdel",
    "hexists",
    "hkeys",
    "del",
    "set",
    "incr",
    "pexpire",
    "pttl",
    "pexpiretime",
    "time",
    "publish",
    "zadd",
    "zscore",
    "zrem",
    "zrange",
    "zremrangebyscore",
)
# Called by the worker itself. CONFIG is optional: without it the worker cannot set
# notify-keyspace-events and says so.
CLIENT_COMMANDS = (
    "ping",
    "select",
    "info",
    "scan",
    "hgetall",
    "eval",
    "evalsha",
    "script|load",
    "subscribe",
    "psubscribe",
    "unsubscribe",
    "punsubscribe",
    "config|get",
    "config|set",
    "client|setname",
)
# Optional, from inside the lease scripts: without it a leader that dies is replaced only
# when its lease expires (fast takeover off), and the worker says so.
TAKEOVER_COMMANDS = ("pubsub|numsub",)
_SINCE_7 = ("pexpiretime",)  # an ACL naming a command the server lacks is refused


def acl_rule(counter_key: str, namespace: str, db: int, redis_major: int = 7) -> str:
    """``ACL SETUSER`` arguments (after the user name and password) for one deployment."""
    needed: tuple[str, ...] = (*CLIENT_COMMANDS, *SCRIPT_COMMANDS, *TAKEOVER_COMMANDS)
    if redis_major < 7:
        needed = tuple(c for c in needed if c not in _SINCE_7)
    commands = " ".join(f"+{c}" for c in needed)
    return (
        f"resetkeys ~{counter_key} ~{namespace}:* resetchannels "
        f"&{keyspace_pattern(db, counter_key)} &{namespace}:* -@all {commands}"
    )


def is_permission_error(text: str) -> bool:
    """Redis's refusal for a command, key or channel the ACL does not allow (directly, or
    from inside a script, where Redis words it differently)."""
    return "NOPERM" in text or "no permissions" in text or "can't run this command" in text


def sample_key(pattern: str) -> str:
    """A key name the glob ``pattern`` matches (for checking key permissions)."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            pass
        elif c == "?":
            out.append("x")
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(pattern[i])
        elif c == "[":
            end = pattern.find("]", i + 2)
            body = pattern[i + 1 : end] if end > 0 else ""
            if not body or body.startswith("^") or "\\" in body:
                return pattern  # unusual class: check the pattern itself as a name
            out.append(body[0])
            i = end
        else:
            out.append(c)
        i += 1
    return "".join(out)
