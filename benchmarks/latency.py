"""Enqueue → handler start latency: streamflow (events on and off) against a bare redis-py loop.

One private redis-server, three consumer processes measured one after another within each round
(the order reversed every other round), ``--rounds`` rounds:

* **bare**: ``XADD`` of ``{t}``, consumed by ``_worker.py bare`` (``XREADGROUP COUNT 100 BLOCK
  5000`` + ``XACK``, no streamflow);
* **on** / **off**: ``Client.publish`` of ``{"t": ...}`` to a ``Worker.run()`` process at its
  defaults, the role's lifecycle events on (the default) or off.

Each consumer records ``time.time_ns()`` at handler start minus the ``t`` the publisher stamped;
the first ``WARMUP`` samples of each process are dropped. **Hot**: one message every 2 ms;
**idle**: one every 200 ms, so that the consumer sits blocked in ``XREADGROUP`` and the machine
idles between messages. p50/p99/max over all rounds' samples pooled, and the median of the
per-round p50s; the 1-minute load average is read when each measurement ends.

    PYTHONPATH=. .venv/bin/python benchmarks/latency.py [--quick] [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from _common import (
    REPO_ROOT,
    ROLE,
    WorkerProcess,
    git_revision,
    markdown_table,
    print_section,
    redis_url,
    redis_version,
    run_date,
)

from streamflow import Client
from streamflow.keys import Keys

DOC = REPO_ROOT / "docs" / "benchmarks.md"
SECTION = "## Latency (enqueue → handler start)"
WARMUP = 20
VARIANTS = ("bare", "on", "off")
#: (name, seconds between messages, messages per round, and with --quick)
PACES = (("hot", 0.002, 500, 100), ("idle", 0.2, 60, 15))
TARGET_P50_MS, TARGET_P99_MS = 0.9, 2.0


@dataclass
class Cell:
    """The samples of one variant at one pace, over every round."""

    samples_ms: list[float] = field(default_factory=list)
    round_p50s: list[float] = field(default_factory=list)
    loads: list[float] = field(default_factory=list)


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


async def publish_paced(url: str, namespace: str, variant: str, count: int, gap: float) -> None:
    """``count`` messages stamped with the time of publishing, ``gap`` seconds apart."""
    client = Client.from_url(url, namespace=namespace)
    stream = Keys(namespace).role_stream(ROLE)
    try:
        for _ in range(count):
            if variant == "bare":
                await client.redis.xadd(stream, {"t": str(time.time_ns())})
            else:
                await client.publish(ROLE, {"t": time.time_ns()})
            await asyncio.sleep(gap)
    finally:
        await client.aclose()


async def measure(url: str, variant: str, count: int, gap: float) -> list[float]:
    """Milliseconds from publish to handler start, warm-up dropped, for one consumer process."""
    namespace = f"lat-{uuid.uuid4().hex[:8]}"
    total = count + WARMUP
    mode = "bare" if variant == "bare" else "latency"
    options = {"expected": total} if variant == "bare" else {"expected": total, "events": variant}
    async with WorkerProcess(mode, url, namespace, options) as worker:
        async with asyncio.timeout(60):
            await worker.wait_event("ready")
        await publish_paced(url, namespace, variant, total, gap)
        async with asyncio.timeout(60):
            report = await worker.wait_event("latencies")
            await worker.wait()
    return [ns / 1e6 for ns in report["ns"][WARMUP:]]


async def run(url: str, rounds: int, quick: bool) -> dict[tuple[str, str], Cell]:
    cells = {(pace, v): Cell() for pace, *_ in PACES for v in VARIANTS}
    for r in range(rounds):
        order = VARIANTS if r % 2 == 0 else tuple(reversed(VARIANTS))
        for pace, gap, count, quick_count in PACES:
            for variant in order:
                samples = await measure(url, variant, quick_count if quick else count, gap)
                cell = cells[pace, variant]
                cell.samples_ms += samples
                cell.round_p50s.append(percentile(samples, 50))
                cell.loads.append(os.getloadavg()[0])
                print(f"round {r + 1} {pace} {variant}: p50 {percentile(samples, 50):.3f} ms",
                      file=sys.stderr, flush=True)  # fmt: skip
    return cells


def status(p50: float, p99: float) -> str:
    met = p50 <= TARGET_P50_MS and p99 <= TARGET_P99_MS
    return "met" if met else "**not met**"


def render(cells: dict[tuple[str, str], Cell], rounds: int, version: str) -> str:
    header = ["case", "bare redis-py loop", "events on (default)", "events off", "status (on)"]
    rows = []
    for pace, *_ in PACES:
        on = cells[pace, "on"].samples_ms
        for label, q in (("p50", 50), ("p99", 99), ("max", 100)):
            row = [f"{pace}, {label}"]
            for v in VARIANTS:
                cell = cells[pace, v]
                value = f"{percentile(cell.samples_ms, q):.3f} ms"
                if q == 50:
                    value += f" ({statistics.median(cell.round_p50s):.3f})"
                row.append(value)
            row.append(status(percentile(on, 50), percentile(on, 99)) if q == 50 else "")
            rows.append(row)
    loads = [x for c in cells.values() for x in c.loads]
    return (
        f"{SECTION}\n\nMeasured by `benchmarks/latency.py` on {run_date()} at {git_revision()}"
        f" (Redis {version}, {rounds} rounds, 2 cores; 1-minute load average "
        f"{min(loads):.2f} to {max(loads):.2f}). Target: p50 ≤ {TARGET_P50_MS} ms and p99 ≤ "
        f"{TARGET_P99_MS} ms, hot and idle. In brackets: the median of the per-round p50s.\n\n"
        + markdown_table(header, rows)
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--redis-url", help="use this Redis instead of a private redis-server")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="fewer messages and 2 rounds")
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rounds = 2 if args.quick else args.rounds
    with redis_url(args.redis_url) as url:
        cells = asyncio.run(run(url, rounds, args.quick))
        version = asyncio.run(redis_version(url))
    print_section(render(cells, rounds, version), DOC, SECTION, write=args.write)


if __name__ == "__main__":
    main()
