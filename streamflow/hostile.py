"""Hostile JSON: what a worker refuses before it trusts a message.

Publishers may be anywhere, so every message is treated as untrusted input. Beyond the size
limit (checked before parsing) a message is refused when it nests deeper than
:data:`MAX_DEPTH`, holds a list longer than :data:`MAX_ITEMS` or a string longer than
:data:`MAX_STRING`, an integer outside 64 bits, ``NaN`` or ``Infinity`` (not JSON, but accepted
by lenient parsers), a duplicate key (parsers disagree on which value wins: a classic smuggling
trick), or invalid UTF-8.

The full check parses with hooks and costs a few microseconds, so the worker's hot path runs
cheap byte-level screen first (:func:`screen`) and the full check only when it fires; a
duplicate key, which the fast parser silently drops, is caught by comparing the number of key
tokens in the bytes with the number of keys the parser kept.
"""

from __future__ import annotations

import json
import math
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


def count_keys(value: Any) -> int:
    """How many object keys a parsed JSON value holds, at every level."""
    count = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            count += len(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count


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
