"""``flags``: the app rewrites ``notify-keyspace-events`` (to ``""`` or ``Ex``, in turn);
the leader must restore them and rescan. While it lasts every SET gets a TTL of at least
FLAGS_TTL_MS: the rescan is how the leader learns of such a key, and it must find it
alive."""

from __future__ import annotations

from typing import Any

import redis

from ...replicas import Replica
from ..options import FLAGS_TTL_MS, FLAGS_VALUES
from ..record import Fault
from ..report import ms as _ms
from .base import Fired, Nemesis

__all__ = ["FlagsNemesis"]

NAME = "notify-keyspace-events"


class FlagsNemesis(Nemesis):
    kinds = ("flags",)

    def fire(self, f: Fault, leader: Replica) -> Fired:
        """Where CONFIG is refused, the fault is dropped for the rest of the run (with a
        note)."""
        earlier = sum(1 for x in self.stage.faults if x.kind == "flags") - 1  # f is counted
        value = FLAGS_VALUES[earlier % len(FLAGS_VALUES)]
        try:
            before = str(dict(self.stage.client.config_get(NAME)).get(NAME, ""))
            self.stage.client.config_set(NAME, value)
        except redis.ResponseError as exc:
            note = f"the flags fault is skipped: Redis refused CONFIG ({exc})"
            self.stage.notes.append(note)
            self.stage.event(note)
            return "dropped"
        f.flags = (before, value)
        self.stage.pending = f
        self.stage.event(f"{self.head(f)}the app sets {NAME} from {before!r} to {value!r}")
        return "fired"

    def _current(self) -> Fault | None:
        f = self.stage.pending
        return f if f is not None and f.kind == "flags" else None

    def min_ttl_ms(self) -> int:
        return FLAGS_TTL_MS if self._current() is not None else 0

    def count_sets(self, sets: int) -> None:
        """``sets`` SETs were just made: blind ones if the leader has not restored yet."""
        f = self._current()
        if f is not None and f.restored is None:
            f.blind_sets += sets

    def on_log(self, replica: Replica, record: dict[str, Any], at: float | None) -> None:
        f = self.stage.faults[-1] if self.stage.faults else None
        if f is None or f.kind != "flags" or at is None or at < f.fired - 0.001:
            return
        # Put back by the leader's periodic check (flags_restored), or as it resubscribes
        # after a Redis error (flags_enabled: every subscription starts by setting them).
        if record.get("event") in ("flags_restored", "flags_enabled") and f.restored is None:
            f.restored = at
            self.stage.event(
                f"{replica.name} restored {NAME} to "
                f"{record.get('flags')!r} {_ms(at - f.fired)} after the rewrite"
            )
        elif (
            str(record.get("message", "")).startswith("reconciled:")
            and f.restored is not None
            and f.resynced is None
        ):
            f.resynced = at
            self.stage.event(f"{replica.name} rescanned {_ms(at - f.fired)} after the rewrite")
