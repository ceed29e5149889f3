"""The app of benchmarks/dag.py: a source that emits batches as fast as it can, and a step.

Every handler appends one JSON line to the record file named by ``SFBENCH_DAG_RECORD`` (one
``os.write`` per line on an ``O_APPEND`` descriptor, so lines of concurrent handlers and
processes never interleave). The task's params say how many batches the source emits
(``batches``) and how long each step works (``work_ms``, an ``anyio.sleep``).
"""

from __future__ import annotations

import os
import time
from typing import Any

import anyio
import orjson

import streamflow

app = streamflow.App()
_record_fd: int | None = None


def _record(**fields: Any) -> None:
    global _record_fd
    if _record_fd is None:
        path = os.environ["SFBENCH_DAG_RECORD"]
        _record_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(_record_fd, orjson.dumps(fields) + b"\n")


@app.role("dag_source")
async def source(ctx: streamflow.Context, payload: Any) -> None:
    """Emit ``batches`` batches of one item, each carrying the time just before its emit."""
    started = time.perf_counter()
    for seq in range(int(payload["batches"])):
        await ctx.emit([{"seq": seq, "t": time.time()}])
    _record(
        task=ctx.task_id,
        node=ctx.node_id,
        handler_s=time.perf_counter() - started,
        emitted=ctx.emitted,
    )


@app.role("dag_step")
async def step(ctx: streamflow.Context, payload: Any) -> None:
    """Record the parent batch's age at start, work, emit one batch with the time."""
    start_wall, started = time.time(), time.perf_counter()
    assert ctx.batch is not None
    (item,) = ctx.batch.items
    work_ms = float(payload.get("work_ms", 0))
    if work_ms > 0:
        await anyio.sleep(work_ms / 1000)
    emit_at = time.perf_counter()
    await ctx.emit([{"seq": item["seq"], "t": time.time()}])
    done = time.perf_counter()
    _record(
        task=ctx.task_id,
        node=ctx.node_id,
        parent=ctx.batch.node,
        index=ctx.batch.index,
        invocation=ctx.invocation,
        attempt=ctx.attempt,
        seq=item["seq"],
        latency_s=start_wall - item["t"],
        # The coordinator builds the child's job (created_at_ms) when it decides to dispatch it.
        to_dispatch_s=ctx.created_at_ms / 1000 - item["t"],
        # The role stream's entry id is the time Redis added the job (ms).
        to_publish_s=int(ctx.entry_id.split("-")[0]) / 1000 - item["t"],
        handler_s=done - started,
        emit_s=done - emit_at,
    )
