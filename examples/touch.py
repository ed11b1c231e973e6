"""The app's side, in Python with redis-py: mark activity atomically through the Redis
Functions library of trio-counter-worker (Redis 7.0+).

On every bit of activity::

    FCALL tcw_touch 1 <key> <ttl_ms> [<payload>]

sets the key with its TTL (its value: the payload, or "1") and records its deadline for
the worker in the same atomic step, so no leader needs to be listening at that moment.
When the app ends an episode itself (logout, checkout...)::

    FCALL tcw_done 1 <key>

deletes the key: no reset. Load the library once per Redis first::

    trio-counter-worker install-functions --counter-key 'counter:*'

Try it::

    python examples/touch.py counter:user42 --ttl-ms 20000 --payload '{"user": 42}'
    python examples/touch.py counter:user42 --done

``--redis-url`` defaults to ``REDIS_URL`` from the environment, else
``redis://127.0.0.1:6379/0``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import redis


def touch(
    client: redis.Redis, key: str, ttl_ms: int, payload: str | bytes | None = None
) -> list[int]:
    """Re-arm ``key`` for ``ttl_ms`` more milliseconds, with an optional payload (at most
    4096 bytes) that the reset will carry. Returns [deadline_ms, deployments matched,
    earlier episodes claimed]."""
    args = [ttl_ms] if payload is None else [ttl_ms, payload]
    answer: list[int] = client.fcall("tcw_touch", 1, key, *args)
    return answer


def done(client: redis.Redis, key: str) -> list[int]:
    """End the episode without a reset. Returns [keys deleted, deployments matched,
    earlier episodes claimed]."""
    answer: list[int] = client.fcall("tcw_done", 1, key)
    return answer


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Mark activity: FCALL tcw_touch / tcw_done.")
    parser.add_argument("key", help="the counter key")
    parser.add_argument(
        "--ttl-ms",
        type=int,
        default=1_200_000,
        help="milliseconds of inactivity before the reset [1200000]",
    )
    parser.add_argument("--payload", default=None, help="carried by the reset [none]")
    parser.add_argument("--done", action="store_true", help="end the episode: no reset")
    parser.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    args = parser.parse_args(argv)
    client = redis.Redis.from_url(args.redis_url)
    try:
        answer = (
            done(client, args.key)
            if args.done
            else touch(client, args.key, args.ttl_ms, args.payload)
        )
    except redis.ResponseError as exc:
        if "Function not found" in str(exc):
            exc = redis.ResponseError(
                "the tcw library is not loaded: run trio-counter-worker install-functions"
            )
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    print(answer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
