"""``streamflow demo``: a worker processing published messages, on a Redis it starts itself."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
from pydantic import BaseModel
from redis.asyncio import Redis

from streamflow import streams
from streamflow.app import App
from streamflow.client import Client
from streamflow.context import Context
from streamflow.keys import Keys
from streamflow.server import RedisServer
from streamflow.worker import Worker

Echo = Callable[[str], None]
NAMESPACE = "sf-demo"


class Reading(BaseModel):
    """A sensor reading, the demo's payload."""

    sensor: str
    celsius: float


def demo_app(totals: dict[str, float]) -> App:
    """One role, ``readings``, that sums the temperatures it sees."""
    app = App()

    @app.role("readings")
    async def readings(ctx: Context, reading: Reading) -> None:
        totals[reading.sensor] = totals.get(reading.sensor, 0.0) + reading.celsius

    return app


@contextmanager
def redis_for_demo(url: str | None, echo: Echo) -> Iterator[str | None]:
    """Yield a Redis URL: the given one, a private redis-server, or None for in-process fake."""
    if url is not None:
        echo(f"using Redis at {streams.redact_url(url)}")
        yield url
        return
    if not RedisServer.available():
        echo("redis-server not found: running on the in-process fake Redis instead.")
        echo("  (for the real thing: apt-get install redis-server, or brew install redis)")
        yield None
        return
    with RedisServer() as server:
        echo(f"started a private redis-server on port {server.port} (pid {server.pid})")
        yield server.url


async def run_demo(url: str | None, messages: int, concurrency: int, echo: Echo) -> dict[str, Any]:
    """Publish ``messages`` readings plus two malformed entries and let a worker process them."""
    redis: Redis
    if url is None:
        import fakeredis

        redis = fakeredis.FakeAsyncRedis()
    else:
        redis = streams.connect(url, name="streamflow-demo")
        await streams.ping(redis, url)
    totals: dict[str, float] = {}
    keys = Keys(NAMESPACE)
    try:
        await redis.delete(keys.role_stream("readings"), keys.dead_letters("readings"))
        worker = Worker(demo_app(totals), redis, namespace=NAMESPACE, concurrency=concurrency)
        client = Client(redis, namespace=NAMESPACE)
        payloads = [{"sensor": f"s{i % 4}", "celsius": 20 + i % 10} for i in range(messages)]
        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            if url is not None:
                await tg.start(worker.run)  # consumes while we publish
            await client.publish_many("readings", payloads)
            published = time.perf_counter() - started
            # Malformed input never stops a worker: these two go to the dead-letter stream.
            await redis.xadd(keys.role_stream("readings"), {"message": b"{not json"})
            await client.publish("readings", {"sensor": "s9", "celsius": "hot"})
            echo(f"published {messages} readings in {published:.2f}s (+2 malformed)")
            if url is None:
                await worker.drain()
            await _show_progress(worker, messages + 2, echo)
            worker.stop()
        elapsed = time.perf_counter() - started
        dead = await streams.read_range(redis, keys.dead_letters("readings"))
        left = await redis.xlen(keys.role_stream("readings"))
    finally:
        await redis.aclose()
    stats = worker.statistics()
    echo(
        f"processed {stats.acked} in {elapsed:.2f}s ({stats.acked / elapsed:,.0f} msgs/s), "
        f"dead-lettered {stats.dead_lettered} ({', '.join(sorted(stats.by_reason))}), "
        f"left in the stream: {left}"
    )
    echo("totals by sensor: " + ", ".join(f"{k}={v:,.0f}" for k, v in sorted(totals.items())))
    return {"acked": stats.acked, "dead": len(dead), "left": left, "totals": totals}


async def _show_progress(worker: Worker, total: int, echo: Echo) -> None:
    last = -1
    with anyio.fail_after(300):
        while True:
            stats = worker.statistics()
            done = stats.acked + stats.dead_lettered
            if done != last:
                echo(f"  settled {done:>7}/{total}")
                last = done
            if done >= total:
                return
            await anyio.sleep(0.25)
