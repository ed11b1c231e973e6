"""The leader's counter scripts sent to Redis as pipelines, from trio through threads."""

from __future__ import annotations

import contextlib
import copy
from functools import partial
from typing import Any

import redis.exceptions as rexc
import trio

from .redis_master import MasterWatch
from .redis_replies import translate

__all__ = ["PIPELINES", "Pipelines"]

PIPELINES = 2  # script pipelines in flight at once (see Pipelines)


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


class Pipelines:
    """The leader's script calls, sent as pipelines: every call queued while the Redis
    threads are busy goes in the next one, in one thread hop, one write and one wake-up
    of trio for all of them (a hop per call cost more CPU than the script itself under a
    burst). At most ``PIPELINES`` are in flight, each on its own connection, so a call
    made while one is out goes at once rather than a round trip later.

    Cancellation: a waiting task is woken at once with Cancelled; its call still runs
    (like ``abandon_on_cancel``) and its reply is dropped.
    """

    def __init__(self, client: Any, master: MasterWatch) -> None:
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
        if self._running < PIPELINES:
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
        if self._queue and self._running < PIPELINES:
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
