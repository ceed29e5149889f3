"""A FastAPI app that publishes jobs, submits tasks, streams their progress and calls roles.

One :class:`streamflow.Client` for the whole app, opened in the lifespan and closed with it
(its connection pool is shared by every request). Run it with the worker side
(``worker_app.py``) and a coordinator:

    export STREAMFLOW_REDIS_URL=redis://localhost:6379/0
    streamflow worker --app examples.fastapi_app.worker_app:app
    streamflow coordinator
    uvicorn examples.fastapi_app.app:app

Endpoints:

* ``POST /jobs`` publishes a job and answers at once with its message id;
* ``POST /tasks`` submits a task; ``GET /tasks/{task_id}/progress`` streams its lifecycle
  events (its nodes' progress among them) as server-sent events until it ends;
* ``POST /call`` calls a role and answers with its result, or 504 when none came in time.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from examples.fastapi_app.worker_app import Order, Welcome, report
from streamflow import Client, JobFailedError, ResultTimeoutError, TaskState
from streamflow.protocol import PROTOCOL_VERSION, now_ms
from streamflow.records import LifecycleEvent

#: A task's states after which nothing more happens to it.
TASK_ENDS = {"succeeded", "failed", "cancelled"}
#: A task that ended longer ago than this (ms) gets its final state, not a replay of events.
REPLAY_ENDED_MS = 60_000


# --8<-- [start:lifespan]
@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[dict[str, Client]]:
    """One client for the app's lifetime, in the lifespan state (``request.state.client``)."""
    url = os.environ.get("STREAMFLOW_REDIS_URL", "redis://localhost:6379/0")
    namespace = os.environ.get("STREAMFLOW_NAMESPACE", "sf")
    async with Client.from_url(url, namespace=namespace) as client:
        yield {"client": client}


def get_client(request: Request) -> Client:
    """The app's client, for ``Depends``."""
    client: Client = request.state.client
    return client


Streamflow = Annotated[Client, Depends(get_client)]

app = FastAPI(title="streamflow recipe", lifespan=lifespan)
# --8<-- [end:lifespan]


# --8<-- [start:publish]
@app.post("/jobs", status_code=202)
async def publish_welcome(user: Welcome, client: Streamflow) -> dict[str, str]:
    """Publish a job and answer at once; a worker runs it later."""
    return {"message_id": await client.publish("welcome", user)}
    # --8<-- [end:publish]


# --8<-- [start:progress]
class ReportRequest(BaseModel):
    """How many pages the report task scans."""

    pages: int = 4


@app.post("/tasks", status_code=202)
async def submit_report(body: ReportRequest, client: Streamflow) -> dict[str, str]:
    """Submit the report task; follow it at ``/tasks/{task_id}/progress``."""
    return {"task_id": await client.submit(report, params={"pages": body.pages})}


def sse(event: LifecycleEvent) -> str:
    """One server-sent event: its type as the SSE event name, the whole event as data."""
    return f"event: {event.type}\ndata: {event.model_dump_json(exclude_none=True)}\n\n"


async def ended(task: TaskState) -> AsyncIterator[str]:
    """One ``task`` event with the final state of a task that ended long ago."""
    final = LifecycleEvent(
        protocol=PROTOCOL_VERSION,
        kind="lifecycle",
        type="task",
        at_ms=task.finished_at_ms or task.created_at_ms,
        task_id=task.id,
        state=task.state,
    )
    yield sse(final)


async def task_events(client: Client, task_id: str, since_ms: int) -> AsyncIterator[str]:
    """The task's events since ``since_ms``, up to and including the one that ends it."""
    async for event in client.events(task_id=task_id, since_ms=since_ms):
        yield sse(event)
        if event.type == "task" and event.state in TASK_ENDS:
            return


@app.get("/tasks/{task_id}/progress")
async def task_progress(task_id: str, client: Streamflow) -> StreamingResponse:
    """Stream a task's lifecycle events (``progress``, ``node``, ``task``...) until it ends."""
    task = await client.task(task_id)
    if task is None:
        raise HTTPException(404, f"no task {task_id!r}")
    if task.finished_at_ms is not None and now_ms() - task.finished_at_ms > REPLAY_ENDED_MS:
        # Its events may have left the capped events stream: the final state is the truth.
        return StreamingResponse(ended(task), media_type="text/event-stream")
    # Replay from its submission: the events written before this request are not missed. The
    # margin covers a web server's clock a little ahead of Redis's (since_ms is Redis time).
    events = task_events(client, task_id, since_ms=task.created_at_ms - 1000)
    return StreamingResponse(events, media_type="text/event-stream")
    # --8<-- [end:progress]


# --8<-- [start:call]
@app.post("/call")
async def call_quote(
    order: Order,
    client: Streamflow,
    timeout: Annotated[float, Query(gt=0, le=30)] = 5.0,  # noqa: ASYNC109 - a query parameter
) -> Any:
    """Call the ``quote`` role and answer with its result (request/reply)."""
    try:
        return await client.call("quote", order, timeout=timeout)
    except ResultTimeoutError as e:  # no worker answered in time; the job may still run
        raise HTTPException(504, {"message_id": e.message_id, "error": str(e)}) from e
    except JobFailedError as e:  # dead-lettered or cancelled: it will never answer
        raise HTTPException(502, {"message_id": e.message_id, "reason": e.reason}) from e
    # --8<-- [end:call]
