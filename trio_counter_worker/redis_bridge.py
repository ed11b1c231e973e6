"""The one module that talks to redis-py: its sync client, run from trio in threads.

redis-py's asyncio client does not run under trio, so each command runs in a worker
thread (``trio.to_thread.run_sync``) with a socket timeout shorter than the lease; the
leader's counter scripts go as pipelines, one thread hop for all the calls made meanwhile
(:class:`_Pipelines`). Each pub/sub connection is owned by one thread from creation to
close, reading whole batches of messages with a short timeout and forwarding them into a
trio channel.

redis-py's own retries are turned off: the worker retries at the trio level, where it
knows its deadlines, and a silent reconnect would hide lost pub/sub messages.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import redis
import redis.exceptions as rexc
import trio
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from . import functions, redis_preflight, scripts
from .config import Config
from .errors import (
    FunctionsUnavailable,
    LeaseLost,
    RedisRefused,
    RedisUnavailable,
    SubscriptionOverflow,
)
from .keyspace import merged_flags, missing_flags
from .lease_spec import Renewal
from .redis_replies import (
    deadline_page,
    lease_view,
    note,
    note_json,
    numsub_count,
    outcomes,
    pending_record,
    reported_args,
    translate,
    translating,
)
from .store import (
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

__all__ = [
    "MASTER_CHECK_EVERY",
    "RedisBridge",
    "client_kwargs",
    "ensure_on",
    "flags_of",
    "make_client",
]

T = TypeVar("T")

_POLL_SECONDS = 0.1  # pub/sub poll: bounds how long a stop takes
_MAX_BATCH = 1000
# When the first read brings fewer than _GATHER_BELOW messages, the listener waits this
# long for more before it forwards the batch: a steady trickle (a re-arm's `set` and
# `expire`, a claim's marker and echo, a few a millisecond) then reaches the leader as one
# batch, one wake-up and one TRACK per few milliseconds, not per message. Events are only
# hints to look (the scripts read Redis's state), so holding one this long delays a look
# by as much, nothing more. A burst fills batches by itself: it is not held up.
_GATHER_SECONDS = 0.005
_GATHER_BELOW = 100
_PIPELINES = 2  # script pipelines in flight at once (see _Pipelines)
_TOPOLOGY_EVERY = 2.0  # Cluster: how often the leader checks the set of primaries
_REDIRECTS = 5  # Cluster: MOVED/ASK followed per probe before resynchronising instead
MASTER_CHECK_EVERY = 0.25  # Sentinel: how often to ask which node is the master
TRACKED_PAGE = 5_000  # recorded deadlines per call: a page is well inside any timeout
REACHABLE_POLL = 0.1  # after a lost connection: how often to ask whether Redis is back


class _MasterWatch:
    """Sentinel: which node is the master, asked of the sentinels at most every
    ``MASTER_CHECK_EVERY`` seconds by whichever command comes first.

    After a manual failover the old master stays a master for ~10 s and accepts every
    command, so nothing fails on its own: redis-py asks the sentinels only when it opens
    a connection. On a change, every connection to the old master is dropped (pub/sub
    included: each listener, in its own thread, closes its subscription when it sees
    ``generation`` change) and the caller gets RedisUnavailable: it resynchronises
    against the new master within about a second.
    """

    def __init__(self, client: Any) -> None:
        pool = getattr(client, "connection_pool", None)
        self._pool = pool if hasattr(pool, "get_master_address") else None
        self._lock = threading.Lock()
        self._address: tuple[str, int] | None = None
        self._next_check = 0.0
        self.generation = 0  # bumped at each change of master

    def follow(self) -> None:
        if self._pool is None:
            return
        with self._lock:
            now = time.monotonic()
            if now < self._next_check:
                return
            self._next_check = now + MASTER_CHECK_EVERY
            address = tuple(self._pool.get_master_address())
            old, self._address = self._address, (str(address[0]), int(address[1]))
            if old is None or old == self._address:
                return
            # redis-py has dropped the idle connections to the old master and drops each
            # busy one when it comes back; subscriptions go by ``generation``.
            self.generation += 1
        raise RedisUnavailable(
            f"Sentinel moved the master from {old[0]}:{old[1]} to {address[0]}:{address[1]}:"
            " dropped every connection to the old one; resynchronising"
        )


class _Call:
    """One script call waiting for its pipeline: the task to wake, and what it gets."""

    __slots__ = ("args", "error", "keys", "reply", "script", "task")

    def __init__(self, script: Any, keys: list[str], args: list[Any]) -> None:
        self.script = script
        self.keys = keys
        self.args = args
        self.task: trio.lowlevel.Task | None = trio.lowlevel.current_task()
        self.reply: Any = None
        self.error: BaseException | None = None


class _Pipelines:
    """The leader's script calls, sent as pipelines: every call queued while the Redis
    threads are busy goes in the next one, in one thread hop, one write and one wake-up
    of trio for all of them (a hop per call cost more CPU than the script itself under a
    burst). At most ``_PIPELINES`` are in flight, each on its own connection, so a call
    made while one is out goes at once rather than a round trip later.

    Cancellation: a waiting task is woken at once with Cancelled; its call still runs
    (like ``abandon_on_cancel``) and its reply is dropped.
    """

    def __init__(self, client: Any, master: _MasterWatch) -> None:
        self._client = client
        self._master = master
        self._queue: list[_Call] = []
        self._running = 0
        self._token: trio.lowlevel.TrioToken | None = None

    async def call(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        token = trio.lowlevel.current_trio_token()
        if token is not self._token:
            # Another trio.run (a test, a command): pipelines left running by the last one
            # can never report back to it, so they must not hold the slots.
            self._token, self._queue, self._running = token, [], 0
        call = _Call(script, keys, args)
        self._queue.append(call)
        if self._running < _PIPELINES:
            self._start(token)

        def abort(_: Any) -> trio.lowlevel.Abort:
            call.task = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
        if call.error is not None:
            raise call.error
        return call.reply

    def _start(self, token: trio.lowlevel.TrioToken) -> None:
        batch, self._queue = self._queue, []
        self._running += 1

        def deliver(result: Any) -> None:  # in the thread: hand the replies back to trio
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self._finished, batch, result, token)

        trio.lowlevel.start_thread_soon(partial(self._execute, batch), deliver)

    def _finished(self, batch: list[_Call], result: Any, token: trio.lowlevel.TrioToken) -> None:
        self._running -= 1
        failed: BaseException | None = getattr(result, "error", None)  # outcome.Error
        for call in batch:
            if call.task is None:  # cancelled: nobody waits for it
                continue
            if failed is not None:  # each task raises its own copy, with its own traceback
                call.error = copy.copy(failed)
            trio.lowlevel.reschedule(call.task)
        if self._queue and self._running < _PIPELINES:
            self._start(token)

    def _execute(self, batch: list[_Call]) -> None:
        """In a thread: run ``batch`` as one pipeline; each call gets its reply or its
        error (translated); an error of the whole pipeline is raised for all."""
        try:
            self._master.follow()
            replies = self._send(batch)
            missing = [i for i, r in enumerate(replies) if isinstance(r, rexc.NoScriptError)]
            if missing:  # a restarted or promoted Redis has no scripts: load, run again
                again = [batch[i] for i in missing]
                for script in {id(c.script): c.script for c in again}.values():
                    self._client.script_load(script.script)
                for i, reply in zip(missing, self._send(again), strict=True):
                    replies[i] = reply
        except Exception as exc:
            translated = translate(exc)
            if translated is exc:
                raise
            raise translated from None
        for call, reply in zip(batch, replies, strict=True):
            if isinstance(reply, Exception):
                call.error = translate(reply)
            else:
                call.reply = reply

    def _send(self, batch: list[_Call]) -> list[Any]:
        pipe = self._client.pipeline(transaction=False)
        for c in batch:
            pipe.execute_command("EVALSHA", c.script.sha, len(c.keys), *c.keys, *c.args)
        replies: list[Any] = pipe.execute(raise_on_error=False)
        return replies


class RedisBridge:
    """Implements :class:`trio_counter_worker.store.Store` on a real Redis."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self.keys = config.keys
        self._client = make_client(config)
        self._master = _MasterWatch(self._client)
        self._scripts = {
            name: self._client.register_script(getattr(scripts, name)) for name in scripts.ON_ONE
        }
        # Cluster routes each call by its keys: there, one call per thread hop.
        self._pipelines = (
            None if config.redis_cluster_nodes else _Pipelines(self._client, self._master)
        )

    @property
    def client(self) -> Any:
        """The redis-py client, for operator reads (:mod:`trio_counter_worker.redis_reads`):
        call it only through :meth:`call`."""
        return self._client

    async def aclose(self) -> None:
        """Close every connection."""
        await trio.lowlevel.checkpoint()
        self._client.close()

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a thread, with Redis's errors translated (for operator reads)."""
        return await self._run(fn, *args)

    async def script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """One of :mod:`trio_counter_worker.scripts`, by name."""
        return await self._script(name, keys, args)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        # abandon_on_cancel: a step-down must not wait for a stuck socket; the thread ends
        # by itself within the socket timeout.
        return await trio.to_thread.run_sync(
            translating, self._followed, fn, *args, abandon_on_cancel=True
        )

    def _followed(self, fn: Callable[..., T], *args: Any) -> T:
        self._master.follow()
        return fn(*args)

    async def _script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        return await self._run(self._scripts[name], keys, args)

    async def _pipelined(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """A counter script: in the next pipeline where there is one (the lease's own calls
        keep a thread hop each, never waiting behind a pipeline of claims)."""
        if self._pipelines is None:
            return await self._script(name, keys, args)
        return await self._pipelines.call(self._scripts[name], keys, args)

    async def ping(self) -> None:
        await self._run(self._client.ping)

    def _load_scripts_sync(self) -> None:
        # Loaded ahead, so the first call of each after a connect, restart or failover is
        # one round trip, not EVALSHA -> NOSCRIPT -> SCRIPT LOAD -> EVALSHA; all in one
        # pipeline, so a takeover over a slow link pays one round trip for them, not 11.
        pipe = self._client.pipeline(transaction=False)
        for script in self._scripts.values():
            pipe.script_load(script.script)
        pipe.execute()

    async def preflight(self) -> None:
        """Check at start-up that Redis lets the worker do everything it will need; raise
        :class:`RedisRefused` ("permission") naming each missing permission at once."""
        await self._run(
            redis_preflight.check_all,
            self._client,
            self._pubsub_client,
            self._config,
            self._load_scripts_sync,
            self._scripts["PREFLIGHT"],
        )

    def _pubsub_client(self) -> Any:
        return self._client

    async def takeover_allowed(self) -> bool:
        """Whether the ACL lets the lease scripts ask PUBSUB NUMSUB (fast takeover)."""
        try:
            await self._run(self._client.pubsub_numsub, self.keys.released)
        except RedisRefused as exc:
            if exc.kind != "permission":
                raise
            return False
        return True

    # -- lease ---------------------------------------------------------------------------

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
        raw = await self._script(
            "ACQUIRE",
            [self.keys.lease, self.keys.epoch],
            [holder, replica_id, ttl_ms, epoch_floor, alive, suspect, endpoint],
        )
        return lease_view(raw)

    async def wait_leader_gone(self, channel: str, every: float) -> Watched:
        # One thread asks, on a connection of its own, and wakes trio once: a hop and a
        # script every TAKEOVER_CHECK_MS cost a standby ~4 % of a core (BENCHMARKS §24).
        stop = threading.Event()
        try:
            return await trio.to_thread.run_sync(
                translating,
                self._poll_leader,
                channel,
                every,
                stop,
                abandon_on_cancel=True,  # the thread sees ``stop`` within ``every``
                limiter=trio.CapacityLimiter(1),  # long-lived: off the shared limiter
            )
        finally:
            stop.set()

    def _poll_leader(self, channel: str, every: float, stop: threading.Event) -> Watched:
        pool = self._client.connection_pool
        conn = pool.get_connection()
        # PTTL, not EXISTS: the ACL rule the worker documents already allows it.
        asks = conn.pack_commands([("PUBSUB", "NUMSUB", channel), ("PTTL", self.keys.lease)])
        try:
            while not stop.is_set():
                self._master.follow()
                conn.send_packed_command(asks)
                subscribers, lease = conn.read_response(), conn.read_response()
                if numsub_count(subscribers) == 0:
                    return "gone"
                if int(lease) == -2:  # no such key
                    return "free"
                stop.wait(every)
            return "free"  # stopped: the caller has gone (cancelled), nobody reads this
        except BaseException:
            conn.disconnect()  # an answer may still be on its way: never reuse it
            raise
        finally:
            pool.release(conn)

    async def renew(self, holder: str, ttl_ms: int) -> Renewal:
        answer = int(await self._script("RENEW", [self.keys.lease], [holder, ttl_ms]))
        return "renewed" if answer == 1 else "unseen" if answer == -1 else "lost"

    async def release(self, holder: str, replica_id: str) -> bool:
        return bool(
            await self._script(
                "RELEASE", [self.keys.lease], [holder, self.keys.released, replica_id]
            )
        )

    # -- counters --------------------------------------------------------------------------

    async def track(self, holder: str, keys: list[str]) -> list[KeyOutcome]:
        raw = await self._pipelined(
            "TRACK", [self.keys.lease, self.keys.deadlines, self.keys.payloads, *keys], [holder]
        )
        return outcomes(raw, keys)

    async def claim(
        self,
        holder: str,
        keys: list[str],
        expired_after: list[int] | None = None,
        heard: bool = False,
    ) -> list[KeyOutcome]:
        raw = await self._pipelined(
            "CLAIM",
            [
                self.keys.lease,
                self.keys.deadlines,
                self.keys.pending,
                self.keys.claimed,
                self.keys.payloads,
                *keys,
            ],
            [
                holder,
                self._config.namespace,
                self.keys.claims,
                *reported_args(keys, expired_after, heard),
            ],
        )
        return outcomes(raw, keys)

    async def mark_sent(self, holder: str, *reset_ids: str) -> None:
        if not reset_ids:
            return
        # A hop of its own, not the claims' pipelines: marks gathered every 5 ms
        # (delivering.py) took one of their two slots on the claims' own rhythm, and
        # the steady state's p99 went up by 10 % (BENCHMARKS 22.6).
        r = await self._script(
            "MARK_SENT",
            [self.keys.lease, self.keys.pending, self.keys.failing],
            [holder, *reset_ids],
        )
        if int(r) < 0:
            raise LeaseLost("lease lost before the reset could be marked sent")

    async def note_failing(self, holder: str, notes: list[FailingNote]) -> None:
        if not notes:
            return
        args: list[str] = [holder]
        for failing in notes:
            args += [failing.reset_id, note_json(failing)]
        r = await self._pipelined(
            "NOTE_FAILING", [self.keys.lease, self.keys.pending, self.keys.failing], args
        )
        if int(r) < 0:
            raise LeaseLost("lease lost while noting failing resets")

    async def failing(self) -> dict[str, FailingNote]:
        rows: dict[str, str] = await self._run(self._hgetall, self.keys.failing)
        return {reset_id: note(reset_id, raw) for reset_id, raw in rows.items()}

    async def bury(self, holder: str, note: FailingNote) -> bool:
        r = await self._pipelined(
            "BURY",
            [self.keys.lease, self.keys.pending, self.keys.failing, self.keys.dead],
            [holder, note.reset_id, note_json(note)],
        )
        if int(r) < 0:
            raise LeaseLost("lease lost while giving up on a reset")
        return int(r) == 1

    async def pending(self) -> list[PendingReset]:
        # Parsed in the thread: thousands of records (a leader that died mid-burst) must
        # not hold up the trio loop, and with it the new leader's first resets.
        return await self._run(self._pending_sync)

    def _pending_sync(self) -> list[PendingReset]:
        rows = self._hgetall(self.keys.pending)
        return sorted((pending_record(v) for v in rows.values()), key=lambda p: p.deadline_ms)

    def _hgetall(self, key: str) -> dict[str, str]:
        rows: dict[str, str] = self._client.hgetall(key)
        return rows

    async def hand_over(self, entries: list[str]) -> None:
        if entries:
            await self._script("HAND_OVER", [self.keys.handed], [self.keys.redeliver, *entries])

    async def take_handed(self, holder: str, most: int) -> tuple[int, list[str]]:
        r = await self._script("TAKE_HANDED", [self.keys.lease, self.keys.handed], [holder, most])
        if not isinstance(r, list):
            raise LeaseLost("lease lost while taking keys handed over")
        dropped, taken = r
        return int(dropped), [str(e) for e in taken]

    async def tracked(
        self, holder: str, start: PageStart, within_ms: int | None = None
    ) -> DeadlinePage:
        keys = [self.keys.lease, self.keys.deadlines]
        lowest = "-inf" if start.after is None else f"({start.after}"
        within = "" if within_ms is None else str(int(within_ms))
        args = [holder, lowest, TRACKED_PAGE, within]
        return deadline_page(await self._pipelined("TRACKED", keys, args))

    async def scan(self, pattern: str, cursor: int) -> tuple[int, list[str]]:
        next_cursor, keys = await self._run(self._client.scan, cursor, pattern, 1000)
        return int(next_cursor), [str(k) for k in keys]

    # -- operator commands -----------------------------------------------------------------

    async def ensure_notifications(self) -> NotificationStatus:
        """Add the flags the worker needs to ``notify-keyspace-events``, keeping the app's."""
        return await self._run(self._ensure_notifications_sync)

    async def verify_notifications(self) -> NotificationStatus:
        return await self._run(self._verify_notifications_sync)

    def _verify_notifications_sync(self) -> NotificationStatus:
        return ensure_on(self._client)

    async def install_functions(self) -> str:
        return await self._run(self._install_functions_sync)

    def _install_functions_sync(self) -> str:
        try:
            return functions.ensure(self._client, self._config.counter_key)
        except rexc.ResponseError as exc:  # optional: a refusal must not stop the leader
            raise FunctionsUnavailable(f"Redis refused: {exc}") from None

    async def functions_gone(self) -> bool:
        return await self._run(functions.library_gone, self._client)

    async def memory_policy(self) -> str | None:
        return await self._run(self._memory_policy_sync)

    def _memory_policy_sync(self) -> str | None:
        try:
            reply = self._client.config_get("maxmemory-policy")
        except rexc.ResponseError:
            return None
        return str(reply.get("maxmemory-policy", "")) or None

    async def wait_until_reachable(self) -> None:
        while True:
            try:
                await self.ping()
                return
            except RedisUnavailable:
                await trio.sleep(REACHABLE_POLL)

    def _ensure_notifications_sync(self) -> NotificationStatus:
        # Every resynchronisation starts here: a restarted or promoted Redis has no scripts.
        self._load_scripts_sync()
        return ensure_on(self._client)

    async def listen(
        self,
        *,
        patterns: list[str],
        channels: list[str],
        send: trio.MemorySendChannel[list[Message]],
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Subscribe, report started once Redis confirmed, forward messages until cancelled.
        Started with Redis's time (ms) read just before subscribing: every message
        forwarded was published after it.

        Raises :class:`RedisUnavailable` when the connection drops: messages may have been
        lost, so the caller must resynchronise rather than trust a silent reconnect.
        """
        await self._listen_on(self._client, patterns, channels, send, task_status=task_status)

    async def _listen_on(
        self,
        client: Any,
        patterns: list[str],
        channels: list[str],
        send: trio.MemorySendChannel[list[Message]],
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        await trio.to_thread.run_sync(
            _listen_sync,
            client,
            patterns,
            channels,
            send,
            task_status,
            self._master,
            limiter=trio.CapacityLimiter(1),  # long-lived: keep it off the shared limiter
        )


def _listen_sync(
    client: Any,
    patterns: list[str],
    channels: list[str],
    send: trio.MemorySendChannel[list[Message]],
    task_status: trio.TaskStatus[int],
    master: _MasterWatch,
) -> None:
    generation = master.generation
    pubsub = client.pubsub()
    dropped = _overflow_count(client)
    run_id = _run_id(client) if dropped is None else None  # before 7.2: see _closed_while_up
    try:
        try:
            seconds, micros = client.time()
            since = int(seconds) * 1000 + int(micros) // 1000
            if patterns:
                pubsub.psubscribe(*patterns)
            if channels:
                pubsub.subscribe(*channels)
            confirmations = len(patterns) + len(channels)
            early: list[Message] = []  # arrived between two confirmations: keep them
            while confirmations:
                trio.from_thread.check_cancelled()
                msg = pubsub.get_message(timeout=_POLL_SECONDS)
                if msg and msg["type"] in ("subscribe", "psubscribe"):
                    confirmations -= 1
                elif msg and msg["type"] in ("message", "pmessage"):
                    early.append(Message(channel=msg["channel"], data=msg["data"]))
            trio.from_thread.run_sync(task_status.started, since)
            if early:
                trio.from_thread.run(send.send, early)
            # The keyspace watch gathers a trickle; the release watch (no patterns) does
            # not: a release or a liveness change is acted on at once.
            read = _batch_reader(pubsub, _GATHER_SECONDS if patterns else 0.0)
            while True:
                trio.from_thread.check_cancelled()
                master.follow()
                if master.generation != generation:
                    raise RedisUnavailable("Sentinel moved the master: resubscribing there")
                # Forward in batches: one thread hop for a burst, not one per message.
                batch = read(_POLL_SECONDS)
                if batch:
                    trio.from_thread.run(send.send, batch)
        except Exception as exc:
            if isinstance(exc, rexc.ConnectionError) and _overflowed(client, dropped):
                raise SubscriptionOverflow(_OVERFLOW) from None
            if isinstance(exc, rexc.ConnectionError) and _closed_while_up(client, run_id):
                raise SubscriptionOverflow(_CLOSED_WHILE_UP) from None
            translated = translate(exc)
            if translated is exc:
                raise
            raise translated from None
    finally:
        pubsub.close()


def _batch_reader(pubsub: Any, gather: float) -> Callable[[float], list[Message]]:
    """A reader of the messages that arrived on a subscription, up to
    ``_MAX_BATCH`` at a time, waiting at most ``timeout`` for the first, then ``gather``
    seconds for more when fewer than ``_GATHER_BELOW`` came with it.

    PubSub.get_message costs ~4 us a message in redis-py's layers (~10 without hiredis);
    a 200k re-arm is 400k events, and a listener that falls that far behind is closed by
    Redis (client-output-buffer-limit pubsub 32mb 8mb 60). With hiredis the replies are
    taken from its reader directly, every whole reply of one recv in a row (~0.25 us
    each); without it (or should redis-py's internals change), by get_message.
    """
    parser: Any = getattr(pubsub.connection, "_parser", None)
    if getattr(parser, "_reader", None) is None or not hasattr(parser, "read_from_socket"):
        return partial(_get_messages, pubsub)
    from redis._parsers.hiredis import NOT_ENOUGH_DATA

    def read(timeout: float) -> list[Message]:
        batch: list[Message] = []
        reader = parser._reader  # a new one after each reconnect: read it each time
        if reader is None:
            raise rexc.ConnectionError("the subscription's connection is closed")
        gathered = False
        while len(batch) < _MAX_BATCH:
            reply = reader.gets()
            if reply is NOT_ENOUGH_DATA:
                if batch and not gathered:
                    gathered = True
                    if gather and len(batch) < _GATHER_BELOW:
                        time.sleep(gather)
                # Wait for the first message only; then take what has already come.
                wait = 0 if batch else timeout
                if not parser.read_from_socket(timeout=wait, raise_on_timeout=False):
                    break
                continue
            _add_message(batch, reply)
        return batch

    return read


def _get_messages(pubsub: Any, timeout: float) -> list[Message]:
    batch: list[Message] = []
    msg = pubsub.get_message(timeout=timeout)
    while msg is not None and len(batch) < _MAX_BATCH:
        if msg["type"] in ("message", "pmessage"):
            batch.append(Message(channel=msg["channel"], data=msg["data"]))
        if len(batch) < _MAX_BATCH:
            msg = pubsub.get_message(timeout=0)
    return batch


def _add_message(batch: list[Message], reply: Any) -> None:
    """Keep ``reply`` if it is a message: ["message", channel, data] or ["pmessage",
    pattern, channel, data]; not confirmations. An error reply is raised."""
    if not isinstance(reply, list):
        if isinstance(reply, Exception):
            raise reply
        return
    kind = reply[0]
    if kind == "pmessage":
        batch.append(Message(channel=reply[2], data=reply[3]))
    elif kind == "message":
        batch.append(Message(channel=reply[1], data=reply[2]))


_OVERFLOW = (
    "Redis closed the leader's subscription: it fell behind the keyspace events, past "
    "Redis's client-output-buffer-limit for pubsub clients (Redis itself is up). Raise it "
    '(CONFIG SET client-output-buffer-limit "pubsub 32mb 8mb 60", Redis\'s default, or '
    "more), or arm fewer counters at once; resynchronising"
)


_CLOSED_WHILE_UP = (
    "Redis closed a subscription while it stayed up (the same server answers at once; "
    "Redis before 7.2 does not count why): most likely the leader fell behind the "
    "keyspace events, past Redis's client-output-buffer-limit for pubsub clients — "
    'raise it (CONFIG SET client-output-buffer-limit "pubsub 32mb 8mb 60", Redis\'s '
    "default, or more) or arm fewer counters at once — or someone killed the connection "
    "(CLIENT KILL); resubscribing"
)


def _run_id(client: Any) -> str | None:
    """The server's run_id (a new one after a restart), or None if it cannot be read."""
    return _info_field(client, "server", "run_id")


def _closed_while_up(client: Any, run_id: str | None) -> bool:
    """Where Redis cannot count output-buffer disconnections (before 7.2): whether the
    subscription was closed by a server that is still up, the same one (not a restart,
    not a failover to another)."""
    return run_id is not None and _run_id(client) == run_id


def _overflow_count(client: Any) -> int | None:
    """Redis's count of clients it closed for their output buffer (7.2+), or None."""
    value = _info_field(client, "stats", "client_output_buffer_limit_disconnections")
    return None if value is None else int(value)


def _info_field(client: Any, section: str, name: str) -> str | None:
    """One INFO field, or None where Redis does not report it or INFO fails: these are
    hints, and a Redis that cannot give one is not an error."""
    try:
        value = client.info(section).get(name)
    except Exception:
        return None
    return None if value is None else str(value)


def _overflowed(client: Any, before: int | None) -> bool:
    """Whether a subscription that dropped was closed for its output buffer: the
    connection is gone, so only the server-wide counter rising can tell."""
    if before is None:
        return False
    after = _overflow_count(client)
    return after is not None and after > before


def flags_of(client: Any) -> str:
    """The server's notify-keyspace-events; raises ResponseError where CONFIG is refused."""
    return str(client.config_get("notify-keyspace-events").get("notify-keyspace-events", ""))


def ensure_on(client: Any) -> NotificationStatus:
    try:
        current = flags_of(client)
    except rexc.ResponseError as exc:
        return NotificationStatus(ok=False, flags=None, missing="?", error=str(exc))
    missing = missing_flags(current)
    if not missing:
        return NotificationStatus(ok=True, flags=current)
    try:
        client.config_set("notify-keyspace-events", merged_flags(current))
    except rexc.ResponseError as exc:
        return NotificationStatus(ok=False, flags=current, missing=missing, error=str(exc))
    now = flags_of(client)
    # missing: what is still missing, else what was (for the log line saying so)
    return NotificationStatus(
        ok=not missing_flags(now), flags=now, changed=True, missing=missing_flags(now) or missing
    )


def client_kwargs(config: Config) -> dict[str, Any]:
    # Commands must finish well inside the lease, so a stuck one cannot outlive it.
    timeout = min(2.0, config.lease_ttl / 4)
    common: dict[str, Any] = {
        "db": config.redis_db,
        "username": config.redis_username,
        "password": config.redis_password,
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        # Named, so CLIENT LIST shows an operator which connections are the worker's.
        "client_name": f"tcw:{config.replica_id}",
        "retry": Retry(NoBackoff(), 0),
        "decode_responses": True,
        # Key names are bytes: one that is not UTF-8 decodes to lone surrogates and
        # encodes back to the same bytes (see keyspace.key_bytes).
        "encoding_errors": "surrogateescape",
        # RESP2: plain AUTH, which Redis rejects when it has no password configured;
        # RESP3's HELLO 3 AUTH is accepted there, hiding a misconfiguration.
        "protocol": 2,
    }
    if config.redis_tls:
        common["ssl"] = True
        common["ssl_ca_certs"] = config.redis_ca_file  # None: system CAs; always verified
    return common


def make_client(config: Config) -> Any:
    common = client_kwargs(config)
    if config.redis_cluster_nodes:
        from redis.cluster import ClusterNode, RedisCluster

        del common["db"]
        nodes = [ClusterNode(h, p) for h, p in config.redis_cluster_nodes]  # type: ignore[no-untyped-call, unused-ignore]
        return RedisCluster(startup_nodes=nodes, **common)
    if config.redis_sentinels:
        # The pool asks the sentinels for the master on every new connection, and drops a
        # connection that finds its master demoted: a failover surfaces as one error.
        sentinel = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
            list(config.redis_sentinels),
            sentinel_kwargs={
                "password": config.redis_sentinel_password,
                "socket_timeout": common["socket_timeout"],
                "socket_connect_timeout": common["socket_timeout"],
                "protocol": 2,
            },
        )
        assert config.redis_sentinel_master is not None
        master: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call, unused-ignore]
            config.redis_sentinel_master, **common
        )
        return master
    return redis.Redis(host=config.redis_host, port=config.redis_port, **common)
