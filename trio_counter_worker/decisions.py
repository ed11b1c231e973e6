"""Counter keys waiting for a decision in Redis, merged per key: plain logic, no I/O.

Keyspace events and deadlines only say *which* keys to look at; the scripts read Redis's
current state. So a key re-armed a hundred times before the leader gets to it needs one
look, not a hundred, and several script calls may be in flight at once as long as no key
is in two of them (results are applied in the order they come back, and two answers for
one key could arrive in the wrong order). This is what lets the leader keep up with any
activity rate over a slow link: throughput is ``calls in flight * batch / round trip``.
"""

from __future__ import annotations

from typing import Literal

import attrs

__all__ = ["CallLimits", "DecisionQueue", "Op", "Report", "Want", "latest_report"]

Op = Literal["track", "claim", "reported", "expired"]


@attrs.frozen
class Want:
    """What to ask Redis about a key. ``claim``: decide it as due (else only record its
    TTL); ``reported``: Redis said it expired (after a known time), so it ended an episode
    unless that is the echo of a later claim (:func:`trio_counter_worker.spec.claim`);
    ``heard``: that report is an `expired` event heard (op "expired"), not a key that may
    have expired unheard: it ends an episode even if the key is set again by then.
    Asking more never gives a wrong answer: CLAIM on a live key records its TTL as TRACK
    does."""

    claim: bool = False
    reported: bool = False
    heard: bool = False

    def __or__(self, other: Want) -> Want:
        return Want(
            self.claim or other.claim,
            self.reported or other.reported,
            self.heard or other.heard,
        )


# A key reported expired: (key, after, heard), as :class:`Want` and ``after`` say.
Report = tuple[str, int, bool]


def latest_report(a: tuple[int, bool], b: tuple[int, bool]) -> tuple[int, bool]:
    """Two reports of one key, (after, heard), merged: the later time, heard if the report
    of that time was. An event heard after an earlier time does not vouch for a later
    one (a claim between them may be what it echoes), nor the other way round."""
    if a[0] != b[0]:
        return max(a, b)
    return a[0], a[1] or b[1]


_WANTS: dict[Op, Want] = {
    "track": Want(),
    "claim": Want(claim=True),
    "reported": Want(claim=True, reported=True),
    "expired": Want(claim=True, reported=True, heard=True),
}


class DecisionQueue:
    """Keys to decide, one entry per key; claims first, then looks, each in the
    order they came."""

    def __init__(self) -> None:
        self._due: dict[str, Want] = {}  # claims (deadlines, reported expiries): first
        self._other: dict[str, Want] = {}  # looks, from events and reconciles
        self._deciding: set[str] = set()
        # Reported keys: Redis published `expired` after this time (Redis ms). Merged to
        # the latest: an expiry after a claim is a new episode, one before it its echo,
        # and only the latest report can be the former.
        self._after: dict[str, int] = {}
        # Reported keys in a call now: (after, heard).
        self._reporting: dict[str, tuple[int, bool]] = {}

    def __len__(self) -> int:
        return len(self._due) + len(self._other)

    def __contains__(self, key: object) -> bool:
        return key in self._due or key in self._other or key in self._deciding

    def want(self, key: str, op: Op, after: int | None = None) -> None:
        """Ask for ``op`` on ``key``, merged with what is already asked. ``after`` (with
        "reported", or "claim" for a key the timer holds): Redis reported it expired,
        after that time; it makes the claim a reported one."""
        wanted = _WANTS[op]
        heard: bool | None = None  # two reports merged: whether the latest was heard
        if after is not None:
            wanted = wanted | _WANTS["reported"]
            latest = self._after.get(key)
            if latest is not None:
                queued = self._due.get(key)  # (reported: a claim)
                was_heard = queued is not None and queued.heard
                after, heard = latest_report((after, wanted.heard), (latest, was_heard))
            self._after[key] = after
        elif wanted.reported:
            raise ValueError("want: a reported key needs `after`")
        queue = self._due if wanted.claim else self._other
        if key in self._due and queue is self._other:
            queue = self._due  # already due: keep its place, add what is asked
        other = self._other if queue is self._due else self._due
        if key in other:
            wanted = wanted | other.pop(key)
        held = queue.get(key)
        # (Merged only when asked twice: a reconcile asks this once per key, a million times.)
        merged = wanted if held is None or held == wanted else held | wanted
        if heard is not None and merged.heard != heard:
            merged = Want(merged.claim, merged.reported, heard)
        queue[key] = merged

    def take(
        self, limit: int, claims: bool = True, looks: bool = True
    ) -> tuple[Want, list[str], list[int] | None] | None:
        """Up to ``limit`` keys that want the same call and are in no call now, with
        their ``after`` times if reported; they count as deciding until :meth:`done`.
        ``claims``, ``looks``: which of the two may be taken."""
        for queue in [q for q, ok in ((self._due, claims), (self._other, looks)) if ok]:
            picked: list[str] = []
            kind: Want | None = None
            for key, wanted in queue.items():
                if key in self._deciding:
                    continue
                if kind is None:
                    kind = wanted
                if wanted == kind:
                    picked.append(key)
                    if len(picked) >= limit:
                        break
            if kind is not None:
                for key in picked:
                    del queue[key]
                self._deciding.update(picked)
                return kind, picked, self._afters(kind, picked)
        return None

    def _afters(self, kind: Want, keys: list[str]) -> list[int] | None:
        if not kind.reported:
            return None
        afters = [self._after.pop(k) for k in keys]
        self._reporting.update((k, (a, kind.heard)) for k, a in zip(keys, afters, strict=True))
        return afters

    def take_reported(self) -> list[Report]:
        """Every key that only a reported expiry may vouch for, queued or in a call, with
        its time and whether it was heard: what a leader handing over decides before it
        lets go (the next leader finds the others by itself, from a scan and the recorded
        deadlines). Deciding a key again is harmless: the script reads what the first
        call did."""
        taken = dict(self._reporting)
        for queue in (self._due, self._other):
            for key, heard in [(k, w.heard) for k, w in queue.items() if w.reported]:
                del queue[key]
                report = (self._after.pop(key), heard)
                taken[key] = latest_report(report, taken.get(key, report))
        self._reporting.clear()
        return [(key, after, heard) for key, (after, heard) in taken.items()]

    def done(self, keys: list[str], decided: bool = True) -> None:
        """The call for ``keys`` has returned; ``decided``: with an answer (else it was
        cancelled or failed: a reported key stays for :meth:`take_reported`)."""
        self._deciding.difference_update(keys)
        if decided:
            for key in keys:
                self._reporting.pop(key, None)

    def clear(self) -> None:
        """Forget everything (a resynchronisation starts from Redis's state)."""
        self._due.clear()
        self._other.clear()
        self._deciding.clear()
        self._after.clear()
        self._reporting.clear()


class CallLimits:
    """Which script calls may start now, given those in flight: claims always come first,
    at most ``looks`` calls look at keys (TRACK) at once, so a claim due during a
    reconcile's looks finds few scripts ahead of it; and at most ``small`` calls of each
    kind carry less than a full ``batch``, so that more keys wait for one to return and go
    together (at a few keys a second each goes alone at once; at thousands a second calls
    carry many keys each instead of one)."""

    def __init__(self, batch: int, looks: int, small: int) -> None:
        self.batch = batch
        self._looks = looks  # looks that may still start
        self._small_max = small
        self._small = {True: 0, False: 0}  # small calls in flight: claims, looks

    def allowed(self, queued: int) -> tuple[bool, bool]:
        """(claims, looks): which kinds may start a call, with ``queued`` keys waiting."""
        full = queued >= self.batch
        claims = full or self._small[True] < self._small_max
        looks = self._looks > 0 and (full or self._small[False] < self._small_max)
        return claims, looks

    def started(self, claim: bool, keys: int) -> None:
        """A call for ``keys`` keys went out."""
        self._small[claim] += keys < self.batch
        if not claim:
            self._looks -= 1

    def finished(self, claim: bool, keys: int) -> None:
        """The call :meth:`started` with these arguments returned (or failed)."""
        self._small[claim] -= keys < self.batch
        if not claim:
            self._looks += 1
