"""Soak test: a long publish while one worker process drains; checks memory and leftovers.

Publishes ``--messages`` (default 1,000,000) jobs in chunks, keeping the backlog bounded, while
one ``Worker.run`` process drains them and reports its RSS every ``--interval`` seconds.
Passes when the worker's RSS grew less than ``--max-growth-mb`` between warm-up and the end,
and the role stream is empty with nothing pending. Not run by CI: it takes minutes.

    PYTHONPATH=. .venv/bin/python benchmarks/soak.py [--messages 200000] [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from dataclasses import dataclass, field

from _common import (
    REPO_ROOT,
    ROLE,
    WorkerProcess,
    WorkerProcessError,
    git_revision,
    markdown_table,
    pending_count,
    print_section,
    redis_url,
    run_date,
    text_table,
)
from redis.asyncio import Redis

from streamflow import Client
from streamflow.keys import GROUP, Keys

DOC = REPO_ROOT / "docs" / "benchmarks.md"
SECTION = "## Soak"
MB = 1024 * 1024
#: How often the publisher looks at the backlog while it waits for the worker to catch up.
BACKLOG_POLL = 0.01


@dataclass
class Sample:
    t: float
    acked: int
    rss: int


@dataclass
class SoakResult:
    messages: int
    elapsed: float = 0.0
    samples: list[Sample] = field(default_factory=list)
    done: Sample | None = None
    memory_before: int = 0
    memory_after: int = 0
    xlen: int = -1
    pending: int = -1

    def warm(self, fraction: float) -> Sample:
        """The first periodic sample once ``fraction`` of the messages were acked."""
        threshold = fraction * self.messages
        for sample in self.samples:
            if sample.acked >= threshold:
                return sample
        if self.done is None:
            raise RuntimeError("the worker reported no samples")
        return self.done


async def collect(worker: WorkerProcess, result: SoakResult, done: asyncio.Event) -> None:
    async for event in worker.events():
        kind = event.get("event")
        if kind in ("rss", "done"):
            sample = Sample(event["t"], event["acked"], event["rss"])
            result.samples.append(sample)
            if kind == "done":
                result.done = sample
                done.set()
                return
    raise WorkerProcessError(f"the worker exited (code {await worker.wait()}) before the end")


async def wait_backlog_below(redis: Redis, stream: str, limit: int) -> None:
    """Poll XLEN until the worker has caught up to at most ``limit`` queued entries."""
    # The state lives in Redis, so there is no local event to wait on: poll it.
    while await redis.xlen(stream) > limit:
        await asyncio.sleep(BACKLOG_POLL)


async def soak(url: str, args: argparse.Namespace) -> SoakResult:
    n = args.messages
    namespace = f"soak-{uuid.uuid4().hex[:8]}"
    stream = Keys(namespace).role_stream(ROLE)
    result = SoakResult(messages=n)
    admin = Redis.from_url(url)
    client = Client.from_url(url, namespace=namespace)
    options: dict[str, object] = {
        "expected": n,
        "interval": args.interval,
        "concurrency": args.concurrency,
        "read_count": args.read_count,
    }
    try:
        async with WorkerProcess("soak", url, namespace, options) as worker:
            async with asyncio.timeout(60):
                await worker.wait_event("ready")
            result.memory_before = int((await admin.info("memory"))["used_memory"])
            drained = asyncio.Event()
            t0 = time.perf_counter()
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(collect(worker, result, drained))
                published = 0
                while published < n:
                    await wait_backlog_below(admin, stream, args.max_backlog)
                    size = min(args.chunk, n - published)
                    await client.publish_many(ROLE, ({"i": published + i} for i in range(size)))
                    published += size
                    if published * 10 // n != (published - size) * 10 // n:
                        progress(published, n, result)
                async with asyncio.timeout(args.timeout):
                    await drained.wait()
                    result.elapsed = time.perf_counter() - t0
                    await worker.wait()
        result.xlen = await admin.xlen(stream)
        result.pending = await pending_count(admin, stream, GROUP)
        result.memory_after = int((await admin.info("memory"))["used_memory"])
        return result
    finally:
        await admin.delete(stream, Keys(namespace).dead_letters(ROLE))
        await admin.aclose()
        await client.aclose()


def progress(published: int, n: int, result: SoakResult) -> None:
    acked = result.samples[-1].acked if result.samples else 0
    print(f"published {published:,}/{n:,}; worker acked ~{acked:,}", file=sys.stderr)


def verdicts(r: SoakResult, args: argparse.Namespace) -> list[list[str]]:
    warm, end = r.warm(args.warmup), r.done
    assert end is not None
    growth = (end.rss - warm.rss) / MB
    return [
        ["messages drained", f"{r.messages:,} in {r.elapsed:.0f} s"],
        ["average rate (publishing paced by the backlog)", f"{r.messages / r.elapsed:,.0f}/s"],
        [
            f"worker RSS after warm-up ({warm.acked:,} acked, t={warm.t:.0f} s)",
            f"{warm.rss / MB:.1f} MB",
            "",
            "",
        ],
        [f"worker RSS at the end (t={end.t:.0f} s)", f"{end.rss / MB:.1f} MB", "", ""],
        [
            "worker RSS growth",
            f"{growth:+.1f} MB",
            f"< {args.max_growth_mb:g} MB",
            "met" if growth < args.max_growth_mb else "MISSED",
        ],
        ["Redis used_memory before publishing", f"{r.memory_before / MB:.2f} MB", "", ""],
        ["Redis used_memory after drain", f"{r.memory_after / MB:.2f} MB", "", ""],
        ["XLEN after drain", str(r.xlen), "0", "met" if r.xlen == 0 else "MISSED"],
        ["XPENDING after drain", str(r.pending), "0", "met" if r.pending == 0 else "MISSED"],
    ]


def passed(rows: list[list[str]]) -> bool:
    return all(row[3] != "MISSED" for row in rows)


def sample_rows(r: SoakResult) -> list[list[str]]:
    return [[f"{s.t:.1f}", f"{s.acked:,}", f"{s.rss / MB:.1f}"] for s in r.samples]


def render_markdown(r: SoakResult, rows: list[list[str]], args: argparse.Namespace) -> str:
    date = run_date()
    settings = (
        f"chunks of {args.chunk:,}, backlog kept under {args.max_backlog:,}, "
        f"worker concurrency {args.concurrency or 'default'}, "
        f"read_count {args.read_count or 'default'}"
    )
    return "\n".join(
        [
            SECTION,
            "",
            f"Measured {date} by `benchmarks/soak.py --messages {r.messages}`; {settings}; "
            f"machine: 2 cores, shared; streamflow {git_revision()}. Verdict: "
            f"**{'passed' if passed(rows) else 'FAILED'}**.",
            "",
            markdown_table(["figure", "result", "limit", "status"], rows),
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--redis-url", help="use this Redis instead of starting a private one")
    parser.add_argument("--chunk", type=int, default=10_000, help="messages per publish_many")
    parser.add_argument("--max-backlog", type=int, default=50_000, help="publisher pauses above")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between RSS samples")
    parser.add_argument("--warmup", type=float, default=0.1, help="fraction acked = warmed up")
    parser.add_argument("--max-growth-mb", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, help="worker concurrency (default: Worker's)")
    parser.add_argument("--read-count", type=int, help="worker read_count (default: Worker's)")
    parser.add_argument("--timeout", type=float, default=600.0, help="drain deadline after publish")
    parser.add_argument("--write", action="store_true", help=f"replace '{SECTION}' in {DOC}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with redis_url(args.redis_url) as url:
        result = asyncio.run(soak(url, args))
    rows = [row + [""] * (4 - len(row)) for row in verdicts(result, args)]
    print()
    print(text_table(["RSS sample t (s)", "acked", "RSS MB"], sample_rows(result)))
    print()
    print(text_table(["figure", "result", "limit", "status"], rows))
    print()
    markdown = render_markdown(result, rows, args)
    print_section(markdown, DOC, SECTION, write=args.write)
    return 0 if passed(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
