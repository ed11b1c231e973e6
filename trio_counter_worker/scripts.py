"""Lua scripts: every Redis-side decision that must be exclusive, each one atomic.

Each script that changes state first checks that the caller holds the lease
(``HGET lease holder == ARGV[1]``), so a replica that lost its lease — frozen, cut off,
or simply slow — cannot acquire, claim or mark anything. Keys are always passed in
KEYS so the scripts stay correct on a cluster (the worker's own keys share one hash tag).

Results are returned as JSON text (cjson) so one parser handles RESP2 and RESP3.

Deadlines are kept in Redis time (ms since the epoch). ``PEXPIRETIME`` gives them exactly
on Redis 7; on 6.2 it is an unknown command and ``TIME + PTTL`` is used instead.
"""

from __future__ import annotations

from .keys import HANDED_HINT
from .spec import DUE_SLACK_MS, HANDED_FOR_MS, TOMBSTONE_MS

# Shared prelude: current Redis time in ms and a key's absolute expiry.
_PRELUDE = (
    f"local DUE_SLACK_MS = {DUE_SLACK_MS}\n"
    + """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- A key's TTL at `now` and absolute expiry (-1 without a TTL). Looking it up is the
-- touch: a due key expires now. One call on Redis 7 (PEXPIRETIME: -2 gone, -1 no TTL);
-- on 6.2, which lacks it, PTTL and TIME + PTTL.
local has_pexpiretime = true  -- until Redis says otherwise (6.2), once per call
local function ttl_of(key, now)
  if has_pexpiretime then
    local at = redis.pcall('PEXPIRETIME', key)
    if type(at) == 'number' then
      if at < 0 then return at, -1 end
      return math.max(at - now, 0), at
    end
    has_pexpiretime = false
  end
  local pttl = redis.call('PTTL', key)
  if pttl < 0 then return pttl, -1 end
  return pttl, now + pttl
end
local function holds(lease, holder)
  return redis.call('HGET', lease, 'holder') == holder
end
-- Forget a key's payload (tcw_touch), if the caller keeps them (`payloads` not nil).
local function drop_payload(payloads, key)
  if payloads then redis.call('HDEL', payloads, key) end
end
-- Record one key's state at `now` (pttl, absolute expiry `at`) in the deadlines zset.
local function record(deadlines, key, now, pttl, at, payloads)
  if pttl >= 0 then
    redis.call('ZADD', deadlines, at, key)
    return {p = pttl}
  end
  local dl = tonumber(redis.call('ZSCORE', deadlines, key))
  if pttl == -2 and dl and dl <= now + DUE_SLACK_MS then return {due = true} end
  if dl then redis.call('ZREM', deadlines, key) end
  drop_payload(payloads, key)
  return {gone = true}
end
"""
)

# Liveness (see lease_spec): subscribers of a channel, nil where PUBSUB is refused.
_LIVENESS = """
local function subscribers(channel)
  local r = redis.pcall('PUBSUB', 'NUMSUB', channel)
  if type(r) ~= 'table' or r.err then return nil end
  return tonumber(r[2])
end
"""

# KEYS: lease, epoch   ARGV: holder, replica_id, ttl_ms, epoch_floor, mine, suspect,
# endpoint (recorded with a lease taken, told to the others)
# lease_spec.acquire states the rules. The epoch only grows: INCR, raised above the
# highest epoch the caller has seen, so a Redis that lost its data (restart without
# persistence) does not hand out old tokens.
ACQUIRE = (
    _PRELUDE
    + _LIVENESS
    + """
local lease, holder, ttl = KEYS[1], ARGV[1], tonumber(ARGV[3])
local mine, suspect = ARGV[5], ARGV[6]
local function ready()
  if mine == '' then return true end
  local n = subscribers(mine)
  return n == nil or n > 0
end
local current = redis.call('HGET', lease, 'holder')
if current == holder then
  local epoch = tonumber(redis.call('HGET', lease, 'epoch'))
  if not ready() then
    return cjson.encode({acquired = false, ready = false, epoch = epoch,
                         pttl = redis.call('PTTL', lease)})
  end
  if mine ~= '' then redis.call('HSET', lease, 'alive', mine) end
  redis.call('PEXPIRE', lease, ttl)
  return cjson.encode({acquired = true, epoch = epoch, pttl = ttl})
end
if current then
  local theirs = redis.call('HGET', lease, 'alive') or ''
  local liveness, ok = 'off', true
  if theirs ~= '' and mine ~= '' then
    local n = subscribers(theirs)
    if n == nil then liveness = 'unknown' elseif n > 0 then liveness = 'alive'
    else liveness = 'gone' ok = ready() end
  end
  if not (liveness == 'gone' and suspect == theirs and ok) then
    return cjson.encode({acquired = false, pttl = redis.call('PTTL', lease),
                         epoch = tonumber(redis.call('HGET', lease, 'epoch')) or 0,
                         replica = redis.call('HGET', lease, 'replica') or '',
                         liveness = liveness, alive = theirs, ready = ok,
                         endpoint = redis.call('HGET', lease, 'endpoint') or ''})
  end
elseif not ready() then
  return cjson.encode({acquired = false, ready = false, epoch = 0, pttl = 0})
end
local was = ''  -- the replica stolen from (gone), if any
if current then was = redis.call('HGET', lease, 'replica') or '' end
local epoch = redis.call('INCR', KEYS[2])
local floor = tonumber(ARGV[4])
if epoch <= floor then
  epoch = floor + 1
  redis.call('SET', KEYS[2], epoch)
end
redis.call('DEL', lease)
redis.call('HSET', lease, 'holder', holder, 'replica', ARGV[2], 'epoch', epoch,
           'since_ms', now_ms(), 'alive', mine, 'endpoint', ARGV[7] or '')
redis.call('PEXPIRE', lease, ttl)
return cjson.encode({acquired = true, epoch = epoch, pttl = ttl, replica = was})
"""
)

# KEYS: lease   ARGV: holder, ttl_ms
# 1 renewed; 0 not ours; -1 ours, but our liveness channel lost its subscriber: not
# renewed (lease_spec.renew).
RENEW = (
    _PRELUDE
    + _LIVENESS
    + """
if not holds(KEYS[1], ARGV[1]) then return 0 end
local alive = redis.call('HGET', KEYS[1], 'alive')
if alive and alive ~= '' and subscribers(alive) == 0 then return -1 end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
"""
)

# KEYS: lease   ARGV: holder, release channel, replica_id
# Compare-and-delete, then tell the standbys at once.
RELEASE = (
    _PRELUDE
    + """
if holds(KEYS[1], ARGV[1]) then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return 1
end
return 0
"""
)

# KEYS: lease, deadlines, payloads, counter keys...   ARGV: holder
# Record what each counter key's state is now. Per key:
#   {p = pttl}   alive, deadline recorded, fires in pttl ms
#   {due = true} gone but its recorded deadline has passed: an expiry, claim it now
#   {}           no deadline (no TTL, or deleted before its deadline): not tracked, and
#                its payload (if it was touched with one) dropped
TRACK = (
    _PRELUDE
    + """
if not holds(KEYS[1], ARGV[1]) then return cjson.encode({leader = false}) end
local now = now_ms()
local out = {}
for i = 4, #KEYS do
  local key = KEYS[i]
  local pttl, at = ttl_of(key, now)
  out[#out + 1] = record(KEYS[2], key, now, pttl, at, KEYS[3])
end
return cjson.encode({leader = true, now = now, keys = out})
"""
)

# Claiming: the pending record, a tombstone (key -> claim time) and, on one Redis, a
# marker published on the leader's own subscription. Pub/sub keeps publication order, so
# the marker tells the leader which of the key's `expired` events came after the claim
# (real expiries) and which before (the claim's own echo). spec.claim is this decision in
# Python; tests/test_spec_contract.py holds the two to the same outcomes.
_CLAIMING = (
    f"local TOMBSTONE_MS = {TOMBSTONE_MS}\n"
    + """
local function claim_episode(k, key, dl, epoch, now)
  local episode = k.ns .. '\\n' .. key .. '\\n' .. string.format('%d', dl)
  local id = string.sub(redis.sha1hex(episode), 1, 32)
  local fields = {reset_id = id, key = key, deadline_ms = dl, fencing_token = epoch,
                  claimed_ms = now}
  if k.payloads then  -- the episode's payload (tcw_touch) goes with its reset
    fields.payload = redis.call('HGET', k.payloads, key) or nil
    redis.call('HDEL', k.payloads, key)
  end
  local rec = cjson.encode(fields)
  redis.call('HSETNX', k.pending, id, rec)
  redis.call('ZADD', k.claimed, now, key)
  if k.markers ~= '' then
    redis.call('PUBLISH', k.markers, string.format('%d', now) .. ' ' .. key)
  end
  return rec
end
-- `expired`, published after `after`, is the echo of a later claim (spec.is_echo).
local function is_echo(claimed, key, now, after)
  local t = tonumber(redis.call('ZSCORE', claimed, key))
  return t ~= nil and t >= now - TOMBSTONE_MS and t > after
end
-- The decision for one key, given its state at `now` (pttl, absolute expiry `at`);
-- `after`: nil, or Redis reported it expired after that time; `heard`: as an `expired`
-- event, which ends an episode even if the key is set again by now (spec.claim).
-- k: {deadlines, pending, claimed, ns, markers, payloads (or nil)}; returns the row for
-- the caller's answer.
local function decide(k, key, now, pttl, at, epoch, after, heard)
  local dl = tonumber(redis.call('ZSCORE', k.deadlines, key))
  local due = dl ~= nil and dl <= now + DUE_SLACK_MS
  if pttl >= 0 then
    redis.call('ZADD', k.deadlines, at, key)
  elseif dl then
    redis.call('ZREM', k.deadlines, key)
  end
  if after and (pttl == -2 or heard) and not is_echo(k.claimed, key, now, after) then
    local rec = claim_episode(k, key, due and dl or now, epoch, now)
    if pttl >= 0 then return {p = pttl, claimed = rec} end  -- set again since
    return {claimed = rec}
  end
  if pttl >= 0 then return {p = pttl} end
  if pttl == -1 or not due then
    drop_payload(k.payloads, key)
    return {gone = true}
  end
  return {claimed = claim_episode(k, key, dl, epoch, now)}
end
-- ARGV[i]: '' (not reported) or the time Redis reported the key expired after, with
-- 'h' before it if that report is an `expired` event heard. Returns after, heard.
local function reported_after(i)
  local v = ARGV[i]
  if v == '' then return nil, false end
  if string.sub(v, 1, 1) == 'h' then return tonumber(string.sub(v, 2)), true end
  return tonumber(v), false
end
"""
)

# KEYS: lease, deadlines, pending, claimed, payloads, counter keys...
# ARGV: holder, namespace, marker channel ('' for none), then per counter key '' or the
# time Redis reported it expired after.
# At a key's deadline, decide. Touching the key makes Redis expire it now if it is due,
# instead of whenever its background cycle finds it. If it is gone and its recorded
# deadline has passed, that inactivity episode ends: create the pending reset, whose id
# is derived from (namespace, key, deadline) so it is the same whoever computes it.
# A key still alive had its TTL extended: it is rescheduled, not reset. A reported
# expiry that is not the echo of a claim ends an episode even without a usable recorded
# deadline (set and expired before the leader read its TTL): it ends when it was seen.
CLAIM = (
    _PRELUDE
    + _CLAIMING
    + """
if not holds(KEYS[1], ARGV[1]) then return cjson.encode({leader = false}) end
local epoch = tonumber(redis.call('HGET', KEYS[1], 'epoch'))
local now = now_ms()
local k = {deadlines = KEYS[2], pending = KEYS[3], claimed = KEYS[4], ns = ARGV[2],
           markers = ARGV[3], payloads = KEYS[5]}
local out = {}
for i = 6, #KEYS do
  local key = KEYS[i]
  local pttl, at = ttl_of(key, now)  -- the touch: a due key expires now
  out[#out + 1] = decide(k, key, now, pttl, at, epoch, reported_after(i - 2))
end
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - TOMBSTONE_MS)
return cjson.encode({leader = true, now = now, keys = out})
"""
)

# KEYS: lease, pending, failing   ARGV: holder, reset_id...
MARK_SENT = (
    _PRELUDE
    + """
if not holds(KEYS[1], ARGV[1]) then return -1 end
redis.call('HDEL', KEYS[3], unpack(ARGV, 2))
return redis.call('HDEL', KEYS[2], unpack(ARGV, 2))
"""
)

# KEYS: lease, pending, failing   ARGV: holder, then (reset_id, note JSON) pairs
# Why a reset is not delivered yet, for `status` and the next leader. Only for resets
# still pending: a note must not outlive its reset.
NOTE_FAILING = (
    _PRELUDE
    + """
if not holds(KEYS[1], ARGV[1]) then return -1 end
local n = 0
for i = 2, #ARGV, 2 do
  if redis.call('HEXISTS', KEYS[2], ARGV[i]) == 1 then
    redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
    n = n + 1
  end
end
return n
"""
)

# KEYS: lease, pending, failing, dead   ARGV: holder, reset_id, note JSON
# Give up on a reset (RESET_GIVE_UP_AFTER): its record moves to the dead letters, with
# why, until an operator runs `redeliver`.
BURY = (
    _PRELUDE
    + """
if not holds(KEYS[1], ARGV[1]) then return -1 end
local rec = redis.call('HGET', KEYS[2], ARGV[2])
if not rec then return 0 end
redis.call('HSET', KEYS[4], ARGV[2], cjson.encode({record = rec, note = ARGV[3],
                                                   dead_ms = now_ms()}))
redis.call('HDEL', KEYS[2], ARGV[2])
redis.call('HDEL', KEYS[3], ARGV[2])
return 1
"""
)

# KEYS: pending, dead   ARGV: channel, reset_id... (none: every dead reset)
# `redeliver`: dead resets become pending again, under the same reset_id, and the leader
# is told to pick them up. No lease check: any replica or operator may ask.
REDELIVER = """
local ids = {}
if #ARGV > 1 then
  for i = 2, #ARGV do ids[#ids + 1] = ARGV[i] end
else
  ids = redis.call('HKEYS', KEYS[2])
end
local n = 0
for _, id in ipairs(ids) do
  local dead = redis.call('HGET', KEYS[2], id)
  if dead then
    redis.call('HSETNX', KEYS[1], id, cjson.decode(dead).record)
    redis.call('HDEL', KEYS[2], id)
    n = n + 1
  end
end
if n > 0 then redis.call('PUBLISH', ARGV[1], n) end
return n
"""

# KEYS: handed   ARGV: redeliver channel, then entries (spec.handed_entries)
# A former leader hands over what it saw and could not decide (handover.py). No lease
# check: these are facts for whoever leads, who decides them with CLAIM. Timed by
# Redis's clock (TAKE_HANDED drops the stale); the set goes with its last entry.
HAND_OVER = (
    _PRELUDE
    + f"local HANDED_FOR_MS, HANDED_HINT = {HANDED_FOR_MS}, '{HANDED_HINT}'\n"
    + """
local now = now_ms()
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], now, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], HANDED_FOR_MS)
redis.call('PUBLISH', ARGV[1], HANDED_HINT)
return #ARGV - 1
"""
)

# KEYS: lease, handed   ARGV: holder, most
# The leader takes what former leaders handed over: {dropped, entries}, or -1 if not
# the holder. spec.take_handed is this in Python.
TAKE_HANDED = (
    _PRELUDE
    + f"local HANDED_FOR_MS = {HANDED_FOR_MS}\n"
    + """
if not holds(KEYS[1], ARGV[1]) then return -1 end
local now = now_ms()
local dropped = redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. (now - HANDED_FOR_MS))
local taken = redis.call('ZRANGE', KEYS[2], 0, tonumber(ARGV[2]) - 1)
if #taken > 0 then redis.call('ZREM', KEYS[2], unpack(taken)) end
return {dropped, taken}
"""
)

# KEYS: lease, deadlines   ARGV: holder, after ('-inf', or '(' .. ms: past it), most rows
# One page of recorded deadlines, earliest first, up to ARGV[4] ms past Redis's clock
# ('' : all), with Redis's clock to turn them into delays (ZRANGE ... BYSCORE, 6.2+: the
# ACL's +zrange covers it). Paged, since a million of them in one reply outlasts any
# timeout; a page ends with every key at its last deadline, so the next starts strictly
# after it (no offsets that keys recorded or claimed meanwhile could shift). `upto`:
# every deadline up to it has been read, by this page or earlier ones.
TRACKED = (
    _PRELUDE
    + """
if not holds(KEYS[1], ARGV[1]) then return cjson.encode({leader = false}) end
local limit = tonumber(ARGV[3])
local now = now_ms()
local top = '+inf'
if ARGV[4] ~= '' then top = string.format('%.0f', now + tonumber(ARGV[4])) end
local rows = redis.call('ZRANGE', KEYS[2], ARGV[2], top, 'BYSCORE', 'LIMIT', 0, limit,
                        'WITHSCORES')
local more = #rows == 2 * limit
local upto = top
if more then
  local last = rows[#rows]
  while #rows > 0 and rows[#rows] == last do
    rows[#rows] = nil
    rows[#rows] = nil
  end
  for _, v in ipairs(redis.call('ZRANGE', KEYS[2], last, last, 'BYSCORE', 'WITHSCORES')) do
    rows[#rows + 1] = v
  end
  upto = last
end
return cjson.encode({leader = true, now = now, rows = rows, more = more, upto = upto})
"""
)


# -- Redis Cluster ---------------------------------------------------------------------
# On a cluster a counter key and the worker's keys live in different slots, and no script
# may span slots. Each decision is split: PROBE runs on the counter key's own node
# (touching it, so a due key expires now) and returns facts stamped with that node's
# clock; APPLY_TRACK / APPLY_CLAIM run in the worker's slot, check the lease, and apply
# the facts with the same rules as TRACK / CLAIM. Facts older than the last ones applied
# for a key are not applied (the key is looked at again instead): without that, a "gone"
# probe taken before the app set the key again could erase the new deadline.

# KEYS: counter key   ->  {now_ms, pttl, expire_at (or -1)}
PROBE = (
    _PRELUDE
    + """
local now = now_ms()
local pttl, at = ttl_of(KEYS[1], now)
return {now, pttl, at}
"""
)

# Shared part: read one key's facts from ARGV at position i; skip stale ones.
_FACTS = """
local function facts(i)
  return ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
end
local function fresh(seen_key, key, now)
  local seen = tonumber(redis.call('ZSCORE', seen_key, key))
  if seen and seen > now then return false end
  redis.call('ZADD', seen_key, now, key)
  return true
end
local function prune(seen_key, now)
  if now then redis.call('ZREMRANGEBYSCORE', seen_key, '-inf', now - 3600000) end
end
"""

# KEYS: lease, deadlines, seen   ARGV: holder, then (key, now, pttl, at) per key
APPLY_TRACK = (
    _PRELUDE
    + _FACTS
    + """
if not holds(KEYS[1], ARGV[1]) then return cjson.encode({leader = false}) end
local out, last = {}, nil
for i = 2, #ARGV, 4 do
  local key, now, pttl, at = facts(i)
  last = now
  if fresh(KEYS[3], key, now) then
    out[#out + 1] = record(KEYS[2], key, now, pttl, at)
  else
    out[#out + 1] = {due = true}
  end
end
prune(KEYS[3], last)
return cjson.encode({leader = true, keys = out})
"""
)

# KEYS: lease, deadlines, pending, seen, claimed
# ARGV: holder, namespace, then per key its facts and '' or the time Redis reported it
# expired after (as CLAIM). No markers: on a cluster a key's events come from its own
# node and a marker from the worker's, so their order says nothing.
APPLY_CLAIM = (
    _PRELUDE
    + _FACTS
    + _CLAIMING
    + """
if not holds(KEYS[1], ARGV[1]) then return cjson.encode({leader = false}) end
local epoch = tonumber(redis.call('HGET', KEYS[1], 'epoch'))
local k = {deadlines = KEYS[2], pending = KEYS[3], claimed = KEYS[5], ns = ARGV[2],
           markers = ''}
local out, last = {}, nil
for i = 3, #ARGV, 5 do
  local key, now, pttl, at = facts(i)
  last = now
  if fresh(KEYS[4], key, now) then
    out[#out + 1] = decide(k, key, now, pttl, at, epoch, reported_after(i + 4))
  else
    out[#out + 1] = {due = true}
  end
end
prune(KEYS[4], last)
if last then redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', last - TOMBSTONE_MS) end
return cjson.encode({leader = true, keys = out})
"""
)


# KEYS: a scratch key in the worker's namespace   ARGV: a scratch channel there
# The start-up permission check: every command the scripts use, called harmlessly on the
# scratch key (deleted again); returns the refused ones. (Key patterns are checked by
# Redis before a script runs, so the bridge checks counter-key access with a plain PTTL.)
PREFLIGHT = """
local s, refused = KEYS[1], {}
local function try(name, ...)
  local r = redis.pcall(name, ...)
  if type(r) == 'table' and r.err then
    local e = r.err
    if string.find(e, 'NOPERM', 1, true) or string.find(e, 'no permissions', 1, true)
       or string.find(e, "can't run", 1, true) then
      refused[#refused + 1] = string.lower(name)
    end
  end
end
try('TIME')
try('HSET', s, 'f', '1') try('HSETNX', s, 'g', '1') try('HGET', s, 'f')
try('HEXISTS', s, 'f') try('HKEYS', s) try('HDEL', s, 'f') try('DEL', s)
try('SET', s, '0') try('INCR', s) try('PEXPIRE', s, 1000) try('PTTL', s)
try('PEXPIRETIME', s) try('DEL', s)
try('ZADD', s, 0, 'm') try('ZSCORE', s, 'm') try('ZRANGE', s, 0, -1)
try('ZREM', s, 'm') try('ZREMRANGEBYSCORE', s, '-inf', 0) try('DEL', s)
try('PUBLISH', ARGV[1], 'preflight')
return refused
"""

# The scripts a worker runs on one Redis (or a Cluster's worker slot), by name; the
# Cluster's apply scripts come on top (redis_cluster.py).
ON_ONE = (
    "ACQUIRE",
    "RENEW",
    "RELEASE",
    "TRACK",
    "CLAIM",
    "MARK_SENT",
    "TRACKED",
    "NOTE_FAILING",
    "BURY",
    "REDELIVER",
    "HAND_OVER",
    "TAKE_HANDED",
    "PREFLIGHT",
)
