"""The worker's Redis (the Store): redis-py's sync client, run from trio in threads.

redis-py's asyncio client does not run under trio, so each command runs in a worker
thread (``trio.to_thread.run_sync``) with a socket timeout shorter than the lease; the
leader's counter scripts go as pipelines, one thread hop for all the calls made meanwhile
(:mod:`.redis_pipelines`). Each pub/sub connection is owned by one thread from creation
to close, reading whole batches of messages with a short timeout and forwarding them into
a trio channel (:mod:`.redis_listener`).

redis-py's own retries are turned off: the worker retries at the trio level, where it
knows its deadlines, and a silent reconnect would hide lost pub/sub messages.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
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
)
from .keyspace import merged_flags, missing_flags
from .lease_spec import Renewal
from .redis_listener import listen_sync
from .redis_master import MASTER_CHECK_EVERY, MasterWatch
from .redis_pipelines import Pipelines
from .redis_replies import (
    deadline_page,
    lease_view,
    note,
    note_json,
    numsub_count,
    outcomes,
    pending_record,
    reported_args,
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

_TOPOLOGY_EVERY = 2.0  # Cluster: how often the leader checks the set of primaries
_REDIRECTS = 5  # Cluster: MOVED/ASK followed per probe before resynchronising instead
TRACKED_PAGE = 5_000  # recorded deadlines per call: a page is well inside any timeout
REACHABLE_POLL = 0.1  # after a lost connection: how often to ask whether Redis is back


class RedisBridge:
    """Implements :class:`trio_counter_worker.store.Store` on a real Redis."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self.keys = config.keys
        self._client = make_client(config)
        self._master = MasterWatch(self._client)
        self._scripts = {
            name: self._client.register_script(getattr(scripts, name)) for name in scripts.ON_ONE
        }
        # Cluster routes each call by its keys: there, one call per thread hop.
        self._pipelines = (
            None if config.redis_cluster_nodes else Pipelines(self._client, self._master)
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
            listen_sync,
            client,
            patterns,
            channels,
            send,
            task_status,
            self._master,
            limiter=trio.CapacityLimiter(1),  # long-lived: keep it off the shared limiter
        )


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
