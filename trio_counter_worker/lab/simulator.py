"""The app, simulated for ``demo`` and ``chaos``: counters set, re-armed, left to expire.

Each counter key is set with ``SET key 1 PX <ttl>`` (its deadline read back exactly),
sometimes re-armed before it expires (activity), then left to expire: an *episode* is
(key, final deadline). After an idle pause the key starts its next episode. A key
given a payload in ``touch`` is marked with ``FCALL tcw_touch`` instead (the ``tcw``
library must be loaded), so its resets carry that payload.
:func:`match_posts` says which episode each reset request belongs to, and
:class:`Settle` when to stop waiting for the last ones.

It uses redis-py directly, as an app would; the caller's loop drives it with
:meth:`AppSimulator.step`, which says what it did (for a narration).
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import attrs
import redis

from .backend import ResetPost

__all__ = [
    "MATCH_SLACK_MS",
    "SET_SCRIPT",
    "AppPlan",
    "AppSimulator",
    "Counter",
    "Episode",
    "Matching",
    "Settle",
    "Step",
    "clock_offset",
    "match_posts",
]

# SET key 1 PX ttl, and return its deadline in ms on Redis's clock (PEXPIRETIME on
# Redis 7; TIME + ttl on 6.2). With ARGV[2] > 0 it is a re-arm: only if the key still has
# at least that many ms left, else 0 (the key is expiring: it is left to).
SET_SCRIPT = """
local min_left = tonumber(ARGV[2])
if min_left > 0 and redis.call('PTTL', KEYS[1]) < min_left then return 0 end
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
local r = redis.pcall('PEXPIRETIME', KEYS[1])
if type(r) == 'number' and r > 0 then return r end
local t = redis.call('TIME')
return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
"""

MATCH_SLACK_MS = 5  # a reset's expired_at vs. the deadline read from Redis

State = Literal["idle", "rearm", "expiring", "done"]


@attrs.frozen
class AppPlan:
    """How the app uses its counters."""

    ttl_ms: tuple[int, int]  # each SET's TTL is drawn from this range
    # how long a key stays unset after it expired, before its next episode: longer than
    # a failover, so the next leader sees the expiry before the key is set again
    idle: tuple[float, float]
    rearm_chance: float  # after each SET: re-armed later (activity) or left to expire
    max_rearms: int | None = None  # per episode; None: no limit
    rearm_at: tuple[float, float] = (0.3, 0.7)  # ... when this fraction of its TTL passed
    rearm_margin_ms: int = 250  # never re-arm a key with less left: that would race expiry


@attrs.define
class Episode:
    """An inactivity episode the app caused: ``key`` expiring at ``deadline_ms``."""

    number: int
    key: str
    deadline_ms: int  # Redis's clock (ms since the epoch)
    deadline: float  # the same on this host's wall clock
    began: float  # wall clock: the episode's first SET
    earlier: tuple[int, ...] = ()  # deadlines (Redis ms) of its SETs before the last one
    delivered_at: float | None = None  # first 2xx (progress display; reports recompute)


@attrs.define
class Counter:
    key: str
    state: State = "idle"
    next_at: float = 0.0  # monotonic: when the next step is due
    deadline_ms: int = 0  # while the key is alive
    began: float = 0.0  # wall clock of this episode's first SET
    rearms: int = 0
    earlier: list[int] = attrs.Factory(list)  # deadlines this episode's re-arms replaced
    episode: Episode | None = None  # while "expiring"


@attrs.frozen
class Step:
    """What the app just did with one counter."""

    kind: Literal["set", "rearm", "late", "expired"]  # late: too close to expiry to re-arm
    key: str
    ttl_ms: int = 0  # set, rearm
    left: float = 0.0  # rearm: seconds the key had left
    episode: Episode | None = None  # expired
    payload: str | None = None  # set, rearm: marked with FCALL tcw_touch and this payload

    @property
    def is_set(self) -> bool:
        """The step ran the SET script (a ``late`` re-arm too, which set nothing)."""
        return self.kind != "expired"


def clock_offset(client: redis.Redis) -> float:
    """Redis's clock minus this host's, seconds."""
    before = time.time()
    sec, usec = client.time()
    after = time.time()
    return float(sec) + float(usec) / 1e6 - (before + after) / 2


class AppSimulator:
    """The app on ``keys``, through ``client`` (``decode_responses=True``); the keys in
    ``touch`` are marked with ``FCALL tcw_touch`` and their payload, the others with SET."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Sequence[str],
        plan: AppPlan,
        rng: random.Random,
        touch: Mapping[str, str] | None = None,
    ) -> None:
        self.client = client
        self.plan = plan
        self.rng = rng
        self.touch = dict(touch or {})  # key -> payload
        self.counters = [Counter(key) for key in keys]
        self.episodes: list[Episode] = []
        self.by_key: dict[str, list[Episode]] = defaultdict(list)
        self.offset = clock_offset(client)
        self.min_ttl_ms = 0  # a floor for every TTL set while it is not 0
        self.stopped = False
        self._script: Any = client.register_script(SET_SCRIPT)

    def use(self, client: redis.Redis) -> None:
        """Write through ``client`` from now on (a new master, say)."""
        self.client = client
        self._script = client.register_script(SET_SCRIPT)

    @property
    def done(self) -> bool:
        """Stopped, and every key has expired."""
        return all(c.state == "done" for c in self.counters)

    def begin(self, mono: float, first: float, spacing: float) -> None:
        """The app starts ``first`` s after ``mono``, one counter every ``spacing`` s."""
        for i, c in enumerate(self.counters):
            c.next_at = mono + first + spacing * i

    def set_key(self, key: str, ttl_ms: int, min_left_ms: int) -> int:
        """Run the SET script (or ``tcw_touch``); the key's deadline (ms, Redis's clock)
        or 0 if not set."""
        ttl_ms = max(ttl_ms, self.min_ttl_ms)
        payload = self.touch.get(key)
        if payload is None:
            return int(self._script(keys=[key], args=[ttl_ms, min_left_ms]))
        # FCALL may not run inside a script, so a re-arm checks the time left first: the
        # margin (hundreds of ms) dwarfs the round trip between the two commands.
        if min_left_ms > 0 and int(self.client.pttl(key)) < min_left_ms:
            return 0
        answer: Any = self.client.fcall("tcw_touch", 1, key, ttl_ms, payload)
        return int(answer[0])  # [deadline_ms, deployments matched, earlier claimed]

    def step(self, mono: float) -> list[Step]:
        """Take every counter's step that is due by ``mono`` (monotonic)."""
        steps = []
        for c in self.counters:
            if c.state == "done" or mono < c.next_at:
                continue
            if c.state == "expiring":
                steps.append(Step("expired", c.key, episode=c.episode))
                c.episode = None
                if self.stopped:
                    c.state = "done"
                else:
                    c.state = "idle"
                    c.next_at = mono + self.rng.uniform(*self.plan.idle)
            elif c.state == "idle":
                ttl = self.rng.randint(*self.plan.ttl_ms)
                c.deadline_ms = self.set_key(c.key, ttl, 0)
                c.began = time.time()
                c.rearms = 0
                c.earlier = []
                steps.append(Step("set", c.key, ttl, payload=self.touch.get(c.key)))
                self.plan_next(c, ttl)
            elif c.state == "rearm":
                ttl = self.rng.randint(*self.plan.ttl_ms)
                left = c.deadline_ms / 1000 - self.offset - time.time()
                deadline = self.set_key(c.key, ttl, self.plan.rearm_margin_ms)
                if deadline == 0:  # we were late (a stalled loop): let it expire instead
                    steps.append(Step("late", c.key, ttl))
                    self.expire(c)
                    continue
                c.earlier.append(c.deadline_ms)
                c.deadline_ms = deadline
                c.rearms += 1
                steps.append(Step("rearm", c.key, ttl, left, payload=self.touch.get(c.key)))
                self.plan_next(c, ttl)
        return steps

    def plan_next(self, c: Counter, ttl_ms: int) -> None:
        """After a SET: re-arm later, or leave the key to expire."""
        p = self.plan
        if (p.max_rearms is None or c.rearms < p.max_rearms) and (
            self.rng.random() < p.rearm_chance
        ):
            c.state = "rearm"
            c.next_at = time.monotonic() + ttl_ms / 1000 * self.rng.uniform(*p.rearm_at)
        else:
            self.expire(c)

    def expire(self, c: Counter) -> None:
        """Leave the key alone until its deadline: an inactivity episode."""
        deadline = c.deadline_ms / 1000 - self.offset
        e = Episode(
            len(self.episodes) + 1, c.key, c.deadline_ms, deadline, c.began, tuple(c.earlier)
        )
        self.episodes.append(e)
        self.by_key[c.key].append(e)
        c.state = "expiring"
        c.episode = e
        c.next_at = time.monotonic() + max(0.0, deadline - time.time())

    def stop(self) -> None:
        """The activity stops: every counter is left to expire."""
        self.stopped = True
        for c in self.counters:
            if c.state == "rearm":
                self.expire(c)
            elif c.state == "idle":
                c.state = "done"

    def episode_for(self, post: ResetPost, slack_ms: float) -> Episode | None:
        """The episode of ``post``'s key whose final deadline is nearest its
        ``expired_at``, if within ``slack_ms``."""
        return _nearest(self.by_key.get(post.key, ()), post.expired_at * 1000, slack_ms)


def _nearest(episodes: Sequence[Episode], at_ms: float, slack_ms: float) -> Episode | None:
    best = min(episodes, key=lambda e: abs(e.deadline_ms - at_ms), default=None)
    return best if best is not None and abs(best.deadline_ms - at_ms) <= slack_ms else None


@attrs.frozen
class Matching:
    """Which episode each reset request belongs to."""

    exact: dict[int, list[ResetPost]]  # episode number -> posts for its final deadline
    # episode number -> posts whose expired_at is a deadline the episode's own re-arm
    # replaced: a re-arm no leader saw (see the README's limits), reset late or early
    earlier: dict[int, list[ResetPost]]
    unexplained: list[ResetPost]


def match_posts(
    episodes: Sequence[Episode], posts: Sequence[ResetPost], slack_ms: float = MATCH_SLACK_MS
) -> Matching:
    """Each post to the episode of its key whose final deadline is nearest its
    ``expired_at`` (within ``slack_ms``); failing that, to the episode with an earlier,
    re-armed deadline that near; else it is unexplained."""
    by_key: dict[str, list[Episode]] = defaultdict(list)
    for e in episodes:
        by_key[e.key].append(e)
    exact: dict[int, list[ResetPost]] = defaultdict(list)
    earlier: dict[int, list[ResetPost]] = defaultdict(list)
    unexplained: list[ResetPost] = []
    for post in posts:
        at_ms = post.expired_at * 1000
        mine = by_key.get(post.key, [])
        best = _nearest(mine, at_ms, slack_ms)
        if best is not None:
            exact[best.number].append(post)
            continue
        owner = next((e for e in mine if any(abs(d - at_ms) <= slack_ms for d in e.earlier)), None)
        if owner is not None:
            earlier[owner.number].append(post)
        else:
            unexplained.append(post)
    return Matching(dict(exact), dict(earlier), unexplained)


@attrs.define
class Settle:
    """When to stop waiting once the app is quiet: every episode delivered, then
    ``linger`` more for late duplicates; or ``grace`` after the last deadline, whatever
    is still missing. Times are ``time.monotonic()``; the deadline is wall-clock."""

    grace: float
    linger: float
    until: float | None = None  # give up at; set on the first check
    resolved_at: float | None = None  # when everything was first delivered

    def check(self, mono: float, last_deadline: float, all_delivered: bool) -> str:
        """ "wait", "done", or "gave up"."""
        if self.until is None:
            self.until = mono + max(0.0, last_deadline - time.time()) + self.grace
        if all_delivered:
            if self.resolved_at is None:
                self.resolved_at = mono
            return "done" if mono >= self.resolved_at + self.linger else "wait"
        return "gave up" if mono >= self.until else "wait"
