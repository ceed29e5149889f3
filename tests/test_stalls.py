"""The loop-stall watchdog against a real redis-server: blocked loops are named and counted,
and a message that keeps outliving its lease is dead-lettered with a truthful detail."""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio
import pytest
from redis.asyncio import Redis

from streamflow import App, Client, Context, Worker, streams
from streamflow.keys import Keys
from streamflow.leases import LeaseSettings
from streamflow.protocol import decode_dead_letter
from streamflow.worker import Outcome
from tests.helpers import running, wait_until

pytestmark = pytest.mark.anyio


async def test_a_handler_blocking_the_loop_is_named_in_a_warning_and_counted(
    redis: Redis, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = App()

    @app.role("blocker")
    async def blocks_the_loop(ctx: Context, payload: Any) -> None:
        time.sleep(1.0)  # noqa: ASYNC251 - the mistake the watchdog is for

    outcomes: list[Outcome] = []
    worker = Worker(app, redis, namespace=namespace, stall_warning=0.2, on_outcome=outcomes.append)
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
    worker = Worker(app, redis, namespace=namespace, stall_warning=0.2, on_outcome=outcomes.append)
    with anyio.fail_after(20):
        async with running(worker):
            await Client(redis, namespace=namespace).publish("threaded", {})
            await wait_until(lambda: bool(outcomes), 15)
    assert [o.status for o in outcomes] == ["acked"]
    # A loaded machine may stall the loop by itself, but never in this handler.
    assert not [r for r in caplog.records if "blocks_a_thread" in r.getMessage()]


async def test_max_deliveries_dead_letter_says_the_lease_expired_not_that_the_worker_crashed(
    redis: Redis, namespace: str
) -> None:
    """An entry already started max_deliveries times (here: counted by hand) is dead-lettered
    when it is adopted again; the detail names what is known: its lease expired before its
    outcome was settled, with the possible causes, the blocked loop among them."""
    app = App()
    ran: list[str] = []

    @app.role("outlived", max_deliveries=2)
    async def outlived(ctx: Context, payload: Any) -> None:
        ran.append(ctx.message_id)

    keys = Keys(namespace)
    stream = keys.role_stream("outlived")
    await Client(redis, namespace=namespace).publish("outlived", {})
    await streams.ensure_group(redis, stream)
    [entry] = await streams.read_group(redis, stream, "gone-1", count=1, block_ms=None)
    # Its first start, and one rerun counted before: the next start would be the third.
    await redis.set(keys.starts("outlived", entry.id.decode()), 1)
    outcomes: list[Outcome] = []
    lease = LeaseSettings(ttl=0.3, reclaim_interval=0.05)
    worker = Worker(app, redis, namespace=namespace, lease=lease, on_outcome=outcomes.append)
    with anyio.fail_after(20):
        async with running(worker):
            await wait_until(lambda: bool(outcomes), 15)
    assert not ran
    assert [(o.status, o.reason) for o in outcomes] == [("dead_lettered", "max_deliveries")]
    [(_, fields)] = await redis.xrange(keys.dead_letters("outlived"))
    letter, _ = decode_dead_letter(fields)
    assert "crashed or froze each time" not in letter.detail
    assert "lease expired" in letter.detail
    assert "event loop blocked" in letter.detail
