"""The app of docs/protocol.md's worked example: ``streamflow worker --app tests.doc_apps:app``.

Role ``resize`` takes ``{"image": str, "width": int}`` and appends ``message_id attempt`` to the
file named by ``SFTEST_RECORD``; an image called ``flaky.png`` fails its first attempt (the
retry example of docs/protocol.md).
"""

from __future__ import annotations

import os

from pydantic import BaseModel

import streamflow


class Resize(BaseModel):
    """The payload of a resize job."""

    image: str
    width: int


app = streamflow.App()


@app.role("resize", retry=streamflow.RetryPolicy(max_attempts=3, backoff=0.2))
def resize(ctx: streamflow.Context, job: Resize) -> None:
    """Record the job; ``flaky.png`` fails once (a plain function: it runs in a thread)."""
    with open(os.environ["SFTEST_RECORD"], "a") as out:
        out.write(f"{ctx.message_id} {ctx.attempt}\n")
    if job.image == "flaky.png" and ctx.attempt == 1:
        raise RuntimeError("flaky the first time")
