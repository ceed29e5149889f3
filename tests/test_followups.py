"""Follow-up jobs: ``ctx.publish`` and ``ctx.submit`` start each child once per parent message.

In-process tests run the parent again by a retry; the process test SIGKILLs the parent's worker
right after the handler published its children, and another worker adopts and reruns it.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis as redis_sync
from redis.asyncio import Redis

from streamflow import App, Client, Context, Coordinator, Graph, Retry, SyncClient
from streamflow.delivery import Outcome
from streamflow.followups import call_name, child_task_id
from streamflow.keys import GROUP, Keys, validate_name
from tests.apps import read_trace
from tests.helpers import make_worker, running, wait_for, wait_until
from tests.processes import Workers, unique

TRACE = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}


def _app(children: list[tuple[str, Any, dict[str, str]]], returned: list[list[str]]) -> App:
    app = App()

    @app.role("parent")
    async def parent(ctx: Context, payload: Any) -> None:
        assert ctx.headers["step"] == "first"  # on the retry too: the next attempt keeps them
        ids = [
            await ctx.publish("child", {"n": 0}),
            await ctx.publish("child", {"n": 1}, headers={"step": "second"}),
            await ctx.publish("other", {"n": 2}),
            await ctx.publish("child", {"n": 3}, idempotency_key="audit"),
        ]
        returned.append(ids)
        if ctx.attempt == 1:
            raise Retry("run me again", delay=0)

    async def child(ctx: Context, payload: Any) -> None:
        children.append((ctx.role, payload, dict(ctx.headers)))

    app.role("child")(child)
    app.role("other")(child)
    return app


@pytest.mark.anyio
async def test_follow_ups_are_published_once_when_the_parent_runs_again(
    redis: Redis, namespace: str
) -> None:
    children: list[tuple[str, Any, dict[str, str]]] = []
    returned: list[list[str]] = []
    outcomes: list[Outcome] = []
    parent_id = await Client(redis, namespace=namespace).publish(
        "parent", None, headers={**TRACE, "step": "first"}
    )
    worker = make_worker(_app(children, returned), redis, namespace, outcomes)
    async with running(worker):
        await wait_until(lambda: [o.status for o in outcomes].count("acked") == 5)
        await anyio.sleep(0.2)  # time for a duplicate child to show up, if any were published
    assert len(returned) == 2 and returned[0] == returned[1]  # the second run got the same ids
    inherited = {**TRACE, "step": "first"}
    assert sorted(children, key=lambda c: c[1]["n"]) == [
        ("child", {"n": 0}, inherited),
        ("child", {"n": 1}, {**TRACE, "step": "second"}),
        ("other", {"n": 2}, inherited),
        ("child", {"n": 3}, inherited),
    ]
    # The dedup keys say whose children they are: the parent's id and the call's key.
    markers = [call_name(parent_id, key) for key in ("child#0", "child#1", "audit")]
    assert all(m.startswith(f"followup:{parent_id}/") for m in markers)


def test_call_names_fit_the_protocol_and_task_ids_are_names() -> None:
    long = call_name("m" * 128, "k" * 200)
    assert long.startswith("followup:") and len(long) <= 256
    assert call_name("m", "k") == "followup:m/k"
    assert child_task_id("m", "k") == child_task_id("m", "k") != child_task_id("m", "j")
    assert validate_name(child_task_id("m" * 128, "k"), "task id")


@asynccontextmanager
async def _system(
    redis_url: str, namespace: str, app: App
) -> AsyncIterator[tuple[Client, list[Outcome]]]:
    from streamflow import connect

    redis = connect.connect(redis_url)
    outcomes: list[Outcome] = []
    worker = make_worker(app, redis, namespace, outcomes)
    coordinator = Coordinator(redis, namespace=namespace, block_ms=100, sweep_interval=0.1)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)
            await tg.start(coordinator.run)
            yield Client(redis, namespace=namespace), outcomes
            worker.stop()
            coordinator.stop()
    finally:
        await redis.aclose()


@pytest.mark.anyio
@pytest.mark.slow
async def test_a_task_submitted_by_a_handler_is_submitted_once_and_its_nodes_carry_headers(
    redis_url: str, namespace: str
) -> None:
    app = App()
    leaves: list[tuple[str | None, dict[str, str]]] = []
    submitted: list[str] = []

    @app.role("leaf")
    async def leaf(ctx: Context, params: Any) -> None:
        leaves.append((ctx.task_id, dict(ctx.headers)))

    @app.role("starter")
    async def starter(ctx: Context, payload: Any) -> None:
        graph = Graph("followed")
        graph.node("a", role="leaf").node("b", role="leaf").edge("a", "b", on="done")
        submitted.append(await ctx.submit(graph, headers={"stage": "graph"}))
        if ctx.attempt == 1:
            raise Retry("run me again", delay=0)

    async with _system(redis_url, namespace, app) as (client, _):
        await client.publish("starter", None, headers=TRACE)
        await wait_until(lambda: len(submitted) == 2)
        task = await client.wait(submitted[0], timeout=20)
        direct = await client.submit(
            Graph("direct").node("a", role="leaf"), headers={"correlation-id": "c-1"}
        )
        await client.wait(direct, timeout=20)
        tasks = await client.tasks()
    assert task.state == "succeeded"
    assert submitted[0] == submitted[1]
    assert sorted(t.id for t in tasks) == sorted([submitted[0], direct])
    assert sorted(leaves, key=str) == sorted(
        [
            (submitted[0], {**TRACE, "stage": "graph"}),
            (submitted[0], {**TRACE, "stage": "graph"}),
            (direct, {"correlation-id": "c-1"}),
        ],
        key=str,
    )


# -- the parent's worker SIGKILLed after it published -----------------------------------------


@pytest.mark.redis
@pytest.mark.slow
def test_follow_ups_are_published_once_when_the_parents_worker_is_sigkilled_after_publishing(
    tmp_path: Path, redis_url: str, namespace: str
) -> None:
    record = tmp_path / "record.txt"
    workers = Workers(tmp_path, redis_url, namespace, record)
    try:
        # The victim runs parents only: a child it ran would be run again after the kill.
        victim = workers.start(unique("victim"), roles=("parent",))
        victim.wait_ready()
        with SyncClient(redis_url, namespace=namespace) as client:
            parents = [
                client.publish("parent", {"kill": True}, headers={"correlation-id": f"c{i}"})
                for i in range(3)
            ]
        wait_for(lambda: victim.process.poll() is not None, 20, "the victim kills itself")
        assert victim.process.returncode == -signal.SIGKILL
        published = {line.message_id for line in read_trace(record) if line.event == "PUBLISHED"}
        assert published, "the victim died before any parent published its children"
        survivor = workers.start(unique("survivor"), roles=("parent", "child"))
        survivor.wait_ready()

        def finished() -> bool:
            lines = read_trace(record)
            done = {line.message_id for line in lines if line.event == "DONE"}
            children = sum(line.event in ("CHILD", "ORPHAN") for line in lines)
            return done >= set(parents) and children >= 2 * len(parents)

        wait_for(finished, 20, "every parent finished and its children ran")
        wait_for(lambda: _settled(redis_url, namespace), 10, "every entry acknowledged")
    finally:
        workers.kill_all()
    lines = read_trace(record)
    children = [line.event for line in lines if line.event in ("CHILD", "ORPHAN")]
    # Two children per parent, each run once (the external record), whoever published them,
    # and each with its parent's headers.
    assert children == ["CHILD"] * 2 * len(parents)
    # Every parent that published before the kill ran again, and published nothing new.
    started = [line.message_id for line in lines if line.event == "START"]
    assert all(started.count(m) == 2 for m in published)
    survivor.assert_clean_log()


def _settled(redis_url: str, namespace: str) -> bool:
    client = redis_sync.Redis.from_url(redis_url)
    try:
        keys = Keys(namespace)
        return all(
            client.xpending(keys.role_stream(role), GROUP)["pending"] == 0
            for role in ("parent", "child")
        )
    finally:
        client.close()
