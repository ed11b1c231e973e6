"""The decision queue as plain logic: merged per key, deadlines first, one call per key."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from trio_counter_worker.decisions import DecisionQueue, Want


def test_a_key_touched_many_times_is_one_look() -> None:
    q = DecisionQueue()
    for _ in range(100):
        q.want("c:1", "track")
    assert len(q) == 1
    assert q.take(10) == (Want(), ["c:1"], None)
    assert q.take(10) is None


def test_deadlines_go_before_events() -> None:
    q = DecisionQueue()
    q.want("c:event", "track")
    q.want("c:due", "claim")
    assert q.take(10) == (Want(claim=True), ["c:due"], None)
    assert q.take(10) == (Want(), ["c:event"], None)


def test_wants_merge_to_the_strongest() -> None:
    q = DecisionQueue()
    q.want("c:1", "track")
    q.want("c:1", "claim")  # moves to the due queue, as a claim
    q.want("c:2", "reported", 7)
    q.want("c:2", "claim")
    assert len(q) == 2
    assert q.take(10) == (Want(claim=True), ["c:1"], None)
    assert q.take(10) == (Want(claim=True, reported=True), ["c:2"], [7])


def test_a_key_in_a_call_is_not_taken_again_until_done() -> None:
    q = DecisionQueue()
    q.want("c:1", "track")
    first = q.take(10)
    assert first is not None
    q.want("c:1", "track")  # changed again while its call is in flight
    assert "c:1" in q
    assert q.take(10) is None
    q.done(["c:1"])
    assert q.take(10) == (Want(), ["c:1"], None)


def test_a_reported_key_keeps_its_latest_report() -> None:
    q = DecisionQueue()
    q.want("c:1", "reported", 5)
    q.want("c:1", "reported", 9)
    q.want("c:1", "reported", 7)
    q.want("c:2", "claim", 3)  # a key the timer holds, reported: the same call
    assert q.take(10) == (Want(claim=True, reported=True), ["c:1", "c:2"], [9, 3])


def test_a_key_is_decided_as_heard_if_its_latest_report_was_heard() -> None:
    """An `expired` heard after an earlier time does not vouch for a later one: the claim
    between them may be what it echoes (spec.claim)."""
    q = DecisionQueue()
    q.want("c:1", "expired", 5)
    q.want("c:1", "track")
    q.want("c:1", "reported", 3)  # older: the event heard still holds
    q.want("c:2", "expired", 5)
    q.want("c:2", "reported", 7)  # a later sighting: only reported
    q.want("c:3", "reported", 7)
    q.want("c:3", "expired", 9)
    heard, reported = Want(claim=True, reported=True, heard=True), Want(claim=True, reported=True)
    assert q.take(10) == (heard, ["c:1", "c:3"], [5, 9])
    assert q.take(10) == (reported, ["c:2"], [7])


def test_handing_over_takes_every_reported_key() -> None:
    q = DecisionQueue()
    q.want("c:t", "track")
    q.want("c:r", "reported", 4)
    q.want("c:d", "claim", 6)
    assert sorted(q.take_reported()) == [("c:d", 6, False), ("c:r", 4, False)]
    assert q.take(10) == (Want(), ["c:t"], None)
    assert q.take(10) is None


def test_one_call_holds_keys_of_one_kind_up_to_the_limit() -> None:
    q = DecisionQueue()
    for n in range(5):
        q.want(f"c:{n}", "track")
    q.want("c:r", "reported", 7)
    assert q.take(3) == (Want(claim=True, reported=True), ["c:r"], [7])  # a claim: first
    assert q.take(3) == (Want(), ["c:0", "c:1", "c:2"], None)
    assert q.take(3) == (Want(), ["c:3", "c:4"], None)


def test_claims_can_be_taken_without_looks() -> None:
    """Some deciders take claims only, so a reconcile's looks never hold up a reset."""
    q = DecisionQueue()
    q.want("c:t", "track")
    assert q.take(10, looks=False) is None
    q.want("c:r", "reported", 7)
    q.want("c:d", "claim")
    assert q.take(10, looks=False) == (Want(claim=True, reported=True), ["c:r"], [7])
    assert q.take(10, looks=False) == (Want(claim=True), ["c:d"], None)
    assert q.take(10, looks=False) is None
    assert q.take(10) == (Want(), ["c:t"], None)


ops = st.sampled_from(["track", "claim", "reported"])


@given(st.lists(st.tuples(st.sampled_from("abcde"), ops, st.booleans()), max_size=60))
def test_no_key_is_ever_in_two_calls_and_none_is_lost(
    steps: list[tuple[str, str, bool]],
) -> None:
    q = DecisionQueue()
    in_call: set[str] = set()
    wanted: set[str] = set()
    for key, op, take in steps:
        q.want(key, op, 1 if op == "reported" else None)  # type: ignore[arg-type]
        wanted.add(key)
        if take:
            taken = q.take(2)
            if taken is not None:
                _, keys, _ = taken
                assert not in_call & set(keys), "a key taken while its call is in flight"
                in_call |= set(keys)
                wanted -= set(keys)
                q.done(keys)
                in_call -= set(keys)
    while (taken := q.take(2)) is not None:
        wanted -= set(taken[1])
        q.done(taken[1])
    assert not wanted, f"asked for and never taken: {wanted}"
    assert len(q) == 0
