"""streams.read_group's one-pass reply: the same entries whatever the client speaks."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from redis.asyncio import Redis

from streamflow import streams
from streamflow.keys import GROUP

pytestmark = pytest.mark.anyio

CLIENTS = [{}, {"protocol": 2}, {"protocol": 3}, {"decode_responses": True}]


@pytest.mark.parametrize("options", CLIENTS, ids=["default", "resp2", "resp3", "decoded"])
async def test_read_group_gives_the_same_entries_over_resp2_and_resp3(
    redis_url: str, namespace: str, options: dict[str, Any]
) -> None:
    """One field, several fields, nothing new (blocking or not), and an entry deleted while
    pending (re-read with null fields): the entries redis-py's own parsing would give."""
    client = Redis.from_url(redis_url, **options)
    stream = f"{namespace}:s"
    try:
        with anyio.fail_after(10):
            await streams.ensure_group(client, stream)
            first = await client.xadd(stream, {"message": b"{}"})
            second = await client.xadd(stream, {"a": b"1", "b": b"2"})
            entries = await streams.read_group(client, stream, "c", count=10, block_ms=None)
            assert [(e.id, e.fields, e.deliveries) for e in entries] == [
                (first, {_key(client, "message"): _key(client, "{}")}, 1),
                (
                    second,
                    {_key(client, "a"): _key(client, "1"), _key(client, "b"): _key(client, "2")},
                    1,
                ),
            ]
            assert await streams.read_group(client, stream, "c", count=10, block_ms=None) == []
            assert await streams.read_group(client, stream, "c", count=10, block_ms=5) == []
            await client.xdel(stream, first)
            again = await streams.read_group(
                client, stream, "c", count=10, block_ms=None, after="0"
            )
            assert [(e.id, e.fields) for e in again] == [(first, {}), (second, entries[1].fields)]
            # Any other XREADGROUP on the client keeps redis-py's reply shape.
            plain: Any = await client.xreadgroup(GROUP, "c", {stream: "0"}, count=1)
            expected: Any = {_key(client, stream): [[(first, {})]]}
            if options.get("protocol") != 3:
                expected = [[_key(client, stream), [(first, {})]]]
            assert plain == expected
    finally:
        await client.aclose()


def _key(client: Redis, value: str) -> Any:
    """``value`` as the client returns it (str with decoding on, else bytes)."""
    decoding = client.connection_pool.connection_kwargs.get("decode_responses", False)
    return value if decoding else value.encode()


async def test_a_worker_read_leaves_the_clients_own_reads_alone_after_a_resp2_fallback(
    private_redis: Any, namespace: str
) -> None:
    """A server (or proxy) that refuses HELLO makes redis-py fall back to RESP2 per connection:
    the caller's own XREADGROUP on the client a worker reads with still parses."""
    server = private_redis(extra_args=["--rename-command", "HELLO", ""])
    client = Redis.from_url(server.url)
    stream = f"{namespace}:s"
    try:
        with anyio.fail_after(10):
            await streams.ensure_group(client, stream)
            first = await client.xadd(stream, {"message": b"{}"})
            entries = await streams.read_group(client, stream, "c", count=10, block_ms=None)
            assert [(e.id, e.fields) for e in entries] == [(first, {b"message": b"{}"})]
            plain: Any = await client.xreadgroup(GROUP, "c", {stream: "0"}, count=1)
            assert plain == [[stream.encode(), [(first, {b"message": b"{}"})]]]
    finally:
        await client.aclose()
