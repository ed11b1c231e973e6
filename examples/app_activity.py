"""The app's side, in Python with redis-py: mark activity on a counter key.

All the app has to do, on every bit of activity, is (re)arm the key with its TTL::

    SET <key> 1 EX <ttl>

When no activity re-arms it for ``ttl`` seconds the key expires and the worker POSTs
a reset to the backend. ``COUNTER_KEY`` in the worker's settings names the key, or a
glob such as ``counter:*`` for one counter per key (``counter:user42``, ...).

Try it::

    python examples/app_activity.py                           # contador_reset, 1200 s
    python examples/app_activity.py counter:user42 --ttl 20   # with COUNTER_KEY=counter:*
    python examples/app_activity.py --every 5 --count 3       # three bits of activity

``--redis-url`` defaults to ``REDIS_URL`` from the environment, else
``redis://127.0.0.1:6379/0``.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence

import redis

DEFAULT_KEY = "contador_reset"
DEFAULT_TTL = 1200  # seconds of inactivity that end an episode


def mark_activity(client: redis.Redis, key: str = DEFAULT_KEY, ttl: int = DEFAULT_TTL) -> None:
    """Re-arm ``key`` for another ``ttl`` seconds. Call it on every bit of activity.

    One atomic command: ``SET key 1 EX ttl``. Do not split it into SET + EXPIRE (a crash
    in between leaves a key that never expires, so no reset ever comes) and do not use
    a TTL under a few seconds (the worker cannot promise a reset for a key whose whole
    life fits inside a leader failover; see the project README).
    """
    if ttl < 1:
        raise ValueError("ttl must be at least 1 second")
    client.set(key, "1", ex=ttl)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Mark activity: SET <key> 1 EX <ttl>.")
    parser.add_argument(
        "key", nargs="?", default=DEFAULT_KEY, help=f"the counter key [{DEFAULT_KEY}]"
    )
    parser.add_argument(
        "--ttl",
        type=int,
        default=DEFAULT_TTL,
        help=f"seconds of inactivity before the reset [{DEFAULT_TTL}]",
    )
    parser.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument("--count", type=int, default=1, help="how many times to mark [1]")
    parser.add_argument(
        "--every", type=float, default=1.0, help="seconds between marks when --count > 1 [1]"
    )
    args = parser.parse_args(argv)
    client = redis.Redis.from_url(args.redis_url)
    try:
        for i in range(args.count):
            if i:
                time.sleep(args.every)
            mark_activity(client, args.key, args.ttl)
            print(f"SET {args.key} 1 EX {args.ttl}  (ttl now {client.ttl(args.key)} s)")
    finally:
        client.close()


if __name__ == "__main__":
    main()
