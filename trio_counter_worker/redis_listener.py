"""A pub/sub subscription read in the thread that owns it: whole batches of messages
forwarded into a trio channel, and why Redis closed it when it does."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any

import redis.exceptions as rexc
import trio

from .errors import RedisUnavailable, SubscriptionOverflow
from .redis_master import MasterWatch
from .redis_replies import translate
from .store import Message

__all__ = [
    "GATHER_BELOW",
    "GATHER_SECONDS",
    "MAX_BATCH",
    "POLL_SECONDS",
    "batch_reader",
    "listen_sync",
]

POLL_SECONDS = 0.1  # pub/sub poll: bounds how long a stop takes
MAX_BATCH = 1000
# When the first read brings fewer than GATHER_BELOW messages, the listener waits this
# long for more before it forwards the batch: a steady trickle (a re-arm's `set` and
# `expire`, a claim's marker and echo, a few a millisecond) then reaches the leader as one
# batch, one wake-up and one TRACK per few milliseconds, not per message. Events are only
# hints to look (the scripts read Redis's state), so holding one this long delays a look
# by as much, nothing more. A burst fills batches by itself: it is not held up.
GATHER_SECONDS = 0.005
GATHER_BELOW = 100


def listen_sync(
    client: Any,
    patterns: list[str],
    channels: list[str],
    send: trio.MemorySendChannel[list[Message]],
    task_status: trio.TaskStatus[int],
    master: MasterWatch,
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
                msg = pubsub.get_message(timeout=POLL_SECONDS)
                if msg and msg["type"] in ("subscribe", "psubscribe"):
                    confirmations -= 1
                elif msg and msg["type"] in ("message", "pmessage"):
                    early.append(Message(channel=msg["channel"], data=msg["data"]))
            trio.from_thread.run_sync(task_status.started, since)
            if early:
                trio.from_thread.run(send.send, early)
            # The keyspace watch gathers a trickle; the release watch (no patterns) does
            # not: a release or a liveness change is acted on at once.
            read = batch_reader(pubsub, GATHER_SECONDS if patterns else 0.0)
            while True:
                trio.from_thread.check_cancelled()
                master.follow()
                if master.generation != generation:
                    raise RedisUnavailable("Sentinel moved the master: resubscribing there")
                # Forward in batches: one thread hop for a burst, not one per message.
                batch = read(POLL_SECONDS)
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


def batch_reader(pubsub: Any, gather: float) -> Callable[[float], list[Message]]:
    """A reader of the messages that arrived on a subscription, up to
    ``MAX_BATCH`` at a time, waiting at most ``timeout`` for the first, then ``gather``
    seconds for more when fewer than ``GATHER_BELOW`` came with it.

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
        while len(batch) < MAX_BATCH:
            reply = reader.gets()
            if reply is NOT_ENOUGH_DATA:
                if batch and not gathered:
                    gathered = True
                    if gather and len(batch) < GATHER_BELOW:
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
    while msg is not None and len(batch) < MAX_BATCH:
        if msg["type"] in ("message", "pmessage"):
            batch.append(Message(channel=msg["channel"], data=msg["data"]))
        if len(batch) < MAX_BATCH:
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
