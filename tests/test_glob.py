"""``glob.may_match_prefix`` / ``example_match`` against a reference Redis matcher.

The reference, ``redis_match``, is Redis's ``stringmatchlen`` (src/util.c) transliterated
line by line: pointers become indexes, and ``at`` stands for the C string's NUL that the
original reads one past the end. The reference is itself checked against a real
redis-server (KEYS over a fixed set of keys), so the module under test is checked against
Redis, not against a second reading of the same documentation.

Properties, for random patterns over the characters that matter (``t c w : { * ? [ ] ^ -
\\`` and one non-ASCII letter, whose UTF-8 bytes are above 0x7F):

* a True answer comes with a witness key that starts with the prefix and that the
  reference matches;
* if brute force finds a match among the prefix plus every suffix of up to 3 characters
  from a small alphabet, the answer is True.
"""

from __future__ import annotations

import itertools
import platform
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.redis_server import RedisServer
from trio_counter_worker.config import OWN_KEY_PREFIX
from trio_counter_worker.glob import example_match, may_match_prefix

STAR, QUESTION, OPEN, CLOSE, CARET, DASH, BACKSLASH = b"*?[]^-\\"


def redis_match(pattern: bytes, string: bytes, signed_char: bool) -> bool:
    """util.c's stringmatchlen(pattern, string, nocase=0), with C ``char`` signed or not."""
    skip_longer = False

    def at(k: int) -> int:
        return pattern[k] if k < len(pattern) else 0

    def char(byte: int) -> int:
        return byte - 256 if signed_char and byte >= 0x80 else byte

    def impl(p: int, s: int, nesting: int) -> bool:
        nonlocal skip_longer
        if nesting > 1000:
            return False
        plen, slen = len(pattern) - p, len(string) - s
        while plen and slen:
            c = pattern[p]
            if c == STAR:
                while plen and at(p + 1) == STAR:
                    p, plen = p + 1, plen - 1
                if plen == 1:
                    return True
                while slen:
                    if impl(p + 1, s, nesting + 1):
                        return True
                    if skip_longer:
                        return False
                    s, slen = s + 1, slen - 1
                skip_longer = True
                return False
            if c == QUESTION:
                s, slen = s + 1, slen - 1
            elif c == OPEN:
                p, plen = p + 1, plen - 1
                negate = at(p) == CARET
                if negate:
                    p, plen = p + 1, plen - 1
                match = False
                while True:
                    if at(p) == BACKSLASH and plen >= 2:
                        p, plen = p + 1, plen - 1
                        match = match or at(p) == string[s]
                    elif at(p) == CLOSE:
                        break
                    elif plen == 0:
                        p, plen = p - 1, plen + 1
                        break
                    elif plen >= 3 and at(p + 1) == DASH:
                        start, end = sorted((char(at(p)), char(at(p + 2))))
                        p, plen = p + 2, plen - 2
                        match = match or start <= char(string[s]) <= end
                    else:
                        match = match or at(p) == string[s]
                    p, plen = p + 1, plen - 1
                if negate:
                    match = not match
                if not match:
                    return False
                s, slen = s + 1, slen - 1
            else:
                if c == BACKSLASH and plen >= 2:
                    p, plen = p + 1, plen - 1
                if pattern[p] != string[s]:
                    return False
                s, slen = s + 1, slen - 1
            p, plen = p + 1, plen - 1
            if slen == 0:
                while at(p) == STAR:
                    p, plen = p + 1, plen - 1
                break
        return plen == 0 and slen == 0

    return impl(0, 0, 0)


def matches_somewhere(pattern: bytes, key: bytes) -> bool:
    """On x86 (signed char) or on ARM (unsigned char)."""
    return redis_match(pattern, key, True) or redis_match(pattern, key, False)


# --- tables --------------------------------------------------------------------------

REFUSED = ["*", "t*", "tcw:*", "?cw:{x}", "[t]cw:*", "tcw:{", "tcw:{c:*}:lease", "[a-z]*",
           "[^x]cw:{*", "\\tcw:*", "t[c]w[:][{]*", "tcw[^a]{*", "tc?:*", "[s-u][b-d]w:{*",
           "tcw:{\\", "[é-z]cw:*"]  # fmt: skip
# "[]t]cw:*": "[]" is an empty class (matching nothing), not a class holding "]".
ACCEPTED = ["c:*", "contador_reset", "tenant:*:room", "", "tcw", "tcw:", "tcw:[^{]*",
            "tcw\\*", "[^t]*", "tcw:[]", "t[c-]w:*", "[", "tcw:{[]*", "T*",
            "[]t]cw:*"]  # fmt: skip


@pytest.mark.parametrize("pattern", REFUSED)
def test_patterns_that_can_match_own_keys(pattern: str) -> None:
    assert may_match_prefix(pattern, OWN_KEY_PREFIX)
    witness = example_match(pattern, OWN_KEY_PREFIX)
    assert witness is not None
    assert witness.startswith(OWN_KEY_PREFIX.encode())
    assert matches_somewhere(pattern.encode(), witness)


@pytest.mark.parametrize("pattern", ACCEPTED)
def test_patterns_that_cannot(pattern: str) -> None:
    assert not may_match_prefix(pattern, OWN_KEY_PREFIX)
    assert example_match(pattern, OWN_KEY_PREFIX) is None


@pytest.mark.parametrize(
    ("pattern", "key", "expected"),
    [
        (b"*", b"", False),  # the empty key matches only the empty pattern
        (b"", b"", True),
        (b"[", b"x", False),  # an unclosed, empty class matches nothing
        (b"[^", b"x", True),  # ... negated, anything
        (b"[ab", b"b", True),  # unclosed: runs to the end
        (b"[a-]", b"^", True),  # "-]" is a range a..] (0x5D-0x61), not the class's end
        (b"[a-]", b"-", False),
        (b"[\\]]", b"]", True),  # backslash escapes inside a class
        (b"\\", b"\\", True),  # a trailing backslash is itself
        (b"a\\*", b"a*", True),
        (b"a\\*", b"ab", False),
        (b"[z-a]", b"m", True),  # bounds in either order
    ],
)
def test_reference_quirks(pattern: bytes, key: bytes, expected: bool) -> None:
    for signed in (True, False):
        assert redis_match(pattern, key, signed) is expected


def test_signed_and_unsigned_char_ranges() -> None:
    # 0xC3 is -61 as a signed char: on x86 the range \xc3-z takes in all of ASCII.
    assert redis_match(b"[\xc3-z]", b"t", signed_char=True)
    assert not redis_match(b"[\xc3-z]", b"t", signed_char=False)
    # \x00-\xff is 0..-1 signed, so only those two bytes on x86; everything on ARM.
    assert not redis_match(b"[\x00-\xff]", b"t", signed_char=True)
    assert redis_match(b"[\x00-\xff]", b"t", signed_char=False)
    # Either is enough to refuse.
    assert may_match_prefix(b"[\xc3-z]cw:{*", OWN_KEY_PREFIX)
    assert may_match_prefix(b"[\x00-\xff]cw:{*", OWN_KEY_PREFIX)
    assert not may_match_prefix(b"[\x80-\xff]cw:{*", OWN_KEY_PREFIX)  # high bytes either way


def test_str_is_taken_as_utf8() -> None:
    # "é" is two bytes: "??" matches it, "?" does not.
    assert may_match_prefix("??", "é")
    assert not may_match_prefix("?", "é")
    assert example_match("x", "\udcff") is None  # any str, even one not encodable


# --- properties ------------------------------------------------------------------------

PATTERN_CHARS = "tcw:{*?[]^-\\é"
patterns = st.text(alphabet=PATTERN_CHARS, max_size=9)
prefixes = st.one_of(st.just(OWN_KEY_PREFIX), st.text(alphabet="tcw:{x", max_size=4))
SUFFIX_ALPHABET = [bytes([b]) for b in b"tc:{x-^"] + [b"\xc3"]


def short_suffixes() -> Iterator[bytes]:
    for length in range(4):
        for parts in itertools.product(SUFFIX_ALPHABET, repeat=length):
            yield b"".join(parts)


SUFFIXES = list(short_suffixes())


@settings(max_examples=300, deadline=None)
@given(patterns, prefixes)
def test_true_comes_with_a_witness(pattern: str, prefix: str) -> None:
    witness = example_match(pattern, prefix)
    assert may_match_prefix(pattern, prefix) is (witness is not None)
    if witness is not None:
        assert witness.startswith(prefix.encode())
        assert matches_somewhere(pattern.encode(), witness), witness


@settings(max_examples=250, deadline=None)
@given(patterns, prefixes)
def test_brute_force_match_implies_true(pattern: str, prefix: str) -> None:
    raw, start = pattern.encode(), prefix.encode()
    found = next((s for s in SUFFIXES if matches_somewhere(raw, start + s)), None)
    if found is not None:
        assert may_match_prefix(pattern, prefix), start + found


# --- the reference against Redis ----------------------------------------------------------


@pytest.fixture(scope="module")
def keys_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server holding every key in KEYS (module-wide: KEYS only reads)."""
    server = RedisServer(Path(tmp_path_factory.mktemp("glob-redis")))
    server.start()
    try:
        with server.client(decode_responses=False) as client:
            client.mset(dict.fromkeys(KEYS, b"1"))
        yield server
    finally:
        server.stop()


KEYS = sorted({OWN_KEY_PREFIX.encode() + s for s in SUFFIXES[:80]}
              | {b"".join(p) for n in range(1, 4)
                 for p in itertools.product([b"t", b"c", b"w", b":", b"{", b"\xc3", b"\xa9",
                                             b"\\", b"]", b"-"], repeat=n)})  # fmt: skip
# The redis-server runs here: its C char is signed on x86, unsigned on ARM.
SIGNED_CHAR = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


@settings(max_examples=150, deadline=None)
@given(patterns)
def test_reference_agrees_with_redis(keys_server: RedisServer, pattern: str) -> None:
    raw = pattern.encode()
    with keys_server.client(decode_responses=False) as client:
        got = set(client.keys(raw))
    expected = {key for key in KEYS if redis_match(raw, key, SIGNED_CHAR)}
    assert got == expected
