"""The dashboard's Redis load: commands per second with 0, 1 and 5 open live pages.

One private redis-server, one ``streamflow dashboard`` process (refresh 1 s), a namespace with
5 roles (jobs, a dead letter each), a coordinator-less task (it stays queued: a task page keeps
streaming) and a few hundred lifecycle events. A "page" is what a browser tab keeps open: the
overview's or the task's server-sent events stream. Each scenario opens its streams, waits for
their first event, resets Redis's statistics (``CONFIG RESETSTAT``), waits ``--seconds`` and
reads ``INFO commandstats``: the calls of every command but this script's own ``INFO`` and
``CONFIG``, per second.

    PYTHONPATH=. .venv/bin/python benchmarks/dashboard_load.py [--seconds 10] [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import socket
import sys
import warnings
from collections.abc import AsyncIterator

from _common import REPO_ROOT, git_revision, markdown_table, redis_url, replace_section
from redis.asyncio import Redis

from streamflow import Client, Graph

DOC = REPO_ROOT / "docs" / "benchmarks.md"
SECTION = "## Dashboard (Redis load of open pages)"
NAMESPACE = "dash-bench"
ROLES = [f"role{n}" for n in range(5)]
#: This script's own commands, not counted.
OWN = {"info", "config|resetstat", "config"}


async def seed(url: str) -> str:
    """Roles with jobs and a dead letter each, lifecycle events, and a queued task."""
    warnings.simplefilter("ignore")  # no worker, no coordinator: on purpose
    async with Client.from_url(url, namespace=NAMESPACE) as client:
        for role in ROLES:
            for n in range(20):
                await client.publish(role, {"n": n})
            await client.redis.xadd(client.keys.dead_letters(role), {"x": "y"})
        events = b",".join(
            b'{"protocol":1,"kind":"lifecycle","type":"succeeded","at_ms":%d,"role":"role0"}'
            % (int(dt.datetime.now().timestamp() * 1000))
            for _ in range(100)
        )
        for _ in range(3):
            await client.redis.xadd(client.keys.lifecycle(), {"events": b"[" + events + b"]"})
        graph = Graph("bench")
        graph.node("a", function="merge.generic")
        return await client.submit(graph)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def dashboard(url: str) -> AsyncIterator[int]:
    port = free_port()
    args = ["dashboard", "--redis-url", url, "--namespace", NAMESPACE, "--port", str(port)]
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "streamflow", *args, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        for _ in range(300):
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            await asyncio.sleep(0.1)
        yield port
    finally:
        process.terminate()
        await process.wait()


async def page(port: str | int, path: str, first: asyncio.Event) -> None:
    """Hold one live page's event stream open, reading it, until cancelled."""
    reader, writer = await asyncio.open_connection("127.0.0.1", int(port))
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    try:
        while line := await reader.readline():
            if line.startswith(b"data: "):
                first.set()
    finally:
        writer.close()


async def commands_per_second(redis: Redis, seconds: float) -> tuple[float, list[str]]:
    await redis.config_resetstat()
    await asyncio.sleep(seconds)
    stats = await redis.info("commandstats")
    calls = {
        name.removeprefix("cmdstat_"): int(value["calls"])
        for name, value in stats.items()
        if name.removeprefix("cmdstat_") not in OWN
    }
    top = sorted(calls, key=lambda c: -calls[c])[:6]
    # XINFO|GROUPS as XINFO GROUPS: a bar would split the markdown table's cell.
    shown = [f"{c.replace('|', ' ')} {calls[c] / seconds:.1f}" for c in top]
    return sum(calls.values()) / seconds, shown


async def scenario(
    redis: Redis, port: int, paths: list[str], seconds: float
) -> tuple[float, list[str]]:
    firsts = [asyncio.Event() for _ in paths]
    tasks = [asyncio.create_task(page(port, p, f)) for p, f in zip(paths, firsts, strict=True)]
    try:
        await asyncio.wait_for(asyncio.gather(*(f.wait() for f in firsts)), 30)
        return await commands_per_second(redis, seconds)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(1.5)  # the poller stops watching what no page shows


async def measure(url: str, seconds: float) -> list[tuple[str, float, list[str]]]:
    task_id = await seed(url)
    overview, task = "/live/overview", f"/tasks/{task_id}/live"
    plans = {
        "no page open": [],
        "1 overview": [overview],
        "5 overviews": [overview] * 5,
        "1 task page": [task],
        "5 task pages": [task] * 5,
        "1 overview + 1 task page": [overview, task],
    }
    rows = []
    async with dashboard(url) as port:
        redis = Redis.from_url(url)
        try:
            for name, paths in plans.items():
                rate, top = await scenario(redis, port, paths, seconds)
                rows.append((name, rate, top))
                print(f"{name}: {rate:.1f} commands/s ({', '.join(top)})", flush=True)
        finally:
            await redis.aclose()
    return rows


def render(rows: list[tuple[str, float, list[str]]], seconds: float) -> str:
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    table = markdown_table(
        ["Open live pages", "Redis commands/s", "Most sent (per second)"],
        [[name, f"{rate:.1f}", ", ".join(top) or "-"] for name, rate, top in rows],
    )
    return "\n".join(
        [
            SECTION,
            "",
            f"_{when}; streamflow {git_revision()}; {os.cpu_count()} cores; one dashboard "
            f"(refresh 1 s), 5 roles, {seconds:g} s per scenario, `INFO commandstats`. Reproduce: "
            "`PYTHONPATH=. .venv/bin/python benchmarks/dashboard_load.py --write`._",
            "",
            table,
            "",
            "One shared poller per dashboard process reads what the open pages show once per "
            "interval, so five tabs of one page cost what one does; a page that shows something "
            "else (a task) adds its own reads. With no live page open the dashboard sends "
            "nothing. The overview's reads grow with the number of roles (a few commands per "
            "role per second: stream length, groups, pending, flow control).",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--redis-url", help="A Redis to use instead of a private one.")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--write", action="store_true", help="Update docs/benchmarks.md.")
    args = parser.parse_args()
    with redis_url(args.redis_url) as url:
        rows = asyncio.run(measure(url, args.seconds))
    if args.write:
        replace_section(DOC, SECTION, render(rows, args.seconds))


if __name__ == "__main__":
    main()
