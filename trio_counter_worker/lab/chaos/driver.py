"""The app driver: plays the app on the run's counter keys (SETs, re-arms, expiries:
episodes) and follows which episodes the backend has reset."""

from __future__ import annotations

from ..backend import ResetPost
from ..simulator import MATCH_SLACK_MS, AppPlan, AppSimulator, Episode, Step
from .stage import Stage

__all__ = ["AppDriver"]

REARM_CHANCE = 0.4  # after each SET: re-armed later (activity) or left to expire
REARM_AT = (0.3, 0.7)  # ... when this fraction of its TTL has passed
REARM_MARGIN_MS = 250  # never re-arm a key with less left: that would race its expiry
MAX_REARMS = 3


class AppDriver:
    def __init__(self, stage: Stage) -> None:
        o = stage.opts
        plan = AppPlan(
            ttl_ms=o.ttl_ms,
            idle=o.idle,
            rearm_chance=REARM_CHANCE,
            max_rearms=MAX_REARMS,
            rearm_at=REARM_AT,
            rearm_margin_ms=REARM_MARGIN_MS,
        )
        self.stage = stage
        self.sim = AppSimulator(stage.client, stage.keys, plan, stage.rng)
        self.posts: list[ResetPost] = []  # every request the backend received, in order
        self.delivered_episodes = 0
        self.paused = False  # failover: until the sentinels name the new master

    @property
    def episodes(self) -> list[Episode]:
        return self.sim.episodes

    @property
    def offset(self) -> float:
        """Redis's clock minus ours, seconds."""
        return self.sim.offset

    def step(self, mono: float, min_ttl_ms: int) -> list[Step]:
        """The app's steps due by ``mono``, every TTL at least ``min_ttl_ms``."""
        if self.paused:
            return []
        self.sim.min_ttl_ms = min_ttl_ms
        return self.sim.step(mono)

    def poll_backend(self) -> None:
        """Take the backend's new requests; note each episode's first delivery."""
        for post in self.stage.ledger.posts_since(len(self.posts)):
            self.posts.append(post)
            if not post.delivered:
                continue
            at_ms = post.expired_at * 1000
            for e in self.sim.by_key.get(post.key, ()):
                if abs(e.deadline_ms - at_ms) <= MATCH_SLACK_MS or (
                    post.received_at >= e.deadline
                    and any(abs(d - at_ms) <= MATCH_SLACK_MS for d in e.earlier)
                ):
                    if e.delivered_at is None:
                        e.delivered_at = post.received_at
                        self.delivered_episodes += 1
                    break
