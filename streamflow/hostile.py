"""Hostile JSON: what a worker refuses before it trusts a message.

Publishers may be anywhere, so every message is treated as untrusted input. Beyond the size
limit (checked before parsing) a message is refused when it nests deeper than
:data:`MAX_DEPTH`, holds a list longer than :data:`MAX_ITEMS` or a string longer than
:data:`MAX_STRING`, an integer outside 64 bits, ``NaN`` or ``Infinity`` (not JSON, but accepted
by lenient parsers), a duplicate key (parsers disagree on which value wins: a classic smuggling
trick), or invalid UTF-8.

The full check parses with hooks and costs about ten microseconds, so the worker's hot path
lets the fast parser (pydantic's) read the message first and then looks at what it returned
(:func:`measure`): the fast parser keeps integers past 64 bits, infinities and ``NaN`` as
values, so a walk of the parsed payload sees every limit break but one, and runs the full check
only when it finds one. That one is a duplicate key, which the fast parser silently drops: it is
caught by comparing the number of key tokens in the bytes (:func:`key_tokens`) with the number
of keys the parser kept. A message the fast parser refuses gets the byte-level :func:`screen`,
and the full check when it fires, before the reason is named.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any

from streamflow.errors import ProtocolError

#: Deepest nesting of arrays and objects accepted.
MAX_DEPTH = 32
#: Longest array accepted.
MAX_ITEMS = 10_000
#: Longest string accepted, in characters.
MAX_STRING = 256 * 1024
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _byte_class(byte: int) -> int:
    char = chr(byte)
    if byte < 128 and char.isdigit():
        return ord("0")
    if char in "eE":
        return ord("e")
    if char in "[{":
        return ord("b")
    if char in " \t\r\n":
        return ord("w")
    return {'"': ord("q"), ":": ord("c"), "+": ord("+")}.get(char, ord("."))


# The screen maps every byte to a class in one C ``translate``, then looks at the classes:
# brackets (the deepest possible nesting), 19 digits in a row (an integer that may pass 64
# bits), a 3-digit exponent (a float that may overflow), and a quote followed by a colon or
# white space (where every object key ends).
_CLASSES = bytes(_byte_class(b) for b in range(256))
_SUSPECT_RUNS = (b"0" * 19, b"e000", b"e+000")


def screen(raw: bytes) -> tuple[bool, int]:
    """A cheap look at a message's bytes before and after the fast parser reads it.

    Returns:
        Whether the message may break a limit and must get the full :func:`check`; and an
        upper bound on the object keys written in it (a key's closing quote is followed by
        ``:`` or white space; a string value's may be too, so the bound can only be too high).
        When the bound equals the number of keys the parser kept, no key was written twice.
    """
    classes = raw.translate(_CLASSES)
    suspect = (
        len(raw) > 2 * MAX_ITEMS
        or classes.count(b"b") > MAX_DEPTH
        or b"NaN" in raw
        or b"Infinity" in raw
        or any(run in classes for run in _SUSPECT_RUNS)
    )
    return suspect, classes.count(b"qc") + classes.count(b"qw")


def key_tokens(raw: bytes) -> int:
    """An upper bound on the object keys written in ``raw`` (the count :func:`screen` returns).

    A key's closing quote is followed by ``:`` or white space; a string value's may be too, so
    the bound can only be too high. When it equals the number of keys the parser kept, no key
    was written twice.
    """
    count = raw.count(b'":')
    # A one-byte search is a memchr, several times faster than a two-byte one: look for a
    # white space byte first (most messages have none, or only spaces).
    for space, quoted in _QUOTED_SPACES:
        if space in raw:
            count += raw.count(quoted)
    return count


_QUOTED_SPACES = tuple((space, b'"' + space) for space in (b" ", b"\n", b"\t", b"\r"))


def measure(value: Any, depth: int = 1) -> int | None:
    """Walk a value the fast parser returned: how many object keys it holds, at every level.

    Args:
        value: A parsed JSON value (dicts, lists, str, int, float, bool, None).
        depth: The nesting depth of ``value`` in its message (1 for the message itself).

    Returns:
        The number of keys; or None when the value breaks (or may break) a limit of
        :func:`check`: nesting past :data:`MAX_DEPTH`, a list longer than :data:`MAX_ITEMS`, a
        string longer than :data:`MAX_STRING`, an integer outside 64 bits, or a float that is
        not finite (``NaN``, ``Infinity`` or an overflowing number, which the fast parser
        accepts). Then the caller runs :func:`check`, which names the reason.
    """
    kind = type(value)
    if kind is dict:
        return _walk(value.values(), len(value), depth)
    if kind is list:
        return None if len(value) > MAX_ITEMS else _walk(value, 0, depth)
    return 0 if _scalar_ok(value) else None


def _walk(children: Iterable[Any], keys: int, depth: int) -> int | None:
    """:func:`measure` of a container's children: ``keys`` plus theirs, or None.

    Recursive, without a stack of its own: most payloads are one flat object, walked in one
    loop; the depth limit bounds the recursion.
    """
    if depth > MAX_DEPTH:
        return None
    for child in children:
        kind = type(child)
        # The most common scalars first, checked here: a call per string costs more than its
        # check (a fifth of the walk of a payload of a few short strings and numbers).
        if kind is int:
            if not INT64_MIN <= child <= INT64_MAX:
                return None
        elif kind is str:
            if len(child) > MAX_STRING:
                return None
        elif kind is dict or kind is list:
            inner = measure(child, depth + 1)
            if inner is None:
                return None
            keys += inner
        elif not _scalar_ok(child):
            return None
    return keys


def _scalar_ok(value: Any) -> bool:
    """Whether a parsed scalar is within the limits."""
    kind = type(value)
    if kind is int:
        return INT64_MIN <= value <= INT64_MAX  # type: ignore[no-any-return]
    if kind is str:
        return len(value) <= MAX_STRING
    if kind is float:
        return math.isfinite(value)
    return True  # bool or None


def check(raw: bytes, what: str = "message") -> Any:
    """Parse ``raw`` strictly, refusing everything the module docstring lists.

    Returns:
        The parsed value.

    Raises:
        ProtocolError: ``invalid_json`` (not strict JSON: bad UTF-8, NaN, big integers,
            duplicate keys) or ``too_complex`` (past a nesting, list or string limit).
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError("invalid_json", f"{what} is not UTF-8: {exc.reason}", raw) from None
    try:
        value = _DECODER.decode(text)
    except _Refused as exc:
        raise ProtocolError(exc.reason, f"{what} {exc}", raw) from None
    except RecursionError:
        raise ProtocolError("too_complex", f"{what} nests deeper than {MAX_DEPTH}", raw) from None
    except ValueError as exc:
        raise ProtocolError("invalid_json", f"{what} is not valid JSON: {exc}", raw) from None
    _check_shape(value, raw, what)
    return value


class _Refused(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        duplicate = ""
        for key, _ in pairs:
            if key in seen:
                duplicate = key
                break
            seen.add(key)
        raise _Refused("invalid_json", f"has the key {duplicate[:100]!r} twice")
    return obj


def _constant(name: str) -> Any:
    raise _Refused("invalid_json", f"holds {name}, which is not JSON")


def _integer(digits: str) -> int:
    value = int(digits)
    if not INT64_MIN <= value <= INT64_MAX:
        raise _Refused("invalid_json", f"holds the integer {digits[:40]}, outside 64 bits")
    return value


def _float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _Refused("invalid_json", f"holds the number {text[:40]}, too large for a double")
    return value


_DECODER = json.JSONDecoder(
    object_pairs_hook=_pairs, parse_constant=_constant, parse_int=_integer, parse_float=_float
)


def _check_shape(value: Any, raw: bytes, what: str) -> None:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > MAX_DEPTH:
                raise ProtocolError("too_complex", f"{what} nests deeper than {MAX_DEPTH}", raw)
            if isinstance(item, list):
                if len(item) > MAX_ITEMS:
                    detail = f"{what} holds a list of {len(item)} items, limit {MAX_ITEMS}"
                    raise ProtocolError("too_complex", detail, raw)
                stack.extend((child, depth + 1) for child in item)
            else:
                stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, str) and len(item) > MAX_STRING:
            detail = f"{what} holds a string of {len(item)} characters, limit {MAX_STRING}"
            raise ProtocolError("too_complex", detail, raw)
