"""Core throughput benchmark: streamflow's worker and client against a bare redis-py loop.

Everything runs in ONE invocation against ONE private redis-server, so the ratios are
comparable even on a noisy machine. See benchmarks/README.md for what each figure means.

``--loop asyncio|uvloop|both`` picks the event loop of BOTH sides: the bare loop runs on it in
this process, the worker on it in its subprocess, so a ratio always compares like with like.
With ``both`` every measurement runs once on each loop, side by side. The default is asyncio,
the loop ``streamflow worker`` runs on; uvloop is not a dependency (``pip install uvloop``).

    PYTHONPATH=. .venv/bin/python benchmarks/throughput.py [--quick] [--loop both] [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from _common import (
    REPO_ROOT,
    ROLE,
    WorkerProcess,
    git_revision,
    markdown_table,
    pending_count,
    print_section,
    redis_cpu_seconds,
    redis_url,
    redis_version,
    run_date,
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
GRID: list[tuple[int, int, int | str]] = [
    (c, r, p)
    for c in (64, 128, 256)
    for r, p in ((256, 0), (256, 256), (1000, 1000), (1000, "auto"))
]
BARE_READ_COUNT = 100
PUBLISH_CHUNK = 1000
BIG_CHUNK = 10_000
LATENCY_MESSAGES = 1000
LATENCY_WARMUP = 20
#: The deliberate gap between single publishes, so that the worker is idle for each.
LATENCY_GAP = 0.002

TARGET_RATIO = 0.40
#: Rounds of the head-to-head (bare loop, defaults, best setting) whose medians are judged.
DUEL_ROUNDS = 3
TARGET_PUBLISH = 50_000.0
TARGET_REDIS_CPU_US = 10.0
TARGET_P50_MS = 1.0

LOOPS = ("asyncio", "uvloop")
T = TypeVar("T")


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
    prefetch: int | str | None = None

    @property
    def rate(self) -> float:
        return self.messages / self.elapsed


@dataclass
class Results:
    """Every figure measured on one event loop (bare loop and worker alike)."""

    loop: str
    messages: int
    bare: list[Drain] = field(default_factory=list)
    default: list[Drain] = field(default_factory=list)
    grid: list[Drain] = field(default_factory=list)
    publish: dict[int, float] = field(default_factory=dict)
    latency_ms: list[float] = field(default_factory=list)
    redis_version: str = ""
    # The head-to-head: bare loop, defaults and the best grid setting, alternating.
    duel_bare: list[Drain] = field(default_factory=list)
    duel_default: list[Drain] = field(default_factory=list)
    duel_best: list[Drain] = field(default_factory=list)

    def duel_ratio(self, drains: list[Drain]) -> float:
        """Median rate of ``drains`` over the median rate of the head-to-head bare loops."""
        return statistics.median(d.rate for d in drains) / statistics.median(
            d.rate for d in self.duel_bare
        )

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


def running_loop() -> str:
    """``uvloop`` or ``asyncio``: the event loop this coroutine runs on."""
    return (
        "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"
    )


def on_loop(kind: str, func: Callable[..., Awaitable[T]], /, *args: object, **kwargs: object) -> T:
    """Run ``func(*args, **kwargs)`` to completion on a fresh event loop of kind ``kind``."""
    factory = None
    if kind == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop

    async def checked() -> T:
        if running_loop() != kind:
            raise RuntimeError(f"asked for {kind}, running on {running_loop()}")
        return await func(*args, **kwargs)

    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(checked())


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

        cpu_t0, t0 = time.process_time(), time.perf_counter()
        handled = await bare_drain(redis, key)
        elapsed, cpu_self = time.perf_counter() - t0, time.process_time() - cpu_t0
        cpu1 = await redis_cpu_seconds(redis)
        pending = await pending_count(redis, key, "g")
        if handled != n or pending:
            raise RuntimeError(f"bare loop handled {handled}/{n}, {pending} left pending")
        return Drain("bare redis-py loop", n, elapsed, (cpu1 - cpu0) / n * 1e6, cpu_self / n * 1e6)
    finally:
        await redis.delete(key)
        await redis.aclose()


async def bare_drain(
    redis: Redis,
    key: str,
    *,
    expected: int | None = None,
    block: int | None = None,
    handle: Callable[[dict[bytes, bytes]], None] = noop,
) -> int:
    """Read ``key`` with XREADGROUP (group ``g``), each batch acknowledged in the next pipeline.

    Without ``expected``, stops at the first empty read (a drain); with it, reads (blocking
    ``block`` ms at a time) until ``expected`` entries were handled and acknowledged. Returns how
    many entries were handled.
    """
    handled = 0
    previous: list[bytes] = []
    while True:
        pipe = redis.pipeline(transaction=False)
        if previous:
            pipe.xack(key, "g", *previous)
        if expected is not None and handled >= expected:
            await pipe.execute()
            return handled
        pipe.xreadgroup("g", "c", {key: ">"}, count=BARE_READ_COUNT, block=block)
        reply = (await pipe.execute())[-1]
        previous = []
        if not reply:
            if expected is None:
                return handled  # the last batch was acknowledged in this same pipeline
            continue
        for entry_id, fields in reply[0][1]:
            handle(fields)
            previous.append(entry_id)
        handled += len(previous)


# -- b, c, f: the streamflow worker in its own process ------------------------------------------


async def worker_drain(
    url: str,
    n: int,
    label: str,
    *,
    loop: str = "asyncio",
    concurrency: int | None = None,
    read_count: int | None = None,
    prefetch: int | str | None = None,
    profile: Path | None = None,
    events: str | None = None,
    metrics: str | None = None,
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
        options = {
            "concurrency": concurrency,
            "read_count": read_count,
            "prefetch": prefetch,
            "loop": loop,
            "events": events,
            "metrics": metrics,
        }
        async with WorkerProcess("drain", url, namespace, options, profile=profile) as worker:
            async with asyncio.timeout(120 + n / 500):
                report = await worker.wait_event("drained")
                await worker.wait()
        cpu1 = await redis_cpu_seconds(admin)
        left, pending = await admin.xlen(stream), await pending_count(admin, stream, GROUP)
        if report["acked"] != n or left or pending:
            raise RuntimeError(f"{label}: acked {report['acked']}/{n}, xlen {left}, {pending=}")
        if report["loop"] != loop:
            raise RuntimeError(f"{label}: the worker ran on {report['loop']}, not {loop}")
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
        await admin.delete(stream, Keys(namespace).dead_letters(ROLE), Keys(namespace).lifecycle())
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


async def latency(url: str, count: int, loop: str = "asyncio") -> list[float]:
    """Milliseconds from Client.publish to the handler starting, one message at a time."""
    namespace = f"lat-{uuid.uuid4().hex[:8]}"
    total = count + LATENCY_WARMUP
    client = Client.from_url(url, namespace=namespace)
    try:
        options = {"expected": total, "loop": loop}
        async with WorkerProcess("latency", url, namespace, options) as worker:
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


def run(url: str, n: int, repeats: int, loops: Sequence[str]) -> list[Results]:
    """Every measurement, on each loop in turn, so that drift on a shared machine hits all."""
    version = on_loop("asyncio", redis_version, url)
    results = {loop: Results(loop=loop, messages=n, redis_version=version) for loop in loops}
    # Bare and default runs alternate (and the loops within each) for the same reason.
    for i in range(repeats):
        for loop in loops:
            r = results[loop]
            r.bare.append(on_loop(loop, bare_loop, url, n))
            progress(f"[{loop}] bare loop #{i + 1}: {r.bare[-1].rate:,.0f} msgs/s")
        for loop in loops:
            r = results[loop]
            label = "streamflow worker, default"
            r.default.append(on_loop(loop, worker_drain, url, n, label, loop=loop))
            progress(f"[{loop}] worker default #{i + 1}: {r.default[-1].rate:,.0f} msgs/s")
    for concurrency, read_count, prefetch in GRID:
        label = f"concurrency {concurrency}, read_count {read_count}, prefetch {prefetch}"
        for loop in loops:
            drain = on_loop(
                loop,
                worker_drain,
                url,
                n,
                label,
                loop=loop,
                concurrency=concurrency,
                read_count=read_count,
                prefetch=prefetch,
            )
            results[loop].grid.append(drain)
            progress(f"[{loop}] worker {label}: {drain.rate:,.0f} msgs/s")
    head_to_head(url, n, [results[loop] for loop in loops])
    for chunk in (PUBLISH_CHUNK, BIG_CHUNK):
        for loop in loops:
            results[loop].publish[chunk] = on_loop(loop, publish_rate, url, n, chunk)
            progress(f"[{loop}] publish_many chunk {chunk}: {results[loop].publish[chunk]:,.0f}")
    for loop in loops:
        results[loop].latency_ms = on_loop(loop, latency, url, LATENCY_MESSAGES, loop)
        progress(f"[{loop}] latency done")
    return [results[loop] for loop in loops]


def head_to_head(url: str, n: int, rs: Sequence[Results]) -> None:
    """The figure judged against the target.

    A best-of over many worker drains against a best-of over two bare ones favours the worker,
    so the defaults and the best setting meet the bare loop again in alternating rounds, and
    their medians are compared.
    """
    for i in range(DUEL_ROUNDS):
        for r in rs:
            best = r.best_tuned
            r.duel_bare.append(on_loop(r.loop, bare_loop, url, n))
            r.duel_default.append(
                on_loop(r.loop, worker_drain, url, n, "streamflow worker, default", loop=r.loop)
            )
            r.duel_best.append(
                on_loop(
                    r.loop,
                    worker_drain,
                    url,
                    n,
                    "best setting",
                    loop=r.loop,
                    concurrency=best.concurrency,
                    read_count=best.read_count,
                    prefetch=best.prefetch,
                )
            )
            progress(
                f"[{r.loop}] head-to-head #{i + 1}: bare {r.duel_bare[-1].rate:,.0f}, default "
                f"{r.duel_default[-1].rate:,.0f}, best {r.duel_best[-1].rate:,.0f} msgs/s"
            )


def profile_worker(url: str, n: int, out: Path, loops: Sequence[str]) -> None:
    """One extra default-settings drain per loop with the worker under cProfile (not a figure).

    With several loops the stats go to ``OUT.<loop>``.
    """
    for loop in loops:
        path = out if len(loops) == 1 else out.with_name(f"{out.name}.{loop}")
        on_loop(loop, worker_drain, url, n, "profiled", loop=loop, profile=path)
        progress(f"cProfile stats of the worker on {loop} written to {path}")


# -- reporting ----------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def settings(d: Drain) -> str:
    if d.read_count is None:
        return f"defaults (concurrency {d.concurrency}, read_count 1000, prefetch auto)"
    return f"concurrency {d.concurrency}, read_count {d.read_count}, prefetch {d.prefetch}"


def status(oks: Sequence[bool]) -> str:
    return " / ".join(verdict(ok) for ok in oks)


def drain_ratio(d: Drain, r: Results) -> str:
    return f"{d.rate:,.0f} msgs/s = {d.rate / r.best_bare.rate:.0%} of bare"


def row(label: str, cells: Sequence[str], target: str = "", oks: Sequence[bool] = ()) -> list[str]:
    """A summary row: the figure, one cell per loop, the target and one status per loop."""
    return [label, *cells, target, status(oks) if oks else ""]


def summary_rows(rs: Sequence[Results]) -> list[list[str]]:
    """One row per figure, one column per event loop."""
    ratio = f">= {TARGET_RATIO:.0%} of bare"
    latencies = [(percentile(r.latency_ms, 50), percentile(r.latency_ms, 99)) for r in rs]
    bare_cpu = [min(d.redis_cpu_us for d in r.bare) for r in rs]
    default_cpu = [min(d.redis_cpu_us for d in r.default) for r in rs]
    return [
        row(
            "drain, bare redis-py loop",
            [f"{r.best_bare.rate:,.0f} msgs/s" for r in rs],
            "(baseline)",
        ),
        row(
            f"drain, streamflow worker, {settings(rs[0].best_default)}, best run",
            [drain_ratio(r.best_default, r) for r in rs],
        ),
        row(
            "drain, streamflow worker, best run of the grid and the defaults",
            [f"{drain_ratio(r.best_tuned, r)} ({settings(r.best_tuned)})" for r in rs],
        ),
        row(
            f"drain ratio, defaults, median of {DUEL_ROUNDS} rounds alternating with the bare loop",
            [f"{r.duel_ratio(r.duel_default):.0%} of bare" for r in rs],
            ratio,
            [r.duel_ratio(r.duel_default) >= TARGET_RATIO for r in rs],
        ),
        row(
            f"drain ratio, best setting, median of {DUEL_ROUNDS} rounds alternating with the "
            "bare loop",
            [f"{r.duel_ratio(r.duel_best):.0%} of bare ({settings(r.best_tuned)})" for r in rs],
            ratio,
            [r.duel_ratio(r.duel_best) >= TARGET_RATIO for r in rs],
        ),
        *[
            row(
                f"publish, Client.publish_many chunk_size={chunk:,}",
                [f"{r.publish[chunk]:,.0f} msgs/s" for r in rs],
                f">= {TARGET_PUBLISH:,.0f} msgs/s",
                [r.publish[chunk] >= TARGET_PUBLISH for r in rs],
            )
            for chunk in rs[0].publish
        ],
        row(
            "Redis CPU per message, bare loop (XADD + read + XACK)",
            [f"{us:.1f} us" for us in bare_cpu],
        ),
        row(
            "Redis CPU per message, streamflow (publish_many + worker drain, defaults)",
            [f"{us:.1f} us" for us in default_cpu],
            f"<= {TARGET_REDIS_CPU_US:g} us",
            [us <= TARGET_REDIS_CPU_US for us in default_cpu],
        ),
        row(
            f"enqueue-to-start latency, idle worker, p50 / p99 ({len(rs[0].latency_ms)} msgs)",
            [f"{p50:.2f} ms / {p99:.2f} ms" for p50, p99 in latencies],
            f"p50 <= {TARGET_P50_MS:g} ms",
            [p50 <= TARGET_P50_MS for p50, _ in latencies],
        ),
    ]


def speedup_line(rs: Sequence[Results]) -> str:
    """How much faster the second loop ran than the first, bare and worker alike."""
    a, b = rs[0], rs[1]
    pairs = [
        ("bare loop", a.best_bare.rate, b.best_bare.rate),
        ("worker at the defaults", a.best_default.rate, b.best_default.rate),
        ("worker, best setting", a.best_tuned.rate, b.best_tuned.rate),
    ]
    parts = ", ".join(f"{name} x{rb / ra:.2f}" for name, ra, rb in pairs)
    return f"{b.loop} against {a.loop}, best runs: {parts}."


def drain_rows(rs: Sequence[Results]) -> list[list[str]]:
    """Every drain in the order run: each slot once per loop, side by side."""
    rows = []
    runs = [
        [
            *r.bare,
            *r.default,
            *r.grid,
            *(
                d
                for trio in zip(r.duel_bare, r.duel_default, r.duel_best, strict=True)
                for d in trio
            ),
        ]
        for r in rs
    ]
    for slot in zip(*runs, strict=True):
        for r, d in zip(rs, slot, strict=True):
            rows.append(
                [
                    d.label,
                    r.loop,
                    f"{d.rate:,.0f}",
                    f"{d.rate / r.best_bare.rate:.0%}",
                    f"{d.elapsed:.2f}",
                    f"{d.consumer_cpu_us:.1f}" if d.consumer_cpu_us is not None else "-",
                    f"{d.redis_cpu_us:.1f}",
                ]
            )
    return rows


DRAIN_HEADER = [
    "run",
    "loop",
    "msgs/s",
    "of best bare (same loop)",
    "drain s",
    "consumer CPU us/msg",
    "Redis CPU us/msg (publish+drain)",
]


def loop_versions(rs: Sequence[Results]) -> str:
    names = []
    for r in rs:
        if r.loop == "uvloop":
            import uvloop

            names.append(f"uvloop {uvloop.__version__}")
        else:
            names.append("asyncio (the standard library's loop)")
    return " and ".join(names)


def render_markdown(rs: Sequence[Results], date: str) -> str:
    r = rs[0]
    loops = " / ".join(x.loop for x in rs)
    intro = (
        f"Measured {date} by `benchmarks/throughput.py --loop "
        f"{'both' if len(rs) > 1 else r.loop}`; N = {r.messages:,} messages per run; machine: "
        f"2 cores, shared; redis-server {r.redis_version} (private, loopback, no persistence); "
        f"streamflow {git_revision()}; Python {sys.version.split()[0]}; event loop "
        f"{loop_versions(rs)}. Every figure comes from this one run. Each ratio compares the "
        "worker with the bare loop on the same event loop: the bare loop runs on it in the "
        "benchmark process, the worker in its own process."
    )
    blocks = [
        SECTION,
        "",
        intro,
        "",
        markdown_table(
            ["figure", *[x.loop for x in rs], "target", f"status ({loops})"], summary_rows(rs)
        ),
    ]
    if len(rs) > 1:
        blocks += ["", speedup_line(rs)]
    blocks += [
        "",
        "Every drain (bare runs and default runs alternate, and the loops within each; the best "
        "of each is used above):",
        "",
        markdown_table(DRAIN_HEADER, drain_rows(rs)),
        "",
        "Consumer CPU is the draining process's CPU time (user + system) during the drain "
        "(the benchmark process for the bare loop, the worker process otherwise); "
        "Redis CPU is `INFO cpu` used_cpu_user + used_cpu_sys over publishing and draining.",
    ]
    return "\n".join(blocks)


def print_report(rs: Sequence[Results]) -> None:
    loops = " / ".join(x.loop for x in rs)
    print()
    print(
        text_table(
            ["figure", *[x.loop for x in rs], "target", f"status ({loops})"], summary_rows(rs)
        )
    )
    if len(rs) > 1:
        print()
        print(speedup_line(rs))
    print()
    print(text_table(DRAIN_HEADER, drain_rows(rs)))
    print()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, help=f"N per run (default {DEFAULT_MESSAGES:,})")
    parser.add_argument("--quick", action="store_true", help=f"N = {QUICK_MESSAGES:,}")
    parser.add_argument("--redis-url", help="use this Redis instead of starting a private one")
    parser.add_argument("--repeats", type=int, default=2, help="bare and default runs (2)")
    parser.add_argument("--write", action="store_true", help=f"replace '{SECTION}' in {DOC}")
    parser.add_argument(
        "--loop",
        choices=[*LOOPS, "both"],
        default="asyncio",
        help="the event loop of the bare loop AND the worker; both: each measurement on each "
        "(default asyncio; uvloop needs `pip install uvloop`)",
    )
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
    args.loops = LOOPS if args.loop == "both" else (args.loop,)
    if "uvloop" in args.loops and importlib.util.find_spec("uvloop") is None:
        parser.error(f"--loop {args.loop} needs uvloop, which is not installed: pip install uvloop")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    date = run_date()
    with redis_url(args.redis_url) as url:
        results = run(url, args.messages, args.repeats, args.loops)
        if args.profile:
            profile_worker(url, args.messages, args.profile, args.loops)
    print_report(results)
    markdown = render_markdown(results, date)
    print_section(markdown, DOC, SECTION, write=args.write)


if __name__ == "__main__":
    main()
