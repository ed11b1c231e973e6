"""Key names are bytes: any name survives the worker's str form and reaches the wire exactly.

Plain logic with hypothesis; the real-Redis round trip (SCAN, pub/sub, scripts, POST)
is in test_hostile_keys.py.
"""

from __future__ import annotations

import base64
import json

from hypothesis import given
from hypothesis import strategies as st

from trio_counter_worker.delivery import build_request
from trio_counter_worker.keys import OWN_KEY_PREFIX, keyspace_pattern
from trio_counter_worker.keyspace import (
    is_own_key,
    key_bytes,
    key_from_channel,
    shown_key,
    wire_text,
)
from trio_counter_worker.store import PendingReset

names = st.binary(max_size=300)


def as_carried(raw: bytes) -> str:
    """What redis-py (encoding_errors="surrogateescape") hands the worker."""
    return raw.decode("utf-8", "surrogateescape")


@given(names)
def test_the_str_form_gives_back_the_exact_bytes(raw: bytes) -> None:
    assert key_bytes(as_carried(raw)) == raw


@given(names)
def test_the_body_is_strict_json_and_carries_the_exact_bytes(raw: bytes) -> None:
    key = as_carried(b"c:" + raw)
    reset = PendingReset("rid", key, 1_000, 1)
    _, body = build_request(reset, secret="s", replica_id="w", fencing_token=1)
    body.decode("ascii")  # escaped: no raw byte of the name reaches the wire
    parsed = json.loads(body, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    if "key_base64" in parsed:
        assert base64.b64decode(parsed["key_base64"]) == b"c:" + raw
        assert parsed["key"] == (b"c:" + raw).decode("utf-8", "replace")
    else:
        assert parsed["key"].encode("utf-8") == b"c:" + raw
    # No lone surrogate survives into the text a strict parser would refuse.
    parsed["key"].encode("utf-8")


@given(names)
def test_a_payload_travels_like_a_key(raw: bytes) -> None:
    reset = PendingReset("rid", "c:1", 1_000, 1, payload=as_carried(raw))
    _, body = build_request(reset, secret="s", replica_id="w", fencing_token=1)
    body.decode("ascii")
    parsed = json.loads(body)
    exact = (
        base64.b64decode(parsed["payload_base64"])
        if "payload_base64" in parsed
        else (parsed["payload"].encode("utf-8"))
    )
    assert exact == raw
    assert "payload" not in json.loads(
        build_request(
            PendingReset("rid", "c:1", 1_000, 1), secret="s", replica_id="w", fencing_token=1
        )[1]
    )


@given(names)
def test_wire_text_only_adds_base64_when_needed(raw: bytes) -> None:
    text, b64 = wire_text(as_carried(raw))
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        assert b64 is not None
        assert base64.b64decode(b64) == raw
    else:
        assert b64 is None
        assert text == raw.decode("utf-8")


@given(names)
def test_shown_key_is_printable_text(raw: bytes) -> None:
    shown = shown_key(as_carried(raw))
    shown.encode("utf-8")  # never a lone surrogate: safe for any terminal or log


@given(names)
def test_the_channel_gives_back_the_key(raw: bytes) -> None:
    key = as_carried(b"c:" + raw)
    assert key_from_channel(keyspace_pattern(0, "") + key) == key


def test_examples_from_the_issue() -> None:
    text, b64 = wire_text(as_carried(b"c:\xff\xfe"))
    assert text == "c:\ufffd\ufffd"
    assert b64 == base64.b64encode(b"c:\xff\xfe").decode()
    assert shown_key(as_carried(b"c:\xff\x00")) == "c:\\xff\x00"
    assert is_own_key(f"{OWN_KEY_PREFIX}b:*}}:lease")
    assert not is_own_key("tcw:counter")
