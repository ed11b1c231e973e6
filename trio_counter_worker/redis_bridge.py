"""The one module that talks to redis-py: its sync client, run from trio in threads.

redis-py's asyncio client does not run under trio, so each command runs in a worker
thread (``trio.to_thread.run_sync``) with a socket timeout shorter than the lease, and
each pub/sub connection is owned by one thread from creation to close, polling with a
short timeout and forwarding messages into a trio channel.

redis-py's own retries are turned off: the worker retries at the trio level, where it
knows its deadlines, and a silent reconnect would hide lost pub/sub messages.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis
import redis.exceptions as rexc
import trio
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from . import functions, scripts
from .acl import is_permission_error, sample_key
from .config import Config
from .errors import FunctionsUnavailable, LeaseLost, RedisRefused, RedisUnavailable
from .keyspace import merged_flags, missing_flags, shown_key
from .store import (
    FailingNote,
    KeyOutcome,
    LeaseView,
    Message,
    NotificationStatus,
    PendingReset,
)

__all__ = ["ClusterBridge", "RedisBridge", "make_bridge"]

T = TypeVar("T")

_POLL_SECONDS = 0.1  # pub/sub poll: bounds how long a stop takes
_MAX_BATCH = 1000
_TOPOLOGY_EVERY = 2.0  # Cluster: how often the leader checks the set of primaries
_REDIRECTS = 5  # Cluster: MOVED/ASK followed per probe before resynchronising instead
_TRANSIENT = ("BUSY", "LOADING", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "MOVED", "ASK")
_UNAVAILABLE = (rexc.ConnectionError, rexc.TimeoutError, rexc.BusyLoadingError, OSError)
_CLUSTER_TRANSIENT = (
    rexc.ClusterError,  # ClusterDownError, MasterDownError, "TTL exhausted"
    rexc.TryAgainError,
    rexc.AskError,  # MovedError too
    rexc.SlotNotCoveredError,
    rexc.RedisClusterUnreachableError,
)
_MASTER_CHECK_EVERY = 0.25  # Sentinel: how often to ask which node is the master
_REACHABLE_POLL = 0.1  # after a lost connection: how often to ask whether Redis is back
_SUBSCRIBE_TIMEOUT = 2.0  # start-up check: how long Redis may take to confirm a subscription


def _auth_failed(exc: BaseException) -> bool:
    if isinstance(exc, rexc.AuthenticationError | rexc.AuthenticationWrongNumberOfArgsError):
        return True
    text = str(exc)
    return isinstance(exc, rexc.ResponseError) and (
        text.startswith(("WRONGPASS", "NOAUTH")) or "AUTH" in text.split(" ", 2)[:2]
    )


def _translate(exc: BaseException) -> BaseException:
    """Map redis-py errors onto ours, by type where redis-py has one (it strips the error
    code from some messages, e.g. OOM); anything else (a script bug) passes through."""
    if _auth_failed(exc):
        return RedisRefused(
            "Redis authentication failed: check REDIS_PASSWORD (and the user in REDIS_URL)",
            "auth",
        )
    if "CERTIFICATE_VERIFY_FAILED" in str(exc):
        return RedisRefused(
            "Redis TLS certificate verification failed: set REDIS_CA_FILE to the CA that "
            "signed the server's certificate, and connect by a name the certificate lists",
            "tls",
        )
    if isinstance(exc, rexc.NoPermissionError) or (
        isinstance(exc, rexc.ResponseError) and is_permission_error(str(exc))
    ):
        return RedisRefused(
            f"Redis refused a command for lack of permission ({exc}): give the worker's "
            "Redis user the ACL rule in the README (section 'Redis permissions'; "
            "`trio-counter-worker check` prints it)",
            "permission",
        )
    code = _error_code(exc)
    if isinstance(exc, rexc.OutOfMemoryError) or code == "OOM":
        return RedisRefused(
            "Redis is out of memory (maxmemory reached with a noeviction policy) and "
            "refuses writes: free memory or raise maxmemory; the worker catches up once "
            "writes succeed again",
            "oom",
        )
    if isinstance(exc, rexc.ResponseError) and "DB index is out of range" in str(exc):
        return RedisRefused(
            "REDIS_DB (or the /db of REDIS_URL) names a database this Redis does not have "
            "(`CONFIG GET databases` tells how many it has): choose one below that",
            "db",
        )
    if isinstance(exc, rexc.ReadOnlyError) or code == "READONLY":
        return RedisUnavailable("Redis is read-only (a replica?): waiting for a primary")
    if isinstance(exc, _CLUSTER_TRANSIENT) or (
        isinstance(exc, rexc.RedisClusterException)
        and str(exc).startswith("All slots are not covered")
    ):
        # A cluster failing over or resharding: redis-py strips the error code from
        # these (a ClusterDownError reads "The cluster is down"), so tell them by type.
        return RedisUnavailable(f"Redis Cluster cannot serve the command for now: "
                                f"{type(exc).__name__}: {exc}")
    if isinstance(exc, rexc.ResponseError) and (
        str(exc).startswith(_TRANSIENT) or code in _TRANSIENT
    ):
        # Redis is up but cannot serve us right now: wait it out, do not crash.
        return RedisUnavailable(f"Redis refused the command for now: {exc}")
    if isinstance(exc, _UNAVAILABLE):
        return RedisUnavailable(f"Redis unavailable: {type(exc).__name__}: {exc}")
    if isinstance(exc, ValueError) and "closed file" in str(exc):
        # redis-py reading a socket another thread closed (a pool disconnected under it)
        return RedisUnavailable("Redis connection closed while in use")
    return exc


class _MasterWatch:
    """Sentinel: which node is the master, asked of the sentinels at most every
    ``_MASTER_CHECK_EVERY`` seconds by whichever command comes first.

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
            self._next_check = now + _MASTER_CHECK_EVERY
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


def _error_code(exc: BaseException) -> str | None:
    """The Redis error code of a failure inside a script, which redis-py (and Redis 6.2)
    pass on as a plain ResponseError: "Error running script ...: -OOM command not..."."""
    if not isinstance(exc, rexc.ResponseError):
        return None
    _, sep, rest = str(exc).rpartition(": -")
    return rest.split(" ", 1)[0] if sep else None


def _translating(fn: Callable[..., T], *args: Any) -> T:
    try:
        return fn(*args)
    except Exception as exc:
        translated = _translate(exc)
        if translated is exc:
            raise
        raise translated from None


class RedisBridge:
    """Implements :class:`trio_counter_worker.store.Store` on a real Redis."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self.keys = config.keys
        self._client = _make_client(config)
        self._master = _MasterWatch(self._client)
        self._scripts = {
            name: self._client.register_script(getattr(scripts, name))
            for name in ("ACQUIRE", "RENEW", "RELEASE", "TRACK", "CLAIM", "MARK_SENT", "TRACKED",
                         "NOTE_FAILING", "BURY", "REDELIVER", "PREFLIGHT")
        }

    def close(self) -> None:
        self._client.close()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        # abandon_on_cancel: a step-down must not wait for a stuck socket; the thread ends
        # by itself within the socket timeout.
        return await trio.to_thread.run_sync(
            _translating, self._followed, fn, *args, abandon_on_cancel=True
        )

    def _followed(self, fn: Callable[..., T], *args: Any) -> T:
        self._master.follow()
        return fn(*args)

    async def _script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        return await self._run(self._scripts[name], keys, args)

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
        await self._run(self._preflight_sync)

    def _preflight_sync(self) -> None:
        missing: list[str] = []

        def check(rule: str, fn: Callable[[], object]) -> None:
            try:
                fn()
            except rexc.RedisError as exc:
                translated = _translate(exc)
                if isinstance(translated, RedisRefused) and translated.kind == "permission":
                    missing.append(rule)
                    return
                raise translated from None

        check("+script|load", self._load_scripts_sync)
        if not missing:
            refused: list[str] = []
            check(f"+evalsha and ~{self._config.namespace}:* (the worker's own keys)",
                  lambda: refused.extend(self._scripts["PREFLIGHT"](
                      [self.keys.preflight], [self.keys.released])))
            missing += [f"+{name}" for name in refused]
        check(f"+hgetall on ~{self._config.namespace}:*",
              lambda: self._client.hgetall(self.keys.pending))
        check(f"~{self._config.counter_key} (the counter keys) with +pttl",
              lambda: self._client.pttl(sample_key(self._config.counter_key)))
        check("+scan", lambda: self._client.scan(0, self._config.counter_key, 10))
        missing += self._subscribe_check()
        if missing:
            raise RedisRefused(
                f"the Redis user may not do what the worker needs: add {', '.join(missing)} "
                "to its ACL (the full rule is in the README, section 'Redis permissions')",
                "permission",
            )

    def _pubsub_client(self) -> Any:
        return self._client

    def _subscribe_check(self) -> list[str]:
        """Subscribe to what the leader and standbys listen to, and unsubscribe."""
        pattern = self.keys.keyspace(self._config.redis_db)
        wanted = [("psubscribe", pattern, f"+psubscribe and &{pattern}"),
                  ("subscribe", self.keys.released,
                   f"+subscribe and &{self._config.namespace}:*")]
        missing: list[str] = []
        for kind, name, rule in wanted:
            pubsub = self._pubsub_client().pubsub()
            try:
                getattr(pubsub, kind)(name)
                deadline = time.monotonic() + _SUBSCRIBE_TIMEOUT
                while time.monotonic() < deadline:
                    msg = pubsub.get_message(timeout=0.1)
                    if msg and msg["type"] == kind:
                        break
            except rexc.RedisError as exc:
                translated = _translate(exc)
                if not (isinstance(translated, RedisRefused) and translated.kind == "permission"):
                    raise translated from None
                missing.append(rule)
            finally:
                pubsub.close()
        return missing

    # -- lease ---------------------------------------------------------------------------

    async def acquire(
        self, holder: str, replica_id: str, ttl_ms: int, epoch_floor: int
    ) -> LeaseView:
        raw = await self._script(
            "ACQUIRE", [self.keys.lease, self.keys.epoch], [holder, replica_id, ttl_ms, epoch_floor]
        )
        r = json.loads(raw)
        return LeaseView(
            acquired=bool(r["acquired"]),
            epoch=int(r.get("epoch") or 0),
            pttl_ms=int(r.get("pttl") or 0),
            holder_replica=str(r.get("replica") or ""),
        )

    async def renew(self, holder: str, ttl_ms: int) -> bool:
        return bool(await self._script("RENEW", [self.keys.lease], [holder, ttl_ms]))

    async def release(self, holder: str, replica_id: str) -> bool:
        return bool(
            await self._script(
                "RELEASE", [self.keys.lease], [holder, self.keys.released, replica_id]
            )
        )

    # -- counters --------------------------------------------------------------------------

    async def track(self, holder: str, keys: list[str]) -> list[KeyOutcome]:
        raw = await self._script(
            "TRACK", [self.keys.lease, self.keys.deadlines, self.keys.payloads, *keys], [holder]
        )
        return _outcomes(raw, keys)

    async def claim(
        self, holder: str, keys: list[str], expired_after: list[int] | None = None
    ) -> list[KeyOutcome]:
        raw = await self._script(
            "CLAIM",
            [self.keys.lease, self.keys.deadlines, self.keys.pending, self.keys.claimed,
             self.keys.payloads, *keys],
            [holder, self._config.namespace, self.keys.claims,
             *_reported_args(keys, expired_after)],
        )
        return _outcomes(raw, keys)

    async def mark_sent(self, holder: str, *reset_ids: str) -> None:
        if not reset_ids:
            return
        r = await self._script(
            "MARK_SENT", [self.keys.lease, self.keys.pending, self.keys.failing],
            [holder, *reset_ids],
        )
        if int(r) < 0:
            raise LeaseLost("lease lost before the reset could be marked sent")

    async def note_failing(self, holder: str, notes: list[FailingNote]) -> None:
        if not notes:
            return
        args: list[str] = [holder]
        for note in notes:
            args += [note.reset_id, _note_json(note)]
        r = await self._script(
            "NOTE_FAILING", [self.keys.lease, self.keys.pending, self.keys.failing], args
        )
        if int(r) < 0:
            raise LeaseLost("lease lost while noting failing resets")

    async def failing(self) -> dict[str, FailingNote]:
        rows: dict[str, str] = await self._run(self._hgetall, self.keys.failing)
        return {reset_id: _note(reset_id, raw) for reset_id, raw in rows.items()}

    async def bury(self, holder: str, note: FailingNote) -> bool:
        r = await self._script(
            "BURY", [self.keys.lease, self.keys.pending, self.keys.failing, self.keys.dead],
            [holder, note.reset_id, _note_json(note)],
        )
        if int(r) < 0:
            raise LeaseLost("lease lost while giving up on a reset")
        return int(r) == 1

    async def redeliver(self, reset_ids: list[str]) -> int:
        """Operator command: dead resets back to pending (all of them with no ids)."""
        return int(await self._script(
            "REDELIVER", [self.keys.pending, self.keys.dead], [self.keys.redeliver, *reset_ids]
        ))

    async def pending(self) -> list[PendingReset]:
        rows: dict[str, str] = await self._run(self._hgetall, self.keys.pending)
        return sorted((_pending(v) for v in rows.values()), key=lambda p: p.deadline_ms)

    def _hgetall(self, key: str) -> dict[str, str]:
        rows: dict[str, str] = self._client.hgetall(key)
        return rows

    async def tracked(self, holder: str) -> list[tuple[str, int]]:
        keys = [self.keys.lease, self.keys.deadlines]
        r = json.loads(await self._script("TRACKED", keys, [holder]))
        if not r["leader"]:
            raise LeaseLost("lease lost while reading deadlines")
        rows = r["rows"] if isinstance(r["rows"], list) else []
        now = int(r["now"])
        return [(rows[i], int(float(rows[i + 1])) - now) for i in range(0, len(rows), 2)]

    async def scan(self, pattern: str, cursor: int) -> tuple[int, list[str]]:
        next_cursor, keys = await self._run(self._client.scan, cursor, pattern, 1000)
        return int(next_cursor), [str(k) for k in keys]

    # -- operator commands -----------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        """What `trio-counter-worker status` shows, read in one thread hop."""
        return await self._run(self._status_sync)

    def _status_sync(self) -> dict[str, Any]:
        c = self._client
        pipe = c.pipeline(transaction=False)
        pipe.hgetall(self.keys.lease)
        pipe.pttl(self.keys.lease)
        pipe.hlen(self.keys.pending)
        pipe.zcard(self.keys.deadlines)
        pipe.zrange(self.keys.deadlines, 0, 0, withscores=True)
        pipe.time()
        pipe.get(self.keys.epoch)
        pipe.hgetall(self.keys.failing)
        pipe.hgetall(self.keys.dead)
        pipe.hlen(self.keys.payloads)
        (lease, pttl, pending, watched, first, (sec, usec), epoch, failing,
         dead, payloads) = pipe.execute()
        now_ms = int(sec) * 1000 + int(usec) // 1000
        nxt = None
        if first:
            key, score = first[0]
            nxt = {"key": shown_key(key), "in_ms": int(score) - now_ms}
        try:
            flags: str | None = _flags(c)
        except rexc.ResponseError:
            flags = None
        return {
            "leader": lease.get("replica") or None,
            "fencing_token": int(lease["epoch"]) if lease.get("epoch") else None,
            "last_fencing_token": int(epoch) if epoch else 0,
            "lease_ms_left": int(pttl) if int(pttl) >= 0 else None,
            "pending_resets": int(pending),
            "watched_counters": int(watched),
            "next_deadline": nxt,
            "notify_keyspace_events": flags,
            "failing_resets": _listing([_note(i, raw) for i, raw in failing.items()]),
            "dead_resets": _dead_listing(dead),
            "touch": {**_touch_library(c, self._config.namespace), "payloads": int(payloads)},
        }

    async def probe(self) -> dict[str, Any]:
        """What `trio-counter-worker check` needs: version, flags, whether CONFIG SET works."""
        return await self._run(self._probe_sync)

    def _probe_sync(self) -> dict[str, Any]:
        c = self._client
        c.ping()
        version = str(c.info("server").get("redis_version", "?"))
        policy = self._memory_policy_sync()
        try:
            flags = _flags(c)
        except rexc.ResponseError as exc:
            return {"version": version, "flags": None, "can_set": False, "error": str(exc),
                    "policy": policy}
        try:
            c.config_set("notify-keyspace-events", flags)  # a no-op write: is CONFIG SET allowed?
            can_set, error = True, None
        except rexc.ResponseError as exc:
            can_set, error = False, str(exc)
        return {"version": version, "flags": flags, "can_set": can_set, "error": error,
                "policy": policy}

    # -- notifications ---------------------------------------------------------------------

    async def ensure_notifications(self) -> NotificationStatus:
        """Add the flags the worker needs to ``notify-keyspace-events``, keeping the app's."""
        return await self._run(self._ensure_notifications_sync)

    async def verify_notifications(self) -> NotificationStatus:
        return await self._run(self._verify_notifications_sync)

    def _verify_notifications_sync(self) -> NotificationStatus:
        return _ensure_on(self._client)

    async def install_functions(self) -> str:
        return await self._run(self._install_functions_sync)

    def _install_functions_sync(self) -> str:
        try:
            return functions.ensure(self._client, self._config.counter_key)
        except rexc.ResponseError as exc:  # optional: a refusal must not stop the leader
            raise FunctionsUnavailable(f"Redis refused: {exc}") from None

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
                await trio.sleep(_REACHABLE_POLL)

    def _ensure_notifications_sync(self) -> NotificationStatus:
        # Every resynchronisation starts here: a restarted or promoted Redis has no scripts.
        self._load_scripts_sync()
        return _ensure_on(self._client)

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



def make_bridge(config: Config) -> RedisBridge:
    """The bridge for the configured topology: one Redis, Sentinel, or Cluster."""
    return ClusterBridge(config) if config.redis_cluster_nodes else RedisBridge(config)


class ClusterBridge(RedisBridge):
    """Redis Cluster: the same Store, with each counter decision split in two.

    The lease, epoch, deadlines and pending resets share one hash slot (the braces in the
    namespace), so their scripts run as on one Redis. A counter key lives in any slot: it
    is probed on its own node (scripts.PROBE, batched per node in a pipeline) and the
    facts are applied, lease-checked, in the worker's slot. Keyspace events are per
    node: the leader subscribes on every primary and resynchronises when the set of
    primaries changes.
    """

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._flagged: set[str] = set()  # nodes whose flags were verified, by name
        for name in ("APPLY_TRACK", "APPLY_CLAIM"):
            self._scripts[name] = self._client.register_script(getattr(scripts, name))

    async def install_functions(self) -> str:
        raise FunctionsUnavailable("the tcw library does not support Redis Cluster yet")

    def _load_scripts_sync(self) -> None:
        # redis-py sends SCRIPT LOAD to every primary; a cluster pipeline would not.
        for script in self._scripts.values():
            self._client.script_load(script.script)

    def _key_facts_sync(self, keys: list[str]) -> list[Any]:
        """Facts (key, now, pttl, expire_at) for each key, one pipeline per node.

        Slots move while the worker runs (resharding, failovers), so a probe may meet a
        redirection: ``MOVED`` (the slot has a new owner: the slot map is refreshed and
        the key probed there) or ``ASK`` (the slot is being migrated and the key is not
        on the source any more: probed on the target, after ``ASKING``). Redis decides
        where the key is; the probe is never answered from a node that does not own it.
        """
        facts: dict[str, list[Any]] = {}
        todo: dict[str, tuple[str, int] | None] = dict.fromkeys(keys)  # key -> ASK target
        for _ in range(_REDIRECTS):
            by_node: dict[str, tuple[Any, list[tuple[str, bool]]]] = {}
            for key, ask in todo.items():
                node = self._node_at(*ask) if ask else self._client.get_node_from_key(key)
                by_node.setdefault(node.name, (node, []))[1].append((key, ask is not None))
            todo = {}
            moved = False
            for node, probes in by_node.values():
                for (key, _), reply in zip(probes, self._probe_on(node, probes), strict=True):
                    if isinstance(reply, rexc.MovedError):  # before AskError: a subclass
                        moved = True
                        todo[key] = None
                    elif isinstance(reply, rexc.AskError):
                        todo[key] = (reply.host or node.host, int(reply.port))
                    elif isinstance(reply, Exception):
                        raise reply
                    else:
                        now, pttl, at = reply
                        facts[key] = [key, now, pttl, at]
            if not todo:
                return [v for key in keys for v in facts[key]]
            if moved:
                self._client.nodes_manager.initialize()
        raise RedisUnavailable(
            f"Redis Cluster kept redirecting {len(todo)} counter key(s) "
            f"({_REDIRECTS} times): slots moving; retrying after a resynchronisation"
        )

    def _probe_on(self, node: Any, probes: list[tuple[str, bool]]) -> list[Any]:
        """PROBE each key on ``node`` in one pipeline (ASKING first where asked to);
        a redirection comes back as the key's reply, not raised."""
        pipe = self._client.get_redis_connection(node).pipeline(transaction=False)
        for key, asking in probes:
            if asking:
                pipe.execute_command("ASKING")
            pipe.eval(scripts.PROBE, 1, key)
        replies = iter(pipe.execute(raise_on_error=False))
        out = []
        for _, asking in probes:
            if asking:
                next(replies)  # ASKING's OK (or its error, which the probe repeats)
            out.append(next(replies))
        return out

    def _node_at(self, host: str, port: int) -> Any:
        node = self._client.get_node(host=host, port=port)
        if node is None:  # a node added since the slot map was read
            self._client.nodes_manager.initialize()
            node = self._client.get_node(host=host, port=port)
        if node is None:
            raise RedisUnavailable(f"Redis Cluster redirected to unknown node {host}:{port}")
        return node

    async def track(self, holder: str, keys: list[str]) -> list[KeyOutcome]:
        if not keys:
            return []
        facts = await self._run(self._key_facts_sync, keys)
        raw = await self._script(
            "APPLY_TRACK", [self.keys.lease, self.keys.deadlines, self.keys.seen], [holder, *facts]
        )
        return _outcomes(raw, keys)

    async def claim(
        self, holder: str, keys: list[str], expired_after: list[int] | None = None
    ) -> list[KeyOutcome]:
        if not keys:
            return []
        facts = await self._run(self._key_facts_sync, keys)
        reported = _reported_args(keys, expired_after)
        args = [v for i in range(len(keys)) for v in (*facts[4 * i:4 * i + 4], reported[i])]
        raw = await self._script(
            "APPLY_CLAIM",
            [self.keys.lease, self.keys.deadlines, self.keys.pending, self.keys.seen,
             self.keys.claimed],
            [holder, self._config.namespace, *args],
        )
        return _outcomes(raw, keys)

    def _primaries(self) -> list[Any]:
        return sorted(self._client.get_primaries(), key=lambda n: n.name)

    def _fresh_primaries(self) -> list[Any]:
        """The primaries as the cluster names them now (redis-py's map is refreshed only
        after its own commands fail, so a node that died under a subscription, or a
        replica promoted since, would not show)."""
        self._client.nodes_manager.initialize()
        return self._primaries()

    async def wait_until_reachable(self) -> None:
        """Return once every slot has a primary that answers: a cluster whose primary
        died answers on its other nodes (CLUSTERDOWN) until a replica is promoted, and
        only then can the worker resubscribe everywhere."""
        while True:
            try:
                await self._run(self._reachable_sync)
                return
            except RedisUnavailable:
                await trio.sleep(_REACHABLE_POLL)

    def _reachable_sync(self) -> None:
        for node in self._fresh_primaries():
            self._client.get_redis_connection(node).ping()

    async def scan(self, pattern: str, cursor: int) -> tuple[int, list[str]]:
        """SCAN every primary in turn; the low byte of the cursor is the node's index."""
        nodes = await self._run(self._primaries)
        index, node_cursor = cursor & 0xFF, cursor >> 8
        if index >= len(nodes):
            return 0, []
        client = self._client.get_redis_connection(nodes[index])
        next_cursor, keys = await self._run(client.scan, node_cursor, pattern, 1000)
        if int(next_cursor) == 0:
            index += 1
            return (0 if index >= len(nodes) else index), [str(k) for k in keys]
        return (int(next_cursor) << 8) | index, [str(k) for k in keys]

    def _ensure_notifications_sync(self) -> NotificationStatus:
        # Every resynchronisation starts here: refresh the topology first.
        self._client.nodes_manager.initialize()
        self._load_scripts_sync()
        return self._verify_notifications_sync()

    def _verify_notifications_sync(self) -> NotificationStatus:
        nodes = self._client.get_nodes()  # replicas too: they may be promoted
        statuses = [_ensure_on(self._client.get_redis_connection(node)) for node in nodes]
        known, self._flagged = self._flagged, {
            node.name for node, s in zip(nodes, statuses, strict=True) if s.ok}
        # CLUSTER SLOTS lists a replica only once the cluster knows it is in sync, so
        # one may first show up seconds after start: setting its flags then restores
        # nothing (replicas publish nothing the leader listens to). A change counts on a
        # node already verified, or on a primary.
        changed = [s for node, s in zip(nodes, statuses, strict=True) if s.changed
                   and (node.name in known or node.server_type == "primary")]
        bad = [s for s in statuses if not s.ok]
        # Report the node that needs attention: one that refused, else one just set.
        first = bad[0] if bad else changed[0] if changed else statuses[0]
        return NotificationStatus(ok=not bad, flags=first.flags, changed=bool(changed),
                                  missing=first.missing, error=first.error)

    async def listen(
        self,
        *,
        patterns: list[str],
        channels: list[str],
        send: trio.MemorySendChannel[list[Message]],
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Keyspace patterns on every primary; channels (cluster-wide) on one node. Raises
        RedisUnavailable when a connection drops or the set of primaries changes.

        Claim markers are not subscribed: a key's events come from its own node and a
        marker from the worker's, in no common order. Started with the earliest of the
        primaries' times read before subscribing."""
        primaries = await self._run(self._fresh_primaries)
        # Channels are broadcast to every node: one subscription is enough for them.
        clients = [self._node_client(node) for node in (primaries if patterns else primaries[:1])]
        channels = [c for c in channels if c != self.keys.claims]
        try:
            async with trio.open_nursery() as nursery:
                since = [
                    await nursery.start(
                        self._listen_on, client, patterns, channels if i == 0 else [], send
                    )
                    for i, client in enumerate(clients)
                ]
                task_status.started(min(since))
                if patterns:
                    nursery.start_soon(self._watch_topology, {n.name for n in primaries})
        finally:
            for client in clients:
                client.close()

    def _pubsub_client(self) -> Any:
        return self._node_client(self._primaries()[0])

    def _node_client(self, node: Any) -> redis.Redis:
        kwargs = _client_kwargs(self._config)
        del kwargs["db"]
        return redis.Redis(host=node.host, port=node.port, **kwargs)

    async def _watch_topology(self, names: set[str]) -> None:
        while True:
            await trio.sleep(_TOPOLOGY_EVERY)
            if await self._run(self._current_primaries) != names:
                raise RedisUnavailable("Redis Cluster topology changed: resubscribing")

    def _current_primaries(self) -> set[str]:
        nodes: Any = self._client.cluster_nodes()
        return {
            addr.split("@")[0] for addr, info in nodes.items()
            if "master" in info["flags"] and "fail" not in info["flags"]
            and info.get("connected", True)
        }

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
            while True:
                trio.from_thread.check_cancelled()
                master.follow()
                if master.generation != generation:
                    raise RedisUnavailable("Sentinel moved the master: resubscribing there")
                # Forward in batches: one thread hop for a burst, not one per message.
                batch: list[Message] = []
                msg = pubsub.get_message(timeout=_POLL_SECONDS)
                while msg is not None and len(batch) < _MAX_BATCH:
                    if msg["type"] in ("message", "pmessage"):
                        batch.append(Message(channel=msg["channel"], data=msg["data"]))
                    msg = pubsub.get_message(timeout=0)
                if msg is not None and msg["type"] in ("message", "pmessage"):
                    batch.append(Message(channel=msg["channel"], data=msg["data"]))
                if batch:
                    trio.from_thread.run(send.send, batch)
        except Exception as exc:
            translated = _translate(exc)
            if translated is exc:
                raise
            raise translated from None
    finally:
        pubsub.close()


def _touch_library(client: Any, namespace: str) -> dict[str, Any]:
    """The touch library's version on this Redis (None: not loaded, no Functions, or not
    allowed to ask) and whether the deployment is registered."""
    try:
        return {"library": str(client.fcall_ro("tcw_version", 0)),
                "registered": bool(client.hexists(functions.REGISTRY_KEY, namespace))}
    except rexc.ResponseError:
        return {"library": None, "registered": False}


def _flags(client: Any) -> str:
    """The server's notify-keyspace-events; raises ResponseError where CONFIG is refused."""
    return str(client.config_get("notify-keyspace-events").get("notify-keyspace-events", ""))


def _ensure_on(client: Any) -> NotificationStatus:
    try:
        current = _flags(client)
    except rexc.ResponseError as exc:
        return NotificationStatus(ok=False, flags=None, missing="?", error=str(exc))
    missing = missing_flags(current)
    if not missing:
        return NotificationStatus(ok=True, flags=current)
    try:
        client.config_set("notify-keyspace-events", merged_flags(current))
    except rexc.ResponseError as exc:
        return NotificationStatus(ok=False, flags=current, missing=missing, error=str(exc))
    now = _flags(client)
    # missing: what is still missing, else what was (for the log line saying so)
    return NotificationStatus(ok=not missing_flags(now), flags=now, changed=True,
                              missing=missing_flags(now) or missing)


def _client_kwargs(config: Config) -> dict[str, Any]:
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


def _make_client(config: Config) -> Any:
    common = _client_kwargs(config)
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


def _pending(raw: str) -> PendingReset:
    return _record(json.loads(raw))


def _record(r: dict[str, Any]) -> PendingReset:
    payload = r.get("payload")
    return PendingReset(
        reset_id=str(r["reset_id"]),
        key=str(r["key"]),
        deadline_ms=int(r["deadline_ms"]),
        fencing_token=int(r["fencing_token"]),
        payload=None if payload is None else str(payload),
    )


def _note_json(note: FailingNote) -> str:
    return json.dumps({"attempts": note.attempts, "since": note.failing_since,
                       "error": note.last_error[:500], "key": note.key[:200]})


def _note(reset_id: str, raw: str) -> FailingNote:
    try:
        r = json.loads(raw)
        return FailingNote(reset_id, int(r["attempts"]), float(r["since"]), str(r["error"]),
                           str(r.get("key", "")))
    except (ValueError, KeyError, TypeError):
        return FailingNote(reset_id, 0, 0.0, "(unreadable note)")


_LISTED = 20  # `status` shows this many failing or dead resets, and counts the rest


def _listing(notes: list[FailingNote]) -> dict[str, Any]:
    notes.sort(key=lambda n: n.failing_since)
    return {"count": len(notes), "oldest": [
        {"reset_id": n.reset_id, "key": n.key, "attempts": n.attempts,
         "failing_since": n.failing_since,
         "last_error": n.last_error} for n in notes[:_LISTED]]}


def _dead_listing(rows: dict[str, str]) -> dict[str, Any]:
    out: list[dict[str, Any]] = []
    for reset_id, raw in rows.items():
        try:
            dead = json.loads(raw)
            record, note = _pending(dead["record"]), _note(reset_id, dead["note"])
            out.append({"reset_id": reset_id, "key": shown_key(record.key),
                        "attempts": note.attempts, "last_error": note.last_error,
                        "dead_at": int(dead["dead_ms"]) / 1000})
        except (ValueError, KeyError, TypeError):
            out.append({"reset_id": reset_id, "last_error": "(unreadable record)"})
    out.sort(key=lambda d: d.get("dead_at", 0))
    return {"count": len(out), "oldest": out[:_LISTED]}


def _reported_args(keys: list[str], expired_after: list[int] | None) -> list[str]:
    """Per key: '' (not reported) or the time Redis reported it expired after."""
    if expired_after is None:
        return [""] * len(keys)
    if len(expired_after) != len(keys):
        raise ValueError("claim: one expired_after per key")
    return [str(int(t)) for t in expired_after]


def _outcomes(raw: str, keys: list[str]) -> list[KeyOutcome]:
    r = json.loads(raw)
    if not r["leader"]:
        raise LeaseLost("lease lost: Redis shows another holder")
    rows = r["keys"] if isinstance(r["keys"], list) else []
    out: list[KeyOutcome] = []
    for key, row in zip(keys, rows, strict=True):
        if "p" in row:
            out.append(KeyOutcome(key, "alive", pttl_ms=int(row["p"])))
        elif row.get("due"):
            out.append(KeyOutcome(key, "due"))
        elif "claimed" in row:
            rec = json.loads(row["claimed"])
            out.append(KeyOutcome(key, "claimed", reset=_record(rec),
                                  claimed_ms=int(rec["claimed_ms"])))
        else:
            out.append(KeyOutcome(key, "gone"))
    return out

