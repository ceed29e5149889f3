"""Enqueue → handler start latency: streamflow (events on and off) against a bare redis-py loop.

One private redis-server, consumer processes measured one after another within each round
(the order reversed every other round), ``--rounds`` rounds:

* **bare**: redis-py ``XADD`` of ``{t}``, consumed by ``_worker.py bare`` (``XREADGROUP COUNT
  100 BLOCK 5000`` + ``XACK``, no streamflow);
* **bare+publish**: the same bare consumer, fed by ``Client.publish`` (it reads ``t`` from the
  job's body with one orjson parse): against **bare**, the publish side alone; against **on**,
  the delivery side alone;
* **on** / **off**: ``Client.publish`` of ``{"t": ...}`` to a ``Worker.run()`` process at its
  defaults, the role's lifecycle events on (the default) or off;
* **before** (with ``--before DIR``): **on** with both the publisher and the worker importing
  the streamflow in ``DIR`` first (a ``git archive <commit> streamflow`` snapshot), so that old
  and new code are measured in the same rounds; **before bare+publish**: **bare+publish** with
  the publisher from ``DIR`` (the publish side of old and new code alone).

``--variants`` picks some of them, ``--paces`` hot or idle only.

The publisher is a process of its own (``_worker.py publish``), one message at a time, each
stamped with ``time.time_ns()`` just before it is published. Each consumer records
``time.time_ns()`` at handler start minus that stamp; the first ``WARMUP`` samples of each
process are dropped. **Hot**: one message every 2 ms;
**idle**: one every 200 ms, so that the consumer sits blocked in ``XREADGROUP`` and the machine
idles between messages. p50/p99/max over all rounds' samples pooled, and the median of the
per-round p50s; the 1-minute load average is read when each measurement ends.

    PYTHONPATH=. .venv/bin/python benchmarks/latency.py [--quick] [--write] [--before DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from _common import (
    REPO_ROOT,
    WorkerProcess,
    git_revision,
    markdown_table,
    print_section,
    redis_url,
    redis_version,
    run_date,
)

DOC = REPO_ROOT / "docs" / "benchmarks.md"
SECTION = "## Latency (enqueue → handler start)"
WARMUP = 20
VARIANTS = ("bare", "bare+publish", "on", "off")
#: What each variant's publisher and consumer run: (publish, consumer mode, events).
SETUPS = {
    "bare": ("raw", "bare", None),
    "bare+publish": ("client", "bare", None),
    "on": ("client", "latency", "on"),
    "off": ("client", "latency", "off"),
    "before": ("client", "latency", "on"),
    "before bare+publish": ("client", "bare", None),
}
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


async def measure(
    url: str, variant: str, count: int, gap: float, before: str | None
) -> list[float]:
    """Milliseconds from publish to handler start, warm-up dropped, for one consumer process."""
    namespace = f"lat-{uuid.uuid4().hex[:8]}"
    total = count + WARMUP
    publish, mode, events = SETUPS[variant]
    path = before if variant.startswith("before") else None
    options = {"expected": total, "events": events}
    async with WorkerProcess(mode, url, namespace, options, pythonpath=path) as worker:
        async with asyncio.timeout(60):
            await worker.wait_event("ready")
        paced = {"expected": total, "gap": gap, "publish": publish}
        async with WorkerProcess("publish", url, namespace, paced, pythonpath=path) as publisher:
            async with asyncio.timeout(60 + total * gap):
                await publisher.wait_event("published")
        async with asyncio.timeout(60):
            report = await worker.wait_event("latencies")
            await worker.wait()
    return [ns / 1e6 for ns in report["ns"][WARMUP:]]


async def run(
    url: str,
    rounds: int,
    quick: bool,
    variants: Sequence[str],
    before: str | None,
    paces: Sequence[tuple[str, float, int, int]] = PACES,
) -> dict[tuple[str, str], Cell]:
    cells = {(pace, v): Cell() for pace, *_ in paces for v in variants}
    for r in range(rounds):
        order = variants if r % 2 == 0 else tuple(reversed(variants))
        for pace, gap, count, quick_count in paces:
            for variant in order:
                samples = await measure(url, variant, quick_count if quick else count, gap, before)
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


LABELS = {
    "bare": "bare loop, XADD",
    "bare+publish": "bare loop, Client.publish",
    "on": "events on (default)",
    "off": "events off",
    "before": "before: events on",
    "before bare+publish": "before: bare loop, Client.publish",
}


def render(
    cells: dict[tuple[str, str], Cell],
    rounds: int,
    version: str,
    variants: Sequence[str],
    before: str | None,
    paces: Sequence[tuple[str, float, int, int]] = PACES,
) -> str:
    header = ["case", *(LABELS[v] for v in variants), "status (on)"]
    rows = []
    for pace, *_ in paces:
        on = cells.get((pace, "on"), Cell()).samples_ms or [float("nan")]
        for label, q in (("p50", 50), ("p99", 99), ("max", 100)):
            row = [f"{pace}, {label}"]
            for v in variants:
                cell = cells[pace, v]
                value = f"{percentile(cell.samples_ms, q):.3f} ms"
                if q == 50:
                    value += f" ({statistics.median(cell.round_p50s):.3f})"
                row.append(value)
            row.append(status(percentile(on, 50), percentile(on, 99)) if q == 50 else "")
            rows.append(row)
    per_round = [
        [f"{pace}, p50 by round", *(" / ".join(f"{x:.3f}" for x in cells[pace, v].round_p50s)
                                    for v in variants), ""]
        for pace, *_ in paces
    ]  # fmt: skip
    loads = [x for c in cells.values() for x in c.loads]
    snapshot = f"; before: the streamflow in `{before}`" if before else ""
    return (
        f"{SECTION}\n\nMeasured by `benchmarks/latency.py` on {run_date()} at {git_revision()}"
        f" (Redis {version}, {rounds} rounds, 2 cores, shared; 1-minute load average "
        f"{min(loads):.2f} to {max(loads):.2f}{snapshot}). Target: p50 ≤ {TARGET_P50_MS} ms and "
        f"p99 ≤ {TARGET_P99_MS} ms, hot and idle. In brackets: the median of the per-round "
        "p50s.\n\n" + markdown_table(header, rows + per_round)
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--redis-url", help="use this Redis instead of a private redis-server")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="fewer messages and 2 rounds")
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    parser.add_argument(
        "--before", metavar="DIR", help="also run 'on' with the streamflow in DIR (a snapshot)"
    )
    parser.add_argument("--variants", nargs="+", choices=list(SETUPS), help="only these")
    parser.add_argument("--paces", nargs="+", choices=[p[0] for p in PACES], help="only these")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rounds = 2 if args.quick else args.rounds
    before = str(Path(args.before).resolve()) if args.before else None
    variants = args.variants or ((*VARIANTS, "before") if before else VARIANTS)
    paces = [p for p in PACES if not args.paces or p[0] in args.paces]
    with redis_url(args.redis_url) as url:
        cells = asyncio.run(run(url, rounds, args.quick, variants, before, paces))
        version = asyncio.run(redis_version(url))
    text = render(cells, rounds, version, variants, args.before, paces)
    print_section(text, DOC, SECTION, write=args.write)


if __name__ == "__main__":
    main()
