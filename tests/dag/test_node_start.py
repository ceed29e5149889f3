"""A node run's ``accepted`` event: held back briefly, written with the settle of a short run.

A run that reads no input batch at its start writes its ``accepted`` up to
``nodes.ACCEPTED_DELAY`` late; a run that ends sooner reports it in its settle's script (one
round trip fewer per node), a longer one still shows running while its handler runs.
"""

from __future__ import annotations

import anyio
import orjson
import pytest
from redis.asyncio import Redis

from streamflow import Graph, nodes
from streamflow.keys import Keys
from streamflow.protocol import PROTOCOL_VERSION, Job, now_ms
from streamflow.records import EVENT_FIELD
from streamflow.scripts import Scripts
from tests.dag.helpers import gates, seen, system
from tests.helpers import wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


def _run(redis: Redis, keys: Keys) -> nodes.NodeRun:
    job = Job(
        protocol=PROTOCOL_VERSION,
        kind="job",
        id="t1.n.0",
        role="noop",
        payload={},
        created_at_ms=now_ms(),
        task_id="t1",
        node_id="n",
        invocation=0,
    )
    return nodes.NodeRun(
        redis,
        Scripts(redis),
        keys,
        job,
        stream=keys.role_stream("noop"),
        shard="noop",
        entry_id=b"1-0",
        delivery=1,
        consumer="w1",
    )


async def _written(redis: Redis, keys: Keys) -> list[dict[str, object]]:
    entries = await redis.xrange(keys.events("noop"))
    return [orjson.loads(fields[EVENT_FIELD]) for _, fields in entries]


async def test_a_run_that_ends_at_once_hands_its_accepted_to_its_settle(
    redis: Redis, namespace: str
) -> None:
    keys = Keys(namespace)
    run = _run(redis, keys)
    before = now_ms()
    assert await run.start() is None
    events = await run.settle_events()
    assert [orjson.loads(raw)["type"] for raw in events] == ["accepted"]
    assert before <= orjson.loads(events[0])["at_ms"] <= now_ms()  # stamped at its start
    await anyio.sleep(nodes.ACCEPTED_DELAY * 3)
    assert await _written(redis, keys) == []  # the timer was stopped: the settle writes it
    assert await run.settle_events() == []


async def test_a_longer_run_writes_its_accepted_after_the_delay_once(
    redis: Redis, namespace: str
) -> None:
    keys = Keys(namespace)
    run = _run(redis, keys)
    assert await run.start() is None
    assert await _written(redis, keys) == []
    await wait_until(lambda: run._late is not None and run._late.done())
    written = await _written(redis, keys)
    assert [event["type"] for event in written] == ["accepted"]
    assert await run.settle_events() == []  # nothing left for the settle
    await run.send_accepted()  # nor for a failure's
    assert len(await _written(redis, keys)) == 1


async def test_node_runs_short_long_and_failed_show_when_they_started(
    redis_url: str, namespace: str
) -> None:
    graph = Graph("starts")
    graph.node("quick", role="noop").node("held", role="gate")
    # A source that fails at once: its start goes before its ``failed`` (the dead letter's).
    graph.node("broken", role="fail").node("fix", role="fix").edge("broken", "fix", on="failure")
    async with system(redis_url, namespace) as (client, _, _):
        task_id = await client.submit(graph)
        await wait_until(lambda: seen.get(f"gate:{task_id}") == ["start"])

        async def held_running() -> bool:
            task = await client.task(task_id)
            return task is not None and task.nodes["held"].state == "running"

        # Its handler still runs: its start was written by the timer, not with its settle.
        with anyio.fail_after(10):
            while not await held_running():
                await anyio.sleep(0.01)
        gates[task_id].set()
        task = await client.wait(task_id, timeout=30)
    assert task.state == "succeeded", task.error
    assert task.nodes["broken"].state == "failed"
    for node in task.nodes.values():
        assert node.started_at_ms is not None and node.finished_at_ms is not None
        assert node.dispatched_at_ms is not None
        assert node.dispatched_at_ms <= node.started_at_ms <= node.finished_at_ms
