"""One streamflow worker process for the benchmarks (started by throughput.py and soak.py).

Every mode serves the role ``bench`` of an app with a no-op async handler and writes one JSON
object per line to stdout:

* ``drain``: ``Worker.drain()`` what is queued (``--keep-result S``: the role keeps each job's
  result, its payload, S seconds), then ``{"event": "drained", ...}`` with the
  elapsed wall time and the process CPU time of the drain alone (imports and connecting are
  outside the timed part), and its start and end as Unix times (to time several processes).
  ``--partitions P`` declares the role with P partitions, ``--priorities N`` with N priority
  levels; ``--events off`` turns its lifecycle events off (if it has them); ``--role-options
  JSON`` passes more ``app.role()`` keyword arguments (e.g. ``{"rate_limit": "500/s"}``).
  ``--time-scale F`` runs the event loop's clock F times slower than the wall clock (for a
  worker under valgrind, see ``slow_loop_clock``).
* ``latency``: ``Worker.run()``; prints ``{"event": "ready"}`` once the consumer group exists,
  records ``time.time_ns()`` minus the payload's ``t`` for each message, and after ``--expected``
  messages prints ``{"event": "latencies", "ns": [...]}`` and exits.
  ``--events off`` turns the role's lifecycle events off.
* ``bare``: no streamflow: a plain redis-py ``XREADGROUP COUNT 100 BLOCK 5000`` + ``XACK`` loop
  on the role's stream, recording like ``latency`` (the baseline of ``latency.py``); it reads
  ``t`` from a raw ``{t}`` entry or from a job published by ``Client.publish`` (one orjson
  parse of the body, no checks).
* ``publish``: publishes ``--expected`` messages ``--gap`` seconds apart, each stamped with
  ``time.time_ns()`` just before it is published (``--publish client``: ``Client.publish`` of
  ``{"t": ...}``; ``raw``: redis-py ``XADD`` of ``{t}``), then prints ``{"event": "published"}``
  (``latency.py``'s publisher, a process of its own so that it runs the code base it is given).
* ``soak``: ``Worker.run()``; prints ``{"event": "ready"}``, then an ``rss`` sample every
  ``--interval`` seconds, and a ``done`` sample when ``--expected`` messages were acked (taken
  before the worker shuts down), then exits.

SIGTERM or SIGINT stop the worker gracefully in the ``run`` modes. Like ``streamflow worker``,
every mode calls ``tune_garbage_collector()`` once the worker is built (the process is the
worker's alone). ``--loop asyncio|uvloop`` picks the event loop (default asyncio); the
``drained`` event names the loop that actually ran, so a benchmark can check it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import inspect
import json
import logging
import os
import signal
import sys
import time
from typing import Any

import anyio
import orjson
import psutil  # type: ignore[import-untyped]
from anyio.abc import TaskStatus

from streamflow import App, Client, Context, Outcome, Worker, connect
from streamflow.keys import GROUP, Keys
from streamflow.worker import tune_garbage_collector

ROLE = "bench"


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def loop_name() -> str:
    """``uvloop`` or ``asyncio``: the event loop this coroutine runs on."""
    return (
        "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"
    )


def worker_options(args: argparse.Namespace) -> dict[str, Any]:
    """Only the options given on the command line: the rest keep Worker's defaults."""
    options: dict[str, Any] = {"namespace": args.namespace}
    if args.concurrency is not None:
        options["concurrency"] = args.concurrency
    if args.read_count is not None:
        options["read_count"] = args.read_count
    if args.prefetch is not None:
        options["prefetch"] = args.prefetch
    return options


def _counters(stats: dict[str, Any]) -> dict[str, Any]:
    """The plain counters of an older snapshot's statistics (JSON has no tuple keys)."""
    return {name: value for name, value in stats.items() if isinstance(value, int | float)}


def slow_loop_clock(scale: float) -> None:
    """Make the event loop's clock run ``scale`` times slower than the wall clock from now on.

    Under valgrind (benchmarks/instructions.py) the process runs ~50 times slower, so its
    wall-clock timers (the event log's 50 ms linger, retry promotion polls, lease renewals)
    would fire ~50 times as often per message as natively, and as often as the machine's load
    makes the run long. Every anyio and asyncio timer reads ``loop.time()``; ``time.time()``
    and what Redis stores keep the real clock, and so does the blocked-loop watchdog (a
    thread), which may then warn that the loop was blocked for 5 s: expected here.
    """
    loop = asyncio.get_running_loop()
    real = loop.time
    start = real()
    loop.time = lambda: start + (real() - start) / scale  # type: ignore[method-assign]


async def drain(args: argparse.Namespace) -> None:
    app = App()

    # Only options away from their defaults are passed: a snapshot of an older streamflow
    # (benchmarks/compare_drain.py) may not know them.
    options: dict[str, Any] = {"partitions": args.partitions}
    if args.keep_result:
        options["keep_result"] = args.keep_result
    # A snapshot older than lifecycle events (no ``events`` option) has none to turn off.
    if args.events == "off" and "events" in inspect.signature(app.role).parameters:
        options["events"] = False
    if args.priorities > 1:
        options["priorities"] = args.priorities
    options.update(json.loads(args.role_options) if args.role_options else {})

    @app.role(ROLE, **options)
    async def noop(ctx: Context, payload: Any) -> Any:
        return payload  # kept only with --keep-result

    redis = connect.connect(args.url)
    try:
        await redis.ping()
        worker = Worker(app, redis, **worker_options(args))
        if args.metrics == "on":
            worker.enable_metrics()  # handlers timed (no server: nothing scrapes)
        tune_garbage_collector()
        if args.time_scale != 1:
            slow_loop_clock(args.time_scale)
        if args.start_at:  # several processes start draining together
            await anyio.sleep(max(0.0, args.start_at - time.time()))
        cpu0, t0, started_at = time.process_time(), time.perf_counter(), time.time()
        await worker.drain()
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        statistics = worker.statistics()
        # Older snapshots (compare_drain.py) have a plain dataclass without to_dict().
        to_dict = getattr(statistics, "to_dict", None)
        stats = to_dict() if to_dict else _counters(dataclasses.asdict(statistics))
        emit(
            "drained",
            elapsed=elapsed,
            cpu=cpu,
            concurrency=worker.concurrency,
            loop=loop_name(),
            started_at=started_at,
            ended_at=time.time(),
            **stats,
        )
    finally:
        await redis.aclose()


async def stop_on_signal(worker: Worker) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            worker.stop()
            return


async def latency(args: argparse.Namespace) -> None:
    app = App()
    samples: list[int] = []
    worker: Worker | None = None

    # Only options away from their defaults: an older snapshot (--before) may not know them.
    options: dict[str, Any] = {}
    if args.keep_result:
        options["keep_result"] = args.keep_result
    if args.events == "off":
        options["events"] = False

    @app.role(ROLE, **options)
    async def record(ctx: Context, payload: Any) -> None:
        samples.append(time.time_ns() - int(payload["t"]))
        if len(samples) >= args.expected and worker is not None:
            worker.stop()

    redis = connect.connect(args.url)
    try:
        await redis.ping()
        worker = Worker(app, redis, **worker_options(args))
        tune_garbage_collector()
        async with anyio.create_task_group() as tg:
            tg.start_soon(stop_on_signal, worker)
            # run() returns once the handler has seen --expected messages (or on a signal).
            await tg.start(run_then_cancel, worker, tg.cancel_scope)
            emit("ready")
        emit("latencies", ns=samples)
    finally:
        await redis.aclose()


async def bare(args: argparse.Namespace) -> None:
    stream, group = Keys(args.namespace).role_stream(ROLE), GROUP
    samples: list[int] = []
    redis = connect.connect(args.url)
    try:
        await redis.xgroup_create(stream, group, id="0", mkstream=True)
        emit("ready")
        while len(samples) < args.expected:
            reply = await redis.xreadgroup(group, "bare", {stream: ">"}, count=100, block=5000)
            for _, entries in reply or ():
                for entry_id, fields in entries:
                    samples.append(time.time_ns() - stamp_of(fields))
                    await redis.xack(stream, group, entry_id)
        emit("latencies", ns=samples)
    finally:
        await redis.aclose()


def stamp_of(fields: dict[bytes, bytes]) -> int:
    """The publisher's ``t`` of a raw ``{t}`` entry or of a job's payload."""
    raw = fields.get(b"t")
    return int(raw) if raw is not None else int(orjson.loads(fields[b"message"])["payload"]["t"])


async def publish(args: argparse.Namespace) -> None:
    client = Client.from_url(args.url, namespace=args.namespace)
    stream = Keys(args.namespace).role_stream(ROLE)
    try:
        for _ in range(args.expected):
            if args.publish == "raw":
                await client.redis.xadd(stream, {"t": str(time.time_ns())})
            else:
                await client.publish(ROLE, {"t": time.time_ns()})
            await asyncio.sleep(args.gap)
        emit("published")
    finally:
        await client.aclose()


async def run_then_cancel(
    worker: Worker, scope: anyio.CancelScope, *, task_status: TaskStatus[None]
) -> None:
    """Run the worker; when it returns, cancel the helper tasks beside it."""
    await worker.run(task_status=task_status)
    scope.cancel()


async def soak(args: argparse.Namespace) -> None:
    app = App()
    process = psutil.Process(os.getpid())
    start = time.monotonic()
    worker: Worker | None = None
    acked = 0

    def sample(event: str) -> None:
        emit(event, t=time.monotonic() - start, acked=acked, rss=process.memory_info().rss)

    @app.role(ROLE)
    async def noop(ctx: Context, payload: Any) -> None:
        pass

    def on_outcome(outcome: Outcome) -> None:
        nonlocal acked
        if outcome.status == "acked":
            acked += 1
            if acked == args.expected and worker is not None:
                sample("done")
                worker.stop()

    async def report() -> None:
        while True:
            await anyio.sleep(args.interval)
            sample("rss")

    redis = connect.connect(args.url)
    try:
        await redis.ping()
        worker = Worker(app, redis, on_outcome=on_outcome, **worker_options(args))
        tune_garbage_collector()
        async with anyio.create_task_group() as tg:
            tg.start_soon(stop_on_signal, worker)
            await tg.start(run_then_cancel, worker, tg.cancel_scope)
            sample("ready")
            tg.start_soon(report)
    finally:
        await redis.aclose()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("mode", choices=["drain", "latency", "bare", "soak", "publish"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--concurrency", type=int)
    parser.add_argument("--read-count", type=int)
    parser.add_argument("--prefetch", type=lambda v: v if v == "auto" else int(v))
    parser.add_argument("--partitions", type=int, default=1, help="drain: the role's partitions")
    parser.add_argument("--priorities", type=int, default=1, help="drain: the role's levels")
    parser.add_argument(
        "--events", choices=["on", "off"], default="on", help="drain, latency: lifecycle events"
    )
    parser.add_argument(
        "--metrics", choices=["on", "off"], default="off", help="drain: time handlers (metrics)"
    )
    parser.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="drain: the loop's clock this many times slower",
    )
    parser.add_argument("--start-at", type=float, default=0.0, help="drain: Unix time to start")
    parser.add_argument("--expected", type=int, default=0, help="messages to wait for")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between samples")
    parser.add_argument("--gap", type=float, default=0.2, help="publish: seconds between messages")
    parser.add_argument(
        "--publish", choices=["client", "raw"], default="client", help="publish: how"
    )
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument(
        "--keep-result", type=float, help="drain, latency: the role keeps results this many s"
    )
    parser.add_argument(
        "--role-options", help='drain: more app.role() options as JSON, e.g. {"rate_limit": "9/s"}'
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    args = parse_args(argv)
    modes = {"drain": drain, "latency": latency, "bare": bare, "soak": soak, "publish": publish}
    anyio.run(modes[args.mode], args, backend_options={"use_uvloop": args.loop == "uvloop"})


if __name__ == "__main__":
    main()
