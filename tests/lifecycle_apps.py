"""Apps with lifecycle hooks, for worker processes: ``--app tests.lifecycle_apps:failing``.

Every hook and handler appends one line to the file named by ``SFTEST_HOOKS``, so a test counts
effects across the process boundary.

* ``failing``: its second startup hook raises; both shutdown hooks still run.
* ``serving``: role ``work`` (logs through ``ctx.log``, records ``handled <n>``); its first
  shutdown hook (plain) sleeps ``SFTEST_PLAIN_STOP_SLEEP`` seconds (default 0), its second
  (async) ``SFTEST_STOP_SLEEP`` seconds (default 0.3), before recording.
"""

from __future__ import annotations

import os
import time
from typing import Any

import anyio

import streamflow


def record(line: str) -> None:
    """Append ``line`` to the effects file."""
    with open(os.environ["SFTEST_HOOKS"], "a") as out:
        out.write(line + "\n")


class Database:
    """Stands for a connection pool opened once per process."""


failing = streamflow.App()


@failing.on_startup
def open_first(resources: streamflow.Resources) -> None:
    """Succeeds (a plain hook)."""
    record("start first")


@failing.on_startup
async def open_database(resources: streamflow.Resources) -> None:
    """Fails, as a database that refuses connections would."""
    raise ConnectionRefusedError("no database at db:5432")


@failing.on_shutdown
async def close_database(resources: streamflow.Resources) -> None:
    """Runs although startup failed; finds no Database."""
    record(f"stop database {resources.get(Database)}")


@failing.on_shutdown
def close_first(resources: streamflow.Resources) -> None:
    """Runs after the other shutdown hook."""
    record("stop first")


@failing.role("work")
async def never(ctx: streamflow.Context, payload: Any) -> None:
    """Never runs: the worker does not serve."""
    record("handled")


serving = streamflow.App()


@serving.on_startup
async def open_pool(resources: streamflow.Resources) -> None:
    """Stores the Database."""
    resources[Database] = Database()
    record("start")


@serving.on_shutdown
def close_pool(resources: streamflow.Resources) -> None:
    """The first shutdown hook: takes SFTEST_PLAIN_STOP_SLEEP seconds (blocking its thread)."""
    time.sleep(float(os.environ.get("SFTEST_PLAIN_STOP_SLEEP", "0")))
    record("stop pool")


@serving.on_shutdown
async def flush(resources: streamflow.Resources) -> None:
    """The second: takes SFTEST_STOP_SLEEP seconds."""
    await anyio.sleep(float(os.environ.get("SFTEST_STOP_SLEEP", "0.3")))
    record("stop flush")


@serving.role("work")
async def work(ctx: streamflow.Context, payload: int) -> None:
    """Logs through ctx.log and records the payload."""
    ctx.resources[Database]  # the startup hook's, or KeyError
    ctx.log.info("working on %d", payload)
    record(f"handled {payload}")
