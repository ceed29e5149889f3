"""Hostile input: every kind is dead-lettered with its reason, and the worker keeps serving."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from redis.asyncio import Redis

from streamflow import App, Context, Outcome, Worker, hostile
from streamflow.errors import ProtocolError
from streamflow.keys import Keys
from streamflow.protocol import decode_dead_letter, decode_job
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
    worker = Worker(app, redis, namespace=namespace, on_outcome=outcomes.append)
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
