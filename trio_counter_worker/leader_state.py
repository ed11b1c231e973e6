"""What the leader knows and decides between Redis calls: plain logic, no I/O.

The leader's trio code (:mod:`trio_counter_worker.leader` and the modules it composes)
only carries out what this state says: which keys to ask Redis about (a
:class:`DecisionQueue`), when the next deadline is (a :class:`Schedule`), which resets
to deliver. Times are passed in: trio time (seconds) for the schedule, Redis time (ms)
for claims. Tested synchronously in
``tests/test_leader_state.py``, the way h11 tests its state machine.

The path of a reset through it: a keyspace event or a deadline → :meth:`on_events` /
:meth:`due` queue the key → the leader takes a batch (:meth:`take`) and runs a script →
:meth:`apply` turns the script's outcomes into schedule changes and resets to deliver.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import ItemsView, Iterable, Sequence
from typing import overload

import attrs

from .decisions import DecisionQueue, Op, Report, latest_report
from .glob import matches
from .keys import HANDED_HINT, Keys
from .keyspace import is_own_key, key_bytes, key_from_channel
from .pressure import Pressure
from .schedule import Schedule
from .spec import STAMP_DIGITS, TOMBSTONE_MS, parse_handed
from .store import DeadlinePage, KeyOutcome, Message, PageStart, PendingReset

__all__ = ["EARLY", "REFILL_EVERY", "WINDOW", "Heard", "LeaderState", "Quarantine", "Taken"]

EARLY = 0.001  # fire just after the deadline, so the key is already due in Redis
# Seconds of deadlines held in memory. Redis's deadlines zset is the complete, ordered
# record; the leader holds only what falls due soon and reads the rest in, page by page,
# as time advances. Memory then follows the reset rate, not the number of counters.
WINDOW = 60.0
# Read on this often while reads bring many deadlines (at least _BUSY_READ), a few
# seconds of them each time: a read never holds the leader (or Redis) up for long,
# however many counters fall due per second. Otherwise every half window: an idle leader
# reads twice a minute.
REFILL_EVERY = 5.0
_BUSY_READ = 1_000
# Outcomes due within WINDOW + _SLACK are held: more than any page can have covered,
# whatever the round trips and clocks (the window's edge and an outcome's deadline are
# estimated from different calls).
_SLACK = 5.0
_QUARANTINE_MAX = 10_000  # keys set aside per process, at most
_CHUNK = 256  # claims per closed chunk of _Claims' order
# Markers kept per key whose claim's reply has not come. Only the worker publishes on
# the channel (the app's documented ACL does not allow it); past these, a marker is
# dropped and later expiries are decided as if it never came (never a second reset).
_EARLY_MAX = 8
# Keyspace events of a key removed by a command (not expired): no episode ends by them.
_REMOVED = frozenset({"del", "rename_from", "move_from", "evicted"})


class _Claims:
    """Claims (key -> Redis ms), each kept for the tombstone minute (spec.TOMBSTONE_MS) after the
    newest: bounded by the claim rate, not the key count.

    The garbage collector must not walk them: at 800 claims a second the leader keeps
    ~48,000, and a full collection walked every one of them, in a subclass of dict and
    in two deques beside it, for ~27 ms (1M steady run). So they are a plain dict of str
    to int, which the collector does not track, and their order, oldest first, closed
    tuples of ``_CHUNK`` (untracked too, once a collection has seen them) behind an open
    list of the latest. A dict used as a queue instead (dropping its first entry) kept the
    deleted slots and walked over them: ~30-100 us a claim."""

    __slots__ = ("_chunks", "_head", "_keys", "_ms", "_times")

    def __init__(self) -> None:
        self._ms: dict[str, int] = {}
        self._chunks: deque[tuple[tuple[int, ...], tuple[str, ...]]] = deque()
        self._head = 0  # entries of the first chunk already forgotten
        self._times: list[int] = []  # the open chunk: times, and keys beside them
        self._keys: list[str] = []

    def __len__(self) -> int:
        return len(self._ms)

    def __contains__(self, key: object) -> bool:
        return key in self._ms

    @overload
    def get(self, key: str) -> int | None: ...
    @overload
    def get(self, key: str, default: int) -> int: ...
    def get(self, key: str, default: int | None = None) -> int | None:
        return self._ms.get(key, default)

    def items(self) -> ItemsView[str, int]:
        return self._ms.items()

    def remember(self, key: str, claimed_ms: int) -> None:
        self._ms[key] = claimed_ms
        self._times.append(claimed_ms)
        self._keys.append(key)
        if len(self._keys) >= _CHUNK:
            self._chunks.append((tuple(self._times), tuple(self._keys)))
            self._times, self._keys = [], []
        self._forget(claimed_ms - TOMBSTONE_MS)

    def clear(self) -> None:
        self._ms.clear()
        self._chunks.clear()
        self._head = 0
        self._times, self._keys = [], []

    def _forget(self, horizon: int) -> None:
        """Drop the claims made at ``horizon`` or before, oldest first; a key claimed
        again since keeps its later claim."""
        chunks = self._chunks
        while chunks:
            times, keys = chunks[0]
            done = self._drop(times, keys, self._head, horizon)
            if done < len(times):
                self._head = done
                return
            chunks.popleft()
            self._head = 0
        done = self._drop(self._times, self._keys, 0, horizon)
        if done:
            del self._times[:done], self._keys[:done]

    def _drop(self, times: Sequence[int], keys: Sequence[str], start: int, horizon: int) -> int:
        """Forget ``keys[start:]`` while their times are at ``horizon`` or before; the
        index of the first kept."""
        ms = self._ms
        at = start
        while at < len(times) and times[at] <= horizon:
            if ms.get(keys[at]) == times[at]:  # else claimed again since
                del ms[keys[at]]
            at += 1
        return at


class Quarantine:
    """Counter keys whose decision raised an unexpected error, set aside so that one bad
    item cannot stop the others (bounded; kept across leaderships of one process)."""

    def __init__(self) -> None:
        self.keys: dict[str, str] = {}  # key -> the error, oldest first

    def __contains__(self, key: object) -> bool:
        return key in self.keys

    def add(self, key: str, error: str) -> None:
        if len(self.keys) >= _QUARANTINE_MAX:
            del self.keys[next(iter(self.keys))]
        self.keys[key] = error


@attrs.frozen
class Heard:
    """What a batch of pub/sub messages held: activity by source, whether a redelivery
    of dead resets was asked for (read the pending resets again), and whether a former
    leader handed keys over (take them)."""

    notified: int = 0  # keyspace events of counter keys
    touched: int = 0  # tcw_touch / tcw_done announcements
    redeliver: bool = False
    handed: bool = False


@attrs.frozen
class Taken:
    """A batch of keys for one script call: ``claim`` (CLAIM) or not (TRACK), with the
    times Redis reported them expired after when they were reported; ``heard``: those
    reports are `expired` events heard (:class:`.decisions.Want`)."""

    claim: bool
    keys: list[str]
    expired_after: list[int] | None
    heard: bool = False

    def halves(self) -> list[Taken]:
        """The batch cut in two, to find a key whose decision fails (bisecting)."""
        half = len(self.keys) // 2
        after = self.expired_after
        return [
            Taken(self.claim, self.keys[:half], after and after[:half], self.heard),
            Taken(self.claim, self.keys[half:], after and after[half:], self.heard),
        ]


class LeaderState:
    """One leader's bookkeeping: the schedule, the decision queue, and what tells an
    `expired` event apart from the echo of a claim (:func:`spec.is_echo`)."""

    def __init__(
        self, keys: Keys, quarantine: Quarantine | None = None, pressure: Pressure | None = None
    ) -> None:
        # The deadlines due within the window. Invariant: every key whose recorded
        # deadline is before `read_from` is here (or being decided), at or before it.
        self.schedule = Schedule()
        self.read_from = PageStart()  # where the next read of recorded deadlines starts
        self.horizon = -math.inf  # trio time of read_from: read on before it comes
        self._read = 0  # deadlines the last read brought (pages of it so far: _reading)
        self._reading = 0
        self.queue = DecisionQueue()
        self._deciding = 0  # keys taken and not done: held as well
        # While Redis refuses writes, what the queue holds is all the leader knows of it.
        self.pressure = pressure or Pressure()
        self.quarantine = quarantine or Quarantine()
        self.redeliver_channel = keys.redeliver
        self.markers_channel = keys.claims  # a marker per claim (scripts.CLAIM)
        self.touched_channel = keys.touched  # a key's name, per tcw_touch/done
        self._pattern = key_bytes(keys.counter_key)
        # Pub/sub keeps publication order, so an `expired` event follows every claim
        # made before this subscription started, and every claim of its key whose marker
        # came before it. `after`: it follows every claim made at or before that time.
        # A marker is believed only for a claim this leader made (its reply names the
        # same time): anyone who may publish on the channel changes nothing by it.
        self._start_after = 0  # Redis ms: before the current subscription
        self._marked = _Claims()  # key -> last own claim whose marker came
        self._claims = _Claims()  # key -> this leader's last claim (Redis ms)
        self._claiming: set[str] = set()  # keys in a claim call now
        # Markers that came before their claim's reply: one is believed once the reply
        # names its time. Expiries heard after one wait for that (their `after`
        # otherwise). At most _EARLY_MAX per key in a claim call, whatever is published.
        self._early: dict[str, set[int]] = {}
        # key -> (its `after` otherwise, the markers heard before its latest expiry)
        self._held: dict[str, tuple[int, frozenset[int]]] = {}
        # Keys seen (an event, a scan) and not yet looked at, with the `after` of when
        # they were seen: queued (`_unlooked`) or in a call (`_looking`). Their deadline is
        # not recorded yet; if they expire before a look, only the `expired` event shows
        # it. A resynchronisation may lose that event (Redis stalled past the socket
        # timeout: the key expires during the stall, and Redis publishes it on waking, to
        # the subscription being replaced), so these are carried over as reported.
        self._unlooked: dict[str, int] = {}
        self._looking: dict[str, int] = {}

    @property
    def channels(self) -> list[str]:
        """The worker's own channels the leader subscribes to, beside the keyspace."""
        return [self.redeliver_channel, self.markers_channel, self.touched_channel]

    def resubscribed(self, since_ms: int) -> None:
        """A new subscription, started at ``since_ms``: what was queued is decided again
        from Redis's state (a resynchronisation), markers count from here."""
        # A claim in the same millisecond may have been made after the subscription.
        self._start_after = since_ms - 1
        self._marked.clear()
        self._early.clear()
        self._held.clear()
        # Keys only an `expired` event vouches for are in no scan and no recorded
        # deadline: they stay, the rest is read again.
        reported = self.take_reported()
        self.queue.clear()
        for key, after, heard in reported:
            self.queue.want(key, "expired" if heard else "reported", after)
        # What changed meanwhile is in the recorded deadlines (and the scan): read again.
        self.schedule = Schedule()
        self.read_from = PageStart()
        self.horizon = -math.inf
        self._read = self._reading = 0

    @property
    def refill_at(self) -> float:
        """When to read more recorded deadlines: REFILL_EVERY after a busy read, half a
        window before the edge after a quiet one."""
        if self._read >= _BUSY_READ:
            return self.horizon - WINDOW + REFILL_EVERY
        return self.horizon - WINDOW / 2

    def counters(self, keys: Iterable[str]) -> list[str]:
        """Counter keys only: never a key of any worker deployment, nor one set aside."""
        return [k for k in dict.fromkeys(keys) if not is_own_key(k) and k not in self.quarantine]

    def want(self, keys: Iterable[str], op: Op) -> None:
        if op == "track":
            self._seen({key: self._marked.get(key, self._start_after) for key in keys})
            return
        for key in self.counters(keys):
            self._hold(key, op)

    def _seen(self, sightings: dict[str, int]) -> None:
        """Queue a look at each key seen, with the `after` of its latest sighting: a
        claim after that may be of the episode it began."""
        for key in self.counters(sightings):
            self._hold(key, "track")
            if key in self.queue:
                self._unlooked[key] = sightings[key]

    def _hold(self, key: str, op: Op, after: int | None = None) -> None:
        """Queue ``key``, unless Redis refuses writes and the bound is reached."""
        if key in self.queue or self.pressure.admits(self.held):
            self.queue.want(key, op, after)

    @property
    def held(self) -> int:
        """Keys queued or being decided: what the pressure bound counts."""
        return len(self.queue) + self._deciding

    def put_back(self, taken: Taken) -> None:
        """Redis refused the call for ``taken`` (out of memory): its keys wait again,
        as they were asked for, after :meth:`done`."""
        if not taken.claim:
            ops: list[tuple[Op, int | None]] = [("track", None)] * len(taken.keys)
        elif taken.expired_after is None:
            ops = [("claim", None)] * len(taken.keys)
        else:
            op: Op = "expired" if taken.heard else "reported"
            ops = [(op, after) for after in taken.expired_after]
        for key, (op, after) in zip(taken.keys, ops, strict=True):
            self.queue.want(key, op, after)

    def on_events(self, batch: list[Message]) -> Heard:
        """Queue what a batch of pub/sub messages asks for, in order."""
        # key -> the `after` of its latest sighting, as of that message (a marker later
        # in the batch must not count), in the order first seen
        changed: dict[str, int] = {}
        removed: dict[str, bool] = {}  # key -> whether its last event removed it
        marked, start_after = self._marked, self._start_after
        redeliver = handed = False
        notified = touched = 0
        for msg in batch:
            if msg.channel == self.markers_channel:
                self._on_marker(msg.data)
            elif msg.channel == self.touched_channel:
                # Its deadline is recorded: read it. Only for a counter key: anyone who
                # may publish there must not make the leader watch, and reset, other keys.
                if matches(self._pattern, key_bytes(msg.data)):
                    changed[msg.data] = marked.get(msg.data, start_after)
                    removed.pop(msg.data, None)  # seen alive after any removal before it
                    touched += 1
            elif msg.channel == self.redeliver_channel:
                if msg.data == HANDED_HINT:
                    handed = True
                else:
                    redeliver = True
            elif msg.data != "expired":
                key = key_from_channel(msg.channel)
                changed[key] = marked.get(key, start_after)
                removed[key] = msg.data in _REMOVED
                notified += 1
            else:
                self._on_expired(key_from_channel(msg.channel))
                notified += 1
        self._seen(changed)
        for key in [k for k, gone in removed.items() if gone]:
            # Seen removed: its look only forgets it (one in a call now as well).
            self._unlooked.pop(key, None)
            self._looking.pop(key, None)
        return Heard(notified, touched, redeliver, handed)

    def adopt(self, entries: list[str]) -> int:
        """Queue keys a former leader handed over (:mod:`.handover`) as reported expiries,
        heard ones as heard; anything but a counter key's entry is dropped. Returns how
        many keys were queued."""
        queued: set[str] = set()  # (a heard key comes in two entries)
        for entry in entries:
            parsed = parse_handed(entry)
            if parsed is None or not matches(self._pattern, key_bytes(parsed[0])):
                continue
            key, after, heard = parsed
            if self.counters([key]):
                self._hold(key, "expired" if heard else "reported", after)
                queued.add(key)
        return len(queued)

    def _on_expired(self, key: str) -> None:
        if not self.counters([key]):
            return
        after = self._marked.get(key, self._start_after)
        if key in self._early:
            self._held[key] = (after, frozenset(self._early[key]))
            return  # after the marker of a claim whose reply has not come: wait for it
        claimed = self._claims.get(key)
        if claimed is not None and claimed > after:
            return  # the echo of our own claim's touch: no call needed
        # A key set and expired before we read its TTL (events backlogged, or across a
        # handoff) has only this to show for it; one we hold expired before our timer.
        self._hold(key, "expired", after)

    def _on_marker(self, data: str) -> None:
        """A claim's marker: "<claimed_ms> <key>"; later `expired` events of the key
        follow that claim, if this leader made it (else ignored: nothing is kept)."""
        stamp, _, key = data.partition(" ")
        if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= STAMP_DIGITS):
            return  # not a claim's: someone else published on the channel
        claimed_ms = int(stamp)
        if self._claims.get(key) == claimed_ms:
            self._marked.remember(key, claimed_ms)
        elif key in self._claiming:
            early = self._early.setdefault(key, set())
            if len(early) < _EARLY_MAX:
                early.add(claimed_ms)

    def _confirm(self, key: str, claimed_ms: int) -> None:
        """This leader's claim of ``key`` at ``claimed_ms`` has been answered: a marker
        that came first is believed if it names that time."""
        if claimed_ms in self._early.pop(key, ()):
            self._marked.remember(key, claimed_ms)
            held = self._held.pop(key, None)
            if held is not None:
                # After the claim's own marker: a new episode; else as it was.
                after, heard = held
                self.queue.want(key, "expired", claimed_ms if claimed_ms in heard else after)

    def due(self, now: float) -> None:
        """Queue a claim for every key whose deadline has come (trio time)."""
        self.want(self.schedule.pop_due(now), "claim")

    def take(self, limit: int, claims: bool = True, looks: bool = True) -> Taken | None:
        taken = self.queue.take(limit, claims, looks)
        if taken is None:
            return None
        wanted, keys, afters = taken
        if wanted.claim:
            self._claiming.update(keys)
        for key in keys:
            if (seen := self._unlooked.pop(key, None)) is not None:
                self._looking[key] = seen
        self._deciding += len(keys)
        return Taken(wanted.claim, keys, afters, wanted.heard)

    def done(self, taken: Taken, decided: bool) -> None:
        self._deciding -= len(taken.keys)
        self.queue.done(taken.keys, decided)
        for key in taken.keys:
            seen = self._looking.pop(key, None)
            if seen is not None and not decided:
                # Not looked at after all: still only the subscription would show its
                # expiry (a later sighting, if any, is the one that counts).
                self._unlooked.setdefault(key, seen)
        if taken.claim:
            self._claiming.difference_update(taken.keys)
            for key in taken.keys:
                # A marker its reply did not name: not believed. Expiries heard after it
                # are decided by what was known before it (an echo is never a reset).
                self._early.pop(key, None)
                held = self._held.pop(key, None)
                if held is not None:
                    self.queue.want(key, "expired", held[0])

    def apply(self, outcomes: list[KeyOutcome], base: float) -> list[PendingReset]:
        """What Redis decided, as of ``base`` (trio time, the middle of the round trip:
        the best estimate of when Redis read the keys). Returns the resets to deliver."""
        claimed: list[PendingReset] = []
        for o in outcomes:
            if o.kind == "claimed" and o.reset is not None:
                self._claims.remember(o.key, o.claimed_ms)
                self._confirm(o.key, o.claimed_ms)
                claimed.append(o.reset)
                if not o.lives_again:  # (else set again since: scheduled as alive)
                    self.schedule.remove(o.key)
                    continue
            elif o.kind == "due":
                self.schedule.set(o.key, base)
                continue
            elif o.kind != "alive":
                self.schedule.remove(o.key)
                continue
            if o.pttl_ms / 1000 <= WINDOW + _SLACK:
                self.schedule.set(o.key, base + o.pttl_ms / 1000 + EARLY)
            else:
                self.schedule.remove(o.key)  # recorded: a later read brings it in
        return claimed

    def tracked(self, page: DeadlinePage, base: float) -> None:
        """A page of recorded deadlines (ms from ``base``, as read at the middle of the
        round trip). A key already held keeps its deadline: that came from a later
        look at the key, or is earlier (a look too many at worst, never a late one)."""
        for key, pttl_ms in page.rows:
            if key not in self.schedule and key not in self.quarantine:
                self.schedule.set(key, base + pttl_ms / 1000 + EARLY)
        if page.upto is not None and (self.read_from.after or page.upto) <= page.upto:
            self.read_from = PageStart(page.upto)
            self.horizon = base + page.ahead_ms / 1000
        self._reading += len(page.rows)
        if page.next is None:
            self._read, self._reading = self._reading, 0

    def set_aside(self, key: str, error: str) -> None:
        """A key whose decision fails unexpectedly: no more looks at it."""
        self.quarantine.add(key, error)
        self.schedule.remove(key)
        self._unlooked.pop(key, None)
        self._looking.pop(key, None)

    def take_reported(self) -> list[Report]:
        """What only this leader can vouch for, to decide as reported expiries before it
        lets go of the subscription (a graceful handoff, a resynchronisation): the keys
        reported expired (:meth:`DecisionQueue.take_reported`), and the keys seen but
        not yet looked at. Redis has no trace of one of the latter that expires before a
        look (no recorded deadline, and it is in no scan): its `expired` event, published
        while no subscription is there to hear it, would be all. Deciding a live one as
        reported only records its deadline (spec.claim); a claim made after it was seen
        makes its expiry an echo, never a second reset. An expiry heard stays heard (its
        event says what Redis did, whichever subscription carried it)."""
        taken = {key: (after, heard) for key, after, heard in self.queue.take_reported()}
        for seen in (self._unlooked, self._looking):
            for key, after in seen.items():  # seen, not heard expiring
                taken[key] = latest_report((after, False), taken.get(key, (after, False)))
            seen.clear()
        return [(key, after, heard) for key, (after, heard) in taken.items()]
