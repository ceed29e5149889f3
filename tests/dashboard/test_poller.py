"""One shared reader per dashboard process (streamflow/dashboard/poller.py): the Redis load of
live task pages is one read per watched task per interval, however many pages watch it."""

from __future__ import annotations

import anyio
import pytest

from streamflow import Client, Graph
from streamflow.dashboard.poller import Poller

pytestmark = [pytest.mark.redis, pytest.mark.anyio]


async def test_many_subscribers_of_one_task_share_one_read_per_interval(
    redis_url: str, namespace: str
) -> None:
    graph = Graph("poller")
    graph.node("a", function="merge.generic")  # no coordinator: it stays queued
    async with Client.from_url(redis_url, namespace=namespace) as client:
        task_id = await client.submit(graph)
        poller = Poller(client.task, 0.02)
        seen: list[list[str]] = [[] for _ in range(5)]

        async def subscriber(index: int) -> None:
            tick = -1
            with poller.watching(task_id):
                while len(seen[index]) < 5:
                    tick, state = await poller.wait_state(task_id, tick)
                    assert state is not None
                    seen[index].append(state.state)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(poller.run)
                async with anyio.create_task_group() as tabs:
                    for index in range(5):
                        tabs.start_soon(subscriber, index)
                stats = poller.statistics()
                tg.cancel_scope.cancel()
    assert seen == [["queued"] * 5] * 5
    assert stats.reads <= stats.ticks  # one read per interval, not one per subscriber
    assert (stats.watched, stats.subscribers) == (0, 0)
