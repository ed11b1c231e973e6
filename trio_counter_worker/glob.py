"""Redis glob patterns as plain logic: what a KEYS, SCAN MATCH or PSUBSCRIBE pattern can match.

The semantics are those of Redis's ``stringmatchlen`` (``src/util.c``), byte for byte:
``*`` matches any run of bytes, ``?`` one byte, ``[abc]`` ``[^abc]`` ``[a-z]`` one byte of
a class (range bounds in either order, ``\\`` escapes inside a class too, an unclosed
class runs to the end of the pattern), ``\\x`` the byte ``x``; the empty key matches only
the empty pattern. A ``str`` is taken as its UTF-8 bytes, as redis-py sends it.

Redis compares range bounds as C ``char``: signed on x86, unsigned on ARM. That only
matters for bytes above 0x7F; both readings are tried, so "cannot match" holds on either.
Redis also gives up on patterns nested more than 1000 stars deep; this module does not,
so it may say "may match" where Redis would not: the safe side for its use, refusing a
``COUNTER_KEY`` that could match the worker's own keys.
"""

from __future__ import annotations

__all__ = ["example_match", "matches", "may_match_prefix"]

_ANY = (1 << 256) - 1  # a byte set as a 256-bit mask: bit b set means byte b matches
_STAR = -1  # a token that is not a byte set


def may_match_prefix(pattern: str | bytes, prefix: str | bytes) -> bool:
    """Whether the Redis glob ``pattern`` matches at least one key starting with ``prefix``."""
    return example_match(pattern, prefix) is not None


def example_match(pattern: str | bytes, prefix: str | bytes) -> bytes | None:
    """A key starting with ``prefix`` that ``pattern`` matches, or None if there is none."""
    raw_pattern, raw_prefix = _bytes(pattern), _bytes(prefix)
    for signed_char in (True, False):
        found = _complete(_tokens(raw_pattern, signed_char), raw_prefix)
        if found is not None:
            return found
    return None


def matches(pattern: str | bytes, key: str | bytes, *, signed_char: bool = True) -> bool:
    """Whether Redis matches ``key`` against ``pattern`` (KEYS, SCAN MATCH), exactly.

    ``signed_char``: compare range bounds as Redis built for x86 does (for ARM, False).
    The library's Lua port of the matcher (:mod:`trio_counter_worker.functions`) is held
    to this function and to a real redis-server by ``tests/test_functions.py``.
    """
    raw_pattern, raw_key = _bytes(pattern), _bytes(key)
    if not raw_key:  # util.c never enters its loop: only the empty pattern matches
        return not raw_pattern
    tokens = _tokens(raw_pattern, signed_char)
    states = _closure({0}, tokens)
    for byte in raw_key:
        states = _step(states, tokens, byte)
        if not states:
            return False
    return len(tokens) in states


def _bytes(text: str | bytes) -> bytes:
    # surrogatepass: a pure function answers for any str, even one redis-py could not send.
    return text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")


def _tokens(pattern: bytes, signed_char: bool) -> list[int]:
    """The pattern as one token per byte it consumes: a byte-set mask, or _STAR."""
    tokens: list[int] = []
    i, n = 0, len(pattern)
    while i < n:
        byte = pattern[i]
        if byte == ord("*"):
            if not tokens or tokens[-1] != _STAR:  # a run of stars is one star
                tokens.append(_STAR)
            i += 1
        elif byte == ord("?"):
            tokens.append(_ANY)
            i += 1
        elif byte == ord("["):
            mask, i = _class(pattern, i + 1, signed_char)
            tokens.append(mask)
        elif byte == ord("\\") and i + 1 < n:
            tokens.append(1 << pattern[i + 1])
            i += 2
        else:  # a lone trailing backslash is itself
            tokens.append(1 << byte)
            i += 1
    return tokens


def _class(pattern: bytes, i: int, signed_char: bool) -> tuple[int, int]:
    """The byte set of the class whose body starts at ``pattern[i]``, and the index after it.

    Mirrors util.c step by step, including its reads of the terminating NUL (``at``)."""
    n = len(pattern)

    def at(k: int) -> int:
        return pattern[k] if k < n else 0

    negate = at(i) == ord("^")
    if negate:
        i += 1
    mask = 0
    while True:
        left = n - i
        if at(i) == ord("\\") and left >= 2:
            i += 1
            mask |= 1 << at(i)
        elif at(i) == ord("]"):
            break
        elif left == 0:  # unclosed: the class ends with the pattern
            i -= 1
            break
        elif left >= 3 and at(i + 1) == ord("-"):
            mask |= _range(at(i), at(i + 2), signed_char)
            i += 2
        else:
            mask |= 1 << at(i)
        i += 1
    return (_ANY & ~mask if negate else mask), i + 1


def _range(start: int, end: int, signed_char: bool) -> int:
    def value(byte: int) -> int:
        return byte - 256 if signed_char and byte >= 0x80 else byte

    low, high = sorted((value(start), value(end)))
    mask = 0
    for byte in range(256):
        if low <= value(byte) <= high:
            mask |= 1 << byte
    return mask


def _closure(states: set[int], tokens: list[int]) -> set[int]:
    """Add the states reached by letting each star match nothing."""
    out = set(states)
    for state in sorted(states):
        while state < len(tokens) and tokens[state] == _STAR:
            state += 1
            out.add(state)
    return out


def _complete(tokens: list[int], prefix: bytes) -> bytes | None:
    """Run the prefix through the tokens, then finish the key with one byte per token left."""
    states = _closure({0}, tokens)
    for byte in prefix:
        states = _step(states, tokens, byte)
        if not states:
            return None
    for state in sorted(states):
        rest = [token for token in tokens[state:] if token != _STAR]
        if all(rest):  # every byte set left has a byte in it
            key = prefix + bytes(_lowest(token) for token in rest)
            if not key and tokens:  # only stars, and "*" does not match the empty key
                key = b"\x00"
            return key
    return None


def _step(states: set[int], tokens: list[int], byte: int) -> set[int]:
    """The states after one more byte of the key (empty: no match is possible)."""
    moved = set()
    for state in states:
        if state == len(tokens):
            continue
        token = tokens[state]
        if token == _STAR:
            moved.add(state)
        elif token >> byte & 1:
            moved.add(state + 1)
    return _closure(moved, tokens) if moved else moved


def _lowest(mask: int) -> int:
    return (mask & -mask).bit_length() - 1
