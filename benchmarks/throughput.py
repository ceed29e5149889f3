"""Core throughput benchmark: streamflow's worker and client against a bare redis-py loop.

Everything runs in ONE invocation against ONE private redis-server, so the ratios are
comparable even on a noisy machine. See benchmarks/README.md for what each figure means.

    PYTHONPATH=. .venv/bin/python benchmarks/throughput.py [--quick] [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from _common import (
    REPO_ROOT,
    ROLE,
    WorkerProcess,
    git_revision,
    markdown_table,
    pending_count,
    redis_cpu_seconds,
    redis_url,
    replace_section,
    text_table,
)
from redis.asyncio import Redis

from streamflow import Client
from streamflow.keys import GROUP, Keys

DOC = REPO_ROOT / "docs" / "benchmarks.md"
SECTION = "## Throughput (core)"
DEFAULT_MESSAGES = 100_000
QUICK_MESSAGES = 20_000
#: (concurrency, read_count, prefetch) combinations tried for the "best settings" figure.
GRID = [(c, r, p) for c in (64, 128, 256) for r, p in ((256, 0), (256, 256), (1000, 1000))]
BARE_READ_COUNT = 100
PUBLISH_CHUNK = 1000
BIG_CHUNK = 10_000
LATENCY_MESSAGES = 1000
LATENCY_WARMUP = 20
#: The deliberate gap between single publishes, so that the worker is idle for each.
LATENCY_GAP = 0.002

TARGET_RATIO = 0.40
TARGET_PUBLISH = 50_000.0
TARGET_REDIS_CPU_US = 10.0
TARGET_P50_MS = 1.0


@dataclass
class Drain:
    """One drain of N queued messages."""

    label: str
    messages: int
    elapsed: float
    redis_cpu_us: float  # per message, publish + drain
    consumer_cpu_us: float | None = None  # per message, the draining process
    publish_rate: float | None = None
    concurrency: int | None = None
    read_count: int | None = None
    prefetch: int | None = None

    @property
    def rate(self) -> float:
        return self.messages / self.elapsed


@dataclass
class Results:
    messages: int
    bare: list[Drain] = field(default_factory=list)
    default: list[Drain] = field(default_factory=list)
    grid: list[Drain] = field(default_factory=list)
    publish: dict[int, float] = field(default_factory=dict)
    latency_ms: list[float] = field(default_factory=list)
    redis_version: str = ""

    @property
    def best_bare(self) -> Drain:
        return max(self.bare, key=lambda d: d.rate)

    @property
    def best_default(self) -> Drain:
        return max(self.default, key=lambda d: d.rate)

    @property
    def best_tuned(self) -> Drain:
        return max([*self.grid, *self.default], key=lambda d: d.rate)


def sample_body(i: int) -> bytes:
    """A small JSON message shaped (and sized) like a streamflow job envelope."""
    doc = {
        "protocol": 1,
        "kind": "job",
        "id": uuid.uuid4().hex,
        "role": ROLE,
        "payload": {"i": i},
        "attempt": 1,
        "created_at_ms": time.time_ns() // 1_000_000,
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def noop(fields: dict[bytes, bytes]) -> None:
    """The bare loop's handler."""


# -- a: the bare redis-py loop ------------------------------------------------------------------


async def bare_loop(url: str, n: int) -> Drain:
    """XADD n messages (pipelined), then drain them with XREADGROUP + pipelined XACK."""
    redis = Redis.from_url(url)
    key = f"bare-{uuid.uuid4().hex[:8]}:stream"
    try:
        await redis.xgroup_create(key, "g", id="0", mkstream=True)
        body = sample_body(0)
        cpu0 = await redis_cpu_seconds(redis)
        for start in range(0, n, PUBLISH_CHUNK):
            pipe = redis.pipeline(transaction=False)
            for _ in range(min(PUBLISH_CHUNK, n - start)):
                pipe.xadd(key, {b"message": body})
            await pipe.execute()

        handled = 0
        previous: list[bytes] = []
        cpu_t0, t0 = time.process_time(), time.perf_counter()
        while True:
            pipe = redis.pipeline(transaction=False)
            if previous:
                pipe.xack(key, "g", *previous)
            pipe.xreadgroup("g", "c", {key: ">"}, count=BARE_READ_COUNT)
            reply = (await pipe.execute())[-1]
            if not reply:
                break  # the last batch was acknowledged in this same pipeline
            previous = []
            for entry_id, fields in reply[0][1]:
                noop(fields)
                previous.append(entry_id)
            handled += len(previous)
        elapsed, cpu_self = time.perf_counter() - t0, time.process_time() - cpu_t0
        cpu1 = await redis_cpu_seconds(redis)
        pending = await pending_count(redis, key, "g")
        if handled != n or pending:
            raise RuntimeError(f"bare loop handled {handled}/{n}, {pending} left pending")
        return Drain("bare redis-py loop", n, elapsed, (cpu1 - cpu0) / n * 1e6, cpu_self / n * 1e6)
    finally:
        await redis.delete(key)
        await redis.aclose()


# -- b, c, f: the streamflow worker in its own process ------------------------------------------


async def worker_drain(
    url: str,
    n: int,
    label: str,
    *,
    concurrency: int | None = None,
    read_count: int | None = None,
    prefetch: int | None = None,
    profile: Path | None = None,
) -> Drain:
    """Publish n jobs with Client.publish_many, then drain them with one worker process."""
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    stream = Keys(namespace).role_stream(ROLE)
    admin = Redis.from_url(url)
    client = Client.from_url(url, namespace=namespace)
    try:
        payloads = [{"i": i} for i in range(n)]
        cpu0 = await redis_cpu_seconds(admin)
        t0 = time.perf_counter()
        await client.publish_many(ROLE, payloads)
        publish_rate = n / (time.perf_counter() - t0)
        options = {"concurrency": concurrency, "read_count": read_count, "prefetch": prefetch}
        async with WorkerProcess("drain", url, namespace, options, profile=profile) as worker:
            async with asyncio.timeout(120 + n / 500):
                report = await worker.wait_event("drained")
                await worker.wait()
        cpu1 = await redis_cpu_seconds(admin)
        left, pending = await admin.xlen(stream), await pending_count(admin, stream, GROUP)
        if report["acked"] != n or left or pending:
            raise RuntimeError(f"{label}: acked {report['acked']}/{n}, xlen {left}, {pending=}")
        return Drain(
            label,
            n,
            report["elapsed"],
            (cpu1 - cpu0) / n * 1e6,
            consumer_cpu_us=report["cpu"] / n * 1e6,
            publish_rate=publish_rate,
            concurrency=report["concurrency"],
            read_count=read_count,
            prefetch=prefetch,
        )
    finally:
        await admin.delete(stream, Keys(namespace).dead_letters(ROLE))
        await admin.aclose()
        await client.aclose()


# -- e: publish rate ----------------------------------------------------------------------------


async def publish_rate(url: str, n: int, chunk_size: int) -> float:
    namespace = f"pub-{uuid.uuid4().hex[:8]}"
    client = Client.from_url(url, namespace=namespace)
    try:
        payloads = [{"i": i} for i in range(n)]
        t0 = time.perf_counter()
        await client.publish_many(ROLE, payloads, chunk_size=chunk_size)
        return n / (time.perf_counter() - t0)
    finally:
        await client.redis.delete(Keys(namespace).role_stream(ROLE))
        await client.aclose()


# -- g: enqueue-to-start latency ----------------------------------------------------------------


async def latency(url: str, count: int) -> list[float]:
    """Milliseconds from Client.publish to the handler starting, one message at a time."""
    namespace = f"lat-{uuid.uuid4().hex[:8]}"
    total = count + LATENCY_WARMUP
    client = Client.from_url(url, namespace=namespace)
    try:
        async with WorkerProcess("latency", url, namespace, {"expected": total}) as worker:
            async with asyncio.timeout(60):
                await worker.wait_event("ready")
            for _ in range(total):
                await client.publish(ROLE, {"t": time.time_ns()})
                await asyncio.sleep(LATENCY_GAP)
            async with asyncio.timeout(60):
                report = await worker.wait_event("latencies")
                await worker.wait()
        return [ns / 1e6 for ns in report["ns"][LATENCY_WARMUP:]]
    finally:
        await client.redis.delete(Keys(namespace).role_stream(ROLE))
        await client.aclose()


# -- the run ------------------------------------------------------------------------------------


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def run(url: str, n: int, repeats: int) -> Results:
    results = Results(messages=n)
    admin = Redis.from_url(url)
    try:
        results.redis_version = (await admin.info("server"))["redis_version"]
    finally:
        await admin.aclose()
    # Bare and default runs alternate so that drift on a shared machine hits both alike.
    for i in range(repeats):
        results.bare.append(await bare_loop(url, n))
        progress(f"bare loop #{i + 1}: {results.bare[-1].rate:,.0f} msgs/s")
        results.default.append(await worker_drain(url, n, "streamflow worker, default"))
        progress(f"worker default #{i + 1}: {results.default[-1].rate:,.0f} msgs/s")
    for concurrency, read_count, prefetch in GRID:
        label = f"concurrency {concurrency}, read_count {read_count}, prefetch {prefetch}"
        drain = await worker_drain(
            url, n, label, concurrency=concurrency, read_count=read_count, prefetch=prefetch
        )
        results.grid.append(drain)
        progress(f"worker {label}: {drain.rate:,.0f} msgs/s")
    for chunk in (PUBLISH_CHUNK, BIG_CHUNK):
        results.publish[chunk] = await publish_rate(url, n, chunk)
        progress(f"publish_many chunk {chunk}: {results.publish[chunk]:,.0f} msgs/s")
    results.latency_ms = await latency(url, LATENCY_MESSAGES)
    progress("latency done")
    return results


async def profile_worker(url: str, n: int, out: Path) -> None:
    """One extra default-settings drain with the worker under cProfile (not a figure)."""
    await worker_drain(url, n, "profiled", profile=out)
    progress(f"cProfile stats of the worker written to {out}")


# -- reporting ----------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def settings(d: Drain) -> str:
    if d.read_count is None:
        return f"defaults (concurrency {d.concurrency}, read_count 256, prefetch 0)"
    return f"concurrency {d.concurrency}, read_count {d.read_count}, prefetch {d.prefetch}"


def summary_rows(r: Results) -> list[list[str]]:
    bare, default, best = r.best_bare, r.best_default, r.best_tuned
    p50, p99 = percentile(r.latency_ms, 50), percentile(r.latency_ms, 99)
    return [
        ["drain, bare redis-py loop", f"{bare.rate:,.0f} msgs/s", "(baseline)", ""],
        [
            f"drain, streamflow worker, {settings(default)}",
            f"{default.rate:,.0f} msgs/s = {default.rate / bare.rate:.0%} of bare",
            f">= {TARGET_RATIO:.0%} of bare",
            verdict(default.rate / bare.rate >= TARGET_RATIO),
        ],
        [
            f"drain, streamflow worker, best: {settings(best)}",
            f"{best.rate:,.0f} msgs/s = {best.rate / bare.rate:.0%} of bare",
            f">= {TARGET_RATIO:.0%} of bare",
            verdict(best.rate / bare.rate >= TARGET_RATIO),
        ],
        *[
            [
                f"publish, Client.publish_many chunk_size={chunk:,}",
                f"{rate:,.0f} msgs/s",
                f">= {TARGET_PUBLISH:,.0f} msgs/s",
                verdict(rate >= TARGET_PUBLISH),
            ]
            for chunk, rate in r.publish.items()
        ],
        [
            "Redis CPU per message, bare loop (XADD + read + XACK)",
            f"{min(d.redis_cpu_us for d in r.bare):.1f} us",
            "",
            "",
        ],
        [
            "Redis CPU per message, streamflow (publish_many + worker drain, defaults)",
            f"{min(d.redis_cpu_us for d in r.default):.1f} us",
            f"<= {TARGET_REDIS_CPU_US:g} us",
            verdict(min(d.redis_cpu_us for d in r.default) <= TARGET_REDIS_CPU_US),
        ],
        [
            f"enqueue-to-start latency, idle worker, p50 / p99 ({len(r.latency_ms)} msgs)",
            f"{p50:.2f} ms / {p99:.2f} ms",
            f"p50 <= {TARGET_P50_MS:g} ms",
            verdict(p50 <= TARGET_P50_MS),
        ],
    ]


def drain_rows(r: Results) -> list[list[str]]:
    bare = r.best_bare.rate
    rows = []
    for d in [*r.bare, *r.default, *r.grid]:
        rows.append(
            [
                d.label,
                f"{d.rate:,.0f}",
                f"{d.rate / bare:.0%}",
                f"{d.elapsed:.2f}",
                f"{d.consumer_cpu_us:.1f}" if d.consumer_cpu_us is not None else "-",
                f"{d.redis_cpu_us:.1f}",
            ]
        )
    return rows


DRAIN_HEADER = [
    "run",
    "msgs/s",
    "of best bare",
    "drain s",
    "consumer CPU us/msg",
    "Redis CPU us/msg (publish+drain)",
]


def render_markdown(r: Results, date: str) -> str:
    return "\n".join(
        [
            SECTION,
            "",
            f"Measured {date} by `benchmarks/throughput.py`; N = {r.messages:,} messages per "
            f"run; machine: 2 cores, shared; redis-server {r.redis_version} (private, loopback, "
            f"no persistence); streamflow {git_revision()}; Python "
            f"{sys.version.split()[0]}. Every figure comes from this one run.",
            "",
            markdown_table(["figure", "result", "target", "status"], summary_rows(r)),
            "",
            "Every drain (bare runs and default runs alternate; the best of each is used above):",
            "",
            markdown_table(DRAIN_HEADER, drain_rows(r)),
            "",
            "Consumer CPU is the draining process's CPU time (user + system) during the drain "
            "(the benchmark process for the bare loop, the worker process otherwise); "
            "Redis CPU is `INFO cpu` used_cpu_user + used_cpu_sys over publishing and draining.",
        ]
    )


def print_report(r: Results) -> None:
    print()
    print(text_table(["figure", "result", "target", "status"], summary_rows(r)))
    print()
    print(text_table(DRAIN_HEADER, drain_rows(r)))
    print()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, help=f"N per run (default {DEFAULT_MESSAGES:,})")
    parser.add_argument("--quick", action="store_true", help=f"N = {QUICK_MESSAGES:,}")
    parser.add_argument("--redis-url", help="use this Redis instead of starting a private one")
    parser.add_argument("--repeats", type=int, default=2, help="bare and default runs (2)")
    parser.add_argument("--write", action="store_true", help=f"replace '{SECTION}' in {DOC}")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="FILE",
        help="also drain once with the worker under cProfile, stats to FILE (not a figure)",
    )
    args = parser.parse_args(argv)
    if args.messages is None:
        args.messages = QUICK_MESSAGES if args.quick else DEFAULT_MESSAGES
    if args.messages < 100 or args.repeats < 1:
        parser.error("--messages must be at least 100 and --repeats at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    date = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    with redis_url(args.redis_url) as url:
        results = asyncio.run(run(url, args.messages, args.repeats))
        if args.profile:
            asyncio.run(profile_worker(url, args.messages, args.profile))
    print_report(results)
    markdown = render_markdown(results, date)
    print(markdown)
    if args.write:
        replace_section(DOC, SECTION, markdown)
        print(f"\nwrote {SECTION!r} to {DOC}", file=sys.stderr)


if __name__ == "__main__":
    main()
