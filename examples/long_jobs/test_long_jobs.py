"""Cancel and adoption of long jobs, on a real redis-server with in-process workers.

Run with ``pytest examples/long_jobs``. Leases and cancel signals are Redis stream semantics,
so these tests use the suite's private redis-server (``redis_url``), never fakeredis.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from examples.long_jobs.app import app, progress
from streamflow import Client, LeaseSettings, Outcome, Worker

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.slow]

#: Short leases so that the demo of adoption takes a fraction of a second.
LEASE = LeaseSettings(ttl=1.0, reclaim_interval=0.1)


async def wait_until(predicate: Callable[[], Any]) -> None:
    """Poll ``predicate`` until it holds (every caller runs under ``anyio.fail_after``)."""
    while not predicate():  # noqa: ASYNC110 - the state is plain data other tasks change
        await anyio.sleep(0.005)


@asynccontextmanager
async def client_and_worker(
    redis_url: str, namespace: str, outcomes: list[Outcome], **options: Any
) -> AsyncIterator[tuple[Client, Worker]]:
    """A client, and a worker running in the background for the block."""
    async with Client.from_url(redis_url, namespace=namespace) as client:
        worker = Worker(
            app,
            client.redis,
            namespace=namespace,
            block_ms=100,
            lease=LEASE,
            on_outcome=outcomes.append,
            **options,
        )
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)
            try:
                yield client, worker
            finally:
                worker.stop()


def events(message_id: str) -> list[tuple[str, int]]:
    return [(event, step) for event, step, _ in progress.journal[message_id]]


def hard_cancelled(caplog: pytest.LogCaptureFixture) -> bool:
    """Whether the worker logged that it hard-cancelled a handler after its cancel_grace."""
    return any("hard-cancelling crunch message" in r.getMessage() for r in caplog.records)


async def test_cancel_waits_for_the_save_then_stops_between_steps(
    redis_url: str, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    outcomes: list[Outcome] = []
    with anyio.fail_after(20):
        async with client_and_worker(redis_url, namespace, outcomes) as (client, worker):
            # The save (1.3 s) outlasts the role's cancel_grace (1 s): the hard cancel waits.
            job = {"steps": 5, "work_seconds": 0.01, "save_seconds": 1.3}
            message_id = await client.publish("crunch", job)
            await wait_until(lambda: ("save", 0) in events(message_id))
            result = await client.cancel(message_id, target="message", wait=True, timeout=10)

    assert result.complete
    assert result.stopped == [(worker.consumer, message_id)]
    assert [(o.message_id, o.status) for o in outcomes] == [(message_id, "cancelled")]
    # Step 0's save finished; step 1 never started.
    assert events(message_id) == [("work", 0), ("save", 0), ("saved", 0)]
    assert hard_cancelled(caplog)  # the grace ran out during the save: the shield held it back


async def test_cancel_during_the_work_abandons_it_at_once(
    redis_url: str, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    outcomes: list[Outcome] = []
    with anyio.fail_after(20):
        async with client_and_worker(redis_url, namespace, outcomes) as (client, _):
            job = {"steps": 5, "work_seconds": 30, "save_seconds": 0.01}
            message_id = await client.publish("crunch", job)
            await wait_until(lambda: ("work", 0) in events(message_id))
            result = await client.cancel(message_id, target="message", wait=True, timeout=10)

    assert result.complete
    assert [(o.message_id, o.status) for o in outcomes] == [(message_id, "cancelled")]
    assert events(message_id) == [("work", 0)]  # abandoned: nothing saved for step 0
    assert not hard_cancelled(caplog)  # it stopped by itself, within the grace


async def test_a_worker_shutting_down_hands_the_job_to_another_which_resumes_it(
    redis_url: str, namespace: str
) -> None:
    """Worker a stops mid-job: its entry is released and worker b adopts it at once."""
    outcomes_a: list[Outcome] = []
    outcomes_b: list[Outcome] = []
    job = {"steps": 8, "work_seconds": 0.05, "save_seconds": 0.05}
    with anyio.fail_after(20):
        # a's shutdown grace is short, so that it gives up the job soon after a.stop().
        grace = {"shutdown_grace": 0.2}
        async with client_and_worker(redis_url, namespace, outcomes_a, **grace) as (client, a):
            message_id = await client.publish("crunch", job)
            await wait_until(lambda: ("saved", 1) in events(message_id))
            # b starts while a still holds the job: b cannot take it, a's lease is renewed.
            async with client_and_worker(redis_url, namespace, outcomes_b) as (_, b):
                a.stop()  # like SIGTERM: after its shutdown grace a releases the job
                await wait_until(lambda: outcomes_b)

    assert [(o.message_id, o.status) for o in outcomes_a] == [(message_id, "released")]
    assert [(o.message_id, o.status) for o in outcomes_b] == [(message_id, "acked")]
    saved = [(step, who) for event, step, who in progress.journal[message_id] if event == "saved"]
    assert [step for step, _ in saved] == list(range(8))  # every step saved exactly once
    by_a = [step for step, who in saved if who == a.consumer]
    by_b = [step for step, who in saved if who == b.consumer]
    assert by_a == list(range(len(by_a))) and len(by_a) >= 2  # a did the first steps
    assert by_b == list(range(len(by_a), 8)) and by_b  # b resumed after them
