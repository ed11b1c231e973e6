"""HTTP load generator with the worker's HTTP stack (trio + one httpx.AsyncClient with the
worker's settings), run as its own process so it does not share a GIL with the backend.

    .venv/bin/python -m bench.http_load URL REQUESTS CONCURRENCY [--keepalive N]

Prints one JSON object: elapsed time, requests per second, errors by type.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter

import httpx
import trio


async def load(url: str, n: int, concurrency: int, keepalive: int | None) -> dict[str, object]:
    limiter = trio.CapacityLimiter(concurrency)
    errors: Counter[str] = Counter()
    ok = 0
    headers = {"x-secret": "calibration", "content-type": "application/json"}

    # Same construction as the worker (default pool limits: 100 connections, 20 kept
    # alive; 5 s timeout; no redirects), unless --keepalive raises the pool.
    limits = (
        httpx.Limits(max_connections=max(100, keepalive), max_keepalive_connections=keepalive)
        if keepalive
        else httpx.Limits(max_connections=100, max_keepalive_connections=20)
    )
    async with httpx.AsyncClient(
        timeout=httpx.Timeout(5.0), follow_redirects=False, limits=limits
    ) as http:

        async def post(i: int) -> None:
            nonlocal ok
            body = json.dumps(
                {
                    "key": f"c:{i}",
                    "reset_id": f"{i:032x}",
                    "expired_at": time.time(),
                    "fencing_token": 1,
                    "replica_id": "calibration",
                }
            ).encode()
            async with limiter:
                try:
                    resp = await http.post(url, content=body, headers=headers)
                except httpx.HTTPError as exc:
                    errors[type(exc).__name__] += 1
                    return
                if resp.status_code == 200:
                    ok += 1
                else:
                    errors[f"HTTP {resp.status_code}"] += 1

        t0 = trio.current_time()
        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(post, i)
        elapsed = trio.current_time() - t0
    return {
        "requests": n,
        "ok": ok,
        "errors": dict(errors),
        "concurrency": concurrency,
        "keepalive_pool": keepalive or 20,
        "elapsed_s": round(elapsed, 3),
        "req_per_s": round(ok / elapsed, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("requests", type=int)
    parser.add_argument("concurrency", type=int)
    parser.add_argument(
        "--keepalive",
        type=int,
        default=None,
        help="keep-alive pool size (default: httpx's 20, as the worker)",
    )
    args = parser.parse_args()
    print(json.dumps(trio.run(load, args.url, args.requests, args.concurrency, args.keepalive)))


if __name__ == "__main__":
    main()
