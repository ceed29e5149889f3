"""One-call publishes coalesced into pipelines on one held connection (streamflow.pipelines)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from redis.asyncio import Redis

from streamflow import Client, PayloadError, RedisUnavailable, SyncClient
from streamflow.errors import CancelledIdWarning, RedisCommandError
from streamflow.keys import Keys
from streamflow.ops.server import RedisServer
from streamflow.pipelines import AutoPipeline, _pack
from streamflow.protocol import decode_job

pytestmark = pytest.mark.anyio

#: Keeps Redis busy for ``ARGV[1]`` ms (a script blocks every other client meanwhile), so that
#: publishes sent meanwhile are on the wire or queued behind one that is, for sure.
BUSY = """
local t = redis.call('TIME')
local start = t[1] * 1000 + t[2] / 1000
repeat
  t = redis.call('TIME')
until t[1] * 1000 + t[2] / 1000 - start >= tonumber(ARGV[1])
return 1
"""


async def published(redis: Redis, namespace: str, role: str) -> list[str]:
    entries = await redis.xrange(Keys(namespace).role_stream(role))
    return [decode_job(fields).id for _, fields in entries]


async def client_connections(redis: Redis) -> int:
    clients = await redis.client_list()
    return sum(1 for c in clients if c.get("name") == "streamflow-client")


async def busy_redis(redis: Redis, ms: int, started: Callable[[], None]) -> None:
    """Run BUSY on its own connection; ``started`` once the script is on its way."""
    started()
    await redis.eval(BUSY, 0, ms)


async def test_concurrent_publishes_share_one_connection_and_each_is_delivered_once(
    redis: Redis, redis_url: str, namespace: str
) -> None:
    ids: dict[int, str] = {}
    async with Client.from_url(redis_url, namespace=namespace) as client:
        ids[-1] = await client.publish("bulk", "warm-up")  # reads the role's layout once

        async def publish(i: int) -> None:
            ids[i] = await client.publish("bulk", {"i": i})

        async with anyio.create_task_group() as tg:
            for i in range(500):
                tg.start_soon(publish, i)
        # Without coalescing, 500 concurrent calls check out up to 64 pooled connections.
        assert await client_connections(redis) == 1
    assert len(set(ids.values())) == 501
    assert sorted(await published(redis, namespace, "bulk")) == sorted(ids.values())


async def test_one_callers_publishes_keep_their_order_among_concurrent_ones(
    redis: Redis, redis_url: str, namespace: str
) -> None:
    async with Client.from_url(redis_url, namespace=namespace) as client:
        mine: list[str] = []

        async def sequence() -> None:
            for i in range(100):
                mine.append(await client.publish("ordered", {"i": i}))

        async def noise() -> None:
            for i in range(100):
                await client.publish("ordered", {"noise": i})

        async with anyio.create_task_group() as tg:
            tg.start_soon(sequence)
            for _ in range(5):
                tg.start_soon(noise)
    ids = await published(redis, namespace, "ordered")
    assert [i for i in ids if i in set(mine)] == mine


async def test_an_error_in_one_publish_does_not_fail_the_others(
    redis: Redis, redis_url: str, namespace: str
) -> None:
    keys = Keys(namespace)
    async with Client.from_url(redis_url, namespace=namespace) as client:
        for role in ("good", "broken"):  # layouts cached: every call below takes the fast path
            await client.publish(role, 0)
        await redis.delete(keys.role_stream("broken"))
        await redis.set(keys.role_stream("broken"), "not a stream")  # XADD: WRONGTYPE
        outcomes: dict[int, Any] = {}

        async def publish(i: int) -> None:
            role, payload = ("broken", i) if i == 7 else ("good", object() if i == 9 else i)
            try:
                outcomes[i] = await client.publish(role, payload)
            except (RedisCommandError, PayloadError) as exc:
                outcomes[i] = exc

        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(publish, i)
    assert isinstance(outcomes[7], RedisCommandError)
    assert "WRONGTYPE" in str(outcomes[7])
    assert isinstance(outcomes[9], PayloadError)
    good = {i: v for i, v in outcomes.items() if i not in (7, 9)}
    assert all(isinstance(v, str) for v in good.values())
    delivered = await published(redis, namespace, "good")
    assert sorted(delivered[1:]) == sorted(good.values())


@pytest.mark.slow
async def test_cancelled_waiting_publishes_are_not_sent_and_the_rest_go_on(
    redis: Redis, redis_url: str, namespace: str
) -> None:
    async with Client.from_url(redis_url, namespace=namespace) as client:
        await client.publish("waits", "warm-up")
        results: dict[int, str] = {}
        scopes: dict[int, anyio.CancelScope] = {}
        on_wire = anyio.Event()

        async def publish(i: int) -> None:
            with anyio.CancelScope() as scopes[i]:
                results[i] = await client.publish("waits", {"i": i})

        async with anyio.create_task_group() as tg:
            tg.start_soon(busy_redis, redis, 600, on_wire.set)
            await on_wire.wait()
            await anyio.sleep(0.1)  # the script is running: Redis answers nobody meanwhile
            for i in range(20):
                tg.start_soon(publish, i)
            await anyio.sleep(0.1)  # 0 is on the wire, 1..19 wait behind it
            for i in range(1, 20, 2):
                scopes[i].cancel()
        after = await client.publish("waits", "after")
    assert sorted(results) == list(range(0, 20, 2))
    delivered = await published(redis, namespace, "waits")
    assert sorted(delivered) == sorted([*results.values(), delivered[0], after])
    assert len(delivered) == 12


@pytest.mark.slow
async def test_cancelling_the_sender_of_a_batch_does_not_fail_the_calls_behind_it(
    redis: Redis, redis_url: str, namespace: str
) -> None:
    async with Client.from_url(redis_url, namespace=namespace) as client:
        await client.publish("lead", "warm-up")
        results: dict[int, str] = {}
        on_wire = anyio.Event()

        async def publish(i: int, scope: anyio.CancelScope | None = None) -> None:
            with scope or anyio.CancelScope():
                results[i] = await client.publish("lead", {"i": i})

        first = anyio.CancelScope()
        async with anyio.create_task_group() as tg:
            tg.start_soon(busy_redis, redis, 600, on_wire.set)
            await on_wire.wait()
            await anyio.sleep(0.1)
            tg.start_soon(publish, 0, first)
            await anyio.sleep(0.1)  # 0 sends alone and waits for Redis
            for i in range(1, 10):
                tg.start_soon(publish, i)
            await anyio.sleep(0.1)
            first.cancel()  # its connection is dropped; 1..9 go on another
    assert sorted(results) == list(range(1, 10))
    delivered = set(await published(redis, namespace, "lead"))
    assert set(results.values()) <= delivered


async def test_chosen_id_cancel_lookup_rides_in_the_same_round_trip(
    redis: Redis, redis_url: str, namespace: str
) -> None:
    async with Client.from_url(redis_url, namespace=namespace) as client:
        await client.publish("chosen", "warm-up")
        await redis.config_resetstat()
        await client.publish("chosen", 1, message_id="order-1")
        stats = await redis.info("commandstats")
    assert stats["cmdstat_exists"]["calls"] == 1
    assert stats["cmdstat_xadd"]["calls"] == 1


def test_sync_client_threads_share_the_held_connection_or_the_pool(
    redis_url: str, namespace: str
) -> None:
    ids: list[str] = []
    lock = threading.Lock()
    with SyncClient(redis_url, namespace=namespace) as client:

        def publish_many() -> None:
            for i in range(200):
                job = client.publish("threads", i)
                with lock:
                    ids.append(job)

        threads = [threading.Thread(target=publish_many) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        entries = client.redis.xrange(Keys(namespace).role_stream("threads"))
    assert sorted(decode_job(fields).id for _, fields in entries) == sorted(ids)
    assert len(set(ids)) == 800


@pytest.mark.slow
async def test_the_held_connections_reconnect_after_redis_restarts(
    private_redis: Callable[..., RedisServer], namespace: str
) -> None:
    server = private_redis()
    async with Client.from_url(server.url, namespace=namespace) as client:
        await client.publish("restarts", 1)
        with SyncClient(server.url, namespace=namespace) as sync:
            sync.publish("restarts", 1)
            server.restart()
            assert sync.publish("restarts", 2)
        await anyio.sleep(0.1)  # the event loop sees the old connection closed
        assert await client.publish("restarts", 2)
        assert await client.publish_many("restarts", [3, 4])
        server.kill()
        with pytest.raises(RedisUnavailable):
            await client.publish("restarts", 5)
        server.restart()
        await anyio.sleep(0.1)
        assert await client.publish("restarts", 6)


@pytest.mark.slow
async def test_an_asyncio_cancel_of_the_sender_of_a_shared_batch_does_not_fail_the_others(
    redis: Redis,
) -> None:
    lane = AutoPipeline(redis)
    slow = (("EVAL", BUSY, 0, 300),)
    try:
        first = asyncio.ensure_future(lane.call(slow))  # alone on the wire for 300 ms
        await asyncio.sleep(0.1)
        sender = asyncio.ensure_future(lane.call(slow))  # sends the next batch, with the rest
        await asyncio.sleep(0.01)
        rest = [asyncio.ensure_future(lane.call((("INCR", f"{key}"),))) for key in "abcde"]
        assert await first == [1]
        await asyncio.sleep(0.1)  # the second batch is on the wire: its script runs
        sender.cancel()
        assert [await call for call in rest] == [[1]] * 5
        with pytest.raises(asyncio.CancelledError):
            await sender
        assert await lane.call((("PING",),)) == [b"PONG"]  # raw replies: no callbacks
    finally:
        await lane.aclose()
        await redis.delete(*"abcde")


async def test_a_chosen_id_under_a_cancel_warns_on_the_short_way_too(
    redis: Redis, redis_url: str, namespace: str
) -> None:
    async with Client.from_url(redis_url, namespace=namespace) as client:
        await client.publish("marked", "warm-up")  # the layout is cached: the short way below
        await client.cancel("doomed", target="message", preemptive=True)
        with pytest.warns(CancelledIdWarning, match="message doomed is cancelled") as caught:
            assert await client.publish("marked", 1, message_id="doomed") == "doomed"
        assert caught[0].filename == __file__  # shown at the caller, not inside streamflow
        with SyncClient(redis_url, namespace=namespace) as sync:
            sync.publish("marked", "warm-up")
            with pytest.warns(CancelledIdWarning, match="message doomed is cancelled"):
                sync.publish("marked", 2, message_id="doomed")
    assert (await published(redis, namespace, "marked")).count("doomed") == 2  # published anyway


async def test_commands_are_packed_as_redis_py_packs_them(redis: Redis) -> None:
    connection = redis.connection_pool.make_connection()
    commands = [
        (b"XADD", "sf:{ns}:role", b"*", b"message", b'{"a":"\\xc3\\xa9"}'),
        ("EXISTS", "sf:{ns}:cancel:\u00e9", "b"),
        (b"EVALSHA", b"abc", 1, "key", -7, b""),
    ]
    assert _pack(connection, commands) == [b"".join(connection.pack_commands(commands))]
    odd = [(b"SET", b"k", 1.5)]  # a float: left to redis-py's encoder
    assert _pack(connection, odd) == connection.pack_commands(odd)
