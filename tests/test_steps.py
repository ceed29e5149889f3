"""streamflow.steps: one operation run on an asyncio and on a blocking Redis client.

The operations themselves (publishing, layouts, cancel lookups) are tested through both clients
in ``tests/test_client.py``; here only the drivers' contract, with one step run on both kinds
of client: replies go back where the call was written, and so do Redis errors, which the step
may catch or let through.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from streamflow import connect, steps


def read_fields(client: Any, keys: list[str]) -> steps.Steps[list[str]]:
    """HGET ``f`` of each key in turn; a key of another type reads as "-"."""
    found = []
    for key in keys:
        try:
            value = yield client.hget(key, "f")
        except ResponseError:  # WRONGTYPE
            value = b"-"
        found.append(bytes(value).decode())
    return found


def read_one(client: Any, key: str, closed: list[str]) -> steps.Steps[bytes]:
    try:
        value: bytes = yield client.hget(key, "f")
    finally:
        closed.append(key)
    return value


async def make_keys(redis: Redis, namespace: str) -> list[str]:
    keys = [f"{namespace}:{name}" for name in ("a", "text", "c")]
    await redis.hset(keys[0], "f", "A")
    await redis.set(keys[1], "not a hash")
    await redis.hset(keys[2], "f", "C")
    return keys


@pytest.mark.anyio
async def test_one_step_reads_the_same_on_the_asyncio_and_the_blocking_client(
    redis: Redis, redis_url: str, namespace: str
) -> None:
    keys = await make_keys(redis, namespace)
    with anyio.fail_after(10):
        assert await steps.run(read_fields(redis, keys)) == ["A", "-", "C"]
    blocking = connect.connect_sync(redis_url)
    try:
        assert steps.run_blocking(read_fields(blocking, keys)) == ["A", "-", "C"]
    finally:
        blocking.close()


@pytest.mark.anyio
async def test_an_error_the_step_lets_through_leaves_the_driver_and_closes_the_step(
    redis: Redis, redis_url: str, namespace: str
) -> None:
    text = (await make_keys(redis, namespace))[1]
    closed: list[str] = []
    with anyio.fail_after(10), pytest.raises(ResponseError, match="WRONGTYPE"):
        await steps.run(read_one(redis, text, closed))
    blocking = connect.connect_sync(redis_url)
    try:
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            steps.run_blocking(read_one(blocking, text, closed))
    finally:
        blocking.close()
    assert closed == [text, text]
