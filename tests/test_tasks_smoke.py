from __future__ import annotations

from typing import Any

import anyio
import pytest

import streamflow
from streamflow import Client, Coordinator, Graph, Worker, streams
from tests.helpers import running

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

app = streamflow.App()


@app.role("numbers")
async def numbers(ctx: streamflow.Context, params: dict[str, Any]) -> None:
    for start in range(0, params["n"], params["size"]):
        await ctx.emit(range(start, min(start + params["size"], params["n"])))


@app.role("double")
async def double(ctx: streamflow.Context, params: dict[str, Any]) -> None:
    assert ctx.batch is not None
    await ctx.emit([x * 2 for x in ctx.batch.items])


async def test_chain(redis_url: str, namespace: str) -> None:
    redis = streams.connect(redis_url)
    client = Client(redis, namespace=namespace)
    worker = Worker(app, redis, namespace=namespace, block_ms=100)
    coord = Coordinator(redis, namespace=namespace, block_ms=100)
    graph = Graph("smoke", params={"n": 100, "size": 10})
    graph.node("src", role="numbers").node("dbl", role="double")
    graph.node("total", function="metrics.aggregate")
    graph.edge("src", "dbl", on="batch").edge("dbl", "total", on="batch")
    async with running(worker), anyio.create_task_group() as tg:
        await tg.start(coord.run)
        task_id = await client.submit(graph)
        task = await client.wait(task_id, timeout=20)
        coord.stop()
    print(task.model_dump_json(indent=1))
    assert task.state == "succeeded"
    result = await client.result(task_id)
    assert result == {"total": [{"count": 100, "sum": 9900, "sums": {}}]}
    await redis.aclose()
