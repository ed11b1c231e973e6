"""Waiting, by polling, for what no event signals: Redis's state, a backend's record."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from tests.support.procs import DEFAULT_WAIT

__all__ = ["wait_until"]

T = TypeVar("T")


def wait_until(
    check: Callable[[], T | None], what: str, timeout: float = DEFAULT_WAIT, interval: float = 0.005
) -> T:
    """Call ``check`` every ``interval`` seconds until it returns something truthy; return
    that. AssertionError naming ``what`` if ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what}")
        time.sleep(interval)
