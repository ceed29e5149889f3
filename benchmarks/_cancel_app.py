"""The app of benchmarks/cancel_latency.py: a cancellable role and a busy role."""

from __future__ import annotations

import os
import time
from typing import Any

import anyio

import streamflow

app = streamflow.App()


def _trace(event: str, message_id: str) -> None:
    with open(os.environ["SFBENCH_TRACE"], "a") as out:
        out.write(f"{event} {message_id} {time.time():.6f}\n")


@app.role("cancellable")
async def cancellable(ctx: streamflow.Context, payload: Any) -> None:
    _trace("START", ctx.message_id)
    try:
        await ctx.cancel.wait_cancelled()
        _trace("OBSERVED", ctx.message_id)
        ctx.cancel.raise_if_cancelled()
    finally:
        _trace("FINISHED", ctx.message_id)


@app.role("busy")
async def busy(ctx: streamflow.Context, payload: Any) -> None:
    await anyio.sleep(float(payload["seconds"]))
