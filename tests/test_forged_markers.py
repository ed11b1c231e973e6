"""Messages anyone may publish change no decision: a property of the leader's bookkeeping.

A synchronous model (no trio, no Redis): Redis's side is :mod:`trio_counter_worker.spec`
over dicts, publishing keyspace events and claim markers in order on one stream; the
leader's side is :class:`LeaderState`. Hypothesis interleaves the app's SETs, Redis's
own expiries, deliveries of the stream, script calls whose replies come back in any
order, and forged messages on the claim-marker and touched channels (any text, any
time). Then everything is drained, and the run is compared with the same run without
the forgeries: every episode is claimed exactly once, no more than without them and no
fewer, and the leader's memory of markers never outgrows its own claims.
"""

from __future__ import annotations

from collections import Counter

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fakes import claimed_outcome
from trio_counter_worker import spec
from trio_counter_worker.keys import Keys
from trio_counter_worker.leader_state import _EARLY_MAX, LeaderState, Taken
from trio_counter_worker.store import KeyOutcome, Message, PendingReset

KEYS = Keys("c:*")
NAMES = ["c:1", "c:2", "c:3"]


@attrs.define
class Model:
    """Redis (spec over dicts) and one leader, with a clock in Redis ms."""

    forge: bool
    now: int = 10_000
    keys: dict[str, int] = attrs.Factory(dict)  # key -> absolute expiry (ms)
    deadlines: dict[str, int] = attrs.Factory(dict)
    claimed: dict[str, int] = attrs.Factory(dict)  # tombstones
    stream: list[Message] = attrs.Factory(list)  # published, not yet delivered
    replies: list[tuple[Taken, list[KeyOutcome]]] = attrs.Factory(list)
    ended: Counter[str] = attrs.Factory(Counter)  # episodes ended, per key
    resets: dict[str, set[str]] = attrs.Factory(dict)  # key -> reset ids
    claims: Counter[str] = attrs.Factory(Counter)
    state: LeaderState = attrs.Factory(lambda: LeaderState(KEYS))
    # A reported expiry decided when the key, set again since, is due again, or a key
    # whose second life ended before the first's expiry was claimed: the two episodes
    # are one to the claim (README, "Not covered"), so an interleaving that delays or
    # hastens the decision may change how many are claimed.
    set_again: bool = False

    def __attrs_post_init__(self) -> None:
        self.state.resubscribed(self.now)

    def publish(self, channel: str, data: str) -> None:
        self.stream.append(Message(channel, data))

    def expire(self, key: str) -> None:
        if self.ended[key] > self.claims[key]:
            self.set_again = True  # the known gap: an earlier life's end is undecided
        del self.keys[key]
        self.ended[key] += 1
        self.publish(f"__keyspace@0__:{key}", "expired")

    def touch(self, key: str) -> int:
        """PTTL as a script reads it: a due key expires now (the echo)."""
        if key not in self.keys:
            return -2
        if self.keys[key] <= self.now:
            self.expire(key)
            return -2
        return self.keys[key] - self.now

    def call(self, taken: Taken) -> None:
        """The script runs at Redis now; its reply comes back later."""
        afters: list[int | None] = (
            list(taken.expired_after) if taken.expired_after else [None] * len(taken.keys)
        )
        out = []
        for key, after in zip(taken.keys, afters, strict=True):
            if taken.claim and after is not None and self.keys.get(key, self.now + 1) <= self.now:
                self.set_again = True  # the known gap (see set_again)
            pttl = self.touch(key)
            seen = spec.Seen(
                pttl,
                self.now + pttl if pttl >= 0 else -1,
                self.deadlines.get(key),
                self.claimed.get(key),
            )
            verdict = (
                spec.claim(seen, self.now, after, taken.heard)
                if taken.claim
                else spec.track(seen, self.now)
            )
            out.append(self.carry_out(key, verdict))
        self.replies.append((taken, out))

    def carry_out(self, key: str, verdict: spec.Verdict) -> KeyOutcome:
        if verdict.kind == "alive":
            assert verdict.deadline is not None
            self.deadlines[key] = verdict.deadline
            return KeyOutcome(key, "alive", pttl_ms=verdict.deadline - self.now)
        if verdict.kind == "due":
            return KeyOutcome(key, "due")
        self.deadlines.pop(key, None)
        if verdict.kind == "gone":
            return KeyOutcome(key, "gone")
        assert verdict.deadline is not None
        reset_id = spec.reset_id(KEYS.namespace, key, verdict.deadline)
        self.resets.setdefault(key, set()).add(reset_id)
        self.claims[key] += 1
        self.claimed[key] = self.now
        self.publish(KEYS.claims, f"{self.now} {key}")
        reset = PendingReset(reset_id, key, verdict.deadline, 1)
        return claimed_outcome(reset, verdict, self.deadlines, self.now)

    def reply(self, i: int) -> None:
        taken, out = self.replies.pop(i % len(self.replies))
        self.state.apply(out, self.now / 1000)
        self.state.done(taken, decided=True)

    def deliver(self, n: int) -> None:
        batch, self.stream = self.stream[:n], self.stream[n:]
        self.state.on_events(batch)

    def step(self, op: Op) -> None:
        kind, key, n, text = op
        if kind == "set":
            self.keys[key] = self.now + 1 + n % 3_000
            self.publish(f"__keyspace@0__:{key}", "set")
        elif kind == "tick":
            self.now += n % 700
            self.state.due(self.now / 1000)
        elif kind == "expire" and key in self.keys and self.keys[key] <= self.now:
            self.expire(key)  # Redis's own expiry cycle found it first
        elif kind == "deliver":
            self.deliver(1 + n % 4)
        elif kind == "take":
            taken = self.state.take(1 + n % 3)
            if taken is not None:
                self.call(taken)
        elif kind == "reply" and self.replies:
            self.reply(n)
        elif kind == "forge_marker" and self.forge:
            stamp = str(n) if text is None else text
            self.publish(KEYS.claims, f"{stamp} {key}")
        elif kind == "forge_any" and self.forge and text is not None:
            self.publish(KEYS.claims if n % 2 else KEYS.touched, text)
        elif kind == "resubscribe":
            self.resubscribe()

    def resubscribe(self) -> None:
        """The subscription is lost and made again (a resynchronisation): what it had not
        delivered is lost, calls in flight go unanswered (their scripts ran), and the
        leader looks again at every key Redis holds or has a deadline recorded for (the
        scan and the recorded deadlines)."""
        self.stream.clear()
        for taken, _ in self.replies:
            self.state.done(taken, decided=False)
        self.replies.clear()
        self.state.resubscribed(self.now)
        self.state.want([*self.keys, *self.deadlines], "track")

    def drain(self) -> None:
        """Let every key fall due and the leader decide everything it heard."""
        for _ in range(200):
            self.now += 1_000
            self.state.due(self.now / 1000)
            self.deliver(len(self.stream))
            while (taken := self.state.take(10)) is not None:
                self.call(taken)
            while self.replies:
                self.reply(0)
            if not self.keys and not self.stream and not self.state.queue:
                return
        raise AssertionError("the model did not settle")


Op = tuple[str, str, int, str | None]

ops = st.lists(
    st.tuples(
        st.sampled_from(
            ["set", "tick", "expire", "deliver", "take", "reply", "forge_marker", "forge_any"]
        ),
        st.sampled_from(NAMES),
        st.integers(0, 10**13),
        st.none() | st.text(),
    ),
    max_size=120,
)
# The same, with subscriptions lost: fewer resets may follow (a key's whole life inside a
# gap is not seen), never more.
ops_resubscribing = st.lists(
    st.tuples(
        st.sampled_from(["set", "tick", "expire", "deliver", "take", "reply", "resubscribe"]),
        st.sampled_from(NAMES),
        st.integers(0, 10**13),
        st.none(),
    ),
    max_size=120,
)


@settings(max_examples=400, deadline=None)
@given(ops)
def test_forged_messages_neither_double_nor_suppress_a_reset(script: list[Op]) -> None:
    runs = {}
    for forge in (False, True):
        model = Model(forge)
        for op in script:
            model.step(op)
            state = model.state
            # What the leader keeps of markers follows its own claims, not what is
            # published: at most one per key it claimed, and per key in a claim call.
            assert len(state._marked) <= len(state._claims)
            assert set(state._early) <= state._claiming
            assert set(state._held) <= set(state._early) | state._claiming
        model.drain()
        runs[forge] = model
        for key, ids in model.resets.items():
            assert model.claims[key] == len(ids)  # a reset id is claimed once
            assert len(ids) <= model.ended[key]  # never two for one episode
    if not runs[False].set_again:
        assert runs[False].claims == runs[False].ended  # every episode, once
    if runs[False].set_again or runs[True].set_again:
        return  # the known gap: see test_an_expiry_heard_when_the_key_is_due_again_is_one_...
    # Past _EARLY_MAX forged markers for a key in one claim call, a real marker may be
    # dropped: an expiry heard then is decided as an echo (fewer, never more).
    if sum(op[0] in ("forge_marker", "forge_any") for op in script) <= _EARLY_MAX:
        assert runs[True].claims == runs[False].claims
    else:
        assert runs[True].claims <= runs[False].claims


def _set_expired_and_set_again(ttl_ms: int) -> Model:
    """A key set, expired and set again before the leader heard the `expired`."""
    model = Model(forge=False)
    for op in [("set", "c:1", 0, None), ("tick", "", 1, None), ("expire", "c:1", 0, None)]:
        model.step(op)
    model.step(("set", "c:1", ttl_ms - 1, None))
    model.drain()
    assert model.ended["c:1"] == 2
    return model


def test_an_expiry_heard_when_the_key_is_set_again_is_claimed_and_the_new_life_too() -> None:
    """Found by the property above: the claim of the expiry heard finds the key back."""
    model = _set_expired_and_set_again(ttl_ms=1_500)  # alive when the claim comes
    assert model.claims["c:1"] == 2
    assert not model.set_again


@pytest.mark.xfail(strict=True, reason="known gap: README, 'Not covered'")
def test_an_expiry_heard_when_the_key_is_due_again_is_one_of_two_episodes() -> None:
    """The claim's touch ends the second life too: one claim, two episodes."""
    model = _set_expired_and_set_again(ttl_ms=1)  # due again when the claim comes
    assert model.set_again
    assert model.claims["c:1"] == 2


@pytest.mark.xfail(strict=True, reason="known gap: README, 'Not covered'")
def test_two_lives_that_end_before_the_first_is_decided_are_two_episodes() -> None:
    """Found by the property above: both `expired` events come before the claim."""
    model = Model(forge=False)
    for _ in range(2):
        for op in [("set", "c:1", 0, None), ("tick", "", 1, None), ("expire", "c:1", 0, None)]:
            model.step(op)
    model.drain()
    assert model.set_again
    assert model.ended["c:1"] == 2
    assert model.claims["c:1"] == 2


@settings(max_examples=400, deadline=None)
@given(ops_resubscribing)
def test_a_lost_subscription_never_makes_two_resets_of_one_episode(script: list[Op]) -> None:
    model = Model(forge=False)
    for op in script:
        model.step(op)
    model.drain()
    for key, ids in model.resets.items():
        assert model.claims[key] == len(ids)  # a reset id is claimed once
        assert len(ids) <= model.ended[key]  # never two for one episode


def test_a_forged_marker_ahead_of_an_echo_does_not_make_it_a_new_episode() -> None:
    """The attack of issue #21: `9999999999999 <key>` on the claims channel before the
    echo of a claim used to make the echo look like a new episode (a second reset)."""
    model = Model(forge=True)
    model.step(("set", "c:1", 999, None))
    model.deliver(1)
    model.call(Taken(False, ["c:1"], None))
    model.reply(0)
    model.now += 2_000
    model.publish(KEYS.claims, "9999999999999 c:1")  # forged, before the claim
    model.state.due(model.now / 1000)
    taken = model.state.take(10)
    assert taken == Taken(True, ["c:1"], None)
    model.call(taken)  # the touch expires the key: echo, then the real marker
    model.deliver(1)  # the forgery
    model.deliver(1)  # the echo, before the reply: decided by the claim script
    model.publish(KEYS.claims, "9999999999999 c:1")  # and after the real marker
    model.reply(0)
    model.drain()
    assert model.claims["c:1"] == 1
    assert not model.state._early


def test_an_expiry_after_our_own_marker_waits_for_the_reply_that_confirms_it() -> None:
    """A marker that comes before its claim's reply: an expiry heard after it is a new
    episode once the reply names the same time, and decided as before it if not."""
    s = LeaderState(KEYS)
    s.resubscribed(1_000)
    s.due(0.0)
    s.want(["c:1"], "claim")
    taken = s.take(10)
    assert taken is not None
    s.on_events([Message(KEYS.claims, "5000 c:1"), Message("__keyspace@0__:c:1", "expired")])
    assert s.take(10) is None  # held until the reply
    reset = PendingReset("id", "c:1", 4_000, 1)
    s.apply([KeyOutcome("c:1", "claimed", reset=reset, claimed_ms=5_000)], base=5.0)
    s.done(taken, decided=True)
    assert s.take(10) == Taken(True, ["c:1"], [5_000], heard=True)


def test_a_marker_the_reply_does_not_name_is_not_believed() -> None:
    s = LeaderState(KEYS)
    s.resubscribed(1_000)
    s.want(["c:1"], "claim")
    taken = s.take(10)
    assert taken is not None
    s.on_events([Message(KEYS.claims, "9000 c:1"), Message("__keyspace@0__:c:1", "expired")])
    reset = PendingReset("id", "c:1", 4_000, 1)
    s.apply([KeyOutcome("c:1", "claimed", reset=reset, claimed_ms=5_000)], base=5.0)
    s.done(taken, decided=True)
    assert s.take(10) == Taken(True, ["c:1"], [999], heard=True)  # as if the forgery never came
    assert dict(s._marked.items()) == {}


def test_an_echo_after_a_forged_marker_and_before_the_real_one_stays_an_echo() -> None:
    """Found by the real-Redis test: a forgery heard while the claim is in a call, then
    the echo, then the real marker; the reply confirms the real one, and the echo came
    before it."""
    s = LeaderState(KEYS)
    s.resubscribed(1_000)
    s.want(["c:1"], "claim")
    taken = s.take(10)
    assert taken is not None
    s.on_events(
        [
            Message(KEYS.claims, "4999 c:1"),
            Message("__keyspace@0__:c:1", "expired"),
            Message(KEYS.claims, "5000 c:1"),
        ]
    )
    reset = PendingReset("id", "c:1", 4_000, 1)
    s.apply([KeyOutcome("c:1", "claimed", reset=reset, claimed_ms=5_000)], base=5.0)
    s.done(taken, decided=True)
    assert s.take(10) == Taken(True, ["c:1"], [999], heard=True)  # the claim script finds the echo
    assert dict(s._marked.items()) == {"c:1": 5_000}


def test_a_million_forged_markers_keep_nothing() -> None:
    s = LeaderState(KEYS)
    s.resubscribed(1_000)
    s.on_events([Message(KEYS.claims, f"9999999999999 c:{n}") for n in range(100_000)])
    s.on_events([Message(KEYS.claims, f"{'9' * 5000} c:1"), Message(KEYS.claims, "١٢ c:1")])
    assert (dict(s._marked.items()), s._early, s._held) == ({}, {}, {})
