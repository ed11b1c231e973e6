"""Faults of the replicas' way to Redis, through their fault proxies: ``slow`` (latency
added to every round trip) and ``partition`` (the leader's traffic, or every replica's,
blackholed: open sockets, no byte, FIN or RST). Each is healed when its time is up."""

from __future__ import annotations

import math
import time
from typing import Any

from ...replicas import Replica
from ..driver import AppDriver
from ..fleet import Fleet
from ..record import Fault
from ..report import ms as _ms
from ..stage import Stage
from .base import Fired, Nemesis

__all__ = ["NetworkNemesis", "probe_text"]


def probe_text(probe: tuple[float, float] | None) -> str:
    if probe is None:
        return " (the PING probe failed)"
    return f" (a PING: {_ms(probe[0])} through a proxy, {_ms(probe[1])} directly)"


class NetworkNemesis(Nemesis):
    kinds = ("slow", "partition")

    def __init__(self, stage: Stage, fleet: Fleet, driver: AppDriver) -> None:
        super().__init__(stage, fleet, driver)
        self.heals: list[tuple[float, Fault]] = []  # (monotonic, slow or partition fault)

    def fire(self, f: Fault, leader: Replica) -> Fired:
        if f.kind == "partition":
            self.partition(f, leader)
            return "fired"
        o = self.stage.opts
        assert o.slow_for is not None  # else it is not in the rotation
        for proxy in self.fleet.proxies.values():
            proxy.delay(o.slow_ms / 2000)
        f.probe = self.fleet.probe(self.fleet.proxies[leader.name])
        f.effect_end = f.fired + o.slow_for
        self.heals.append((f.fired_mono + o.slow_for, f))
        self.stage.event(
            f"{self.head(f)}the proxies add {o.slow_ms} ms to every Redis round trip for "
            f"{o.slow_for:g} s{probe_text(f.probe)}"
        )
        return "fired"

    def slow_whole_run(self, mono: float) -> None:
        """The proxies have delayed everything from the start: recorded as one fault."""
        s = self.stage
        f = Fault(len(s.faults) + 1, "slow", time.time(), mono, effect_end=math.inf)
        s.faults.append(f)
        f.probe = self.fleet.probe(next(iter(self.fleet.proxies.values())))
        s.event(
            f"fault {f.number}: the proxies add {s.opts.slow_ms} ms to every "
            f"Redis round trip for the whole run{probe_text(f.probe)}"
        )

    def partition(self, f: Fault, leader: Replica) -> None:
        """Blackhole the leader's proxy (or every replica's); healed by :meth:`tick`."""
        o = self.stage.opts
        names = [leader.name]
        if o.partition_target == "all":
            names = [name for name, r in self.fleet.replicas.items() if r.alive]
        for name in names:
            self.fleet.proxies[name].blackhole()
        # Read after the blackhole: a renewal that reached Redis just before counts.
        pttl = int(self.stage.client.pttl(self.stage.lease_key))
        f.targets = tuple(names)
        f.victim = leader.name
        self.heals.append((f.fired_mono + o.partition, f))
        self.stage.pending = f
        cut = f"{leader.name} (leader, fencing token {f.epoch_before})"
        if len(names) > 1:
            cut = f"every replica ({', '.join(names)}; the leader: {cut})"
        self.stage.event(
            f"{self.head(f)}the proxy blackholes the Redis traffic of {cut} for "
            f"{o.partition:g} s; lease {pttl} ms left"
        )

    @property
    def busy(self) -> bool:
        return bool(self.heals)

    @property
    def holds_faults(self) -> bool:
        return self.busy

    def tick(self, mono: float) -> None:
        """End slow and partition faults whose time is up: the proxies forward again."""
        for when, f in list(self.heals):
            if mono < when:
                continue
            self.heals.remove((when, f))
            names = f.targets if f.kind == "partition" else tuple(self.fleet.proxies)
            for name in names:
                self.fleet.base_mode(self.fleet.proxies[name])
            what = "delay" if f.kind == "slow" else f"blackhole of {', '.join(names)}"
            self.stage.event(f"fault {f.number} ({f.kind}) ends: the proxies' {what} is lifted")

    def on_log(self, replica: Replica, record: dict[str, Any], at: float | None) -> None:
        if record.get("event") != "leader_lost" or at is None:
            return
        cut = self.stage.last("partition")
        if (
            cut is not None
            and replica.name in cut.targets
            and cut.stepped_down is None
            and at >= cut.fired - 0.001
        ):
            cut.stepped_down = at
            self.stage.event(
                f"{replica.name} stepped down {_ms(at - cut.fired)} into the "
                f"partition: {record.get('message', '')}"
            )
