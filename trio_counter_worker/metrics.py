"""Prometheus metrics of one replica (prometheus-client, one registry per worker)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .errors import RedisRefused
from .keyspace import eviction_warning

__all__ = ["Metrics"]

_REFUSED_KINDS = ("oom", "auth", "permission", "db", "tls")  # RedisRefused.kind
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class Metrics:
    """The worker's metrics. A fresh registry each, so several workers can share a process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.leader = Gauge("tcw_leader", "1 while this replica leads, else 0", registry=r)
        self.fencing_token = Gauge(
            "tcw_fencing_token",
            "fencing token (epoch) of this replica's lease, or the highest seen",
            registry=r,
        )
        self.leader_endpoint_differs = Gauge(
            "tcw_leader_endpoint_differs",
            "1 while the leader this standby sees sends resets to another "
            "RESET_ENDPOINT_URL than its own, else 0",
            registry=r,
        )
        self.leader_changes = Counter(
            "tcw_leader_changes", "times this replica became leader", registry=r
        )
        self.resets = Counter(
            "tcw_reset_attempts",
            "reset requests by outcome: delivered (2xx), retried "
            "(5xx/408/429/network), rejected (other 4xx), redirect (3xx)",
            ["outcome"],
            registry=r,
        )
        self.reset_latency = Histogram(
            "tcw_reset_latency_seconds",
            "key TTL deadline to the backend's 2xx",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.pending = Gauge(
            "tcw_pending_resets", "resets claimed and not yet confirmed by this leader", registry=r
        )
        self.watched = Gauge(
            "tcw_watched_counters",
            "counter keys whose deadline this leader holds: those due within the next minute",
            registry=r,
        )
        self.redis_errors = Counter(
            "tcw_redis_errors",
            "Redis calls that failed (unreachable, timeout, refused)",
            registry=r,
        )
        self.decision_backlog = Gauge(
            "tcw_decision_backlog",
            "counter keys waiting for the leader to look at them in Redis (merged per key)",
            registry=r,
        )
        self.failing = Gauge(
            "tcw_failing_resets",
            "resets the backend has not accepted yet after at least "
            "one attempt (this leader's view)",
            registry=r,
        )
        self.dead = Counter(
            "tcw_dead_resets",
            "resets given up on after RESET_GIVE_UP_AFTER (moved to the dead letters)",
            registry=r,
        )
        self.quarantined = Counter(
            "tcw_quarantined",
            "counter keys or resets set aside after an unexpected error",
            registry=r,
        )
        self.flags_restored = Counter(
            "tcw_flags_restored",
            "times the leader found notify-keyspace-events changed and set it back",
            registry=r,
        )
        self.leader_crashes = Counter(
            "tcw_leader_crashes",
            "times leader work failed unexpectedly (the replica "
            "released the lease and campaigned again)",
            registry=r,
        )
        self.renewal = Histogram(
            "tcw_lease_renewal_seconds",
            "round trip of a successful lease renewal",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.activity = Counter(
            "tcw_activity_events",
            "counter activity the leader heard of, by source: "
            "touch (tcw_touch / tcw_done) or notification (keyspace events)",
            ["source"],
            registry=r,
        )
        self.reconciled = Gauge(
            "tcw_reconciled",
            "1 once this replica, leading, has reconciled (looked at every counter key) "
            "since it took the lease or last resynchronised (0 on a standby)",
            registry=r,
        )
        self.eviction_unsafe = Gauge(
            "tcw_eviction_policy_unsafe",
            "1 if Redis's maxmemory-policy (allkeys-*) may evict the worker's own keys, "
            "as the leader last read it",
            registry=r,
        )
        self.redis_refused = Counter(
            "tcw_redis_refused",
            "Redis calls of the leader that Redis answered with a refusal, by kind: "
            "oom (refusing writes), auth, permission, db, tls",
            ["kind"],
            registry=r,
        )
        for kind in _REFUSED_KINDS:
            self.redis_refused.labels(kind)
        for outcome in ("delivered", "retried", "rejected", "redirect"):
            self.resets.labels(outcome)
        for source in ("touch", "notification"):
            self.activity.labels(source)

    def redis_error(self, exc: BaseException) -> None:
        """Count a failed Redis call, and a refusal by its kind too."""
        self.redis_errors.inc()
        if isinstance(exc, RedisRefused):
            self.redis_refused.labels(exc.kind).inc()

    def eviction(self, policy: str | None) -> str | None:
        """Record whether ``policy`` may evict the worker's keys; the warning, if so."""
        warning = eviction_warning(policy)
        self.eviction_unsafe.set(warning is not None)
        return warning

    def render(self) -> bytes:
        return generate_latest(self.registry)
