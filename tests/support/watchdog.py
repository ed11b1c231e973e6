"""A bound on a test that threads may hang in: trio cannot cancel a blocked socket call."""

from __future__ import annotations

import faulthandler
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["watchdog"]


@contextmanager
def watchdog(seconds: float) -> Iterator[None]:
    """Dump all threads' stacks and exit if the block runs longer than ``seconds``."""
    faulthandler.dump_traceback_later(seconds, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
