"""The leader's bookkeeping as plain logic: no I/O, no trio, times passed in.

Like h11's state machine tests: feed events and script outcomes, read what the state
says to do next.
"""

from __future__ import annotations

import gc

from hypothesis import given
from hypothesis import strategies as st

from trio_counter_worker.keys import Keys
from trio_counter_worker.leader_state import (
    EARLY,
    REFILL_EVERY,
    WINDOW,
    Heard,
    LeaderState,
    Quarantine,
    Taken,
    _Claims,
)
from trio_counter_worker.spec import TOMBSTONE_MS
from trio_counter_worker.store import DeadlinePage, KeyOutcome, Message, PageStart, PendingReset

KEYS = Keys("c:*")
MARKERS = KEYS.claims


def event(key: str, name: str) -> Message:
    return Message(f"__keyspace@0__:{key}", name)


def marker(key: str, claimed_ms: int) -> Message:
    return Message(MARKERS, f"{claimed_ms} {key}")


def claimed(key: str, claimed_ms: int) -> KeyOutcome:
    return KeyOutcome(
        key, "claimed", reset=PendingReset(f"id-{key}", key, 1, 1), claimed_ms=claimed_ms
    )


def state(since: int = 1_000) -> LeaderState:
    s = LeaderState(KEYS)
    s.resubscribed(since)
    return s


def test_a_set_event_asks_to_track_the_key_once() -> None:
    s = state()
    heard = s.on_events([event("c:1", "set"), event("c:1", "expire"), event("c:1", "set")])
    assert heard == Heard(notified=3)
    assert s.take(10) == Taken(False, ["c:1"], None)
    assert s.take(10) is None


def test_own_keys_and_quarantined_keys_are_never_counters() -> None:
    q = Quarantine()
    q.add("c:bad", "ValueError: x")
    s = LeaderState(KEYS, q)
    s.on_events(
        [
            event("tcw:{c:*}:lease", "set"),
            event("c:bad", "set"),
            event("tcw:{other}:deadlines", "expired"),
        ]
    )
    assert s.take(10) is None


def test_an_unscheduled_expiry_is_reported_after_the_subscription_start() -> None:
    """It follows every claim made before the subscription started (1,000 ms): a claim in
    that same millisecond may have come after it."""
    s = state(since=1_000)
    s.on_events([event("c:late", "expired")])
    assert s.take(10) == Taken(True, ["c:late"], [999], heard=True)


def test_a_claim_in_the_subscriptions_first_millisecond_may_echo_on_it() -> None:
    s = state(since=1_000)
    s.apply([claimed("c:1", 1_000)], base=10.0)
    s.on_events([event("c:1", "expired")])
    assert s.take(10) is None


def test_a_marker_of_a_claim_this_leader_did_not_make_is_ignored() -> None:
    """Only the leader's own claims publish markers; anything else on the channel is
    someone else's message and changes nothing (issue #21)."""
    s = state(since=1_000)
    s.on_events([marker("c:1", 5_000), event("c:1", "expired")])
    assert s.take(10) == Taken(True, ["c:1"], [999], heard=True)


def test_the_echo_of_our_own_claim_needs_no_call() -> None:
    s = state(since=1_000)
    assert s.apply([claimed("c:1", 5_000)], base=10.0)[0].key == "c:1"
    s.on_events([event("c:1", "expired")])  # published before the claim's marker
    assert s.take(10) is None
    s.on_events([marker("c:1", 5_000), event("c:1", "expired")])  # and after it: new
    assert s.take(10) == Taken(True, ["c:1"], [5_000], heard=True)


def test_a_claim_before_this_subscription_has_no_echo_on_it() -> None:
    """The handoff case: a key claimed (by us or the last leader) before the subscription
    started cannot have its echo delivered on it."""
    s = state(since=1_000)
    s.apply([claimed("c:1", 999)], base=10.0)
    s.on_events([event("c:1", "expired")])
    assert s.take(10) == Taken(True, ["c:1"], [999], heard=True)


def test_a_scheduled_key_reported_expired_is_claimed_first() -> None:
    s = state()
    s.apply([KeyOutcome("c:held", "alive", pttl_ms=30_000)], base=1.0)
    s.on_events([event("c:other", "set"), event("c:held", "expired")])
    assert s.take(10) == Taken(True, ["c:held"], [999], heard=True)  # due queue: before the track
    assert s.take(10) == Taken(False, ["c:other"], None)


def test_outcomes_set_the_schedule_and_return_resets_to_deliver() -> None:
    s = state()
    resets = s.apply(
        [
            KeyOutcome("c:a", "alive", pttl_ms=2_000),
            KeyOutcome("c:d", "due"),
            KeyOutcome("c:g", "gone"),
            claimed("c:c", 4_000),
        ],
        base=10.0,
    )
    assert [r.key for r in resets] == ["c:c"]
    assert s.schedule.next_deadline() == 10.0  # c:d, due now
    s.due(10.0)
    assert s.take(10) == Taken(True, ["c:d"], None)
    assert s.schedule.next_deadline() == 12.0 + EARLY
    assert "c:g" not in s.schedule
    assert "c:c" not in s.schedule


def page(rows: list[tuple[str, int]], upto: int, ahead_ms: int, more: bool = False) -> DeadlinePage:
    return DeadlinePage(rows, PageStart(upto) if more else None, upto, ahead_ms)


def test_tracked_rows_are_scheduled_from_the_read_time() -> None:
    s = state()
    s.tracked(page([("c:2", -1_000), ("c:1", 500)], upto=61_000, ahead_ms=60_000), base=20.0)
    s.due(20.0)
    assert s.take(10) == Taken(True, ["c:2"], None)
    assert s.schedule.next_deadline() == 20.5 + EARLY


def test_a_page_never_moves_a_deadline_a_later_look_set() -> None:
    """A page may have been read before a decision that came back first: the key keeps
    the decision's deadline (an earlier one from a stale page costs one look, no more)."""
    s = state()
    s.apply([KeyOutcome("c:1", "alive", pttl_ms=2_000)], base=0.0)
    s.tracked(page([("c:1", 30_000)], upto=60_000, ahead_ms=60_000), base=0.0)
    assert s.schedule.next_deadline() == 2.0 + EARLY


def test_only_deadlines_within_the_window_are_held() -> None:
    """Beyond the window a deadline stays in Redis's record only; a read brings it in
    before it comes (the edge is read half a window ahead)."""
    s = state()
    assert s.refill_at == float("-inf")  # nothing read yet
    s.tracked(page([], upto=1_060_000, ahead_ms=60_000), base=0.0)
    assert s.read_from == PageStart(1_060_000)
    assert s.refill_at == WINDOW / 2  # a quiet read: the next in half a window
    s.apply(
        [
            KeyOutcome("c:near", "alive", pttl_ms=round(WINDOW * 1000)),
            KeyOutcome("c:far", "alive", pttl_ms=20 * 60_000),
        ],
        base=0.0,
    )
    assert "c:near" in s.schedule
    assert "c:far" not in s.schedule
    # Held, then re-armed far: let go.
    s.apply([KeyOutcome("c:near", "alive", pttl_ms=20 * 60_000)], base=1.0)
    assert len(s.schedule) == 0


def test_busy_reads_come_every_few_seconds() -> None:
    """A read that brought many deadlines (over pages) is followed by the next one soon,
    so that no read is large; a quiet one, by the next half a window later."""
    s = state()
    rows = [(f"c:{n}", 100) for n in range(600)]
    s.tracked(page(rows, upto=5_000, ahead_ms=4_000, more=True), base=0.0)
    s.tracked(page(rows, upto=61_000, ahead_ms=60_000), base=1.0)  # 1,200 in all
    assert s.refill_at == 1.0 + REFILL_EVERY
    s.tracked(page(rows[:10], upto=66_000, ahead_ms=60_000), base=6.0)
    assert s.refill_at == 6.0 + WINDOW / 2


def test_pages_move_the_edge_forward_only() -> None:
    s = state()
    s.tracked(page([("c:1", 100)], upto=5_000, ahead_ms=4_000, more=True), base=10.0)
    assert (s.read_from, s.horizon) == (PageStart(5_000), 14.0)
    s.tracked(page([("c:2", 200)], upto=61_000, ahead_ms=60_000), base=11.0)
    assert (s.read_from, s.horizon) == (PageStart(61_000), 71.0)
    s.tracked(page([], upto=60_500, ahead_ms=60_000), base=11.5)  # Redis's clock stepped back
    assert (s.read_from, s.horizon) == (PageStart(61_000), 71.0)


def test_a_new_subscription_reads_the_deadlines_again() -> None:
    s = state()
    s.tracked(page([("c:1", 100)], upto=61_000, ahead_ms=60_000), base=10.0)
    s.resubscribed(2_000)
    assert len(s.schedule) == 0
    assert (s.read_from, s.horizon) == (PageStart(), float("-inf"))


def test_a_key_set_aside_is_not_scheduled_or_queued_again() -> None:
    s = state()
    s.apply([KeyOutcome("c:p", "alive", pttl_ms=1_000)], base=0.0)
    s.set_aside("c:p", "ValueError: boom")
    s.on_events([event("c:p", "set")])
    assert "c:p" not in s.schedule
    assert s.take(10) is None


def test_a_redeliver_request_is_reported_and_markers_of_others_are_ignored() -> None:
    s = state()
    heard = s.on_events([Message(KEYS.redeliver, "3"), Message(MARKERS, "junk")])
    assert heard == Heard(redeliver=True)
    assert s.take(10) is None


def test_a_touch_announcement_of_another_key_is_ignored() -> None:
    """Whoever may publish on the channel cannot make the leader watch a key that is not
    a counter (COUNTER_KEY c:*)."""
    s = state()
    heard = s.on_events([Message(KEYS.touched, "session:42"), Message(KEYS.touched, "")])
    assert heard == Heard()
    assert s.take(10) is None


def test_a_touch_announcement_asks_to_track_the_key_it_names() -> None:
    s = state()
    heard = s.on_events([Message(KEYS.touched, "c:\xff"), event("c:2", "set")])
    assert heard == Heard(notified=1, touched=1)
    assert s.take(10) == Taken(False, ["c:\xff", "c:2"], None)


def test_a_resubscription_forgets_markers_and_the_queue() -> None:
    s = state(since=1_000)
    s.on_events([marker("c:1", 5_000), event("c:2", "set")])
    look = s.take(10)
    assert look is not None
    s.apply([KeyOutcome("c:2", "alive", pttl_ms=50_000)], 0.0)
    s.done(look, decided=True)
    s.resubscribed(9_000)
    assert s.take(10) is None
    s.on_events([event("c:1", "expired")])
    assert s.take(10) == Taken(True, ["c:1"], [8_999], heard=True)


def test_a_key_seen_and_not_looked_at_is_carried_over_as_reported() -> None:
    """Its `expired` may have gone to the subscription being replaced (a stall past the
    socket timeout): decided as reported, after what was known when it was seen."""
    s = state(since=1_000)
    s.on_events([event("c:flying", "set"), event("c:queued", "set")])
    flying = s.take(1)
    assert flying == Taken(False, ["c:flying"], None)
    s.on_events([marker("c:late", 4_000), event("c:late", "expire")])  # not our claim
    s.done(flying, decided=False)  # the call timed out
    s.resubscribed(9_000)
    taken = s.take(10)
    assert taken is not None
    assert taken.claim
    assert sorted(zip(taken.keys, taken.expired_after or [], strict=True)) == [
        ("c:flying", 999),
        ("c:late", 999),
        ("c:queued", 999),
    ]


def test_a_key_seen_again_while_its_look_fails_keeps_the_latest_sighting() -> None:
    s = state(since=1_000)
    s.on_events([event("c:1", "set")])
    s._claims.remember("c:1", 3_000)  # a claim of ours, then its marker, then a re-arm
    s.on_events([marker("c:1", 3_000)])
    taken = s.take(1)
    assert taken is not None
    s.on_events([event("c:1", "set")])
    s.done(taken, decided=False)
    assert s.take_reported() == [("c:1", 3_000, False)]


def test_a_key_removed_after_it_was_seen_is_not_carried_over() -> None:
    s = state(since=1_000)
    s.on_events([event("c:1", "set"), event("c:2", "set")])
    taken = s.take(1)
    assert taken is not None
    s.on_events([event("c:1", "del"), event("c:2", "evicted")])
    s.done(taken, decided=False)
    s.resubscribed(9_000)
    assert s.take(10) is None


def test_a_key_looked_at_is_not_carried_over() -> None:
    s = state(since=1_000)
    s.on_events([event("c:1", "set")])
    taken = s.take(10)
    assert taken is not None
    s.apply([KeyOutcome("c:1", "gone")], 0.0)
    s.done(taken, decided=True)
    assert s.take_reported() == []


def test_handing_over_takes_reported_keys_also_those_in_a_call() -> None:
    s = state(since=1_000)
    s.on_events([event("c:1", "expired"), event("c:2", "expired"), event("c:3", "set")])
    in_call = s.take(1)
    assert in_call == Taken(True, ["c:1"], [999], heard=True)
    assert in_call is not None
    s.done(in_call, decided=False)  # cancelled by the stop
    # c:3: set and not looked at, so the next leader may find no trace of it either.
    assert sorted(s.take_reported()) == [
        ("c:1", 999, True),
        ("c:2", 999, True),
        ("c:3", 999, False),
    ]


@given(
    st.lists(st.tuples(st.sampled_from(["a", "b", "c", "d"]), st.integers(0, 40_000)), max_size=400)
)
def test_claims_keep_each_key_s_latest_claim_for_a_minute(steps: list[tuple[str, int]]) -> None:
    """Against the rule itself: a key's latest claim is kept while it is within the
    tombstone minute of the newest claim (times never go back), across chunks."""
    claims, latest, now = _Claims(), {}, 0
    for key, gap in steps:
        now += gap
        claims.remember(key, now)
        latest[key] = now
        kept = {k: ms for k, ms in latest.items() if ms > now - TOMBSTONE_MS}
        assert dict(claims.items()) == kept
        assert len(claims) == len(kept)


def test_the_garbage_collector_does_not_walk_the_claims() -> None:
    """A full collection walked every remembered claim (~27 ms at 1M steady)."""
    claims = _Claims()
    for n in range(10_000):
        claims.remember(f"c:{n}", n)
    gc.collect()
    assert not gc.is_tracked(claims._ms)
    assert not any(gc.is_tracked(part) for chunk in claims._chunks for part in chunk)


def test_claims_remembered_are_bounded_by_the_tombstone_window() -> None:
    s = state(since=0)
    for n in range(1_000):
        s.apply([claimed(f"c:{n}", n * 1_000)], base=0.0)  # one claim a second
    s.on_events([event("c:0", "expired")])  # 999 s later: its tombstone is long gone
    assert s.take(10) == Taken(True, ["c:0"], [-1], heard=True)
    assert len(s._claims) <= 61


def test_a_key_claimed_again_is_remembered_a_minute_after_its_latest_claim() -> None:
    s = state(since=0)
    s.apply([claimed("c:1", 1_000)], base=0.0)
    s.apply([claimed("c:1", 50_000)], base=0.0)  # again, within the minute
    for n in range(2, 200):
        s.apply([claimed(f"c:{n}", n * 1_000)], base=0.0)  # one claim a second
    # 199 s: c:1's first claim is long past its minute, its latest one too; c:140 is not.
    assert "c:1" not in s._claims
    assert s._claims.get("c:140") == 140_000
    assert len(s._claims) <= 61
    s._claims.clear()
    s.apply([claimed("c:2", 300_000)], base=0.0)
    assert (len(s._claims), s._claims.get("c:2")) == (1, 300_000)


def test_a_claim_renewed_within_the_minute_outlives_its_first() -> None:
    s = state(since=0)
    s.apply([claimed("c:1", 1_000)], base=0.0)
    s.apply([claimed("c:1", 30_000)], base=0.0)
    s.apply([claimed("c:2", 70_000)], base=0.0)  # past c:1's first minute, within its second
    assert s._claims.get("c:1") == 30_000


def test_a_batch_is_halved_with_its_reported_times() -> None:
    reported = Taken(True, ["c:1", "c:2", "c:3"], [10, 20, 30])
    assert reported.halves() == [
        Taken(True, ["c:1"], [10]),
        Taken(True, ["c:2", "c:3"], [20, 30]),
    ]
    looks = Taken(False, ["c:1", "c:2"], None)
    assert looks.halves() == [Taken(False, ["c:1"], None), Taken(False, ["c:2"], None)]


def test_an_expiry_heard_is_claimed_as_heard_also_after_a_resubscription() -> None:
    """Heard, it ends an episode even if the key is set again by the claim; its event
    says what Redis did, whichever subscription carried it. A key only seen is not."""
    s = state(since=1_000)
    s.on_events([event("c:1", "expired"), event("c:1", "set"), event("c:2", "set")])
    taken = s.take(10)
    assert taken == Taken(True, ["c:1"], [999], heard=True)
    assert taken.halves()[1].heard
    s.done(taken, decided=False)
    s.resubscribed(5_000)
    assert s.take(10) == Taken(True, ["c:1"], [999], heard=True)
    assert s.take(10) == Taken(True, ["c:2"], [999], heard=False)


def test_a_claim_of_a_key_set_again_schedules_its_new_life() -> None:
    s = state()
    s.want(["c:1", "c:2"], "claim")
    taken = s.take(10)
    assert taken is not None
    again = KeyOutcome(
        "c:1",
        "claimed",
        pttl_ms=2_000,
        reset=PendingReset("id-c:1", "c:1", 1, 1),
        claimed_ms=5_000,
        lives_again=True,
    )
    assert s.apply([again, claimed("c:2", 5_000)], base=10.0) == [
        again.reset,
        claimed("c:2", 5_000).reset,
    ]
    s.done(taken, decided=True)
    assert s.schedule.pop_due(10.0 + 2.0 + EARLY) == ["c:1"]  # c:2's life is over
