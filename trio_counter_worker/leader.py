"""What the leader does while it holds the lease: watch, decide, deliver.

Every counter key's deadline is known and recorded in Redis. At the deadline the leader
asks Redis to decide (the claim script touches the key, so Redis expires it at once
instead of whenever its background cycle finds it), then sends the reset. Three parts,
composed here:

- :class:`~.watching.Watch`: the subscription, the recorded deadlines, reconciles, and
  resynchronising when Redis is lost: what to look at;
- :class:`~.deciding.Deciders`: the script calls that decide the keys it queues, and the
  deadline timer; each claimed reset goes to
- :class:`~.delivering.Deliveries`: the couriers, retries, failure notes, the dead
  letters, marking sent.

They share one :class:`~.leader_state.LeaderState` (the watch and the deciders) and talk
through :meth:`Deliveries.deliver` (a reset, with its failure history). Runs inside the
leader scope: losing the lease cancels all of it, and a failure of one part cancels the
others.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NoReturn

import trio

from .config import Config
from .deciding import Deciders
from .delivering import Deliveries
from .delivery import ResetSender
from .election import Lease
from .handover import Handover
from .leader_state import LeaderState, Quarantine
from .metrics import Metrics
from .outage import OutageLog
from .retry import RetryPolicy
from .store import PendingReset, Store
from .watching import Watch

__all__ = ["LeaderDuties"]

log = logging.getLogger("trio_counter_worker.leader")


class LeaderDuties:
    """The leader-only work for one lease. ``run()`` until cancelled."""

    def __init__(
        self,
        config: Config,
        store: Store,
        sender: ResetSender,
        holder: str,
        lease: Lease,
        on_reset: Callable[[PendingReset, int], None],
        metrics: Metrics | None = None,
        quarantine: Quarantine | None = None,
        policy: RetryPolicy | None = None,
        outage: OutageLog | None = None,
    ) -> None:
        outage = outage or OutageLog(log)
        metrics = metrics or Metrics()
        state = LeaderState(config.keys, quarantine)
        self._deliveries = Deliveries(
            config,
            store,
            sender,
            holder,
            lease,
            on_reset,
            metrics,
            policy or RetryPolicy(),
            outage,
        )
        deliver = self._deliveries.deliver
        self._deciders = Deciders(store, holder, state, deliver, metrics)
        self._watch = Watch(
            config,
            store,
            holder,
            state,
            self._deciders,
            self._deliveries.deliver_stored,
            metrics,
            outage,
        )

    async def run(self) -> NoReturn:
        """Lead until cancelled. Redis connection loss: resynchronise, with backoff.

        Cancellation: in-flight requests are abandoned; their resets stay pending in
        Redis and the next leader sends them under the same reset_id.
        """
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._deliveries.run)
            await self._watch.run()
        raise AssertionError("unreachable")

    async def hand_over(self, handover: Handover) -> None:
        """As leading ends: decide the keys that only this leader vouches for (seen and
        not looked at, or reported expired; queued, or received and not yet read). The
        next leader finds every other key by itself (a scan, the recorded deadlines),
        but not these. Their resets stay pending in Redis for the next leader to send.
        Then, resets delivered and not yet marked sent are marked (else the next leader
        sends them again: harmless, under the same reset_id, but a request more).

        Call it shielded, with a deadline. Where the lease or Redis is gone (the scripts
        check the lease: nothing is claimed without it), what is left stays in
        ``handover``, which the worker writes to Redis for the next leader.
        """
        self._watch.drain()
        await self._deciders.hand_over(handover)
        await self._deliveries.mark_delivered()
