"""A trio-native, in-memory Store for deterministic-time tests.

trio's MockClock(autojump_threshold=0) jumps ahead while a worker thread runs, so tests
that assert exact times cannot use the real Redis bridge. This fake keeps the same
semantics as the Lua scripts (lease checks; deadlines and claims decided by
:mod:`trio_counter_worker.spec`, the scripts' executable specification) with time taken
from ``trio.current_time()``: 1 s of trio time is 1000 ms of "Redis" time.
"""

from __future__ import annotations

import fnmatch
import math
from collections import deque

import attrs
import trio

from trio_counter_worker import lease_spec, spec
from trio_counter_worker.errors import (
    FunctionsUnavailable,
    LeaseLost,
    RedisRefused,
    RedisUnavailable,
)
from trio_counter_worker.keys import HANDED_HINT, Keys
from trio_counter_worker.keyspace import merged_flags, missing_flags
from trio_counter_worker.store import (
    DeadlinePage,
    FailingNote,
    KeyOutcome,
    LeaseView,
    Message,
    NotificationStatus,
    PageStart,
    PendingReset,
    Watched,
)


@attrs.define(eq=False)
class _Subscription:
    """One subscription of the fake: what it listens to, where its messages go, what its
    channel had no room for yet (Redis's output buffer: publishing never fails or waits,
    and every subscriber gets every message, in order), and whether Redis closed it."""

    patterns: list[str]
    channels: list[str]
    send: trio.MemorySendChannel[list[Message]]
    buffer: deque[list[Message]] = attrs.Factory(deque)
    buffered: trio.Event = attrs.Factory(trio.Event)
    cut: trio.Event = attrs.Factory(trio.Event)

    def deliver(self, message: Message) -> None:
        """At once if the channel has room and nothing is buffered before it, else into
        the buffer."""
        if not self.buffer:
            try:
                self.send.send_nowait([message])
                return
            except trio.WouldBlock:
                pass
        self.buffer.append([message])
        self.buffered.set()

    async def forward(self) -> None:
        """The buffered messages into the channel, in order, as it has room."""
        while True:
            await self.buffered.wait()
            self.buffered = trio.Event()
            while self.buffer:
                await self.send.send(self.buffer[0])
                self.buffer.popleft()


def _ms() -> int:
    return round(trio.current_time() * 1000)


def claimed_outcome(
    reset: PendingReset, verdict: spec.Verdict, deadlines: dict[str, int], now: int
) -> KeyOutcome:
    """A claim's answer, as the script gives it (the claim itself is the caller's): a key
    set again since the episode ended has its new life recorded in ``deadlines``."""
    lives = verdict.lives_until
    if lives is not None:
        deadlines[reset.key] = lives
    return KeyOutcome(
        reset.key,
        "claimed",
        pttl_ms=0 if lives is None else lives - now,
        reset=reset,
        claimed_ms=now,
        lives_again=lives is not None,
    )


@attrs.define
class FakeLease:
    holder: str
    replica: str
    epoch: int
    expires_ms: int
    alive: str = ""
    endpoint: str = ""

    def record(self) -> lease_spec.LeaseRecord:
        return lease_spec.LeaseRecord(
            self.holder, self.replica, self.epoch, self.alive, self.endpoint
        )


class FakeStore:
    def __init__(self, counter_key: str = "c") -> None:
        self.own = Keys(counter_key)  # the worker's own keys and channels
        self.namespace = self.own.namespace
        self.lease: FakeLease | None = None
        self.epoch = 0
        self.keys: dict[str, int | None] = {}  # key -> absolute expiry in ms (None: no TTL)
        self.deadlines: dict[str, int] = {}
        self.pending_resets: dict[str, PendingReset] = {}
        self.claimed: dict[str, int] = {}  # tombstones: key -> when last claimed
        self.failing_notes: dict[str, FailingNote] = {}
        self.dead: dict[str, tuple[PendingReset, FailingNote]] = {}
        self.handed: dict[str, int] = {}  # entry -> when handed over (spec.take_handed)
        self.flags = "Kg$x"  # notify-keyspace-events; a test may change it
        self.maxmemory_policy: str | None = "noeviction"
        self.page_size = 5_000  # recorded deadlines per `tracked` page
        self.down = False  # True: every call raises RedisUnavailable
        self.renew_hangs = False  # True: renew() never answers
        self.pubsub_refused = False  # True: PUBSUB NUMSUB refused (an ACL): no liveness
        self.calls: list[tuple[float, str]] = []
        # DEBUG SLEEP: until this trio time Redis answers nothing; a call that would
        # wait past the client's socket timeout fails after it (see debug_sleep).
        self.asleep_until = -math.inf
        self.socket_timeout = 0.75  # the bridge's min(2 s, lease / 4) at LEASE_TTL_MS=3000
        self._woken = True
        self._listeners: list[_Subscription] = []

    # -- helpers for tests ------------------------------------------------------------

    async def _op(self, name: str) -> None:
        await trio.lowlevel.checkpoint()
        self.calls.append((trio.current_time(), name))
        if self.down:
            raise RedisUnavailable("fake Redis is down")
        left = self.asleep_until - trio.current_time()
        if left > self.socket_timeout:
            await trio.sleep(self.socket_timeout)
            raise RedisUnavailable("fake Redis: Timeout reading from socket")
        if left > 0:
            await trio.sleep(left)
        self._wake()

    def debug_sleep(self, seconds: float) -> None:
        """DEBUG SLEEP: Redis stops for ``seconds``. It runs no expiry meanwhile; on
        waking, before any queued command, its expiry cycle expires every key past its
        TTL and publishes `expired` to whoever is subscribed then. Subscriptions stay
        connected; a call fails once it has waited ``socket_timeout`` (what it would have
        done on waking is not carried out)."""
        self.asleep_until = trio.current_time() + seconds
        self._woken = False

    def _wake(self) -> None:
        if self._woken or trio.current_time() < self.asleep_until:
            return
        self._woken = True
        for key, exp in list(self.keys.items()):
            if exp is not None and exp <= _ms():
                self._pttl(key)

    def _current_lease(self) -> FakeLease | None:
        if self.lease is not None and self.lease.expires_ms <= _ms():
            self.lease = None
        return self.lease

    def _holds(self, holder: str) -> bool:
        lease = self._current_lease()
        return lease is not None and lease.holder == holder

    def _pttl(self, key: str) -> int:
        """Like PTTL, expiring the key on access (as Redis does)."""
        if key not in self.keys:
            return -2
        exp = self.keys[key]
        if exp is None:
            return -1
        if exp <= _ms():
            del self.keys[key]
            self._publish(key, "expired")
            return -2
        return exp - _ms()

    def _publish(self, key: str, event: str) -> None:
        for sub in self._listeners:
            if any(trio_glob(p, f"__keyspace@0__:{key}") for p in sub.patterns):
                sub.deliver(Message(f"__keyspace@0__:{key}", event))

    def set_key(self, key: str, ttl: float | None) -> None:
        """The app's SET key 1 [PX ttl]: publishes set (and expire)."""
        self.keys[key] = None if ttl is None else _ms() + round(ttl * 1000)
        self._publish(key, "set")
        if ttl is not None:
            self._publish(key, "expire")

    def expire_unseen(self, key: str) -> None:
        """A key set and expired before the worker read its TTL: only `expired` shows."""
        self.keys.pop(key, None)
        self._publish(key, "expired")

    def delete_key(self, key: str) -> None:
        if self.keys.pop(key, "missing") != "missing":
            self._publish(key, "del")

    # -- Store protocol -----------------------------------------------------------------

    async def acquire(
        self,
        holder: str,
        replica_id: str,
        ttl_ms: int,
        epoch_floor: int,
        alive: str = "",
        suspect: str = "",
        endpoint: str = "",
    ) -> LeaseView:
        await self._op("acquire")
        lease = self._current_lease()
        decided = lease_spec.acquire(
            None if lease is None else lease.record(),
            self.epoch,
            holder=holder,
            replica=replica_id,
            epoch_floor=epoch_floor,
            mine=alive,
            suspect=suspect,
            subscribers=self._subscribers(),
            endpoint=endpoint,
        )
        self.epoch = decided.epoch_counter
        if decided.acquired:
            assert decided.lease is not None
            taken = decided.lease
            self.lease = FakeLease(
                taken.holder, taken.replica, taken.epoch, _ms() + ttl_ms, taken.alive,
                taken.endpoint,
            )  # fmt: skip
            return LeaseView(True, decided.epoch, ttl_ms, decided.taken_from)
        pttl = 0 if lease is None else lease.expires_ms - _ms()
        return LeaseView(
            False,
            decided.epoch,
            pttl,
            "" if lease is None else lease.replica,
            decided.liveness,
            decided.alive,
            decided.ready,
            decided.endpoint,
        )

    async def renew(self, holder: str, ttl_ms: int) -> lease_spec.Renewal:
        await self._op("renew")
        if self.renew_hangs:
            await trio.sleep_forever()
        lease = self._current_lease()
        renewal = lease_spec.renew(
            None if lease is None else lease.record(),
            holder=holder,
            subscribers=self._subscribers(),
        )
        if renewal == "renewed":
            assert lease is not None
            lease.expires_ms = _ms() + ttl_ms
        return renewal

    async def wait_leader_gone(self, channel: str, every: float) -> Watched:
        while True:
            await self._op("watch")
            subscribers = self._subscribers()
            if subscribers is None:
                raise RedisRefused("fake Redis: PUBSUB NUMSUB refused", kind="permission")
            if subscribers.get(channel, 0) == 0:
                return "gone"
            if self._current_lease() is None:
                return "free"
            await trio.sleep(every)

    def _subscribers(self) -> dict[str, int] | None:
        """PUBSUB NUMSUB of every channel (None: refused, as by an ACL)."""
        if self.pubsub_refused:
            return None
        counts: dict[str, int] = {}
        for sub in self._listeners:
            for channel in sub.channels:
                counts[channel] = counts.get(channel, 0) + 1
        return counts

    async def release(self, holder: str, replica_id: str) -> bool:
        await self._op("release")
        if self._holds(holder):
            self.lease = None
            self._publish_to(self.own.released, replica_id)
            return True
        return False

    def _publish_to(self, channel: str, data: str) -> None:
        for sub in self._listeners:
            if channel in sub.channels:
                sub.deliver(Message(channel, data))

    async def track(self, holder: str, keys: list[str]) -> list[KeyOutcome]:
        await self._op("track")
        self._check(holder)
        return [self._carry_out(key, spec.track(self._seen(key), _ms())) for key in keys]

    async def claim(
        self,
        holder: str,
        keys: list[str],
        expired_after: list[int] | None = None,
        heard: bool = False,
    ) -> list[KeyOutcome]:
        await self._op("claim")
        self._check(holder)
        afters: list[int | None] = [*expired_after] if expired_after else [None] * len(keys)
        out = [
            self._carry_out(key, spec.claim(self._seen(key), _ms(), after, heard))
            for key, after in zip(keys, afters, strict=True)
        ]
        self.claimed = {k: t for k, t in self.claimed.items() if t >= _ms() - spec.TOMBSTONE_MS}
        return out

    def _check(self, holder: str) -> None:
        if not self._holds(holder):
            raise LeaseLost("fake: not the holder")

    def _seen(self, key: str) -> spec.Seen:
        pttl = self._pttl(key)  # the touch
        return spec.Seen(
            pttl, _ms() + pttl if pttl >= 0 else -1, self.deadlines.get(key), self.claimed.get(key)
        )

    def _carry_out(self, key: str, verdict: spec.Verdict) -> KeyOutcome:
        """What the script does with a verdict, on the fake's dicts."""
        if verdict.kind == "alive":
            assert verdict.deadline is not None
            self.deadlines[key] = verdict.deadline
            return KeyOutcome(key, "alive", pttl_ms=verdict.deadline - _ms())
        if verdict.kind == "due":
            return KeyOutcome(key, "due")
        self.deadlines.pop(key, None)
        if verdict.kind == "gone":
            return KeyOutcome(key, "gone")
        assert verdict.deadline is not None
        assert self.lease is not None
        dl = verdict.deadline
        reset = PendingReset(spec.reset_id(self.namespace, key, dl), key, dl, self.lease.epoch)
        self.pending_resets.setdefault(reset.reset_id, reset)
        self.claimed[key] = _ms()
        self._publish_to(self.own.claims, f"{_ms()} {key}")
        return claimed_outcome(reset, verdict, self.deadlines, _ms())

    async def mark_sent(self, holder: str, *reset_ids: str) -> None:
        await self._op("mark_sent")
        if not self._holds(holder):
            raise LeaseLost("fake: not the holder")
        for reset_id in reset_ids:
            self.pending_resets.pop(reset_id, None)
            self.failing_notes.pop(reset_id, None)

    async def note_failing(self, holder: str, notes: list[FailingNote]) -> None:
        await self._op("note_failing")
        if not self._holds(holder):
            raise LeaseLost("fake: not the holder")
        for note in notes:
            if note.reset_id in self.pending_resets:
                self.failing_notes[note.reset_id] = note

    async def failing(self) -> dict[str, FailingNote]:
        await self._op("failing")
        return dict(self.failing_notes)

    async def bury(self, holder: str, note: FailingNote) -> bool:
        await self._op("bury")
        if not self._holds(holder):
            raise LeaseLost("fake: not the holder")
        reset = self.pending_resets.pop(note.reset_id, None)
        self.failing_notes.pop(note.reset_id, None)
        if reset is None:
            return False
        self.dead[note.reset_id] = (reset, note)
        return True

    async def pending(self) -> list[PendingReset]:
        await self._op("pending")
        return sorted(self.pending_resets.values(), key=lambda p: p.deadline_ms)

    async def hand_over(self, entries: list[str]) -> None:
        await self._op("hand_over")
        if entries:
            self.handed.update(dict.fromkeys(entries, _ms()))
            self._publish_to(self.own.redeliver, HANDED_HINT)

    async def take_handed(self, holder: str, most: int) -> tuple[int, list[str]]:
        await self._op("take_handed")
        self._check(holder)
        return spec.take_handed(self.handed, _ms(), most)

    async def tracked(
        self, holder: str, start: PageStart, within_ms: int | None = None
    ) -> DeadlinePage:
        await self._op("tracked")
        if not self._holds(holder):
            raise LeaseLost("fake: not the holder")
        now = _ms()
        top = math.inf if within_ms is None else now + within_ms
        rows = sorted(self.deadlines.items(), key=lambda kv: (kv[1], kv[0]))
        rows = [kv for kv in rows if (start.after is None or kv[1] > start.after) and kv[1] <= top]
        page = rows[: self.page_size]
        more = len(page) == self.page_size
        if more:  # the whole last deadline's keys, as TRACKED
            top = page[-1][1]
            page = [kv for kv in rows if kv[1] <= top]
        upto = None if top == math.inf else int(top)
        return DeadlinePage(
            [(k, dl - now) for k, dl in page],
            PageStart(page[-1][1]) if more else None,
            upto,
            top - now,
        )

    async def scan(self, pattern: str, cursor: int) -> tuple[int, list[str]]:
        await self._op("scan")
        return 0, [k for k in list(self.keys) if trio_glob(pattern, k) and self._pttl(k) != -2]

    async def ensure_notifications(self) -> NotificationStatus:
        await self._op("ensure_notifications")
        return self._flags_status()

    async def verify_notifications(self) -> NotificationStatus:
        await self._op("verify_notifications")
        return self._flags_status()

    def _flags_status(self) -> NotificationStatus:
        missing = missing_flags(self.flags)
        if not missing:
            return NotificationStatus(ok=True, flags=self.flags)
        self.flags = merged_flags(self.flags)
        return NotificationStatus(ok=True, flags=self.flags, changed=True, missing=missing)

    async def install_functions(self) -> str:
        await self._op("install_functions")
        raise FunctionsUnavailable("the fake store has no Redis Functions")

    async def functions_gone(self) -> bool:
        await self._op("functions_gone")
        return False

    async def memory_policy(self) -> str | None:
        await self._op("memory_policy")
        return self.maxmemory_policy

    async def wait_until_reachable(self) -> None:
        while self.down or trio.current_time() < self.asleep_until:
            await trio.sleep(0.1)
        self._wake()

    async def listen(
        self,
        *,
        patterns: list[str],
        channels: list[str],
        send: trio.MemorySendChannel[list[Message]],
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        await self._op("listen")
        sub = _Subscription(patterns, channels, send)
        self._listeners.append(sub)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sub.forward)
                task_status.started(_ms())
                await sub.cut.wait()
                raise RedisUnavailable("fake Redis closed the subscription")
        finally:
            self._listeners.remove(sub)

    def cut_subscriptions(self, channel_prefix: str = "") -> int:
        """Close the subscriptions on a channel starting with ``channel_prefix`` (all, by
        default), as Redis does to a dead process's or a killed connection: their
        listeners raise RedisUnavailable. Returns how many were cut."""
        cut = 0
        for sub in list(self._listeners):
            if any(c.startswith(channel_prefix) for c in sub.channels) or not channel_prefix:
                sub.cut.set()
                cut += 1
        return cut


def trio_glob(pattern: str, text: str) -> bool:
    """Redis-style glob match (enough for * and ?)."""
    return fnmatch.fnmatchcase(text, pattern)
