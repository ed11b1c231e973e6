"""What ``chaos`` prints while it runs: the timeline of events, and one progress line
(redrawn in place on a terminal, else every PROGRESS_EVERY seconds)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from typing import TextIO

from .options import PROGRESS_EVERY

__all__ = ["Timeline"]


class Timeline:
    """Events go to ``out`` (nowhere with ``--json``); progress to ``out``, or to ``err``
    with ``--json`` and only when that is a terminal."""

    def __init__(self, json: bool, out: TextIO, err: TextIO) -> None:
        self.t0 = time.monotonic()
        self.events_out: TextIO | None = None if json else out
        status = err if json else out
        self.status_out: TextIO | None = status
        self.status_tty = status.isatty()
        if json and not self.status_tty:
            self.status_out = None  # --json into a pipe: nothing but the JSON object
        self._last_status = 0.0
        self._status_shown = False

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def event(self, message: str) -> None:
        if self.events_out is None:
            return
        self.clear()
        self.events_out.write(f"{self.elapsed():7.2f}s  {message}\n")
        self.events_out.flush()

    def clear(self) -> None:
        """Erase the progress line drawn in place, if any."""
        if self._status_shown and self.status_out is not None:
            self.status_out.write("\r\x1b[K")
            self.status_out.flush()
            self._status_shown = False

    def status(self, line: Callable[[], str], force: bool = False) -> None:
        """Show ``line()`` if it is time to (``force``: now)."""
        out = self.status_out
        if out is None:
            return
        now = time.monotonic()
        if not self.status_tty and not force and now - self._last_status < PROGRESS_EVERY:
            return
        if self.status_tty and not force and now - self._last_status < 0.1:
            return
        self._last_status = now
        text = line()
        if self.status_tty:  # one row, or \r would only return to the last one
            width = shutil.get_terminal_size().columns - 1
            out.write("\r\x1b[K" + text[:width])
            self._status_shown = True
        else:
            out.write(text + "\n")
        out.flush()
