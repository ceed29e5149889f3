"""What per-key limits cost a worker: a plain role against key-limited ones, in the same run.

One invocation, one private redis-server, rounds alternating three drains of N no-op jobs by
one in-process worker (``Worker.run``, concurrency 32, until every job is acked):

* ``plain``: a role without per-key limits, jobs without a limit key;
* ``keyed, not binding``: ``key_concurrency=1000``, jobs spread over 100 limit keys: the gate's
  cost alone (one ``key_limit.lua`` call per batch of waiting starts, one per sweep for
  their releases);
* ``keyed, saturated``: ``key_concurrency=1``, jobs spread over 20 keys: most jobs are parked
  and woken at least once (``park.lua``, ``unpark.lua``, one more read).

Jobs are published before the worker starts (interleaved keys), outside the timed part. Each
figure is the median of the rounds; worker CPU is this process's CPU time during the drain,
Redis CPU the server's.

    PYTHONPATH=. .venv/bin/python benchmarks/keylimits_cost.py [--quick] [--rounds 3] [--write]
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
import warnings
from dataclasses import dataclass
from typing import Any

import anyio
from _common import REPO_ROOT, redis_cpu_seconds, run_rounds
from redis.asyncio import Redis

from streamflow import App, Client, Context, Worker, connect
from streamflow.delivery import Outcome
from streamflow.errors import UnknownRoleWarning

DOC = REPO_ROOT / "docs" / "benchmarks.md"
SECTION = "## Per-key limits (cost per message)"
DEFAULT_MESSAGES, QUICK_MESSAGES = 5_000, 1_000
CONCURRENCY = 32
#: (label, declared key_concurrency or None, number of limit keys)
VARIANTS: list[tuple[str, int | None, int]] = [
    ("plain", None, 0),
    ("keyed, not binding", 1000, 100),
    ("keyed, saturated", 1, 20),
]


@dataclass(frozen=True)
class Drain:
    label: str
    rate: float
    worker_cpu_us: float
    redis_cpu_us: float
    parks_per_job: float


def make_app(key_concurrency: int | None) -> App:
    app = App()

    @app.role("bench", key_concurrency=key_concurrency, events=False)
    async def bench(ctx: Context, payload: Any) -> None:
        return None

    return app


async def publish(client: Client, n: int, keys: int) -> None:
    async def one(i: int) -> None:
        key = f"cust-{i % keys}" if keys else None
        await client.publish("bench", {"i": i}, limit_key=key)

    for start in range(0, n, 500):
        await asyncio.gather(*(one(i) for i in range(start, min(n, start + 500))))


async def drain(url: str, n: int, label: str, key_concurrency: int | None, keys: int) -> Drain:
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    redis: Redis = connect.connect(url)
    client = Client(redis, namespace=namespace)
    acked = 0
    done = anyio.Event()

    def count(outcome: Outcome) -> None:
        nonlocal acked
        if outcome.status == "acked":
            acked += 1
            if acked == n:
                done.set()

    try:
        await publish(client, n, keys)
        worker = Worker(
            make_app(key_concurrency),
            redis,
            namespace=namespace,
            concurrency=CONCURRENCY,
            on_outcome=count,
        )
        cpu0, redis0 = time.process_time(), await redis_cpu_seconds(redis)
        t0 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)
            with anyio.fail_after(300):
                await done.wait()
            elapsed = time.perf_counter() - t0
            cpu1, redis1 = time.process_time(), await redis_cpu_seconds(redis)
            worker.stop()
        parks = worker.statistics().key_parks.get("bench", 0)
        return Drain(
            label,
            n / elapsed,
            (cpu1 - cpu0) / n * 1e6,
            (redis1 - redis0) / n * 1e6,
            parks / n,
        )
    finally:
        await redis.flushdb()
        await redis.aclose()


async def one_round(url: str, n: int) -> list[Drain]:
    return [await drain(url, n, label, cap, keys) for label, cap, keys in VARIANTS]


def render(rounds: list[list[Drain]], n: int, date: str) -> str:
    def med(i: int, what: str) -> float:
        return statistics.median(float(getattr(r[i], what)) for r in rounds)

    lines = [
        SECTION,
        "",
        f"_{date}; {n:,} no-op jobs per drain by one in-process worker (concurrency "
        f"{CONCURRENCY}), {len(rounds)} rounds alternating the three; medians. Reproduce: "
        "`PYTHONPATH=. .venv/bin/python benchmarks/keylimits_cost.py --write`._",
        "",
        "| | msgs/s | of plain | worker CPU µs/msg | Redis CPU µs/msg | parks per job |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for i, (label, _, _) in enumerate(VARIANTS):
        ratio = statistics.median(r[i].rate / r[0].rate for r in rounds)
        lines.append(
            f"| {label} | {med(i, 'rate'):,.0f} | {ratio:.0%} | {med(i, 'worker_cpu_us'):.0f} "
            f"| {med(i, 'redis_cpu_us'):.0f} | {med(i, 'parks_per_job'):.2f} |"
        )
    lines += [
        "",
        "`keyed, not binding` is the gate alone: one `key_limit.lua` call per batch of "
        "waiting starts (grouped by key) and one per sweep for their releases (a sweep runs "
        "as soon as a handler ends); in this drain a batch is about 15 jobs, not a whole read "
        '(see "Per-key limits: where the time goes"). `keyed, saturated` adds '
        "parking: each park is one `park.lua`, one more look at the key, and later one "
        "`unpark.lua` and one more read of the job. Per-key limits are for jobs that cost "
        "far more than these (calls to a customer's API), not for no-op handlers.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    warnings.filterwarnings("ignore", category=UnknownRoleWarning)  # a fresh namespace each
    run_rounds(
        argv,
        DOC,
        SECTION,
        (DEFAULT_MESSAGES, QUICK_MESSAGES),
        one_round,
        lambda drains: ", ".join(f"{d.label} {d.rate:,.0f}/s" for d in drains),
        render,
        __doc__.splitlines()[0] if __doc__ else None,
    )


if __name__ == "__main__":
    main()
