"""What priority levels cost per message: a role with 3 levels against a plain role.

One invocation, one private redis-server, rounds alternating the order of the settings so
that they compare like with like on a shared machine. Each drain: a worker process creates the
role first (a role with priorities must exist before a priority is accepted), N jobs are
published with ``Client.publish_many``, then one worker process (``benchmarks/_worker.py
drain``, default settings) drains them. The settings: a plain role; a role with 3 levels and
the jobs spread evenly over them (``priorities=``); the same role with every job at level 0
(its reader looks at the two empty levels above first, every read: the worst case of the
reads). Reported per setting, as medians (and ranges) of the rounds: the drain rate, the
worker's CPU per message (the drain alone) and the Redis server's CPU per message (publish and
drain).

    PYTHONPATH=. .venv/bin/python benchmarks/priorities.py [-n 50000] [--rounds 3] [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from dataclasses import dataclass

from _common import (
    REPO_ROOT,
    ROLE,
    WorkerProcess,
    git_revision,
    print_section,
    redis_cpu_seconds,
    redis_url,
    run_date,
)
from redis.asyncio import Redis

from streamflow import Client
from streamflow.keys import Keys

DOC = REPO_ROOT / "docs" / "benchmarks.md"
SECTION = "## Priorities (cost per message)"
LEVELS = 3


#: The settings compared: (name, levels, the levels the jobs are published at).
SETTINGS: tuple[tuple[str, int, str], ...] = (
    ("plain role", 1, "0"),
    (f"{LEVELS} levels, jobs spread evenly", LEVELS, "spread"),
    (f"{LEVELS} levels, every job at level 0", LEVELS, "0"),
)


@dataclass
class Drain:
    setting: str
    levels: int
    n: int
    elapsed: float
    worker_cpu_us: float
    redis_cpu_us: float

    @property
    def rate(self) -> float:
        return self.n / self.elapsed


async def drain(url: str, n: int, setting: tuple[str, int, str]) -> Drain:
    name, levels, published_at = setting
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    keys = Keys(namespace)
    options = {"priorities": levels}
    admin = Redis.from_url(url)
    try:
        async with WorkerProcess("drain", url, namespace, options) as first:  # creates the role
            async with asyncio.timeout(60):
                await first.wait_event("drained")
                await first.wait()
        async with Client.from_url(url, namespace=namespace) as client:
            payloads = [{"i": i} for i in range(n)]
            ranks = [i % levels for i in range(n)] if published_at == "spread" else None
            cpu0 = await redis_cpu_seconds(admin)
            await client.publish_many(ROLE, payloads, priorities=ranks)
        async with WorkerProcess("drain", url, namespace, options) as worker:
            async with asyncio.timeout(120 + n / 500):
                report = await worker.wait_event("drained")
                await worker.wait()
        cpu1 = await redis_cpu_seconds(admin)
        left = [await admin.xlen(keys.role_stream(ROLE, level)) for level in range(levels)]
        if report["acked"] != n or any(left):
            raise RuntimeError(f"{name}: acked {report['acked']}/{n}, left {left}")
        return Drain(
            name, levels, n, report["elapsed"], report["cpu"] / n * 1e6, (cpu1 - cpu0) / n * 1e6
        )
    finally:
        streams = [keys.role_stream(ROLE, level) for level in range(levels)]
        await admin.delete(*streams, keys.lifecycle(), keys.role_config(ROLE))
        await admin.aclose()


def of(drains: list[Drain], setting: str, what: str) -> list[float]:
    return [float(getattr(d, what)) for d in drains if d.setting == setting]


def cell(values: list[float], digits: int) -> str:
    """The median, then the range of the rounds."""
    low, high = min(values), max(values)
    return f"{statistics.median(values):,.{digits}f} ({low:,.{digits}f} to {high:,.{digits}f})"


def render(drains: list[Drain], n: int, rounds: int, date: str) -> str:
    rows = [
        f"| {name} | {cell(of(drains, name, 'rate'), 0)} | "
        f"{cell(of(drains, name, 'worker_cpu_us'), 1)} | "
        f"{cell(of(drains, name, 'redis_cpu_us'), 1)} |"
        for name, _, _ in SETTINGS
    ]
    plain = SETTINGS[0][0]
    deltas = []
    for name, _, _ in SETTINGS[1:]:
        worker = statistics.median(of(drains, name, "worker_cpu_us"))
        worker -= statistics.median(of(drains, plain, "worker_cpu_us"))
        redis = statistics.median(of(drains, name, "redis_cpu_us"))
        redis -= statistics.median(of(drains, plain, "redis_cpu_us"))
        deltas.append(f"{name}: worker {worker:+.1f} µs, Redis {redis:+.1f} µs")
    return "\n".join(
        [
            SECTION,
            "",
            f"_{date}; streamflow {git_revision()}; {n:,} no-op jobs per drain, {rounds} rounds "
            "alternating the order of the settings; one worker process with default settings, "
            "one private redis-server; medians, the rounds' range in brackets. **Machine: 2 "
            "cores, shared with other work.** Reproduce: `PYTHONPATH=. .venv/bin/python "
            "benchmarks/priorities.py --write`._",
            "",
            "| role | drain msgs/s | worker CPU µs/msg | Redis CPU µs/msg (publish + drain) |",
            "|---|---:|---:|---:|",
            *rows,
            "",
            "Per message against the plain role (medians): " + "; ".join(deltas) + ".",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("-n", "--messages", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--redis-url", help="use this Redis instead of starting a private one")
    parser.add_argument("--write", action="store_true", help=f"replace '{SECTION}' in {DOC}")
    args = parser.parse_args(argv)
    date = run_date()
    drains: list[Drain] = []
    with redis_url(args.redis_url) as url:
        for i in range(args.rounds):
            for setting in SETTINGS if i % 2 == 0 else SETTINGS[::-1]:
                t0 = time.perf_counter()
                drains.append(asyncio.run(drain(url, args.messages, setting)))
                d = drains[-1]
                print(
                    f"round {i + 1}, {d.setting}: {d.rate:,.0f} msgs/s, worker "
                    f"{d.worker_cpu_us:.1f} us/msg, Redis {d.redis_cpu_us:.1f} us/msg "
                    f"({time.perf_counter() - t0:.1f} s)",
                    file=sys.stderr,
                )
    print_section(render(drains, args.messages, args.rounds, date), DOC, SECTION, write=args.write)


if __name__ == "__main__":
    main()
