"""When each fault comes, and when it is over.

Faults come one at a time, every ``--fault-every`` seconds, in rounds. The first round
opens with the leader's faults in the order kill, term, stop (the design's own test: a
short run must cover them), then the rest of the kinds, shuffled; later rounds are
shuffled whole. Each fault waits until a leader has taken over and reconciled after the
previous one: stacked failovers would make one gap longer than the TTLs allow for, and
keys living wholly inside a gap are a documented limit, not a finding.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from urllib.parse import urlsplit

from ..replicas import LeaseInfo
from .fleet import Fleet
from .nemeses import Nemesis
from .options import LEADER_FAULTS, PROXY_FAULTS, RESTART_FAULTS, SENTINEL_SKIPS, Options
from .record import Fault
from .report import ms as _ms
from .stage import Stage

__all__ = ["LEADER_ORDER", "Schedule", "choose_kinds", "round_order"]

LEADER_WAIT = 10.0  # a fault waits this long for a working leader to hit, then is skipped
LEADER_ORDER = ("kill", "term", "stop")  # how the first round opens


def choose_kinds(opts: Options) -> tuple[list[str], list[str]]:
    """The fault kinds this run can inject, and a note for each kind it cannot."""
    kinds = [k for k in opts.faults if not (k == "redis" and opts.redis_url)]
    notes: list[str] = []
    if "redis" in opts.faults and opts.redis_url:
        notes.append("the redis fault is skipped: --redis-url is not ours to kill")
    if opts.topology == "sentinel" and SENTINEL_SKIPS & set(kinds):
        skipped = [k for k in kinds if k in SENTINEL_SKIPS]
        kinds = [k for k in kinds if k not in SENTINEL_SKIPS]
        notes.append(f"the {' and '.join(skipped)} fault(s) are skipped with --topology sentinel")
    scheme = urlsplit(opts.redis_url).scheme if opts.redis_url else "redis"
    if scheme != "redis" and PROXY_FAULTS & set(kinds):
        skipped = [k for k in kinds if k in PROXY_FAULTS]
        kinds = [k for k in kinds if k not in PROXY_FAULTS]
        notes.append(
            f"the {' and '.join(skipped)} fault(s) are skipped: a plain TCP "
            f"proxy needs a redis:// URL, not {scheme}://"
        )
    return kinds, notes


def round_order(rotation: Sequence[str], rng: random.Random, first: bool) -> list[str]:
    """One round of ``rotation``, in the order fired: the first round opens with the
    leader's faults (LEADER_ORDER), the rest shuffled."""
    lead = [k for k in LEADER_ORDER if first and k in rotation]
    rest = [k for k in rotation if k not in lead]
    rng.shuffle(rest)
    return lead + rest


class Schedule:
    def __init__(
        self,
        stage: Stage,
        fleet: Fleet,
        nemeses: Sequence[Nemesis],
        kinds: list[str],
        slow_run: bool,
    ) -> None:
        self.stage = stage
        self.fleet = fleet
        self.nemeses = list(nemeses)
        self.by_kind = {kind: n for n in self.nemeses for kind in n.kinds}
        self.kinds = kinds
        # the kinds fired in rounds: a slow fault for the whole run is not one of them
        self.rotation = [k for k in kinds if not (k == "slow" and slow_run)]
        self.queue: list[str] = []  # the rest of the current round, next first
        self.rounds = 0
        self.next_fault_at = math.inf
        self.waiting_since: float | None = None

    def begin(self, mono: float) -> None:
        self.next_fault_at = mono + self.stage.opts.fault_every

    @property
    def busy(self) -> bool:
        """A fault is still being timed or followed up."""
        return self.stage.pending is not None or any(n.busy for n in self.nemeses)

    def tick(self, mono: float) -> None:
        for n in self.nemeses:
            n.tick(mono)

    def min_ttl_ms(self) -> int:
        return max(n.min_ttl_ms() for n in self.nemeses)

    def run(self, mono: float) -> None:
        """Fire the next fault if it is due and a leader works."""
        held = any(n.holds_faults for n in self.nemeses)
        if not self.rotation or mono < self.next_fault_at or held or self.stage.pending is not None:
            return
        if not self.queue:
            self.queue = round_order(self.rotation, self.stage.rng, first=self.rounds == 0)
            self.rounds += 1
        kind = self.queue[0]
        target = self.fleet.leader_process()
        if not self.fleet.leader_working() or target is None:
            if self.waiting_since is None:
                self.waiting_since = mono
            elif mono - self.waiting_since > LEADER_WAIT:
                self.stage.event(f"{kind} skipped: no working leader for {LEADER_WAIT:g} s")
                self.queue.pop(0)
                self.waiting_since = None
                self.next_fault_at = mono + self.stage.opts.fault_every
            return
        self.waiting_since = None
        self.queue.pop(0)
        self.next_fault_at = mono + self.stage.opts.fault_every
        lease = self.fleet.leader
        f = Fault(
            len(self.stage.faults) + 1,
            kind,
            time.time(),
            time.monotonic(),
            epoch_before=lease.epoch if lease else 0,
        )
        self.stage.faults.append(f)
        fired = self.by_kind[kind].fire(f, target)
        if fired != "fired":
            self.stage.faults.remove(f)
        if fired == "dropped":
            self.kinds.remove(kind)
            self.rotation.remove(kind)
            self.queue = [k for k in self.queue if k != kind]

    # -- is it over? -------------------------------------------------------------------

    def check(self, lease: LeaseInfo | None, now: float, offset: float) -> str:
        """Resolve the pending fault if a leader is back (``offset``: Redis's clock minus
        ours, seconds); a suffix for the timeline."""
        f = self.stage.pending
        if f is None:
            return ""
        opts = self.stage.opts
        if f.kind == "flags":
            self._check_flags(f, now)
            return ""
        took: float | None = None
        if lease is not None and f.kind in LEADER_FAULTS | {"partition"}:
            if lease.epoch > f.epoch_before:
                took = lease.taken_after(f.fired, now, offset)
                f.successor = lease.replica
        elif lease is not None and f.kind in RESTART_FAULTS and f.restarted is not None:
            if lease.epoch > f.epoch_before:
                took = lease.taken_after(f.restarted, now, offset)
            else:  # the same lease survived the restart: wait for it to be renewed
                pttl = int(self.stage.client.pttl(self.stage.lease_key))
                expiry = now + pttl / 1000
                if f.expiry_before is not None and pttl > 0 and expiry > f.expiry_before + 0.05:
                    took = max(0.0, expiry - opts.lease - f.restarted)
        if took is None:
            limit = max(10.0, 5 * opts.lease)
            if f.kind == "partition":
                limit += opts.partition
            if time.monotonic() - f.fired_mono > limit:
                self._time_out(f, now, "NO leader back")
            return ""
        f.failover = took
        f.effect_end = (f.restarted or f.fired) + took
        self.stage.pending = None
        what = {"redis": "after the restart", "failover": "after the switch"}.get(
            f.kind, f"after the {f.kind}"
        )
        return f" — {_ms(took)} {what}"

    def _check_flags(self, f: Fault, now: float) -> None:
        """Resolve a pending flags fault once the leader restored them and rescanned."""
        if f.resynced is not None:
            f.effect_end = f.resynced
            self.stage.pending = None
        elif time.monotonic() - f.fired_mono > max(10.0, 5 * self.stage.opts.lease):
            self._time_out(f, now, "notify-keyspace-events NOT restored and rescanned")

    def _time_out(self, f: Fault, now: float, what: str) -> None:
        """Give up timing ``f``: ``what`` did not happen in time."""
        f.timed_out = True
        f.effect_end = now
        self.stage.pending = None
        self.stage.event(
            f"fault {f.number} ({f.kind}): {what} within {time.monotonic() - f.fired_mono:.1f} s"
        )
