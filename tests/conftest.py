"""Shared fixtures: a session redis-server on a free loopback port, namespaces, extra servers."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from redis.asyncio import Redis

from streamflow import connect
from streamflow.ops.server import RedisServer


def _require_redis_server() -> None:
    """Skip the test when redis-server is missing, or fail it on CI where it must be present."""
    if RedisServer.available():
        return
    message = (
        "redis-server is not on PATH; install it with: apt-get install redis-server "
        "(Debian/Ubuntu) or brew install redis (macOS)"
    )
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but {message}", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """Run `@pytest.mark.anyio` tests on asyncio only (session scope allows async fixtures)."""
    return "asyncio"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One private redis-server (AOF off) shared by the whole test session."""
    _require_redis_server()
    with RedisServer(appendonly=False) as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of the session redis-server."""
    return redis_server.url


@pytest.fixture
def namespace() -> str:
    """A namespace no other test uses, so tests can share the session server."""
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
def private_redis() -> Iterator[Callable[..., RedisServer]]:
    """A factory that starts a dedicated `RedisServer(**kwargs)`; all are stopped at teardown.

    For tests that kill, pause or restart Redis without disturbing the session server.
    """
    _require_redis_server()
    servers: list[RedisServer] = []

    def start(**kwargs: Any) -> RedisServer:
        server = RedisServer(**kwargs)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    """An asyncio client of the session server (streamflow's settings: no client retries)."""
    client = connect.connect(redis_url)
    yield client
    await client.aclose()
