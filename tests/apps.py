"""Test applications for worker subprocesses: ``streamflow worker --app tests.apps:app``.

Handlers report what they did through files named by ``SFTEST_*`` environment variables (never
``STREAMFLOW_*``: the CLI rejects unknown variables with that prefix). To add a role, register
another handler on ``app`` below; reuse :func:`record` to leave a trace the test can poll.

Roles:
    record: appends ``ctx.message_id`` and a newline to the file named by ``SFTEST_RECORD``.
    sleepy: sleeps ``payload["seconds"]``, then records like ``record``.
"""

from __future__ import annotations

import os
from typing import Any

import anyio

import streamflow

#: The environment variable naming the file that handlers append message ids to.
RECORD_ENV = "SFTEST_RECORD"

app = streamflow.App()


def record(ctx: streamflow.Context) -> None:
    """Append the message id as one line to the file named by ``SFTEST_RECORD``."""
    with open(os.environ[RECORD_ENV], "a", encoding="utf-8") as out:
        out.write(ctx.message_id + "\n")
        out.flush()


@app.role("record")
async def record_role(ctx: streamflow.Context, payload: Any) -> None:
    record(ctx)


@app.role("sleepy")
async def sleepy_role(ctx: streamflow.Context, payload: Any) -> None:
    await anyio.sleep(float(payload["seconds"]))
    record(ctx)
