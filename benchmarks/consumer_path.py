"""CPU per message of the worker's per-delivery path, without Redis or waiting on the loop.

A ``Worker`` serving a no-op ``async def`` handler is built on an unconnected client. Each
round makes ``--batch`` entries shaped like published jobs (``{"i": n}`` payloads, random
hex ids) and times, per message:

* ``dispatch``: ``ConsumerPool.dispatch`` (a ``Delivery`` each, held and queued);
* ``process``: per delivery ``_process`` with the handler's runner driven to completion,
  then ``Settler.ack_nowait`` and ``_finished``, as the consumer loop does on the hot path;
* ``flush``: ``acker.flush()`` with the settle script stubbed to refuse nothing;
* ``events``: the lifecycle event log's ``flush()`` (entries built, the write stubbed: no
  round trip), so that work moved from the per-delivery path to the flush is still counted.

``--events off`` turns the role's lifecycle events off (on by default, as in a default role).
``--metrics`` enables the worker's metrics (handlers timed); ``--middleware N`` adds N
pass-through middleware to the app (a streamflow that has them).

It prints the best round of ``--rounds`` (after a warm-up) and the 10th percentile: far steadier
on a shared machine than a drain's CPU, which also pays for reading, Redis and the scheduler.
It runs the streamflow that ``PYTHONPATH`` names first, so alternate snapshots to compare::

    PYTHONPATH=/tmp/sf-074ce1c .venv/bin/python benchmarks/consumer_path.py
    PYTHONPATH=. .venv/bin/python benchmarks/consumer_path.py
"""

from __future__ import annotations

import argparse
import time
import uuid
from typing import Any

import anyio
from redis.asyncio import Redis

import streamflow
from streamflow import App, Context, Worker, scripts
from streamflow.protocol import encode_job_fields
from streamflow.streams import Entry
from streamflow.worker import tune_garbage_collector

WARMUP = 20


async def _refuse_nothing(*args: object, **kwargs: object) -> list[bytes]:
    return []


def entries(n: int) -> list[Entry]:
    now = time.time_ns() // 1_000_000
    jobs = [
        encode_job_fields(
            message_id=uuid.uuid4().hex, role="bench", payload={"i": i}, created_at_ms=now
        )
        for i in range(n)
    ]
    return [Entry(b"%d-0" % i, {b"message": job}) for i, job in enumerate(jobs)]


class _Sent:
    """What a stubbed command returns: awaitable (a script call awaits it), or left alone."""

    def __await__(self) -> Any:
        return iter(())


class _NoPipeline:
    """Takes the event log's writes (a pipeline, or a script call) and sends nothing."""

    def pipeline(self, transaction: bool = True) -> _NoPipeline:
        return self

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: _Sent()

    async def execute(self) -> list[Any]:
        return []


async def one_round(worker: Worker, batch: list[Entry], scope: anyio.CancelScope) -> list[int]:
    """Nanoseconds spent in dispatch, process, flush and the events' flush for ``batch``."""
    role = worker._roles[0]
    t0 = time.perf_counter_ns()
    pool = worker._pool
    pool.dispatch(role, role.name, "stream", batch, time.monotonic())
    t1 = time.perf_counter_ns()
    queue, settler = pool._queue, worker._settler
    while queue:
        delivery = queue.popleft()
        step: Any = worker._runner.process(delivery, scope)
        try:
            step.send(None)  # the no-op handler never suspends
        except StopIteration as done:
            decision = done.value
        else:
            raise RuntimeError("the handler's runner suspended")
        settler.ack_nowait(delivery, decision)
        pool._finished(delivery)
    t2 = time.perf_counter_ns()
    await settler.acker.flush()
    t3 = time.perf_counter_ns()
    await worker._events.flush()
    return [t1 - t0, t2 - t1, t3 - t2, time.perf_counter_ns() - t3]


def pass_through() -> Any:
    """A middleware that only calls the rest of the chain (imported here: old snapshots lack it)."""
    from streamflow.middleware import CallNext, Middleware

    class PassThrough(Middleware):
        async def handle(self, ctx: Context, payload: Any, call_next: CallNext) -> Any:
            return await call_next(ctx, payload)

    return PassThrough()


async def measure(
    rounds: int, size: int, metrics: bool, middleware: int, events: bool
) -> list[list[int]]:
    app = App()

    @app.role("bench", events=events)
    async def noop(ctx: Context, payload: Any) -> None:
        pass

    scripts.settle = _refuse_nothing  # type: ignore[assignment]
    if middleware:
        app.add_middleware(*(pass_through() for _ in range(middleware)))
    worker = Worker(app, Redis(), namespace="bench")
    worker._events._redis = _NoPipeline()  # type: ignore[assignment]
    if metrics:
        worker.enable_metrics()
    tune_garbage_collector()
    scope = anyio.CancelScope()
    return [await one_round(worker, entries(size), scope) for _ in range(rounds + WARMUP)][WARMUP:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=300, help="timed rounds (300)")
    parser.add_argument("--batch", type=int, default=500, help="entries per round (500)")
    parser.add_argument("--metrics", action="store_true", help="time handlers (metrics on)")
    parser.add_argument(
        "--middleware", type=int, default=0, help="pass-through middleware added to the app (0)"
    )
    parser.add_argument(
        "--events", choices=("on", "off"), default="on", help="the role's lifecycle events (on)"
    )
    args = parser.parse_args()
    events = args.events == "on"
    results = anyio.run(measure, args.rounds, args.batch, args.metrics, args.middleware, events)
    per_message = [[ns / args.batch / 1000 for ns in r] for r in results]
    for i, name in enumerate(("dispatch", "process", "flush", "events")):
        print(f"{name:10s} {min(r[i] for r in per_message):.3f} us (best round)")
    totals = sorted(sum(r) for r in per_message)
    p10 = totals[len(totals) // 10]
    print(f"{'total':10s} {totals[0]:.3f} us (best round), {p10:.3f} us (p10)")
    print(f"streamflow from {streamflow.__file__}")


if __name__ == "__main__":
    main()
