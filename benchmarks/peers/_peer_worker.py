"""One worker process of a peer (bare loop, taskiq or dramatiq), driven by run.py.

It speaks like ``benchmarks/_worker.py`` (which run.py starts for streamflow): JSON lines on
stdout, one worker process with its peer's default concurrency.

* ``drain``: consume what is queued; once ``--expected`` jobs ran and Redis shows none of them
  unacknowledged, print ``{"event": "drained", "elapsed": s, "cpu": s, "handled": n}``: wall
  and process CPU time (every thread) from the start of consuming, imports and connecting left
  out.
* ``latency``: print ``{"event": "ready"}`` once consuming, record ``time.time_ns()`` minus the
  payload's ``t`` as each job starts, and after ``--expected`` jobs print
  ``{"event": "latencies", "ns": [...]}``.

The bare loop reuses ``throughput.bare_drain``; a drain stops at its first empty read, as there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

import _peers  # noqa: E402
from redis.asyncio import Redis  # noqa: E402
from throughput import bare_drain  # noqa: E402

#: taskiq and dramatiq ack after the handler returns: how often to look whether all are acked.
POLL = 0.001
#: Time for a consumer started in the background to reach its first read before "ready".
SETTLE = 0.5


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


class Jobs:
    """Counts the jobs run (from any thread) and records their enqueue-to-start latency."""

    def __init__(self, expected: int, *, record: bool) -> None:
        self.expected = expected
        self.record = record
        self.ns: list[int] = []
        self.count = 0
        self.done = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, payload: _peers.Payload) -> None:
        now = time.time_ns()
        with self._lock:
            if self.record:
                self.ns.append(now - payload["t"])
            self.count += 1
            if self.count >= self.expected:
                self.done.set()

    async def wait(self) -> None:
        while not self.done.is_set():
            await asyncio.sleep(POLL)


class Clock:
    """Wall and process CPU time since it was made."""

    def __init__(self) -> None:
        self.cpu0, self.t0 = time.process_time(), time.perf_counter()

    def drained(self, handled: int) -> None:
        elapsed, cpu = time.perf_counter() - self.t0, time.process_time() - self.cpu0
        emit("drained", elapsed=elapsed, cpu=cpu, handled=handled)


# -- bare redis-py loop -------------------------------------------------------------------------


async def bare(args: argparse.Namespace, jobs: Jobs) -> None:
    client = Redis.from_url(args.url)
    key = _peers.bare_stream(args.namespace)
    try:
        await client.ping()
        if args.mode == "drain":
            clock = Clock()
            clock.drained(await bare_drain(client, key))
            return

        def handle(fields: dict[bytes, bytes]) -> None:
            jobs(json.loads(fields[b"message"]))

        emit("ready")
        await bare_drain(client, key, expected=jobs.expected, block=1000, handle=handle)
    finally:
        await client.aclose()


# -- taskiq -------------------------------------------------------------------------------------


async def taskiq(args: argparse.Namespace, jobs: Jobs) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from taskiq.receiver import Receiver

    broker, _ = _peers.make_taskiq(args.url, args.namespace, jobs)
    admin = Redis.from_url(args.url)
    stream = _peers.taskiq_stream(args.namespace)

    async def all_acked() -> bool:
        summary = await admin.xpending(stream, _peers.TASKIQ_GROUP)
        return int(summary["pending"]) == 0

    # What `taskiq worker` does in each worker process, with its default options
    # (max_async_tasks 100, max_prefetch 0), stopped by its shutdown event.
    broker.is_worker_process = True
    await broker.startup()
    shutdown = asyncio.Event()
    try:
        with ThreadPoolExecutor() as pool:
            receiver = Receiver(broker, executor=pool, max_async_tasks=100, run_startup=False)
            clock = Clock()
            listening = asyncio.create_task(receiver.listen(shutdown))
            await finish(args, jobs, clock, all_acked)
            shutdown.set()
            await listening
    finally:
        await broker.shutdown()
        await admin.aclose()


async def finish(
    args: argparse.Namespace, jobs: Jobs, clock: Clock, all_acked: Callable[[], Awaitable[bool]]
) -> None:
    """Report "ready" (latency), wait for the jobs and their acks, report "drained" (drain)."""
    if args.mode == "latency":
        await asyncio.sleep(SETTLE)
        emit("ready")
    await jobs.wait()
    # Latency too waits for the acks (untimed), so that the worker stops with nothing in flight.
    while not await all_acked():
        await asyncio.sleep(POLL)
    if args.mode == "drain":
        clock.drained(jobs.count)


# -- dramatiq -----------------------------------------------------------------------------------


async def dramatiq(args: argparse.Namespace, jobs: Jobs) -> None:
    from dramatiq import Worker

    broker, _ = _peers.make_dramatiq(args.url, args.namespace, jobs)
    admin = Redis.from_url(args.url)
    messages = _peers.dramatiq_messages(args.namespace)

    async def all_acked() -> bool:
        # An ack deletes the message from this hash (dramatiq's dispatch.lua).
        return int(await admin.hlen(messages)) == 0

    worker = Worker(broker)  # worker_threads=8, its default
    try:
        clock = Clock()
        worker.start()
        await finish(args, jobs, clock, all_acked)
    finally:
        worker.stop()
        broker.close()
        await admin.aclose()


PEERS = {"bare": bare, "taskiq": taskiq, "dramatiq": dramatiq}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("mode", choices=["drain", "latency"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--peer", choices=sorted(PEERS), required=True)
    parser.add_argument("--expected", type=int, required=True, help="jobs to wait for")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    jobs = Jobs(args.expected, record=args.mode == "latency")
    asyncio.run(PEERS[args.peer](args, jobs))
    if args.mode == "latency":
        emit("latencies", ns=jobs.ns)


if __name__ == "__main__":
    main()
