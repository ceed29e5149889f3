"""Redis CPU per message, publish and drain apart, with the commands that spent it.

For each streamflow given (a directory to import it from, as ``PYTHONPATH``; ``.`` for the work
tree; ``bare`` for the bare redis-py loop of ``throughput.py``, XREADGROUP + XACK in this
process, the reference of the same machine), in alternating rounds against one private
redis-server: publish N jobs with ``Client.publish_many``, then drain them with one default
worker process (``_worker.py drain``). ``INFO cpu`` is read before publishing, between, and
after the drain, and ``INFO commandstats`` around the drain: calls and wall µs per message of
each command (inside scripts too; EVALSHA's time includes the commands its script ran).

    PYTHONPATH=. .venv/bin/python benchmarks/redis_cpu.py --messages 100000 --rounds 2 \\
        /tmp/streamflow-074ce1c .
    ... --redis-server /path/to/redis-server   # another build, e.g. Redis 8.2
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from typing import Any

from _common import ROLE, WorkerProcess, redis_cpu_seconds
from redis.asyncio import Redis
from throughput import bare_drain

from streamflow import Client
from streamflow.keys import Keys
from streamflow.ops.server import RedisServer

#: Commands of the drain worth a line (the rest are start-up and bookkeeping).
SHOWN = ("evalsha", "xreadgroup", "xpending", "xack", "xdel", "xtrim", "xackdel")


async def commandstats(redis: Redis) -> dict[str, tuple[int, int]]:
    info: dict[str, Any] = await redis.info("commandstats")
    return {name.removeprefix("cmdstat_"): (v["calls"], v["usec"]) for name, v in info.items()}


async def one_run(url: str, n: int, path: str) -> str:
    """One publish + drain with the streamflow at ``path``; a report of a few lines."""
    os.environ["PYTHONPATH"] = path  # the worker process imports streamflow from there
    namespace = f"cpu-{uuid.uuid4().hex[:8]}"
    admin, client = Redis.from_url(url), Client.from_url(url, namespace=namespace)
    stream = Keys(namespace).role_stream(ROLE)
    try:
        cpu0 = await redis_cpu_seconds(admin)
        await client.publish_many(ROLE, [{"i": i} for i in range(n)])
        cpu1 = await redis_cpu_seconds(admin)
        stats0 = await commandstats(admin)
        if path == BARE:
            report = await drain_bare(admin, stream, n)
        else:
            async with WorkerProcess("drain", url, namespace) as worker:
                async with asyncio.timeout(120 + n / 500):
                    report = await worker.wait_event("drained")
                    await worker.wait()
        cpu2 = await redis_cpu_seconds(admin)
        stats1 = await commandstats(admin)
        if report["acked"] != n or (path != BARE and await admin.xlen(stream)):
            raise RuntimeError(f"{path}: acked {report['acked']}/{n}, entries left")
    finally:
        await admin.delete(stream)
        await admin.aclose()
        await client.aclose()
    lines = [
        f"{path}: Redis CPU us/msg publish {(cpu1 - cpu0) / n * 1e6:.2f}, drain "
        f"{(cpu2 - cpu1) / n * 1e6:.2f}; worker {report['cpu'] / n * 1e6:.2f} us/msg, "
        f"{n / report['elapsed']:,.0f} msgs/s"
    ]
    for name in SHOWN:
        (calls1, usec1), (calls0, usec0) = stats1.get(name, (0, 0)), stats0.get(name, (0, 0))
        calls, usec = calls1 - calls0, usec1 - usec0
        if calls:
            lines.append(f"    {name:11} {calls:6} calls  {usec / n:6.3f} us/msg (wall)")
    return "\n".join(lines)


#: The ``path`` that names the bare redis-py loop instead of a streamflow.
BARE = "bare"


async def drain_bare(redis: Redis, stream: str, n: int) -> dict[str, Any]:
    """The bare loop's drain of ``stream``, reported like the worker's (its entries are kept)."""
    await redis.xgroup_create(stream, "g", id="0")
    cpu0, t0 = time.process_time(), time.perf_counter()
    acked = await bare_drain(redis, stream)
    return {"acked": acked, "cpu": time.process_time() - cpu0, "elapsed": time.perf_counter() - t0}


async def measure(url: str, paths: list[str], messages: int, rounds: int) -> None:
    admin = Redis.from_url(url)
    print("redis-server", (await admin.info("server"))["redis_version"])
    await admin.aclose()
    for _ in range(rounds):
        for path in paths:
            print(await one_run(url, messages, path), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="where to import streamflow from, in turn")
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--redis-server", default=None, help="redis-server executable")
    args = parser.parse_args()
    paths = [path if path == BARE else os.path.abspath(path) for path in args.paths]
    with RedisServer(executable=args.redis_server, appendonly=False) as server:
        asyncio.run(measure(server.url, paths, args.messages, args.rounds))


if __name__ == "__main__":
    main()
