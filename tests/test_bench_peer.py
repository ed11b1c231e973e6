"""bench/peer.py's pure parts: which arms must end in a reset, commandstats deltas less
the bench's own polls, lateness per planned counter, and the metrics compare reads. No
processes, no Redis, no node."""

from __future__ import annotations

import math

from bench.compare import SPECS
from bench.peer import (
    Arm,
    command_deltas,
    delivery_counts,
    episode,
    expected_resets,
    lateness_ms,
    side_metrics,
)


def test_an_arm_resets_unless_the_next_arm_of_its_key_comes_before_its_due() -> None:
    arms = [
        Arm("a", sent_ms=0, due_ms=500),  # next arm at 400: pushed back, no reset
        Arm("a", sent_ms=400, due_ms=900),  # next arm at 1000, after it fell due: reset
        Arm("a", sent_ms=1000, due_ms=3000),  # due after the window: not counted
        Arm("b", sent_ms=100, due_ms=600),  # the key's last arm: reset
    ]
    assert expected_resets(reversed(arms), until_ms=2000) == {("a", 900), ("b", 600)}


def test_an_arm_due_exactly_at_the_next_arm_is_pushed_back() -> None:
    arms = [Arm("a", sent_ms=0, due_ms=500), Arm("a", sent_ms=500, due_ms=900)]
    assert expected_resets(arms, until_ms=2000) == {("a", 900)}


def test_command_deltas_leave_out_the_bench_own_polls_and_info() -> None:
    before = {"cmdstat_set": {"calls": 10}, "cmdstat_zcard": {"calls": 3}}
    after = {
        "cmdstat_set": {"calls": 110},
        "cmdstat_zcard": {"calls": 8},
        "cmdstat_evalsha": {"calls": 100},
        "cmdstat_info": {"calls": 4},
        "used_memory": 1,
    }
    own = {"zcard": 5}
    assert command_deltas(before, after, own) == {"evalsha": 100, "set": 100}


def test_lateness_is_the_first_post_per_planned_counter_and_inf_without_one() -> None:
    posts = [(1.010, {"key": "a"}), (1.500, {"key": "a"}), (2.0025, {"key": "b"})]
    late = lateness_ms(posts, {"a": 1000, "b": 2000, "c": 3000})
    assert [round(x, 1) for x in late[:2]] == [10.0, 2.5]
    assert math.isinf(late[2])


def test_a_post_names_its_episode_by_key_and_due_in_ms() -> None:
    assert episode({"key": "c:1", "expired_at": 1700000000.123}) == ("c:1", 1700000000123)


def test_compare_reads_the_worker_medians_under_the_peer_metric_names() -> None:
    names = [m.name for m, _ in side_metrics({})]
    assert len(names) == len(set(names))
    medians = {name: float(i) for i, name in enumerate(names)}
    got = SPECS["peer"].metrics({"medians": {"worker": medians}})
    assert [(m.name, v) for m, v in got] == list(medians.items())
    assert all(m.lower_is_better for m, _ in got)


def test_side_metrics_read_nested_figures_and_miss_absent_ones() -> None:
    got = dict((m.name, v) for m, v in side_metrics({"idle": {"lateness_ms": {"p50": 3}}}))
    assert got["idle: lateness p50"] == 3.0
    assert got["burst: drain"] is None


def test_two_reset_ids_are_a_double_one_posted_twice_a_redelivery() -> None:
    posts = [
        (1.0, {"key": "a", "reset_id": "1"}),
        (1.1, {"key": "a", "reset_id": "1"}),  # the same reset again: deduped downstream
        (1.0, {"key": "b", "reset_id": "2"}),
        (1.2, {"key": "b", "reset_id": "3"}),  # a second reset of the same episode
    ]
    assert delivery_counts(posts, {"a": 900, "b": 900, "c": 900}) == (1, 1, 1)
