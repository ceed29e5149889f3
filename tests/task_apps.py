"""Test application for DAG task subprocess tests: ``streamflow worker --app tests.task_apps:app``.

Like :mod:`tests.apps`, handlers report through the file named by ``SFTEST_RECORD`` (never a
``STREAMFLOW_*`` variable: the CLI rejects unknown ones), one ``write`` per line so that lines
from several processes never interleave.

Roles (their payload is the task's params updated with the node's own):
    src: a source node. Emits ``n`` batches of ``size`` consecutive ints (batch ``b`` holds
        ``b * size .. b * size + size - 1``), sleeping ``pause`` seconds after each, so that a
        kill can land while it is still emitting; with ``gate`` (a file path) and ``gate_after``
        (a batch count), it waits after that many batches until the file exists, so that it is
        still emitting at a kill however slow the rest is. Rerun from scratch after a crash, it
        emits the same batches in the same order (the coordinator drops the numbers already
        recorded).
    step: a node fed per batch. Traces START, sleeps ``seconds``, emits the parent batch with
        every item multiplied by ``factor`` (default 2), traces DONE. With the source's
        ``gate``, the runs of the second quarter of batches also wait for it before emitting.

Trace lines are ``EVENT task node invocation parent index attempt pid consumer unix_time``:
EVENT is ``START`` (the handler began) or ``DONE`` (it emitted everything and returned: its
worker will try to settle it); ``parent``/``index`` name the parent batch of a ``step`` run
(``-``/``-1`` for ``src``). A SIGKILLed run leaves its ``START`` line only, or a ``DONE`` line
whose settle never happened.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

import streamflow

#: The environment variable naming the trace file.
RECORD_ENV = "SFTEST_RECORD"

app = streamflow.App()


@dataclass(frozen=True)
class Line:
    """One trace line, as :func:`trace` writes it."""

    event: str
    task: str
    node: str
    invocation: int
    parent: str
    index: int
    attempt: int
    pid: int
    consumer: str
    at: float


def read_trace(path: Path) -> list[Line]:
    """The complete trace lines of ``path`` (a half-written last line is left out)."""
    if not path.exists():
        return []
    out = []
    for raw in path.read_text().split("\n")[:-1]:
        event, task, node, inv, parent, index, attempt, pid, consumer, at = raw.split(" ")
        numbers = int(inv), parent, int(index), int(attempt), int(pid)
        out.append(Line(event, task, node, *numbers, consumer, float(at)))
    return out


def trace(ctx: streamflow.Context, event: str) -> None:
    """Append one trace line (see the module docstring) to the file named by ``SFTEST_RECORD``."""
    parent, index = (ctx.batch.node, ctx.batch.index) if ctx.batch is not None else ("-", -1)
    line = (
        f"{event} {ctx.task_id} {ctx.node_id} {ctx.invocation} {parent} {index} {ctx.attempt} "
        f"{os.getpid()} {ctx.consumer} {time.time():.6f}\n"
    )
    with open(os.environ[RECORD_ENV], "a", encoding="utf-8") as out:
        out.write(line)


@app.role("src")
async def src(ctx: streamflow.Context, params: dict[str, Any]) -> None:
    trace(ctx, "START")
    size, pause = int(params["size"]), float(params.get("pause", 0))
    for batch in range(int(params["n"])):
        await ctx.emit(range(batch * size, (batch + 1) * size))
        if pause > 0:
            await anyio.sleep(pause)
        if batch + 1 == params.get("gate_after"):
            await wait_for_file(anyio.Path(params["gate"]))
    trace(ctx, "DONE")


async def wait_for_file(path: anyio.Path) -> None:
    """Return once ``path`` exists (the test opens a gate by creating it)."""
    while not await path.exists():
        await anyio.sleep(0.02)


@app.role("step")
async def step(ctx: streamflow.Context, params: dict[str, Any]) -> None:
    assert ctx.batch is not None, "step is fed per batch"
    trace(ctx, "START")
    await anyio.sleep(float(params.get("seconds", 0)))
    if "gate" in params and ctx.batch.index >= int(params["gate_after"]) // 2:
        await wait_for_file(anyio.Path(params["gate"]))  # in flight until the gate opens
    factor = int(params.get("factor", 2))
    await ctx.emit([item * factor for item in ctx.batch.items])
    trace(ctx, "DONE")
