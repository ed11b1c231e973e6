"""The lab's one exception."""

from __future__ import annotations

__all__ = ["LabError"]


class LabError(RuntimeError):
    """Something the lab needs did not work (a server that did not start, no leader in
    time); the message says what."""
