"""Which Store the configured Redis topology needs: one Redis or Sentinel
(:class:`~.redis_bridge.RedisBridge`), or Redis Cluster
(:class:`~.redis_cluster.ClusterBridge`, built on it). Here, rather than in
redis_bridge, so that module never imports its own subclass."""

from __future__ import annotations

from .config import Config
from .redis_bridge import RedisBridge
from .redis_cluster import ClusterBridge

__all__ = ["make_bridge"]


def make_bridge(config: Config) -> RedisBridge:
    """The bridge for the configured topology: one Redis, Sentinel, or Cluster."""
    if config.redis_cluster_nodes:
        return ClusterBridge(config)
    return RedisBridge(config)
