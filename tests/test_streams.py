"""streams.read_group's one-pass reply: the same entries whatever the client speaks, through
the pool or on a held connection."""

from __future__ import annotations

import functools
from typing import Any

import anyio
import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from streamflow import intake, pipelines, streams
from streamflow.keys import GROUP
from streamflow.scripts import Scripts
from tests.helpers import wait_for_query

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


@pytest.mark.parametrize("options", CLIENTS, ids=["default", "resp2", "resp3", "decoded"])
async def test_read_group_on_a_held_connection_gives_what_the_pool_path_gives(
    redis_url: str, namespace: str, options: dict[str, Any]
) -> None:
    """The held connection's raw reply builds the same entries (and raises the same errors)."""
    client = Redis.from_url(redis_url, **options)
    held = pipelines.Held(client.connection_pool)
    stream = f"{namespace}:s"
    try:
        with anyio.fail_after(10):
            with pytest.raises(ResponseError, match="NOGROUP"):
                await streams.read_group(client, stream, "c", count=1, block_ms=None, held=held)
            await streams.ensure_group(client, stream)
            await client.xadd(stream, {"message": b"{}"})
            await client.xadd(stream, {"a": b"1", "b": b"2"})
            got = await streams.read_group(client, stream, "c", count=10, block_ms=5, held=held)
            assert (
                await streams.read_group(client, stream, "c", count=10, block_ms=5, held=held) == []
            )
            again = await streams.read_group(
                client, stream, "c", count=10, block_ms=None, after="0"
            )
            assert [(e.id, e.fields) for e in got] == [(e.id, e.fields) for e in again]
    finally:
        await held.aclose()
        await client.aclose()


async def test_a_held_read_cancelled_mid_flight_is_reconnected_not_reused(
    redis: Redis, namespace: str
) -> None:
    """A blocked read cut short leaves its reply unread: the next read is on a new connection
    and gets its own reply; closing gives the connection back to the pool."""
    stream = f"{namespace}:s"
    held = pipelines.Held(redis.connection_pool)
    read = functools.partial(streams.read_group, redis, stream, "c", count=1, held=held)
    await streams.ensure_group(redis, stream)
    pool: Any = redis.connection_pool
    with anyio.fail_after(10):
        first_id = await held.execute(("CLIENT", "ID"))
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(read, block_ms=5000))
            await wait_for_query(lambda: _blocked(redis, first_id))
            tg.cancel_scope.cancel()
        await wait_for_query(lambda: _gone(redis, first_id))
        entry_id = await redis.xadd(stream, {"message": b"{}"})
        assert [e.id for e in await read(block_ms=None)] == [entry_id]
        assert await held.execute(("CLIENT", "ID")) != first_id
        assert len(pool._in_use_connections) == 1  # held between reads
        await held.aclose()
    assert not pool._in_use_connections


async def test_a_group_reader_gives_its_held_connections_back_to_the_pool(
    redis: Redis, namespace: str
) -> None:
    reader = intake.GroupReader(redis, Scripts(redis), GROUP, "c", lease_ms=30_000)
    pool: Any = redis.connection_pool
    with anyio.fail_after(10):
        for stream in (f"{namespace}:a", f"{namespace}:b"):
            await streams.ensure_group(redis, stream)
            await redis.xadd(stream, {"message": b"{}"})
            assert len(await reader.read(stream, count=5, block_ms=None)) == 1
            assert await reader.read(stream, count=5, block_ms=None) == []
        assert len(pool._in_use_connections) == 2  # one per stream read
        await reader.aclose()
    assert not pool._in_use_connections


async def _blocked(redis: Redis, client_id: int) -> bool:
    clients: Any = await redis.client_list()
    return any(int(c["id"]) == client_id and "b" in c["flags"] for c in clients)


async def _gone(redis: Redis, client_id: int) -> bool:
    clients: Any = await redis.client_list()
    return all(int(c["id"]) != client_id for c in clients)


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
            second = await client.xadd(stream, {"message": b"[]"})
            held = pipelines.Held(client.connection_pool)
            entries = await streams.read_group(
                client, stream, "c", count=10, block_ms=None, held=held
            )
            await held.aclose()
            assert [(e.id, e.fields) for e in entries] == [(second, {b"message": b"[]"})]
    finally:
        await client.aclose()
