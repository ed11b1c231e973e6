"""The worker: a replica that campaigns for the lease and, while leading, does the duties.

    async with open_worker(config) as worker:
        await worker.run()

``run()`` owns one nursery: a task that listens for lease releases (so a standby takes
over in milliseconds after a graceful stop), and the campaign loop. Each time this
replica wins, the leader-only work runs in a child nursery beside the lease renewer, so
losing the lease cancels it at once.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import NoReturn

import trio

from .config import Config
from .delivery import ResetSender, open_lanes, safe_url
from .election import Elector, Lease, LeaseTiming
from .errors import LeaseLost, RedisRefused, RedisUnavailable, first_error
from .handover import Handover
from .health import serve_health
from .hooks import Hooks
from .http_client import Transport
from .leader import LeaderDuties
from .leader_state import Quarantine
from .liveness import Liveness, off_by_setting, off_reason
from .metrics import Metrics
from .outage import OutageLog
from .redis_bridge import MASTER_CHECK_EVERY, RedisBridge
from .redis_replies import translating
from .retry import Backoff
from .store import Message, Store
from .topology import make_bridge

__all__ = ["Worker", "open_worker"]

log = logging.getLogger("trio_counter_worker")

_RELEASE_TIMEOUT = 1.0  # graceful stop: how long to try handing the lease back
_HAND_OVER_TIMEOUT = 0.5  # and before that, to decide what only this leader has seen
_STEADY = 60.0  # a lease held this long without a crash resets the crash backoff


class Worker:
    """One replica. Create it with :func:`open_worker`; call :meth:`run`."""

    def __init__(
        self,
        config: Config,
        store: Store,
        http: Sequence[Transport],
        hooks: Hooks | None = None,
        metrics: Metrics | None = None,
        *,
        takeover: bool = True,
    ) -> None:
        """``takeover`` False: no liveness (Redis refuses PUBSUB NUMSUB): a leader that
        dies is replaced when its lease expires."""
        self.config = config
        self.hooks = hooks or Hooks()
        self.metrics = metrics or Metrics()
        self._store = store
        self._sender = ResetSender(config, http, metrics=self.metrics)
        # Unique per process: two processes started with the same REPLICA_ID still differ.
        self.holder = f"{config.replica_id}#{secrets.token_hex(4)}"
        self._outage = OutageLog(log)  # one account of an outage for all the loops
        self.liveness = Liveness(config.keys, self.holder)
        fast = takeover and off_by_setting(config) is None
        self._elector = Elector(
            store,
            LeaseTiming(config.lease_ttl),
            self.holder,
            config.replica_id,
            self.metrics,
            self._outage,
            self.liveness if fast else None,
            config.takeover_check or 0.0,
            # Sentinel: a live leader follows a moved master within two checks.
            settle=2 * MASTER_CHECK_EVERY if config.redis_sentinels else 0.0,
            endpoint=safe_url(config.reset_endpoint_url),
        )
        self.lease: Lease | None = None
        self.health_port: int | None = None  # bound port of the health endpoint, once up
        self._quarantine = Quarantine()  # outlives each leadership: a bad key stays aside
        self._handover = Handover()  # outlives it too: what it could not decide
        self._crash_backoff = Backoff(base=1.0, cap=30.0)

    @property
    def is_leader(self) -> bool:
        return self.lease is not None

    def state(self) -> dict[str, object]:
        """Readiness: Redis answered a lease call lately, and this replica leads or stands
        by. (Every replica calls Redis at least once a lease period.)"""
        last_ok = self._elector.last_ok
        fresh = last_ok is not None and trio.current_time() - last_ok < 3 * self.config.lease_ttl
        return {
            "ready": fresh,
            "role": "leader" if self.is_leader else "standby",
            "replica_id": self.config.replica_id,
            "fencing_token": self.lease.epoch if self.lease else self._elector.epoch_seen,
        }

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Campaign and lead until cancelled. Reports started once it is listening for
        lease releases, i.e. ready to take over.

        Cancellation: leader work stops, the lease is released (compare-and-delete) and
        the standbys are told, so one of them takes over within milliseconds.
        """
        async with trio.open_nursery() as nursery:
            if self.config.health_port is not None:
                self.health_port = await nursery.start(
                    serve_health, self, self.config.health_port, self.config.health_host
                )
            await nursery.start(self._watch_releases)
            nursery.start_soon(self._handover.run, self._store, self._outage)
            task_status.started()
            log.info(
                "replica %s started (standby); lease %s ms, counter key %r, Redis %s, endpoint %s",
                self.config.replica_id,
                self.config.lease_ttl_ms,
                self.config.counter_key,
                self.config.redis_location,
                safe_url(self.config.reset_endpoint_url),
            )
            try:
                while True:
                    lease = await self._elector.acquire()
                    await self._lead(lease)
            finally:
                # Stopping: what the last leadership could not decide goes to Redis now,
                # not with the process (the writer above is being cancelled).
                with trio.CancelScope(shield=True), trio.move_on_after(_HAND_OVER_TIMEOUT):
                    await self._handover.flush(self._store)
        raise AssertionError("unreachable")

    async def _lead(self, lease: Lease) -> None:
        """Lead until the lease is lost. The crash barrier: if leader work fails
        unexpectedly (a bug, or an item it cannot process), log it once with the
        traceback, give the lease back and wait before campaigning again — never exit
        on account of data."""
        started = trio.current_time()
        try:
            await self._lead_once(lease)
        except* Exception as group:
            if trio.current_time() - started > _STEADY:
                self._crash_backoff.reset()
            delay = self._crash_backoff.next()
            self.metrics.leader_crashes.inc()
            log.error(
                "leader work failed unexpectedly (fencing_token=%d); the lease was "
                "released; campaigning again in %.1f s",
                lease.epoch,
                delay,
                exc_info=group,
                extra={"event": "leader_crashed", "fencing_token": lease.epoch},
            )
            await trio.sleep(delay)

    async def _lead_once(self, lease: Lease) -> None:
        self.lease = lease
        self.metrics.leader.set(1)
        self.metrics.leader_changes.inc()
        log.info(
            "leader acquired: replica=%s fencing_token=%d%s",
            self.config.replica_id,
            lease.epoch,
            f" (taken over from {lease.taken_from}: its connection to Redis is gone)"
            if lease.taken_from
            else "",
            extra={"event": "leader_acquired", "fencing_token": lease.epoch},
        )
        duties = LeaderDuties(
            self.config,
            self._store,
            self._sender,
            self.holder,
            lease,
            self.hooks.on_reset,
            self.metrics,
            self._quarantine,
            outage=self._outage,
        )
        self.hooks.on_elected(lease.epoch)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._elector.hold, lease)
                nursery.start_soon(self._elector.guard, lease)
                nursery.start_soon(duties.run)
                try:
                    await trio.sleep_forever()
                finally:
                    # Release as soon as leading ends, while the children are still
                    # winding down: the scripts check the lease, so whatever they still
                    # try fails safely, and a standby need not wait for them.
                    self.lease = None
                    self.metrics.leader.set(0)
                    self.metrics.pending.set(0)
                    self.metrics.watched.set(0)
                    self.metrics.reconciled.set(0)  # a standby has reconciled nothing
                    with trio.CancelScope(shield=True), trio.move_on_after(_HAND_OVER_TIMEOUT):
                        await duties.hand_over(self._handover)
                    await self._release(lease)
                    self.hooks.on_deposed(lease.epoch)
        except* LeaseLost as group:
            log.warning(
                "leader lost: fencing_token=%d: %s",
                lease.epoch,
                first_error(group),
                extra={"event": "leader_lost", "fencing_token": lease.epoch},
            )

    async def _release(self, lease: Lease) -> None:
        with trio.CancelScope(shield=True):
            with trio.move_on_after(_RELEASE_TIMEOUT) as scope:
                try:
                    if await self._elector.release():
                        log.info(
                            "lease released: fencing_token=%d",
                            lease.epoch,
                            extra={"event": "lease_released", "fencing_token": lease.epoch},
                        )
                    else:  # a standby took it over first (its check saw this one stop)
                        log.info(
                            "lease already taken over: fencing_token=%d",
                            lease.epoch,
                            extra={"event": "lease_taken_over", "fencing_token": lease.epoch},
                        )
                except RedisUnavailable as exc:
                    log.warning(
                        "could not release the lease (%s): it expires by itself within %s ms",
                        exc,
                        self.config.lease_ttl_ms,
                    )
            if scope.cancelled_caught:
                log.warning(
                    "releasing the lease took over %.1f s: given up; it expires by "
                    "itself within %s ms",
                    _RELEASE_TIMEOUT,
                    self.config.lease_ttl_ms,
                )

    async def _watch_releases(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Wake the campaign when a leader announces a release, and keep this replica's
        liveness subscription (same connection: it carries almost nothing). Polling the
        lease covers the times this subscription is down."""
        send, receive = trio.open_memory_channel[list[Message]](16)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._on_releases, receive)
            released = self.config.keys.released
            backoff = Backoff()
            first = True
            while True:
                alive = self.liveness.next_channel()
                try:
                    async with trio.open_nursery() as inner:
                        await inner.start(self._listen, [released, alive], send)
                        self.liveness.up(alive)
                        backoff.reset()
                        self._outage.recovered(trio.current_time())
                        if first:
                            first = False
                            task_status.started()
                except* RedisUnavailable as group:
                    self.liveness.down()
                    delay = backoff.next()
                    self._outage.failed("release watch", first_error(group), trio.current_time())
                    if first:
                        first = False
                        task_status.started()
                    await trio.sleep(delay)
                finally:
                    self.liveness.down()
        raise AssertionError("unreachable")

    async def _listen(
        self,
        channels: list[str],
        send: trio.MemorySendChannel[list[Message]],
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        await self._store.listen(patterns=[], channels=channels, send=send, task_status=task_status)

    async def _on_releases(self, receive: trio.MemoryReceiveChannel[list[Message]]) -> None:
        released = self.config.keys.released
        async for batch in receive:
            # Nothing is published on the liveness channel; whatever is, is no release.
            if any(message.channel == released for message in batch):
                self._elector.notify_released()


@asynccontextmanager
async def open_worker(
    config: Config,
    *,
    store: Store | None = None,
    http_client: Sequence[Transport] | None = None,
    hooks: Hooks | None = None,
) -> AsyncIterator[Worker]:
    """Connect to Redis and the HTTP client, yield a :class:`Worker`, close them after.

    With no ``store``, connects to the Redis in ``config``: waits (retrying with backoff,
    and saying so in the log) while Redis is unreachable, and raises
    :class:`~trio_counter_worker.RedisAuthError` if Redis rejects the credentials.
    """
    bridge: RedisBridge | None = None
    takeover = True
    if store is None:
        bridge, takeover = await _start_on_redis(config)
        store = bridge
    try:
        if http_client is not None:
            yield Worker(config, store, http_client, hooks, takeover=takeover)
        else:
            # One lane (one kept-alive connection) per request in flight.
            async with open_lanes(config) as lanes:
                yield Worker(config, store, lanes, hooks, takeover=takeover)
    finally:
        if bridge is not None:
            with trio.CancelScope(shield=True):
                await bridge.aclose()


async def _start_on_redis(
    config: Config, connect: Callable[[Config], RedisBridge] = make_bridge
) -> tuple[RedisBridge, bool]:
    """Connect, wait for Redis to answer, then check every permission the worker needs;
    the bridge, and whether fast takeover works. A refusal that is a bad setting raises
    its ConfigError; Redis unreachable, or going away during the checks, is waited out
    with backoff: one WARNING, a summary at most every 10 s, and a line when it answers
    (OutageLog), not a line per retry."""
    backoff = Backoff()
    outage = OutageLog(log)
    bridge: RedisBridge | None = None
    try:
        while True:
            what = "unreachable"
            try:
                if bridge is None:
                    # In a thread: Redis Cluster's client connects as it is made, and
                    # fails while a startup node it picks is down.
                    bridge = await trio.to_thread.run_sync(
                        translating, connect, config, abandon_on_cancel=True
                    )
                await bridge.ping()
                what = "failed during the start-up checks"
                await bridge.preflight()
                takeover = await _check_takeover(bridge, config)
                outage.recovered(trio.current_time())
                return bridge, takeover
            except RedisRefused as exc:
                start_error = exc.at_start()
                if start_error is not exc:
                    raise start_error from None
                outage.failed(config.redis_location, exc, trio.current_time())
            except RedisUnavailable as exc:
                outage.failed(
                    f"{config.redis_location} {what}",
                    exc,
                    trio.current_time(),
                    "check REDIS_HOST/REDIS_PORT or REDIS_URL",
                )
            await trio.sleep(backoff.next())
    except BaseException:
        if bridge is not None:
            with trio.CancelScope(shield=True):
                await bridge.aclose()
        raise


async def _check_takeover(bridge: RedisBridge, config: Config) -> bool:
    """Whether fast takeover works here; say once, at start, when a leader that dies will
    be replaced only at the end of its lease, and why."""
    why = await off_reason(bridge, config)
    if why is None:
        return True
    log.warning(
        "fast takeover off (%s): a leader that dies is replaced only when its lease "
        "expires (LEASE_TTL_MS=%d)",
        why,
        config.lease_ttl_ms,
        extra={"event": "takeover_off"},
    )
    return False
