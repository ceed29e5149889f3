"""The Python side of the example: a worker whose jobs come from a shell script or Node.js.

    streamflow worker --app examples.outside_python.app:app
    ./examples/outside_python/publish.sh redis://127.0.0.1:6379/0 sf
    node examples/outside_python/publish.mjs redis://127.0.0.1:6379/0 sf

Both scripts publish one ``greet`` job with headers (a trace context and a correlation id),
which runs at once, and one ``slow`` job, which they then cancel by its message id while it
runs.
"""

from __future__ import annotations

import anyio
from pydantic import BaseModel

import streamflow

app = streamflow.App()


class Greet(BaseModel):
    """The ``greet`` payload: ``{"name": "..."}``."""

    name: str


class Slow(BaseModel):
    """The ``slow`` payload: ``{"steps": 600, "step_seconds": 0.1}`` (a minute by default)."""

    steps: int = 600
    step_seconds: float = 0.1


#: Who was greeted, by message id (the tests read it).
greeted: dict[str, str] = {}
#: The headers each greet job carried, by message id.
greeted_headers: dict[str, dict[str, str]] = {}


@app.role("greet")
async def greet(ctx: streamflow.Context, job: Greet) -> None:
    """Say hello: a job that finishes at once."""
    greeted[ctx.message_id] = job.name
    greeted_headers[ctx.message_id] = dict(ctx.headers)
    ctx.log.info("hello, %s (correlation id %s)", job.name, ctx.headers.get("correlation-id"))


@app.role("slow", cancel_grace=2.0)
async def slow(ctx: streamflow.Context, job: Slow) -> None:
    """Work for a long time in small steps, until it is done or cancelled."""
    for step in range(job.steps):
        ctx.cancel.raise_if_cancelled()
        await ctx.cancellable(anyio.sleep(job.step_seconds))  # one step of made-up work
        ctx.log.debug("step %d done", step)
