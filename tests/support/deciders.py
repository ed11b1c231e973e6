"""Deciders alone, on a FakeStore: no watch, no delivery; what they hand on is collected."""

from __future__ import annotations

from tests.fakes import FakeStore
from trio_counter_worker.deciding import Deciders
from trio_counter_worker.leader_state import LeaderState
from trio_counter_worker.metrics import Metrics
from trio_counter_worker.store import FailingNote, PendingReset

__all__ = ["HOLDER", "Delivered", "deciding"]

HOLDER = "h1"

Delivered = list[tuple[PendingReset, FailingNote | None]]


async def deciding(store: FakeStore) -> tuple[LeaderState, Deciders, Delivered, Metrics]:
    """Deciders leading on ``store`` as HOLDER, just resubscribed, with what they hand to
    delivery and their metrics."""
    await store.acquire(HOLDER, "r1", 3_600_000, 0)
    state = LeaderState(store.own)
    state.resubscribed(0)
    delivered: Delivered = []
    metrics = Metrics()
    deciders = Deciders(store, HOLDER, state, lambda r, h: delivered.append((r, h)), metrics)
    return state, deciders, delivered, metrics
