"""The app of docs/protocol.md's worked example: ``streamflow worker --app tests.doc_apps:app``.

Role ``resize`` takes ``{"image": str, "width": int}`` and appends ``message_id attempt`` (and
the job's headers as compact JSON, when it has any) to the file named by ``SFTEST_RECORD``; an
image called ``flaky.png`` fails its first attempt (the retry example of docs/protocol.md), and
one called ``slow.png`` runs until it is cancelled (or for a minute), then appends
``message_id end`` (the cancel examples).
"""

from __future__ import annotations

import os
import time

import orjson
from pydantic import BaseModel

import streamflow


class Resize(BaseModel):
    """The payload of a resize job."""

    image: str
    width: int


app = streamflow.App()


@app.role("resize", retry=streamflow.RetryPolicy(max_attempts=3, backoff=0.2))
def resize(ctx: streamflow.Context, job: Resize) -> None:
    """Record the job; ``flaky.png`` fails once, ``slow.png`` waits for a cancel (in a thread)."""
    with open(os.environ["SFTEST_RECORD"], "a") as out:
        headers = f" {orjson.dumps(dict(ctx.headers)).decode()}" if ctx.headers else ""
        out.write(f"{ctx.message_id} {ctx.attempt}{headers}\n")
    if job.image == "flaky.png" and ctx.attempt == 1:
        raise RuntimeError("flaky the first time")
    if job.image == "slow.png":
        deadline = time.monotonic() + 60
        while not ctx.cancel.cancelled and time.monotonic() < deadline:
            time.sleep(0.02)  # a plain function: it can only notice the cancel by looking
        with open(os.environ["SFTEST_RECORD"], "a") as out:
            out.write(f"{ctx.message_id} end\n")
