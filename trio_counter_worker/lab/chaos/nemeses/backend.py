"""Faults of the backend: 503 for a while (``http5xx``), requests held past the
replicas' timeout (``httphang``), some keys refused with a 4xx (``poison``)."""

from __future__ import annotations

from ...replicas import Replica
from ..options import HANG_HOLD, HTTP_FAULT_SECONDS, POISON_RETRY_FACTOR, POISON_RETRY_SLACK
from ..record import Fault
from .base import Fired, Nemesis

__all__ = ["BackendNemesis"]


class BackendNemesis(Nemesis):
    kinds = ("http5xx", "httphang", "poison")
    horizon = 0.0  # wall clock: resets refused by a poison may come until then
    poison_chain = 0.0  # wall clock: the first of the poisons that lead up to it

    def fire(self, f: Fault, leader: Replica) -> Fired:
        ledger = self.stage.ledger
        if f.kind == "http5xx":
            ledger.fail_for(HTTP_FAULT_SECONDS)
            f.effect_end = f.fired + HTTP_FAULT_SECONDS
            self.stage.event(f"{self.head(f)}backend answers 503 for {HTTP_FAULT_SECONDS:g} s")
        elif f.kind == "httphang":
            ledger.hang_for(HTTP_FAULT_SECONDS, HANG_HOLD)
            f.effect_end = f.fired + HTTP_FAULT_SECONDS
            self.stage.event(
                f"{self.head(f)}backend hangs for {HTTP_FAULT_SECONDS:g} s (each request "
                f"{HANG_HOLD:g} s, then 503)"
            )
        else:
            self.poison(f)
        return "fired"

    def poison(self, f: Fault) -> None:
        o = self.stage.opts
        f.keys = tuple(self.stage.rng.sample(self.stage.keys, o.poisoned_keys()))
        self.stage.ledger.poison(f.keys, o.poison_status, o.poison_seconds)
        f.effect_end = f.fired + o.poison_seconds
        # A refused reset's backoff keeps growing through back-to-back poisons: the chain
        # runs from the first poison that began before the previous horizon.
        if f.fired > self.horizon:
            self.poison_chain = f.fired
        self.horizon = max(
            self.horizon,
            f.effect_end
            + POISON_RETRY_SLACK
            + POISON_RETRY_FACTOR * (f.effect_end - self.poison_chain),
        )
        self.stage.event(
            f"{self.head(f)}backend answers {o.poison_status} to the resets of "
            f"{len(f.keys)} key(s) for {o.poison_seconds:g} s"
        )
