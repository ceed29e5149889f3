"""The quickstart app: one role, ``echo``, that logs what it gets.

Run a worker:   streamflow worker --app examples.quickstart.app:app --role echo
Publish a job:  streamflow publish echo --json '{"text": "hello"}'
"""

from __future__ import annotations

from pydantic import BaseModel

import streamflow

app = streamflow.App()


class Echo(BaseModel):
    text: str


@app.role("echo")
async def echo(ctx: streamflow.Context, job: Echo) -> None:
    ctx.log.info("echo %s (attempt %d): %s", ctx.message_id, ctx.attempt, job.text)
