"""What comes back from Redis, read without a server: hand-made exceptions and replies."""

from __future__ import annotations

import json

import pytest
import redis.exceptions as rexc

from trio_counter_worker.errors import LeaseLost, RedisRefused, RedisUnavailable
from trio_counter_worker.redis_replies import (
    error_code,
    note,
    note_json,
    outcomes,
    reported_args,
    translate,
)
from trio_counter_worker.store import FailingNote, KeyOutcome, PendingReset


def _rec(**extra: object) -> str:
    return json.dumps(
        {
            "reset_id": "r1",
            "key": "c:1",
            "deadline_ms": 1500,
            "fencing_token": 3,
            "claimed_ms": 1501,
            **extra,
        }
    )


def test_a_script_answer_becomes_outcomes_in_key_order() -> None:
    raw = json.dumps(
        {
            "leader": True,
            "keys": [
                {"p": 250},
                {"due": True},
                {"gone": True},
                {"claimed": _rec(payload="room 7")},
            ],
        }
    )
    assert outcomes(raw, ["c:a", "c:d", "c:g", "c:1"]) == [
        KeyOutcome("c:a", "alive", pttl_ms=250),
        KeyOutcome("c:d", "due"),
        KeyOutcome("c:g", "gone"),
        KeyOutcome(
            "c:1", "claimed", reset=PendingReset("r1", "c:1", 1500, 3, "room 7"), claimed_ms=1501
        ),
    ]


def test_an_empty_answer_is_cjsons_empty_object() -> None:
    """cjson encodes an empty Lua table as {}: no keys, no outcomes."""
    assert outcomes(json.dumps({"leader": True, "keys": {}}), []) == []


def test_not_the_leader_is_lease_lost() -> None:
    with pytest.raises(LeaseLost):
        outcomes(json.dumps({"leader": False}), ["c:1"])


def test_reported_times_are_one_per_key() -> None:
    assert reported_args(["a", "b"], None) == ["", ""]
    assert reported_args(["a", "b"], [5, 7]) == ["5", "7"]
    with pytest.raises(ValueError, match="one expired_after per key"):
        reported_args(["a", "b"], [5])


def test_a_failing_note_round_trips_and_junk_is_readable() -> None:
    n = FailingNote("r1", 4, 1700000000.5, "HTTP 503", "c:1")
    assert note("r1", note_json(n)) == n
    assert note("r2", "{not json").last_error == "(unreadable note)"


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (rexc.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."), "oom"),
        (
            rexc.ResponseError(
                "Error running script (call to f_x): @user_script:1: "
                "-OOM command not allowed when used memory > 'maxmemory'."
            ),
            "oom",
        ),
        (
            rexc.NoPermissionError("this user has no permissions to run the 'eval' command"),
            "permission",
        ),
        (rexc.AuthenticationError("invalid username-password pair"), "auth"),
        (rexc.ResponseError("WRONGPASS invalid username-password pair"), "auth"),
        (rexc.ResponseError("ERR DB index is out of range"), "db"),
    ],
)
def test_refusals_are_classified_by_type_or_code(exc: Exception, kind: str) -> None:
    translated = translate(exc)
    assert isinstance(translated, RedisRefused)
    assert translated.kind == kind


@pytest.mark.parametrize(
    "exc",
    [
        rexc.ConnectionError("Error 111 connecting"),
        rexc.TimeoutError("Timeout reading from socket"),
        rexc.ReadOnlyError("You can't write against a read only replica."),
        rexc.BusyLoadingError("Redis is loading the dataset in memory"),
        rexc.ResponseError("MASTERDOWN Link with MASTER is down"),
        ValueError("I/O operation on closed file."),
    ],
)
def test_redis_away_for_now_is_unavailable(exc: Exception) -> None:
    translated = translate(exc)
    assert isinstance(translated, RedisUnavailable)
    assert not isinstance(translated, RedisRefused)


def test_anything_else_passes_through() -> None:
    bug = rexc.ResponseError("Error running script: @user_script:3: attempt to index nil")
    assert translate(bug) is bug
    other = KeyError("x")
    assert translate(other) is other


def test_the_code_inside_a_script_error() -> None:
    assert error_code(rexc.ResponseError("Error running script: -READONLY You can't")) == (
        "READONLY"
    )
    assert error_code(rexc.ResponseError("plain")) is None
    assert error_code(ValueError("-OOM")) is None
