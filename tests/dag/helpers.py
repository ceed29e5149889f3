"""The app, worker-and-coordinator fixture and graphs that DAG tests share.

``app`` serves every role these tests use (``tests.dag.helpers:app`` for worker processes);
:func:`system` runs a worker for it and a coordinator in the background; :func:`chain` is the
five-node streaming graph.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio

import streamflow
from streamflow import Client, Coordinator, Graph, Worker, connect
from streamflow.delivery import Outcome

app = streamflow.App()
#: What handlers saw, by test (keyed by task id where it matters).
seen: dict[str, list[Any]] = {}
#: Per (node, task id): set when that node's first job starts (the ``gate`` param waits on it).
first_start: dict[tuple[str, str | None], anyio.Event] = {}


def started(node: str, task_id: str | None) -> anyio.Event:
    """The event set when ``node``'s first job of ``task_id`` starts."""
    return first_start.setdefault((node, task_id), anyio.Event())


@app.role("source")
async def source(ctx: streamflow.Context, params: dict[str, Any]) -> Any:
    """Emit ints 0 .. n-1 in batches of ``size``, pausing between batches.

    With ``gate``, it waits after its first batch until ``enrich`` has started on it.
    """
    for start in range(0, params["n"], params["size"]):
        yield list(range(start, min(start + params["size"], params["n"])))
        if params.get("gate") and start == 0:
            await started("enrich", ctx.task_id).wait()
        await anyio.sleep(params.get("pause", 0))


@app.role("enrich")
async def enrich(ctx: streamflow.Context, params: dict[str, Any]) -> None:
    assert ctx.batch is not None
    seen.setdefault(f"enrich:{ctx.task_id}", []).append((ctx.batch.node, ctx.batch.index))
    started("enrich", ctx.task_id).set()
    await ctx.emit([x + 1 for x in ctx.batch.items])
    if params.get("gate") and ctx.batch.index == 0:
        await started("ocr", ctx.task_id).wait()  # the first enrich job ends after ocr starts


@app.role("ocr")
async def ocr(ctx: streamflow.Context, params: dict[str, Any]) -> None:
    assert ctx.batch is not None
    started("ocr", ctx.task_id).set()
    await ctx.emit([x * 2 for x in ctx.batch.items])


@app.role("analyze")
async def analyze(ctx: streamflow.Context, params: dict[str, Any]) -> None:
    """Count and sum every input, per parent."""
    per_parent: dict[str, list[int]] = {}
    async for batch in ctx.inputs():
        per_parent.setdefault(batch.node, []).extend(batch.items)
    await ctx.emit(
        [{"parent": p, "count": len(v), "sum": sum(v)} for p, v in sorted(per_parent.items())]
    )


@app.role("parents")
async def parents(ctx: streamflow.Context, params: dict[str, Any]) -> None:
    """Emit the parents whose output this node received."""
    names = set()
    async for batch in ctx.inputs():
        names.add(batch.node)
    await ctx.emit(sorted(names))


@app.role("fail", retry=streamflow.RetryPolicy(max_attempts=1))
async def fail(ctx: streamflow.Context, params: dict[str, Any]) -> None:
    raise RuntimeError("broken on purpose")


@app.role("fix")
async def fix(ctx: streamflow.Context, params: dict[str, Any]) -> None:
    await ctx.emit([ctx.failures])


@app.role("slow")
async def slow(ctx: streamflow.Context, params: dict[str, Any]) -> None:
    """Run until cancelled (or for ``seconds``), recording start and cancel."""
    seen.setdefault(f"slow:{ctx.task_id}", []).append(("start", ctx.node_id))
    with anyio.move_on_after(params.get("seconds", 30)):
        await ctx.cancel.wait_cancelled()
    if ctx.cancel.cancelled:
        seen[f"slow:{ctx.task_id}"].append(("cancelled", ctx.node_id))
        ctx.cancel.raise_if_cancelled()
    await ctx.emit([ctx.node_id])


@app.role("flaky")
async def flaky(ctx: streamflow.Context, params: dict[str, Any]) -> None:
    seen.setdefault(f"flaky:{ctx.task_id}", []).append(ctx.attempt)
    raise streamflow.Retry("not yet", delay=params["delay"])


@app.role("noop")
async def noop(ctx: streamflow.Context, params: dict[str, Any]) -> None:
    """Nothing: a node whose only cost is the coordinator's and the worker's."""


#: Per task id, what the ``gate`` role waits for before it finishes.
gates: dict[str, anyio.Event] = {}


@app.role("gate")
async def gate(ctx: streamflow.Context, params: dict[str, Any]) -> None:
    """Record its start, wait until the test opens its task's gate, emit one batch."""
    assert ctx.task_id is not None
    seen.setdefault(f"gate:{ctx.task_id}", []).append("start")
    await gates.setdefault(ctx.task_id, anyio.Event()).wait()
    await ctx.emit([ctx.node_id])


@app.function("tests.count")
def count_items(params: dict[str, Any], batches: Any) -> list[int]:
    """A coordinator function of this app (only a coordinator started with it provides it)."""
    return [sum(len(batch.items) for batch in batches)]


@asynccontextmanager
async def system(
    redis_url: str, namespace: str, *, workers: bool = True, **coordinator_options: Any
) -> AsyncIterator[tuple[Client, Coordinator, list[Outcome]]]:
    """A worker for every role of ``app`` and a coordinator, running in the background."""
    redis = connect.connect(redis_url)
    outcomes: list[Outcome] = []
    worker = Worker(
        app, redis, namespace=namespace, block_ms=100, shutdown_grace=1, on_outcome=outcomes.append
    )
    options: dict[str, Any] = {"block_ms": 100, "sweep_interval": 0.1, **coordinator_options}
    coordinator = Coordinator(redis, namespace=namespace, **options)
    try:
        async with anyio.create_task_group() as tg:
            if workers:
                await tg.start(worker.run)
            await tg.start(coordinator.run)
            yield (
                Client(
                    redis,
                    namespace=namespace,
                ),
                coordinator,
                outcomes,
            )
            worker.stop()
            coordinator.stop()
    finally:
        await redis.aclose()


def chain(n: int, size: int, pause: float = 0.0, *, gate: bool = False) -> Graph:
    graph = Graph("five", params={"n": n, "size": size, "pause": pause, "gate": gate})
    graph.node("source", role="source")
    graph.node("enrich", role="enrich")
    graph.node("ocr", role="ocr")
    graph.node("merge", function="merge.generic")
    graph.node("analyze", role="analyze")
    graph.edge("source", "enrich", on="batch").edge("enrich", "ocr", on="batch")
    graph.edge("source", "merge").edge("enrich", "merge")
    graph.edge("ocr", "analyze").edge("merge", "analyze")
    return graph
