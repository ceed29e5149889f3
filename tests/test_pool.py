"""Idle consumers are woken one at a time, and a wake is never lost (streamflow.pool)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import anyio
import pytest

from streamflow.pool import ConsumerPool

pytestmark = pytest.mark.anyio


def idle_pool() -> ConsumerPool:
    """A pool whose idle line alone is used (nothing is queued or handled)."""
    none = cast(Any, None)
    return ConsumerPool(none, none, none, none, none, none, concurrency=2, unsafe_after=30.0)


async def two_idle(pool: ConsumerPool) -> tuple[asyncio.Future[None], asyncio.Future[None]]:
    first = asyncio.ensure_future(pool._wait_woken())
    second = asyncio.ensure_future(pool._wait_woken())
    with anyio.fail_after(5):
        while len(pool._idle) < 2:
            await asyncio.sleep(0)
    return first, second


async def test_a_wake_for_a_consumer_cancelled_before_it_ran_goes_to_the_next() -> None:
    pool = idle_pool()
    first, second = await two_idle(pool)
    pool._wake_consumer()  # the first in line is woken...
    first.cancel()  # ...and cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await first
    with anyio.fail_after(5):
        await second
    assert pool._waking == 0
    assert not pool._idle


async def test_a_consumer_cancelled_while_idle_leaves_the_line() -> None:
    pool = idle_pool()
    first, second = await two_idle(pool)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert len(pool._idle) == 1
    pool._wake_consumer()
    with anyio.fail_after(5):
        await second
    assert pool._waking == 0
