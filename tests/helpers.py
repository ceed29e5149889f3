"""Helpers shared by the test files: condition polling, running workers, subprocess env."""

from __future__ import annotations

import os
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from streamflow import Worker
from streamflow.keys import GROUP

#: The repository root: subprocess workers run there so ``tests.apps:app`` imports.
ROOT = Path(__file__).resolve().parents[1]


async def wait_until(predicate: Callable[[], Any], timeout: float = 10.0) -> None:
    """Poll a plain condition until it holds; fail after ``timeout`` seconds."""
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.005)


async def wait_for_query(check: Callable[[], Awaitable[Any]], timeout: float = 10.0) -> None:
    """Poll an async condition (a Redis query) until it holds; fail after ``timeout`` seconds."""
    with anyio.fail_after(timeout):
        while not await check():
            await anyio.sleep(0.01)


def wait_for(
    predicate: Callable[[], bool], timeout: float, what: str = "condition", every: float = 0.02
) -> None:
    """Poll ``predicate`` from synchronous code every ``every`` s; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s")
        time.sleep(every)


@asynccontextmanager
async def running(*workers: Worker) -> AsyncIterator[Worker]:
    """Run workers in the background for the block (yields the first); stop them after."""
    async with anyio.create_task_group() as tg:
        for worker in workers:
            await tg.start(worker.run)
        try:
            yield workers[0]
        finally:
            for worker in workers:
                worker.stop()


async def pending_count(redis: Redis, stream: str) -> int:
    """How many entries of ``stream`` are pending in the workers' group."""
    info = await redis.xpending(stream, GROUP)
    return int(info["pending"])


def clean_env(**extra: str) -> dict[str, str]:
    """The inherited environment without any STREAMFLOW_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMFLOW_")}
    env.update(extra)
    return env


def recorded(path: Path) -> list[str]:
    """The lines the test apps appended to ``path`` so far."""
    return path.read_text().splitlines() if path.exists() else []


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a process's /metrics: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
