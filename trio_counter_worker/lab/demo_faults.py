"""The demo's faults on the leader: a SIGKILL (a crash: a standby takes over once Redis
has dropped the dead leader's connection) and a SIGTERM (a graceful handoff), each at
its time, each followed by a replacement replica; and, after the SIGKILL, how long until
another replica sent a reset.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .backend import ResetPost
from .demo_report import Fault, kill_gap
from .demo_stage import DemoStage
from .replicas import Replica

__all__ = ["Faults"]


class Faults:
    """The SIGKILL at a third of ``duration``, the SIGTERM at two thirds; one at a time
    (:attr:`pending` until the lease shows who took over). ``say`` narrates."""

    def __init__(
        self,
        duration: float,
        stage: DemoStage,
        say: Callable[[str], None],
        *,
        lease_ttl_ms: int,
        leader_wait: float,
    ) -> None:
        self.all = [
            Fault("SIGKILL", duration / 3),
            Fault("SIGTERM", 2 * duration / 3),
        ]
        self.pending: Fault | None = None  # fired; its failover not yet seen in the lease
        self.stage = stage
        self.say = say
        self.lease_ttl_ms = lease_ttl_ms
        self.leader_wait = leader_wait  # a fault waits this long for a leader to hit

    def run(self, now: float, leader: tuple[str, int] | None) -> None:
        """Fire the next fault due, if a leader is there to hit. ``now``: seconds since the
        first leader (when the app's activity started); ``leader``: (replica, fencing
        token) in the lease."""
        for fault in self.all:
            if fault.victim or now < fault.at:
                continue
            if self.pending is not None:
                return  # the previous fault's failover is still going on
            target = self.stage.replicas.get(leader[0]) if leader is not None else None
            if leader is None or target is None or not target.alive or target.signalled:
                if not fault.waited:
                    fault.waited = True
                    self.say(f"{fault.kind} due, waiting for a leader to hit")
                if now >= fault.at + self.leader_wait:
                    self.say(f"no leader for {self.leader_wait:g} s: skipping the {fault.kind}")
                    fault.victim = "-"
                return
            self._fire(fault, target, leader[1])
            return

    def _fire(self, fault: Fault, target: Replica, epoch: int) -> None:
        fault.victim = target.name
        target.signalled = fault.kind
        fault.fired_wall = time.time()
        if fault.kind == "SIGKILL":
            target.proc.kill()
            target.proc.wait()
            fault.fired_wall = time.time()  # the gap to the next reset counts from here
            self.say(
                f"SIGKILL {target.name} (leader, fencing token {epoch}): a crash; a standby "
                "takes over once Redis drops its connection (without liveness: when its "
                f"{self.lease_ttl_ms} ms lease expires)"
            )
        else:
            target.proc.terminate()
            self.say(
                f"SIGTERM {target.name} (leader, fencing token {epoch}): graceful "
                "stop, it hands the lease over"
            )
        self.pending = fault
        name = self.stage.spawn_replica()
        self.say(f"started {name} (replacement)")

    def time_kill_gap(self, post: ResetPost) -> None:
        """The first reset sent after a SIGKILL of the leader, by another replica (what
        the dead one wrote before it died may still arrive): how long resets stopped."""
        for fault in self.all:
            if (
                fault.kind == "SIGKILL"
                and fault.hit
                and fault.next_reset is None
                and post.received_at >= fault.fired_wall
                and post.replica_id != fault.victim
            ):
                fault.next_reset = post.received_at - fault.fired_wall
                fault.next_due = post.expired_at - fault.fired_wall
                self.say(
                    f"first reset sent since the SIGKILL: {kill_gap(fault)} (by {post.replica_id})"
                )
