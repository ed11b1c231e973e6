"""Faults of the leader's process: SIGKILL (a crash), SIGTERM (a graceful handoff), and
SIGSTOP past its lease, then SIGCONT. A replacement replica follows a kill or a term."""

from __future__ import annotations

import signal
import time

from ...replicas import Replica
from ..driver import AppDriver
from ..fleet import Fleet
from ..options import FREEZE_LEASES
from ..record import Fault
from ..stage import Stage
from .base import Fired, Nemesis

__all__ = ["LeaderNemesis"]


class LeaderNemesis(Nemesis):
    kinds = ("kill", "term", "stop")

    def __init__(self, stage: Stage, fleet: Fleet, driver: AppDriver) -> None:
        super().__init__(stage, fleet, driver)
        self.thaws: list[tuple[float, Replica]] = []  # (monotonic, frozen replica)

    def fire(self, f: Fault, leader: Replica) -> Fired:
        f.victim = leader.name
        leader.signalled = f.kind
        who = f"{leader.name} (leader, fencing token {f.epoch_before})"
        if f.kind == "kill":
            leader.proc.kill()
            leader.proc.wait()
            # the kill -> next reset gap is measured from the moment the process is gone
            f.fired = time.time()
            self.stage.event(f"{self.head(f)}SIGKILL {who}; started {self.fleet.spawn()}")
        elif f.kind == "term":
            leader.proc.terminate()
            self.stage.event(f"{self.head(f)}SIGTERM {who}; started {self.fleet.spawn()}")
        else:
            leader.proc.send_signal(signal.SIGSTOP)
            freeze = FREEZE_LEASES * self.stage.opts.lease
            self.thaws.append((f.fired_mono + freeze, leader))
            self.stage.event(f"{self.head(f)}SIGSTOP {who} for {freeze:.1f} s")
        self.stage.pending = f
        return "fired"

    @property
    def busy(self) -> bool:
        return bool(self.thaws)

    def tick(self, mono: float) -> None:
        for when, replica in list(self.thaws):
            if mono >= when:
                self.thaws.remove((when, replica))
                if replica.alive:
                    replica.proc.send_signal(signal.SIGCONT)
                replica.signalled = None
                self.stage.event(f"SIGCONT {replica.name}: thawed, its lease long gone")
