#!/bin/sh
# The app's side with plain redis-cli: mark activity atomically through the Redis
# Functions library of trio-counter-worker (Redis 7.0+).
#
#   examples/touch.sh <key> <ttl_ms> [payload]    # FCALL tcw_touch 1 <key> <ttl_ms> [payload]
#   examples/touch.sh --done <key>                # FCALL tcw_done 1 <key>: no reset
#
# tcw_touch sets the key with its TTL (value: the payload, or 1) and records its
# deadline for the worker in the same atomic step. Load the library once per Redis first:
#
#   trio-counter-worker install-functions --counter-key 'counter:*'
#
# It answers: deadline (Redis ms), deployments matched, earlier episodes claimed.
# Redis connection: REDIS_URL if set (redis://user:pass@host:port/db; rediss:// for TLS),
# else redis-cli's defaults (127.0.0.1:6379; REDISCLI_AUTH for a password).
set -eu

cli() {
    if [ -n "${REDIS_URL:-}" ]; then redis-cli -u "$REDIS_URL" "$@"; else redis-cli "$@"; fi
}

if [ "${1:-}" = "--done" ]; then
    [ $# -eq 2 ] || { echo "usage: $0 --done <key>" >&2; exit 2; }
    cli FCALL tcw_done 1 "$2"
else
    [ $# -ge 2 ] && [ $# -le 3 ] || { echo "usage: $0 <key> <ttl_ms> [payload]" >&2; exit 2; }
    cli FCALL tcw_touch 1 "$@"
fi
