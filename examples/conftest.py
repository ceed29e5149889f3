"""Fixtures for the examples' tests: the same ones the test suite uses (tests/conftest.py).

pytest gives a conftest's fixtures only to the tests under its own folder, so the examples
import them from the suite's conftest: ``redis_url`` (a private redis-server on a free loopback
port, never 6379), ``namespace`` (a fresh key namespace per test), ``private_redis`` and the
asyncio-only ``anyio_backend``. ``serve`` is the examples' own: a worker and a coordinator in a
background thread, for the web apps' tests, which are synchronous like their test clients.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager

import anyio
import pytest
from anyio.from_thread import start_blocking_portal

from streamflow import App, Client, Coordinator, Worker
from tests.conftest import anyio_backend, namespace, private_redis, redis, redis_server, redis_url

__all__ = [
    "anyio_backend",
    "namespace",
    "private_redis",
    "redis",
    "redis_server",
    "redis_url",
    "serve",
]


@asynccontextmanager
async def _running(app: App, redis_url: str, namespace: str) -> AsyncIterator[Worker]:
    """What `streamflow worker` and `streamflow coordinator` run, for the block."""
    async with Client.from_url(redis_url, namespace=namespace) as client:
        worker = Worker(app, client.redis, namespace=namespace, block_ms=100)
        coordinator = Coordinator(client.redis, app=app, namespace=namespace, block_ms=100)
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)  # registers the roles that submit() checks graphs against
            await tg.start(coordinator.run)
            try:
                yield worker
            finally:
                worker.stop()
                coordinator.stop()


@pytest.fixture
def serve(
    redis_url: str, namespace: str
) -> Iterator[Callable[[App], AbstractContextManager[Worker]]]:
    """``with serve(app):`` runs a worker of ``app`` and a coordinator in a background thread.

    They run in an event loop of their own (an anyio blocking portal), so that a synchronous
    test client (FastAPI's, Django's) can block the test's thread meanwhile.
    """
    with start_blocking_portal() as portal:

        @contextmanager
        def serving(app: App) -> Iterator[Worker]:
            with portal.wrap_async_context_manager(_running(app, redis_url, namespace)) as w:
                yield w

        yield serving
