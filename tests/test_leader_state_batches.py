"""Batching never changes what the leader decides: a batch of pub/sub messages given to
:meth:`LeaderState.on_events` at once leaves the state as the same messages one by one.

The listener gathers a few milliseconds of messages per batch (``redis_listener.GATHER_SECONDS``),
so one batch often holds a key's ``set`` and ``expire``, or a ``set`` then a ``del`` or an
``expired``, a claim's marker and its echo: merging them must keep their order's meaning.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from trio_counter_worker.keys import HANDED_HINT, Keys
from trio_counter_worker.leader_state import Heard, LeaderState
from trio_counter_worker.store import KeyOutcome, Message, PendingReset

KEYS = Keys("c:*")
_NAMES = ["c:1", "c:2", "c:3", "other:1", "tcw:{c:*}:lease"]
_EVENTS = ["set", "expire", "del", "expired", "persist", "rename_from", "rename_to", "evicted"]
_CLAIMED_MS = 2_000  # c:2's claim, made by this leader (see _state)

_messages = st.one_of(
    st.builds(
        lambda key, name: Message(f"__keyspace@0__:{key}", name),
        st.sampled_from(_NAMES),
        st.sampled_from(_EVENTS),
    ),
    st.builds(
        lambda key, ms: Message(KEYS.claims, f"{ms} {key}"),
        st.sampled_from(_NAMES),
        st.sampled_from([_CLAIMED_MS, 3_000]),
    ),
    st.builds(lambda key: Message(KEYS.touched, key), st.sampled_from(_NAMES)),
    st.builds(lambda data: Message(KEYS.redeliver, data), st.sampled_from(["all", HANDED_HINT])),
)


def _state() -> LeaderState:
    """A leader holding c:1's deadline, with a claim of c:2 answered and one of c:3 in
    its call (so markers and echoes take every branch)."""
    s = LeaderState(KEYS)
    s.resubscribed(1_000)
    s.schedule.set("c:1", 50.0)
    s.want(["c:2"], "claim")
    taken = s.take(10)
    assert taken is not None
    reset = PendingReset("id-2", "c:2", 1, 1)
    s.apply([KeyOutcome("c:2", "claimed", reset=reset, claimed_ms=_CLAIMED_MS)], 10.0)
    s.done(taken, True)
    s.want(["c:3"], "claim")
    assert s.take(10) is not None  # in its call: a marker for it may come first
    return s


def _outcome(s: LeaderState, heard: list[Heard]) -> tuple[object, ...]:
    """What the leader would do next, order within a kind of call aside: the keys only
    it can vouch for, the calls it would make, what the batches asked for."""
    reported = sorted(s.take_reported())
    calls = []
    while (taken := s.take(100)) is not None:
        calls += [(key, taken.claim) for key in taken.keys]
    flags = (
        sum(h.notified for h in heard),
        sum(h.touched for h in heard),
        any(h.redeliver for h in heard),
        any(h.handed for h in heard),
    )
    return reported, sorted(calls), flags, sorted(s._held.items()), sorted(s._marked.items())


@given(st.lists(_messages, max_size=12))
def test_a_batch_decides_as_its_messages_one_by_one(batch: list[Message]) -> None:
    whole, single = _state(), _state()
    heard_whole = [whole.on_events(batch)]
    heard_single = [single.on_events([m]) for m in batch]
    assert _outcome(whole, heard_whole) == _outcome(single, heard_single)


@given(st.lists(_messages, max_size=12), st.integers(min_value=0, max_value=12))
def test_a_batch_decides_as_the_same_messages_in_two(batch: list[Message], cut: int) -> None:
    whole, parts = _state(), _state()
    heard_whole = [whole.on_events(batch)]
    heard_parts = [parts.on_events(batch[:cut]), parts.on_events(batch[cut:])]
    assert _outcome(whole, heard_whole) == _outcome(parts, heard_parts)


def test_a_sighting_counts_from_before_a_marker_later_in_its_batch() -> None:
    """`set` then its claim's marker, in one batch: the key was seen before that claim,
    so an expiry after it is that claim's echo (at a hand-over, `after` stays before
    the claim; taking the marker's time would decide it as a new episode: a second
    reset)."""
    s = _state()
    s.on_events([Message("__keyspace@0__:c:2", "set"), Message(KEYS.claims, "2000 c:2")])
    assert s.take_reported() == [("c:2", 999, False)]


def test_a_touch_after_a_del_in_one_batch_is_a_sighting() -> None:
    s = _state()
    s.on_events([Message("__keyspace@0__:c:3", "del"), Message(KEYS.touched, "c:3")])
    assert s.take_reported() == [("c:3", 999, False)]
