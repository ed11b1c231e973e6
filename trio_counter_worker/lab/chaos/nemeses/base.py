"""What every nemesis (a family of faults) offers the schedule."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from ...replicas import Replica
from ..driver import AppDriver
from ..fleet import Fleet
from ..record import Fault
from ..stage import Stage

__all__ = ["Fired", "Nemesis"]

# fired: the fault is on; skipped: not this time (the fault is dropped from the record);
# dropped: not in this run at all (nor the kind)
Fired = Literal["fired", "skipped", "dropped"]


class Nemesis:
    """Injects the faults of :attr:`kinds`, one at a time, when the schedule says so; may
    follow them up later (:meth:`tick`) and read the replicas' logs (:meth:`on_log`)."""

    kinds: ClassVar[tuple[str, ...]] = ()

    def __init__(self, stage: Stage, fleet: Fleet, driver: AppDriver) -> None:
        self.stage = stage
        self.fleet = fleet
        self.driver = driver

    def fire(self, f: Fault, leader: Replica) -> Fired:
        """Inject ``f`` (already in the record); ``leader``: the lease holder's process."""
        raise NotImplementedError

    def tick(self, mono: float) -> None:
        """Follow-ups that fall due by ``mono`` (thaw, heal, ...)."""

    @property
    def busy(self) -> bool:
        """A follow-up is still due: the run does not end meanwhile."""
        return False

    @property
    def holds_faults(self) -> bool:
        """No other fault may start meanwhile (it would end this one)."""
        return False

    def min_ttl_ms(self) -> int:
        """A floor for the TTLs the app sets now; 0: none."""
        return 0

    def on_log(self, replica: Replica, record: dict[str, Any], at: float | None) -> None:
        """A replica's log record (``at``: its time, wall clock)."""

    def head(self, f: Fault) -> str:
        return f"fault {f.number}: "
