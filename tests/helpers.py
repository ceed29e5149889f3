"""Helpers shared by the test files: one home for what several files need.

Condition polling (``wait_*``), in-process workers with short leases (``make_worker``,
``running``, ``statuses``), the ``streamflow`` command as a subprocess (``CLI``, ``run_cli``,
``kill_tree``), free ports and HTTP probes. Fixtures are in ``tests/conftest.py``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import psutil
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from streamflow import App, LeaseSettings, Worker
from streamflow.delivery import Outcome
from streamflow.keys import GROUP

#: The repository root: subprocess workers run there so ``tests.apps:app`` imports.
ROOT = Path(__file__).resolve().parents[1]

#: Short leases so that adoption happens within a test: TTL 1 s, renewal every 1/3 s.
LEASE = LeaseSettings(ttl=1.0, reclaim_interval=0.1)
#: The same short lease for a ``streamflow worker`` subprocess, and a short read block.
LEASE_ARGS = ("--lease-ttl", "1", "--reclaim-interval", "0.2", "--block-ms", "200")

#: The ``streamflow`` command, run with this interpreter.
CLI = [sys.executable, "-m", "streamflow"]
#: How long a ``streamflow`` command that should end by itself may run.
CLI_TIMEOUT = 20.0


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


def make_worker(
    app: App,
    redis: Redis,
    namespace: str,
    outcomes: list[Outcome] | None = None,
    **options: Any,
) -> Worker:
    """An in-process worker with short leases (:data:`LEASE`) that reports to ``outcomes``."""
    options.setdefault("lease", LEASE)
    options.setdefault("block_ms", 100)
    return Worker(
        app,
        redis,
        namespace=namespace,
        on_outcome=outcomes.append if outcomes is not None else None,
        **options,
    )


def statuses(outcomes: list[Outcome], message_id: str) -> list[str]:
    """The statuses reported for ``message_id`` so far, in order."""
    return [o.status for o in outcomes if o.message_id == message_id]


def last_statuses(outcomes: list[Outcome]) -> dict[str | None, str]:
    """Message id -> the last status reported for it."""
    return {o.message_id: o.status for o in outcomes}


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


def run_cli(
    *args: str, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m streamflow ARGS`` to completion (killed if it outlives the timeout)."""
    return subprocess.run(
        [*CLI, *args],
        cwd=ROOT,
        env=env if env is not None else clean_env(),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
    )


def kill_tree(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``process`` and every descendant still alive, and reap ``process``."""
    try:
        family = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for proc in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    if process.poll() is None:
        process.kill()
    process.wait(timeout=10)


def free_port() -> int:
    """A loopback port nothing listens on now (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def status(port: int, path: str) -> int:
    """The HTTP status of ``GET http://127.0.0.1:PORT/PATH``; 0 when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def most_at_once(starts: Iterable[float], ends: Iterable[float]) -> int:
    """The most spans running at one time, from their start and end times (at a tie, an end
    comes before a start)."""
    changes = sorted([(at, 1) for at in starts] + [(at, -1) for at in ends])
    running = most = 0
    for _, step in changes:
        running += step
        most = max(most, running)
    return most
