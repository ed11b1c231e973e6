"""The Redis Functions library ``tcw`` (Redis 7.0+): activity marked atomically.

An app calls, from any language with a Redis client::

    FCALL tcw_touch 1 <counter key> <ttl_ms> [<payload>]   -- SET key PX ttl + its deadline
    FCALL tcw_done  1 <counter key>                         -- the app ends the episode: DEL

Unlike a plain ``SET key 1 EX ttl``, whose deadline the leader learns from a keyspace
event (lost while no leader listens), ``tcw_touch`` records the deadline in the same
atomic step, in every deployment whose COUNTER_KEY matches the key; and a re-arm after a
deadline that passed unseen first claims that ended episode, so two episodes never merge.
:mod:`trio_counter_worker.touch_spec` is the same decision in Python.

Layout, per deployment (``ns`` = ``tcw:{<COUNTER_KEY>}``, see ``Config.namespace``):

- ``tcw:{registry}`` (hash): ns -> COUNTER_KEY pattern; written by ``install`` (and by
  the leader at takeover). In the worker's own key prefix, so no COUNTER_KEY can match it;
- ``<ns>:deadlines`` (zset, key -> absolute expiry), ``<ns>:pending`` (hash, reset_id ->
  record), ``<ns>:claimed`` (zset, tombstones),
  ``<ns>:lease`` and ``<ns>:epoch`` (read for the fencing token): the worker's own;
- ``<ns>:payloads`` (hash, key -> payload of its current episode; no entry: none);
- ``<ns>:touched`` (channel): the key's name, after each ``tcw_touch`` and ``tcw_done``:
  the only channel an app publishes on (a hint to read the key's deadline, nothing more).

The library reuses the claim script's Lua (``scripts._PRELUDE``, ``scripts._CLAIMING``)
verbatim, so a claim made here is byte for byte the one the leader would make.
Redis Cluster is not supported yet: the functions touch keys in several slots.
"""

from __future__ import annotations

from typing import Any

import attrs
import redis.exceptions as rexc

from . import scripts, touch_spec
from .errors import FunctionsUnavailable
from .glob import may_match_prefix
from .keys import (
    CLAIMED,
    DEADLINES,
    EPOCH,
    LEASE,
    OWN_KEY_PREFIX,
    PAYLOADS,
    PENDING,
    REGISTRY,
    TOUCHED,
    Keys,
)

__all__ = [
    "APP_COMMANDS",
    "LIBRARY",
    "LIBRARY_NAME",
    "LIBRARY_VERSION",
    "Installed",
    "app_acl_rule",
    "ensure",
    "install",
    "install_details",
    "namespace_of",
]

LIBRARY_NAME = "tcw"
LIBRARY_VERSION = "4"  # raise it with every change to the library's behaviour


# What an app's Redis user calls: FCALL, and every command the functions call (Redis
# checks ACLs inside functions too).
APP_COMMANDS = (
    "fcall",
    "fcall_ro",
    "get",
    "set",
    "del",
    "pttl",
    "pexpiretime",
    "time",
    "hget",
    "hgetall",
    "hset",
    "hsetnx",
    "hdel",
    "zadd",
    "zscore",
    "zrem",
    "publish",
)


def namespace_of(counter_key: str) -> str:
    """The deployment's namespace (:attr:`Keys.namespace`)."""
    return Keys(counter_key).namespace


def app_acl_rule(counter_key: str) -> str:
    """``ACL SETUSER`` arguments (after the user name and password) for an app that marks
    activity on the keys of one deployment through the library."""
    ns = namespace_of(counter_key)
    commands = " ".join(f"+{c}" for c in APP_COMMANDS)
    return (
        f"resetkeys ~{counter_key} ~{REGISTRY} ~{ns}:* resetchannels &{Keys(counter_key).touched} "
        f"-@all {commands}"
    )


def _lua(text: str) -> str:
    """A Lua string literal: every byte but plain ones as a decimal escape."""
    plain = set(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 _-:<>[]()%.,'")
    return '"' + "".join(chr(b) if b in plain else f"\\{b:03d}" for b in text.encode()) + '"'


# Redis's stringmatchlen (src/util.c, Redis 7.0), nocase off, line by line: indexes for
# pointers, `at` for the NUL the C reads one past the end, skip[1] for skipLongerMatches.
# Range bounds compare as signed char, as on x86 builds.
GLOB = """
local STAR, QUESTION, OPEN, CLOSE, CARET, DASH, BACKSLASH = 42, 63, 91, 93, 94, 45, 92
local function signed(b) if b >= 128 then return b - 256 end return b end
local function glob_impl(pat, p, str, s, nesting, skip)
  if nesting > 1000 then return false end
  local plen, slen = #pat - p + 1, #str - s + 1
  local function at(k) return string.byte(pat, k) or 0 end
  while plen > 0 and slen > 0 do
    local c = at(p)
    if c == STAR then
      while plen > 0 and at(p + 1) == STAR do p, plen = p + 1, plen - 1 end
      if plen == 1 then return true end
      while slen > 0 do
        if glob_impl(pat, p + 1, str, s, nesting + 1, skip) then return true end
        if skip[1] then return false end
        s, slen = s + 1, slen - 1
      end
      skip[1] = true
      return false
    elseif c == QUESTION then
      s, slen = s + 1, slen - 1
    elseif c == OPEN then
      p, plen = p + 1, plen - 1
      local negate = at(p) == CARET
      if negate then p, plen = p + 1, plen - 1 end
      local match, sc = false, string.byte(str, s)
      while true do
        if at(p) == BACKSLASH and plen >= 2 then
          p, plen = p + 1, plen - 1
          if at(p) == sc then match = true end
        elseif at(p) == CLOSE then
          break
        elseif plen == 0 then
          p, plen = p - 1, plen + 1
          break
        elseif plen >= 3 and at(p + 1) == DASH then
          local lo, hi = signed(at(p)), signed(at(p + 2))
          if lo > hi then lo, hi = hi, lo end
          p, plen = p + 2, plen - 2
          if signed(sc) >= lo and signed(sc) <= hi then match = true end
        elseif at(p) == sc then
          match = true
        end
        p, plen = p + 1, plen - 1
      end
      if negate then match = not match end
      if not match then return false end
      s, slen = s + 1, slen - 1
    else
      if c == BACKSLASH and plen >= 2 then p, plen = p + 1, plen - 1 end
      if at(p) ~= string.byte(str, s) then return false end
      s, slen = s + 1, slen - 1
    end
    p, plen = p + 1, plen - 1
    if slen == 0 then
      while at(p) == STAR do p, plen = p + 1, plen - 1 end
      break
    end
  end
  return plen == 0 and slen == 0
end
local function glob(pattern, str)
  return glob_impl(pattern, 1, str, 1, 0, {false})
end
"""

_CONSTANTS = "\n".join(
    f"local {name} = {value}"
    for name, value in {
        "VERSION": _lua(LIBRARY_VERSION),
        "REGISTRY": _lua(REGISTRY),
        "OWN_PREFIX": _lua(OWN_KEY_PREFIX),
        "MAX_PAYLOAD": touch_spec.MAX_PAYLOAD_BYTES,
        "MAX_TTL_DIGITS": touch_spec.MAX_TTL_DIGITS,
        "SHOWN_TTL_BYTES": touch_spec.SHOWN_TTL_BYTES,
        "USAGE_TOUCH": _lua(touch_spec.USAGE["tcw_touch"]),
        "USAGE_DONE": _lua(touch_spec.USAGE["tcw_done"]),
        "USAGE_ERROR": _lua(touch_spec.USAGE_ERROR),
        "TTL_ERROR": _lua(touch_spec.TTL_ERROR),
        "PAYLOAD_ERROR": _lua(touch_spec.PAYLOAD_ERROR),
        "OWN_KEY_ERROR": _lua(touch_spec.OWN_KEY_ERROR),
        "DEADLINES": _lua(DEADLINES),
        "PENDING": _lua(PENDING),
        "CLAIMED": _lua(CLAIMED),
        "LEASE": _lua(LEASE),
        "EPOCH": _lua(EPOCH),
        "PAYLOADS": _lua(PAYLOADS),
        "TOUCHED": _lua(TOUCHED),
    }.items()
)

# The functions. `refuse` answers an error before anything is written. Each matching
# deployment first gets the claim script's own decision for the key with no reported
# expiry (scripts._CLAIMING `decide`): a due deadline of a gone key is claimed. No claim
# marker (the leader believes only its own claims' markers, and the app may not publish
# on <ns>:claims): the new episode's deadline is recorded here, so it is claimed by that.
_FUNCTIONS = """
local function refuse(fmt, ...)
  return redis.error_reply('ERR ' .. string.format(fmt, ...))
end
local function checked(name, usage, keys, args, least, most)
  if #keys ~= 1 or #args < least or #args > most then
    return nil, refuse(USAGE_ERROR, name, usage)
  end
  if string.sub(keys[1], 1, #OWN_PREFIX) == OWN_PREFIX then
    return nil, refuse(OWN_KEY_ERROR, name, OWN_PREFIX)
  end
  return keys[1]
end
-- The namespaces whose COUNTER_KEY pattern matches the key.
local function deployments(key)
  local flat, out = redis.call('HGETALL', REGISTRY), {}
  for i = 1, #flat, 2 do
    if glob(flat[i + 1], key) then out[#out + 1] = flat[i] end
  end
  return out
end
local function fencing_token(ns)
  local epoch = redis.call('HGET', ns .. LEASE, 'epoch')
  if epoch then return tonumber(epoch) end
  return tonumber(redis.call('GET', ns .. EPOCH)) or 0
end
-- Claim, in each namespace, the key's episode if it ended unseen; returns how many.
local function claim_ended(key, namespaces, now)
  local pttl = redis.call('PTTL', key)  -- as the claim script's touch: a due key expires
  -- Alive: no episode ended, and the caller records the key's new state itself.
  if pttl >= 0 then return 0 end
  local claimed = 0
  for _, ns in ipairs(namespaces) do
    local k = {deadlines = ns .. DEADLINES, pending = ns .. PENDING, claimed = ns .. CLAIMED,
               ns = ns, markers = '', payloads = ns .. PAYLOADS}
    if decide(k, key, now, pttl, -1, fencing_token(ns), nil).claimed then
      claimed = claimed + 1
    end
  end
  return claimed
end

local function touch(keys, args)
  local key, err = checked('tcw_touch', USAGE_TOUCH, keys, args, 1, 2)
  if not key then return err end
  local ttl, payload = args[1], args[2]
  if not string.find(ttl, '^[1-9][0-9]*$') or #ttl > MAX_TTL_DIGITS then
    return refuse(TTL_ERROR, string.sub(ttl, 1, SHOWN_TTL_BYTES))
  end
  if payload and #payload > MAX_PAYLOAD then
    return refuse(PAYLOAD_ERROR, #payload, MAX_PAYLOAD)
  end
  local now, namespaces = now_ms(), deployments(key)
  local claimed = claim_ended(key, namespaces, now)
  redis.call('SET', key, payload or '1', 'PX', ttl)
  local deadline = redis.call('PEXPIRETIME', key)
  for _, ns in ipairs(namespaces) do
    redis.call('ZADD', ns .. DEADLINES, deadline, key)
    if payload then
      redis.call('HSET', ns .. PAYLOADS, key, payload)
    else
      redis.call('HDEL', ns .. PAYLOADS, key)
    end
    redis.call('PUBLISH', ns .. TOUCHED, key)
  end
  return {deadline, #namespaces, claimed}
end

local function done(keys, args)
  local key, err = checked('tcw_done', USAGE_DONE, keys, args, 0, 0)
  if not key then return err end
  local now, namespaces = now_ms(), deployments(key)
  local claimed = claim_ended(key, namespaces, now)
  local deleted = redis.call('DEL', key)
  for _, ns in ipairs(namespaces) do
    redis.call('ZREM', ns .. DEADLINES, key)
    redis.call('HDEL', ns .. PAYLOADS, key)
    redis.call('PUBLISH', ns .. TOUCHED, key)
  end
  return {deleted, #namespaces, claimed}
end

redis.register_function('tcw_touch', touch)
redis.register_function('tcw_done', done)
redis.register_function{function_name = 'tcw_version', callback = function() return VERSION end,
                        flags = {'no-writes'}}
"""

# What FUNCTION LOAD takes: the shebang must be the first line.
LIBRARY = (
    f"#!lua name={LIBRARY_NAME}\n"
    + _CONSTANTS
    + "\n"
    + GLOB
    + scripts._PRELUDE
    + scripts._CLAIMING
    + _FUNCTIONS
)


@attrs.frozen
class Installed:
    """What :func:`install` did."""

    version: str  # the library's version now loaded
    previous: str | None  # the version it replaced (None: there was none)
    redis_version: str
    registry: dict[str, str]  # namespace -> COUNTER_KEY, every deployment registered


def install(client: Any, counter_key: str | None = None) -> str:
    """Load (or replace) the library on the Redis ``client`` (redis-py, one Redis, 7.0+)
    and, with ``counter_key``, register that deployment so ``tcw_touch`` records its
    keys' deadlines. Returns the library's version.

    FunctionsUnavailable if Redis has no Functions or refuses FUNCTION LOAD; ValueError
    for a ``counter_key`` that could match the worker's own keys."""
    return install_details(client, counter_key).version


def install_details(client: Any, counter_key: str | None = None) -> Installed:
    """:func:`install`, saying what it found and did."""
    if counter_key is not None and (
        not counter_key or may_match_prefix(counter_key, OWN_KEY_PREFIX)
    ):
        raise ValueError(
            f"--counter-key {counter_key!r} could match the worker's own keys, which all "
            f"start with {OWN_KEY_PREFIX!r}: give the COUNTER_KEY your workers run with"
        )
    redis_version = _redis_version(client)
    if redis_version is not None and int(redis_version.split(".")[0]) < 7:
        raise FunctionsUnavailable(
            f"Redis {redis_version} has no Functions (7.0+): upgrade Redis, or keep marking "
            "activity with SET <key> 1 EX <ttl>"
        )
    loaded = _loaded(client)
    # None: not loaded yet (or FCALL refused: FUNCTION LOAD will tell)
    previous = None if isinstance(loaded, rexc.ResponseError) else loaded
    try:
        client.function_load(LIBRARY, replace=True)
    except rexc.ResponseError as exc:
        raise FunctionsUnavailable(_load_refused(exc, redis_version)) from None
    if counter_key is not None:
        client.hset(REGISTRY, namespace_of(counter_key), counter_key)
    return Installed(
        LIBRARY_VERSION, previous, redis_version or "unknown", client.hgetall(REGISTRY)
    )


def _loaded(client: Any) -> Any:
    """The version of the tcw library loaded in Redis, or the ResponseError that says why
    Redis did not tell (not loaded, or FCALL refused). One read."""
    try:
        return client.fcall_ro("tcw_version", 0)
    except rexc.ResponseError as exc:
        return exc


def library_gone(client: Any) -> bool:
    """Whether Redis has no tcw library since it was loaded (a FUNCTION FLUSH, a restore
    without functions): its version function is not found. Another version, or FCALL
    refused, is not this worker's to change between takeovers."""
    loaded = _loaded(client)
    return isinstance(loaded, rexc.ResponseError) and "function not found" in str(loaded).lower()


def ensure(client: Any, counter_key: str) -> str:
    """What a leader does at takeover: the library at this version (loaded only if
    another version or none is), and this deployment registered. One round trip when all
    is in place. Raises FunctionsUnavailable as :func:`install`."""
    if _loaded(client) != LIBRARY_VERSION:
        return install(client, counter_key)
    client.hset(REGISTRY, namespace_of(counter_key), counter_key)
    return LIBRARY_VERSION


def _redis_version(client: Any) -> str | None:
    try:
        return str(client.info("server")["redis_version"])
    except rexc.ResponseError:  # INFO refused by an ACL: FUNCTION LOAD will tell
        return None


def _load_refused(exc: Exception, redis_version: str | None) -> str:
    text = str(exc)
    if "unknown command" in text.lower():
        return (
            f"Redis {redis_version or '(version unknown)'} does not know FUNCTION "
            "(Functions need Redis 7.0+): upgrade Redis, or keep marking activity with "
            "SET <key> 1 EX <ttl>"
        )
    if "NOPERM" in text or "no permissions" in text:
        return (
            f"Redis refused FUNCTION LOAD ({text}): run install-functions as a user "
            f"with +function|load and ~{REGISTRY}, or as an admin"
        )
    return f"Redis refused the library ({text}): see the README, 'Touch'"
