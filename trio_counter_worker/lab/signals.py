"""SIGTERM like Ctrl-C for the lab's commands, and a cleanup that signals cannot cut."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

__all__ = ["handle_signals", "interrupt"]


def interrupt(signum: int, frame: FrameType | None) -> None:
    """A signal handler that turns the signal into KeyboardInterrupt."""
    raise KeyboardInterrupt


@contextlib.contextmanager
def handle_signals(handler: Any) -> Iterator[None]:
    """Route SIGTERM (and SIGINT, unless ``handler`` is :func:`interrupt`) to ``handler``
    while inside; only possible from the main thread, else a no-op.

    ``with handle_signals(interrupt):`` makes SIGTERM behave like Ctrl-C;
    ``with handle_signals(signal.SIG_IGN):`` protects a cleanup from both.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = (signal.SIGTERM,) if handler is interrupt else (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, handler) for sig in sigs}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
