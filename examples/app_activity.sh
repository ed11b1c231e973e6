#!/bin/sh
# The app's side with plain redis-cli: mark activity on a counter key.
#
#   examples/app_activity.sh [key] [ttl]        # defaults: contador_reset 1200
#
# On every bit of activity the app (re)arms the key with its TTL, in one atomic command:
#
#   SET <key> 1 EX <ttl>
#
# When nothing re-arms it for <ttl> seconds the key expires and the worker POSTs a reset.
# Redis connection: REDIS_URL if set (redis://user:pass@host:port/db; rediss:// for TLS),
# else redis-cli's defaults (127.0.0.1:6379; REDISCLI_AUTH for a password).
#
# One counter per user (a glob COUNTER_KEY): start the worker with
#
#   COUNTER_KEY=counter:*
#
# and mark each user's activity on their own key; each expires, and is reset, on its own:
#
#   redis-cli SET counter:user42 1 EX 1200
#   redis-cli SET counter:user7  1 EX 1200
#
# (e.g. examples/app_activity.sh counter:user42 1200). The reset request's "key" field
# then says which counter to zero.
set -eu

key=${1:-contador_reset}
ttl=${2:-1200}
url=${REDIS_URL:-}

if [ -n "$url" ]; then
    redis-cli -u "$url" SET "$key" 1 EX "$ttl"
    redis-cli -u "$url" TTL "$key"
else
    redis-cli SET "$key" 1 EX "$ttl"
    redis-cli TTL "$key"
fi
