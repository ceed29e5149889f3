"""Hostile input: every kind is dead-lettered with its reason, and the worker keeps serving."""

from __future__ import annotations

import json
import random
from typing import Any

import anyio
import pytest
from redis.asyncio import Redis

from streamflow import App, Context, Outcome, Worker, hostile
from streamflow.errors import ProtocolError
from streamflow.keys import Keys
from streamflow.protocol import Job, decode_job
from streamflow.records import decode_dead_letter
from tests.helpers import pending_count, running, wait_until

pytestmark = pytest.mark.anyio

HEAD = b'{"protocol":1,"kind":"job","id":"%s","role":"echo","created_at_ms":1,"payload":'


def job(message_id: str, payload: bytes, tail: bytes = b"") -> bytes:
    """A job written by hand, byte for byte (no encoder would write most of these)."""
    return HEAD.replace(b"%s", message_id.encode()) + payload + tail + b"}"


#: (reason, a part of the detail, the message): every hostile input a publisher could send.
HOSTILE: list[tuple[str, str, bytes]] = [
    ("invalid_json", "NaN", job("nan", b"NaN")),
    ("invalid_json", "Infinity", job("inf", b"[1, -Infinity]")),
    ("invalid_json", "outside 64 bits", job("big", b"123456789012345678901234567890")),
    ("invalid_json", "outside 64 bits", job("big2", b"9223372036854775808")),
    ("invalid_json", "outside 64 bits", job("small", b"-9223372036854775809")),
    ("invalid_json", "too large for a double", job("huge", b"1e400")),
    ("invalid_json", "'role' twice", job("dup1", b"1", b',"role":"other"')),
    ("invalid_json", "'a' twice", job("dup2", b'{"a":1,"a":2}')),
    ("invalid_json", "'a' twice", job("dup3", b'{"a" : 1, "a":2}')),
    ("invalid_json", "UTF-8", job("utf8", b'"\xff\xfe"')),
    ("too_complex", "nests deeper", job("deep", b"[" * 40 + b"]" * 40)),
    ("too_complex", "nests deeper", job("deeper", b"[" * 5000 + b"]" * 5000)),
    ("too_complex", "list of 10001 items", job("long", b"[" + b",".join([b"0"] * 10001) + b"]")),
    ("too_complex", "string of", job("str", b'"' + b"x" * (hostile.MAX_STRING + 1) + b'"')),
    ("too_large", "bytes, limit", job("size", b'"' + b"x" * 2_000_000 + b'"')),
]


@pytest.mark.parametrize(
    ("reason", "detail", "raw"),
    HOSTILE,
    ids=[h[2][52:70].decode(errors="replace") for h in HOSTILE],
)
def test_decode_refuses(reason: str, detail: str, raw: bytes) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_job({b"message": raw})
    assert caught.value.reason == reason
    assert detail in caught.value.detail


@pytest.mark.parametrize(
    "payload",
    [
        b'{"url":"a\\":b","n":-9223372036854775808,"m":9223372036854775807}',
        b'{"x" : 1, "y" : [1.5e300, -2E-300, "Infinity is a word", "NaN too"]}',
        b"[" * 31 + b"]" * 31,
        b'"' + "é€😀".encode() * 1000 + b'"',
        b"[" + b",".join([b"0"] * 10000) + b"]",
    ],
)
def test_decode_accepts_strict_json_near_the_limits(payload: bytes) -> None:
    decoded = decode_job({b"message": job("fine", payload)}, max_bytes=10_000_000)
    assert decoded.id == "fine"


def _random_value(rng: random.Random, depth: int) -> Any:
    """A JSON value that is sometimes near or past a limit."""
    kind = rng.choice(["int", "big", "float", "huge", "str", "dict", "list", "deep", "const"])
    if kind == "int":
        return rng.choice([0, -1, 2**63 - 1, -(2**63), rng.randrange(-(10**18), 10**18)])
    if kind == "big":
        return rng.choice([2**63, -(2**63) - 1, 10**30])
    if kind == "float":
        return rng.choice([1.5e300, -2e-300, 0.1, 1e308])
    if kind == "huge":
        return rng.choice(["1e400", "-1E309", "NaN", "Infinity"])  # written raw below
    if kind == "str":
        return rng.choice(['a":b', 'x" :y', "1e234", "e0001", "NaN", "é€😀", "\u0000", ""])
    if kind == "const":
        return rng.choice([True, False, None])
    if depth > 3:
        return 1
    if kind == "dict":
        return {f"k{i}": _random_value(rng, depth + 1) for i in range(rng.randrange(4))}
    if kind == "list":
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return rng.choice([[[[[[1]]]]], [1] * 10_001, [1] * 10_000])


def _write(value: Any, rng: random.Random) -> bytes:
    """JSON text of ``value`` with random white space, some strings raw (see above), sometimes
    a duplicate key."""
    sep = rng.choice([(",", ":"), (", ", ": "), (",", " :"), (",\n", ":\t")])
    text = json.dumps(value, separators=sep, ensure_ascii=False)
    for raw in ("1e400", "-1E309", "NaN", "Infinity"):
        text = text.replace(f'"{raw}"', raw, 1 if rng.random() < 0.5 else -1)
    if rng.random() < 0.2:
        text = text.replace('"k1"', '"k0"', 1)  # a duplicate key where both are written
    return text.encode()


def _full_check_first(raw: bytes) -> Job | tuple[str, str]:
    """What decoding must give a message valid but for hostile content: the full check's
    reason, or the job as the strict parser reads it."""
    try:
        hostile.check(raw)
    except ProtocolError as exc:
        return exc.reason, exc.detail
    return Job.model_validate_json(raw)


@pytest.mark.slow
def test_fast_decode_agrees_with_running_the_full_check_first() -> None:
    """The hot path skips the full check unless a look at the parsed job calls for it; on
    every message below it must decide exactly as the full check run first would."""
    rng = random.Random(20261122)
    # All but the oversized one, and invalid UTF-8, which the parser refuses too (the reason
    # is the same, the detail the parser's, as it always was).
    messages = [raw for _, detail, raw in HOSTILE[:-1] if detail != "UTF-8"]
    for n in range(3000):
        payload = _write(_random_value(rng, 1), rng)
        tail = rng.choice([b"", b',"payload":1', b',"attempt":2', b',"dedup_key":"a:b"'])
        message_id = rng.choice(["a1e234b", f"m{n}", "x:y", "e000e000"])
        messages.append(job(message_id, payload, tail))
    for raw in messages:
        expected = _full_check_first(raw)
        try:
            got: Job | tuple[str, str] = decode_job({b"message": raw})
        except ProtocolError as exc:
            got = exc.reason, exc.detail
        assert got == expected, raw[:200]


def test_key_token_count_is_the_byte_screens() -> None:
    """The hot path's count of key tokens (a quote then a colon or white space) agrees with the
    byte screen's, which classifies every byte; white space of every kind, after quotes and
    elsewhere, in keys and in string values."""
    rng = random.Random(20261207)
    spaces = [" ", "\n", "\t", "\r"]
    for n in range(2000):
        payload = _write(_random_value(rng, 1), rng)
        text = payload.decode()
        for _ in range(rng.randrange(4)):  # white space (and quotes) anywhere, valid or not
            at = rng.randrange(len(text) + 1)
            text = text[:at] + rng.choice([*spaces, '"', '" ', '"\r\n']) + text[at:]
        raw = job(f"m{n}", text.encode())
        assert hostile.key_tokens(raw) == hostile.screen(raw)[1], raw[:200]


@pytest.mark.redis
async def test_worker_dead_letters_every_hostile_input_and_keeps_serving(
    redis: Redis, namespace: str
) -> None:
    app = App()
    handled: list[Any] = []

    @app.role("echo")
    async def echo(ctx: Context, payload: Any) -> None:
        handled.append(ctx.message_id)

    keys = Keys(namespace)
    stream = keys.role_stream("echo")
    for n, (_, _, raw) in enumerate(HOSTILE):
        await redis.xadd(stream, {b"message": job(f"good{n}", b'{"n":%d}' % n)})
        await redis.xadd(stream, {b"message": raw})
    outcomes: list[Outcome] = []
    worker = Worker(app, redis, namespace=namespace, block_ms=100, on_outcome=outcomes.append)
    with anyio.fail_after(20):
        async with running(worker):
            await wait_until(lambda: len(outcomes) == 2 * len(HOSTILE))
            assert not worker.stopping
    assert sorted(handled) == sorted(f"good{n}" for n in range(len(HOSTILE)))
    letters = [decode_dead_letter(f) for _, f in await redis.xrange(keys.dead_letters("echo"))]
    by_raw = {raw["message"]: letter for letter, raw in letters}
    for reason, detail, raw in HOSTILE:
        letter = by_raw[raw[: 1024 * 1024]]  # raw fields are kept, cut at the size limit
        assert (letter.reason, detail in letter.detail) == (reason, True), letter.detail
    assert await redis.xlen(stream) == 0
    assert await pending_count(redis, stream) == 0
