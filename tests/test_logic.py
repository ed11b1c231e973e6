"""Plain logic, no I/O: schedule, retry policy, keyspace flags, request format, public API."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import trio_counter_worker
from trio_counter_worker.delivery import build_request, request_body
from trio_counter_worker.keys import keyspace_pattern
from trio_counter_worker.keyspace import (
    enable_hint,
    key_from_channel,
    merged_flags,
    missing_flags,
    wire_text,
)
from trio_counter_worker.retry import Backoff, RetryPolicy, classify, parse_retry_after
from trio_counter_worker.schedule import Schedule
from trio_counter_worker.store import PendingReset

# -- schedule --------------------------------------------------------------------------


def test_schedule_pops_due_keys_in_deadline_order() -> None:
    s = Schedule()
    s.set("b", 2.0)
    s.set("a", 1.0)
    s.set("c", 3.0)
    assert s.next_deadline() == 1.0
    assert s.pop_due(2.5) == ["a", "b"]
    assert s.next_deadline() == 3.0
    assert len(s) == 1


def test_schedule_set_replaces_and_remove_forgets() -> None:
    s = Schedule()
    s.set("a", 1.0)
    s.set("a", 5.0)  # re-armed
    s.set("b", 2.0)
    s.remove("b")
    assert s.pop_due(4.0) == []
    assert s.next_deadline() == 5.0
    assert "a" in s
    assert "b" not in s
    assert s.pop_due(5.0) == ["a"]
    assert s.next_deadline() is None


def test_schedule_limit_and_compaction() -> None:
    s = Schedule()
    for i in range(5000):
        s.set("k", float(i))  # many stale entries for one key
    assert len(s) == 1
    assert len(s._heap) < 3000  # compacted, not growing without bound
    for i in range(10):
        s.set(f"x{i}", 0.5)
    assert len(s.pop_due(1.0, limit=4)) == 4
    assert len(s.pop_due(1.0)) == 6


def test_re_arming_later_adds_nothing_to_the_heap() -> None:
    """A re-arm (the deadline moved later) leaves the key's one entry; it is put back at
    the new deadline when it comes up. An entry per re-arm grew the leader ~1 MiB/min."""
    s = Schedule()
    keys = [f"k{n}" for n in range(10)]
    for i in range(50):  # 500 re-arms: fewer than compacting takes
        for key in keys:
            s.set(key, 10.0 + i)
    assert len(s._heap) == 10
    assert s.pop_due(58.0) == []
    assert s.next_deadline() == 59.0
    assert len(s._heap) == 10
    assert s.pop_due(59.0) == keys


_SCHEDULE_OPS = st.lists(
    st.tuples(
        st.sampled_from(["set", "set", "remove", "pop", "next"]),
        st.sampled_from([f"k{n}" for n in range(6)]),
        st.integers(0, 40).map(float),
        st.none() | st.integers(1, 3),
    ),
    max_size=80,
)


@settings(max_examples=150, deadline=None)
@given(_SCHEDULE_OPS)
def test_schedule_is_a_dict_of_deadlines(ops: list[tuple[str, str, float, int | None]]) -> None:
    """Against a plain dict: the earliest live deadline, and pop_due gives due keys
    earliest first, each once, ``limit`` at most, the earliest ones."""
    s, model = Schedule(), {}
    for op, key, at, limit in ops:
        if op == "set":
            s.set(key, at)
            model[key] = at
        elif op == "remove":
            s.remove(key)
            model.pop(key, None)
        elif op == "next":
            assert s.next_deadline() == (min(model.values()) if model else None)
        else:
            got = s.pop_due(at, limit)
            due = sorted((d, k) for k, d in model.items() if d <= at)
            want = due if limit is None else due[:limit]
            assert sorted(got) == sorted(k for _, k in want)
            assert [model[k] for k in got] == sorted(d for d, _ in want)
            for k in got:
                del model[k]
        assert len(s) == len(model)
        assert len(s._heap) <= 2 * len(model) + 1024 + 1


# -- retry ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (200, "done"),
        (204, "done"),
        (500, "retry"),
        (503, "retry"),
        (408, "retry"),
        (429, "retry"),
        (307, "redirect"),
        (301, "redirect"),
        (401, "rejected"),
        (404, "rejected"),
        (422, "rejected"),
    ],
)
def test_classify(status: int, verdict: str) -> None:
    assert classify(status) == verdict


def test_backoff_grows_capped_with_jitter() -> None:
    policy = RetryPolicy(base=0.1, cap=10.0)
    rng = random.Random(7)
    delays = [policy.delay(n, "retry", rng=rng) for n in range(1, 12)]
    for n, d in enumerate(delays, start=1):
        ceiling = min(10.0, 0.1 * 2 ** (n - 1))
        assert ceiling / 2 <= d <= ceiling
    assert max(delays) <= 10.0
    assert policy.delay(20, "rejected", rng=rng) > 10.0  # slower for 4xx, up to 60 s


def test_reconnect_backoff_grows_capped_and_resets() -> None:
    backoff = Backoff(base=0.1, cap=5.0)
    for n in range(1, 12):
        ceiling = min(5.0, 0.1 * 2 ** (n - 1))
        assert ceiling / 2 <= backoff.next() <= ceiling
    backoff.reset()
    assert 0.05 <= backoff.next() <= 0.1


def test_retry_after_wins_and_is_capped() -> None:
    policy = RetryPolicy()
    assert policy.delay(1, "retry", retry_after=7.0) == 7.0
    assert policy.delay(1, "retry", retry_after=10_000.0) == policy.retry_after_cap


def test_parse_retry_after() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    now = 1_700_000_000.0
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:30 GMT", now=now) == pytest.approx(10.0)


# -- keyspace ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("current", "missing"),
    [("", "Kg$x"), ("Ex", "Kg$"), ("AK", ""), ("KEA", ""), ("Kg$x", ""), ("Kgx", "$")],
)
def test_missing_flags(current: str, missing: str) -> None:
    assert missing_flags(current) == missing


def test_merge_keeps_the_apps_flags() -> None:
    merged = merged_flags("Eh")
    assert set("Eh") <= set(merged)
    assert missing_flags(merged) == ""


def test_channel_names() -> None:
    pattern = keyspace_pattern(3, "counter:*")
    assert pattern == "__keyspace@3__:counter:*"
    assert key_from_channel("__keyspace@3__:counter:a:b") == "counter:a:b"


def test_enable_hint_names_the_flags_and_what_to_do() -> None:
    assert "'$x'" in enable_hint("$x")
    assert "CONFIG SET notify-keyspace-events" in enable_hint(None)
    assert "could not read" in enable_hint(None)


# -- request format ---------------------------------------------------------------------


def test_request_format() -> None:
    reset = PendingReset("r1d", "c:1", 1_764_370_000_123, fencing_token=3)
    headers, body = build_request(reset, secret="s", replica_id="w1", fencing_token=5)
    assert headers == {
        "x-secret": "s",
        "content-type": "application/json",
        "idempotency-key": "r1d",
        "x-fencing-token": "5",
    }
    assert json.loads(body) == {
        "key": "c:1",
        "reset_id": "r1d",
        "expired_at": 1_764_370_000.123,
        "fencing_token": 5,
        "replica_id": "w1",
    }


def dumped_body(reset: PendingReset, replica_id: str, fencing_token: int) -> bytes:
    """The reset body as json.dumps writes it: the reference for :func:`request_body`."""
    key, key_base64 = wire_text(reset.key)
    body: dict[str, object] = {
        "key": key,
        "reset_id": reset.reset_id,
        "expired_at": reset.expired_at,
        "fencing_token": fencing_token,
        "replica_id": replica_id,
    }
    if key_base64 is not None:
        body["key_base64"] = key_base64
    if reset.payload is not None:
        body["payload"], payload_base64 = wire_text(reset.payload)
        if payload_base64 is not None:
            body["payload_base64"] = payload_base64
    return json.dumps(body, separators=(",", ":")).encode()


# Names as Redis hands them over: any text, bytes that are not UTF-8 as lone surrogates.
names = st.lists(
    st.one_of(
        st.characters(exclude_categories=["Cs"]),
        st.sampled_from(["\udcff", "\udc80", "\udce9", '"', "\\", "\n", "\x00", "\u2028"]),
    )
).map("".join)


@given(
    key=names,
    reset_id=names,
    deadline_ms=st.integers(0, 2**62),
    fencing_token=st.integers(0, 2**64),
    replica_id=names,
    payload=st.none() | names,
)
def test_the_body_is_what_json_dumps_writes(
    key: str,
    reset_id: str,
    deadline_ms: int,
    fencing_token: int,
    replica_id: str,
    payload: str | None,
) -> None:
    reset = PendingReset(reset_id, key, deadline_ms, 1, payload)
    expected = dumped_body(reset, replica_id, fencing_token)
    assert request_body(reset, replica_id=replica_id, fencing_token=fencing_token) == expected


# -- public API -------------------------------------------------------------------------


def test_exported_members_are_all() -> None:
    import types

    public = {
        name
        for name, value in vars(trio_counter_worker).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    } | set(trio_counter_worker._LAZY)  # loaded when first asked for
    assert public == set(trio_counter_worker.__all__) - {"__version__"}
    for name in trio_counter_worker.__all__:
        assert getattr(trio_counter_worker, name) is not None


def test_readme_documents_every_setting() -> None:
    """README's settings table: one row per setting, in the order --help lists them, each
    with the default the code declares."""
    from pathlib import Path

    from trio_counter_worker.config import SETTINGS

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    example = (Path(__file__).parent.parent / ".env.example").read_text()
    section = readme.partition("\n## Settings\n")[2].partition("\n## ")[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| `")]
    table = [(name.strip().strip("`"), default.strip().strip("`")) for name, _, default in rows]
    expected = [(s.name, "required" if s.required else s.default or "none") for s in SETTINGS]
    assert table == expected
    for setting in SETTINGS:
        assert setting.name in example, setting.name


# -- signing and logs -------------------------------------------------------------------


def test_signature_is_hmac_of_timestamp_and_body() -> None:
    import hashlib
    import hmac

    from trio_counter_worker.delivery import sign

    reset = PendingReset("r1d", "c:1", 1_000, fencing_token=1)
    headers, body = build_request(
        reset, secret="s", replica_id="w", fencing_token=1, signing_secret="k", now=1700.9
    )
    expected = hmac.new(b"k", b"1700." + body, hashlib.sha256).hexdigest()
    assert headers["x-signature"] == f"t=1700,v1={expected}"
    assert sign("k", body, 1700) == headers["x-signature"]
    assert sign("k", body + b" ", 1700) != headers["x-signature"]


def test_json_log_lines_carry_event_fields() -> None:
    import logging

    from trio_counter_worker.logs import JsonFormatter

    record = logging.LogRecord(
        "trio_counter_worker", logging.INFO, "f.py", 1, "reset sent: key=%r", ("c:1",), None
    )
    record.event = "reset_sent"
    record.fencing_token = 3
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "reset sent: key='c:1'"
    assert line["event"] == "reset_sent"
    assert line["fencing_token"] == 3
    assert line["level"] == "INFO"
    assert "args" not in line
