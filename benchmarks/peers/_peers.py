"""The peers' no-op apps, built the same way by the publisher (run.py) and the worker process.

Each builder takes a namespace (so that every measurement has keys of its own) and the function
the no-op job calls with its payload: nothing in the publisher, a counter or a clock in the
worker. taskiq and dramatiq are imported here only, so that run.py's tables and argument parsing
work without them (the project's own venv and tests).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Payload = dict[str, int]
Handler = Callable[[Payload], None]

#: The worker concurrency each peer runs with: its documented default for one worker process.
CONCURRENCY = {
    "bare": "1 (one read-handle-ack loop)",
    "streamflow": "defaults (concurrency 64, prefetch auto)",
    "taskiq": "100 async tasks (max_async_tasks default), prefetch 0",
    "dramatiq": "8 threads (worker_threads default)",
}
#: The group the bare loop reads with (benchmarks/throughput.py's bare_drain).
BARE_GROUP = "g"
TASKIQ_GROUP = "taskiq"
DRAMATIQ_QUEUE = "default"


def bare_stream(namespace: str) -> str:
    return f"{namespace}:stream"


def taskiq_stream(namespace: str) -> str:
    return f"{namespace}:taskiq"


def dramatiq_messages(namespace: str) -> str:
    """The hash of dramatiq's Redis broker holding the queue's messages until they are acked."""
    return f"{namespace}:{DRAMATIQ_QUEUE}.msgs"


def make_taskiq(url: str, namespace: str, handler: Handler) -> tuple[Any, Any]:
    """A taskiq-redis ``RedisStreamBroker`` (its defaults) and a no-op async task on it."""
    from taskiq_redis import RedisStreamBroker

    broker = RedisStreamBroker(
        url, queue_name=taskiq_stream(namespace), consumer_group_name=TASKIQ_GROUP
    )

    @broker.task(task_name="noop")
    async def noop(payload: Payload) -> None:
        handler(payload)

    return broker, noop


def make_dramatiq(url: str, namespace: str, handler: Handler) -> tuple[Any, Any]:
    """dramatiq's ``RedisBroker`` (default middleware) and a no-op actor on it.

    A plain function: dramatiq runs actors in worker threads (async actors need its AsyncIO
    middleware, which is not its default).
    """
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker

    broker = RedisBroker(url=url, namespace=namespace)

    def noop(payload: Payload) -> None:
        handler(payload)

    actor = dramatiq.actor(noop, broker=broker, actor_name="noop", queue_name=DRAMATIQ_QUEUE)
    return broker, actor


def versions() -> dict[str, str]:
    """The installed versions of the peers and the client (``-`` when one is missing)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("redis", "hiredis", "taskiq", "taskiq-redis", "dramatiq"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "-"
    return out
