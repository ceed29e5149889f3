"""Fixtures for the examples' tests: the same ones the test suite uses (tests/conftest.py).

pytest gives a conftest's fixtures only to the tests under its own folder, so the examples
import them from the suite's conftest: ``redis_url`` (a private redis-server on a free loopback
port, never 6379), ``namespace`` (a fresh key namespace per test), ``private_redis`` and the
asyncio-only ``anyio_backend``.
"""

from tests.conftest import anyio_backend, namespace, private_redis, redis, redis_server, redis_url

__all__ = ["anyio_backend", "namespace", "private_redis", "redis", "redis_server", "redis_url"]
