"""Callbacks for programs that embed the worker: leadership changes and delivered resets."""

from __future__ import annotations

from collections.abc import Callable

import attrs

from .store import PendingReset

__all__ = ["Hooks"]


def _nothing(*_args: object) -> None:
    return None


@attrs.frozen
class Hooks:
    """Plain synchronous callbacks, called from the worker's trio task.

    They must not block; to do async work, hand off to a channel or a nursery of yours.
    An exception raised by ``on_reset`` is a bug in leader work: it is logged with its
    traceback, and the replica releases the lease and campaigns again after a backoff.
    """

    on_elected: Callable[[int], None] = _nothing
    """This replica became leader with the given fencing token."""
    on_deposed: Callable[[int], None] = _nothing
    """This replica stopped leading (lease lost, released or cancelled)."""
    on_reset: Callable[[PendingReset, int], None] = _nothing
    """A reset was delivered (2xx) and marked sent; also given the number of attempts."""
