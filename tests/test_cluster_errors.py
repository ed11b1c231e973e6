"""Redis Cluster errors as the worker sees them: a cluster failing over or resharding is
Redis being away for a moment (wait, resynchronise), never a bug for the crash barrier.

redis-py strips the error code from these (a ClusterDownError reads "The cluster is
down"), so they are told apart by type.
"""

from __future__ import annotations

import pytest
import redis.exceptions as rexc

from trio_counter_worker.errors import RedisUnavailable
from trio_counter_worker.redis_replies import translate


@pytest.mark.parametrize(
    "exc",
    [
        rexc.ClusterDownError("The cluster is down"),
        rexc.MasterDownError(
            "Link with MASTER is down and replica-serve-stale-data is set to 'no'."
        ),
        rexc.ClusterError("TTL exhausted."),
        rexc.TryAgainError("Multiple keys request during rehashing of slot"),
        rexc.MovedError("3999 127.0.0.1:6381"),
        rexc.AskError("3999 127.0.0.1:6381"),
        rexc.SlotNotCoveredError('Slot "3999" is not covered by the cluster.'),
        rexc.RedisClusterUnreachableError(
            "Redis Cluster cannot be connected. Please provide at "
            "least one reachable node: Connection refused"
        ),
        rexc.RedisClusterException(
            "All slots are not covered after query all startup_nodes. 10923 of 16384 covered..."
        ),
    ],
    ids=lambda e: type(e).__name__,
)
def test_a_cluster_in_motion_is_redis_unavailable(exc: Exception) -> None:
    assert isinstance(translate(exc), RedisUnavailable)


def test_a_client_side_cluster_error_is_not_hidden() -> None:
    exc = rexc.RedisClusterException("Invalid args in command: EVAL")
    assert translate(exc) is exc
