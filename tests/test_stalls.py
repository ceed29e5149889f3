"""The loop-stall watchdog against a real redis-server: blocked loops are named and counted."""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio
import pytest
from redis.asyncio import Redis

from streamflow import App, Client, Context, Worker
from streamflow.delivery import Outcome
from tests.helpers import running, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


async def test_a_handler_blocking_the_loop_is_named_in_a_warning_and_counted(
    redis: Redis, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = App()

    @app.role("blocker")
    async def blocks_the_loop(ctx: Context, payload: Any) -> None:
        time.sleep(1.0)  # noqa: ASYNC251 - the mistake the watchdog is for

    outcomes: list[Outcome] = []
    worker = Worker(
        app, redis, namespace=namespace, block_ms=100, stall_warning=0.2, on_outcome=outcomes.append
    )
    registry = worker.enable_metrics()
    caplog.set_level(logging.WARNING, logger="streamflow.worker")
    with anyio.fail_after(20):
        async with running(worker):
            message_id = await Client(redis, namespace=namespace).publish("blocker", {})
            await wait_until(lambda: bool(outcomes), 15)
    # Only the handler's own stall names it (a loaded machine may add stalls of its own).
    warnings = [
        r.getMessage()
        for r in caplog.records
        if "event loop blocked" in r.getMessage() and "blocks_the_loop" in r.getMessage()
    ]
    assert len(warnings) == 1, warnings
    [warning] = warnings
    assert "'blocker'" in warning and message_id in warning
    assert "plain def" in warning  # says what to do
    assert worker.statistics().loop_stalls.get("blocked", 0) >= 1
    assert registry.get_sample_value("streamflow_loop_stalls_total", {"kind": "blocked"}) >= 1
    assert [o.status for o in outcomes] == ["acked"]


async def test_plain_def_handlers_that_block_do_not_stall_the_loop(
    redis: Redis, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """What the warning advises: the same blocking call in a plain def runs in a thread."""
    app = App()

    @app.role("threaded")
    def blocks_a_thread(ctx: Context, payload: Any) -> None:
        time.sleep(1.0)

    outcomes: list[Outcome] = []
    worker = Worker(
        app, redis, namespace=namespace, block_ms=100, stall_warning=0.2, on_outcome=outcomes.append
    )
    with anyio.fail_after(20):
        async with running(worker):
            await Client(redis, namespace=namespace).publish("threaded", {})
            await wait_until(lambda: bool(outcomes), 15)
    assert [o.status for o in outcomes] == ["acked"]
    # A loaded machine may stall the loop by itself, but never in this handler.
    assert not [r for r in caplog.records if "blocks_a_thread" in r.getMessage()]
