"""Peer comparison: streamflow, a bare redis-py loop, taskiq (Redis Streams) and dramatiq (Redis).

The same no-op job and the same three measurements for each, in rounds that alternate the peers
(A B C D A B C D ...), all against ONE private redis-server on a free loopback port:

* one-call publish: N jobs published one awaited call at a time (each peer's own publish call:
  ``XADD``, ``Client.publish``, ``task.kiq``, ``actor.send``), which also queues the drain;
* drain: one worker process started on those N queued jobs; jobs/s, the worker's CPU time per
  job and the redis-server's CPU time per job (``INFO cpu``) while it drains;
* enqueue -> start latency: one job at a time, 2 ms apart, to a running idle worker.

Beside each peer's slot in each round the machine's load is measured: the 1-minute load
average, the CPU time other processes used meanwhile (in cores, from ``/proc/stat`` less this
process, its children and redis-server) and the hypervisor's steal.

Run it with ``make bench-peers`` (its own venv, ``.venv-peers``, from requirements.txt beside
this file), or ``.venv-peers/bin/python benchmarks/peers/run.py [--quick] [--write]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import statistics
import sys
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

import _peers  # noqa: E402
from _common import (  # noqa: E402
    REPO_ROOT,
    ROLE,
    WorkerProcess,
    git_revision,
    markdown_table,
    redis_cpu_seconds,
    redis_url,
    redis_version,
    replace_section,
    text_table,
)
from redis.asyncio import Redis  # noqa: E402
from throughput import LATENCY_GAP, LATENCY_WARMUP, percentile  # noqa: E402

DOC = REPO_ROOT / "docs" / "benchmarks.md"
SECTION = "## Peers"
PEER_WORKER = Path(__file__).resolve().parent / "_peer_worker.py"
PEERS = ("bare", "streamflow", "taskiq", "dramatiq")
LABELS = {
    "bare": "bare redis-py loop",
    "streamflow": "streamflow",
    "taskiq": "taskiq + taskiq-redis (RedisStreamBroker)",
    "dramatiq": "dramatiq (RedisBroker)",
}
DEFAULT_MESSAGES = 50_000
QUICK_MESSAGES = 2_000
DEFAULT_LATENCY = 500
QUICK_LATENCY = 100
DEFAULT_ROUNDS = 3
QUICK_ROUNDS = 2
DASH = "\u2013"
TIMES = "\u00d7"

Send = Callable[[_peers.Payload], Awaitable[None]]


# -- the machine's load -------------------------------------------------------------------------


@dataclass
class Load:
    """What the rest of the machine did while one peer was measured."""

    load1: float  # 1-minute load average at the end
    others: float | None  # cores busy with other processes, on average
    steal: float | None  # share of CPU time taken by the hypervisor


def proc_stat() -> tuple[float, float, float] | None:
    """Busy, steal and total CPU seconds of the machine so far (None without /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return None
    hz = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    busy = user + nice + system + irq + softirq
    return busy / hz, steal / hz, sum(fields) / hz


def own_cpu() -> float:
    """CPU seconds of this process and of its children that have exited (the workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class LoadMeter:
    """Started before a peer's slot and read after it; redis-server's CPU comes from INFO."""

    def __init__(self, redis_cpu: float) -> None:
        self.wall, self.stat, self.own = time.perf_counter(), proc_stat(), own_cpu()
        self.redis_cpu = redis_cpu

    def read(self, redis_cpu: float) -> Load:
        wall, stat = time.perf_counter() - self.wall, proc_stat()
        load1 = os.getloadavg()[0]
        if self.stat is None or stat is None:
            return Load(load1, None, None)
        ours = own_cpu() - self.own + redis_cpu - self.redis_cpu
        busy, steal, total = (b - a for a, b in zip(self.stat, stat, strict=True))
        return Load(load1, max(0.0, busy - ours) / wall, steal / total if total else 0.0)


# -- publishers: each peer's one-call publish ---------------------------------------------------


@contextlib.asynccontextmanager
async def bare_publisher(url: str, namespace: str) -> AsyncIterator[Send]:
    client = Redis.from_url(url)
    key = _peers.bare_stream(namespace)
    await client.xgroup_create(key, _peers.BARE_GROUP, id="0", mkstream=True)

    async def send(payload: _peers.Payload) -> None:
        await client.xadd(key, {b"message": json.dumps(payload).encode()})

    try:
        yield send
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def streamflow_publisher(url: str, namespace: str) -> AsyncIterator[Send]:
    from streamflow import Client

    client = Client.from_url(url, namespace=namespace)

    async def send(payload: _peers.Payload) -> None:
        await client.publish(ROLE, payload)

    try:
        yield send
    finally:
        await client.aclose()


def ignore(payload: _peers.Payload) -> None:
    """The publisher's copy of a peer's app never runs its job."""


@contextlib.asynccontextmanager
async def taskiq_publisher(url: str, namespace: str) -> AsyncIterator[Send]:
    broker, task = _peers.make_taskiq(url, namespace, ignore)
    await broker.startup()  # creates the consumer group, so that the queued jobs are read

    async def send(payload: _peers.Payload) -> None:
        await task.kiq(payload)

    try:
        yield send
    finally:
        await broker.shutdown()


@contextlib.asynccontextmanager
async def dramatiq_publisher(url: str, namespace: str) -> AsyncIterator[Send]:
    broker, actor = _peers.make_dramatiq(url, namespace, ignore)

    async def send(payload: _peers.Payload) -> None:
        actor.send(payload)  # dramatiq's client is synchronous

    try:
        yield send
    finally:
        broker.close()


PUBLISHERS = {
    "bare": bare_publisher,
    "streamflow": streamflow_publisher,
    "taskiq": taskiq_publisher,
    "dramatiq": dramatiq_publisher,
}


# -- one peer's slot in a round -----------------------------------------------------------------


@dataclass
class Run:
    """One peer measured once: publish, drain and latency, and the load beside them."""

    peer: str
    round: int
    messages: int
    publish_rate: float
    drain_rate: float
    worker_cpu_us: float
    redis_cpu_us: float
    p50_ms: float
    p99_ms: float
    load: Load


def worker(peer: str, mode: str, url: str, namespace: str, expected: int) -> WorkerProcess:
    if peer == "streamflow":  # benchmarks/_worker.py, the worker throughput.py measures
        return WorkerProcess(mode, url, namespace, {"expected": expected})
    options = {"peer": peer, "expected": expected}
    return WorkerProcess(mode, url, namespace, options, script=PEER_WORKER)


async def drain(peer: str, url: str, admin: Redis, n: int) -> tuple[float, float, float, float]:
    """Publish n jobs one call at a time, then drain them with one worker process.

    Returns the publish rate, the drain rate, and the worker's and Redis's CPU us per job.
    """
    namespace = f"peers-{peer}-{uuid.uuid4().hex[:8]}"
    try:
        async with PUBLISHERS[peer](url, namespace) as send:
            t0 = time.perf_counter()
            for i in range(n):
                await send({"i": i})
            publish_rate = n / (time.perf_counter() - t0)
        cpu0 = await redis_cpu_seconds(admin)
        async with worker(peer, "drain", url, namespace, n) as process:
            async with asyncio.timeout(120 + n / 200):
                report = await process.wait_event("drained")
                await process.wait()
        redis_cpu = await redis_cpu_seconds(admin) - cpu0
        handled = report.get("handled", report.get("acked"))
        if handled != n:
            raise RuntimeError(f"{peer}: drained {handled} of {n} jobs")
        us = 1e6 / n
        return publish_rate, n / report["elapsed"], report["cpu"] * us, redis_cpu * us
    finally:
        await delete_namespace(admin, namespace)


async def latency(peer: str, url: str, admin: Redis, count: int) -> list[float]:
    """Milliseconds from publish to the job starting, one job at a time, idle worker."""
    namespace = f"peers-{peer}-{uuid.uuid4().hex[:8]}"
    total = count + LATENCY_WARMUP
    try:
        async with (
            PUBLISHERS[peer](url, namespace) as send,
            worker(peer, "latency", url, namespace, total) as process,
        ):
            async with asyncio.timeout(60):
                await process.wait_event("ready")
            for _ in range(total):
                await send({"t": time.time_ns()})
                await asyncio.sleep(LATENCY_GAP)
            async with asyncio.timeout(60 + total * 0.05):
                report = await process.wait_event("latencies")
                await process.wait()
        return [ns / 1e6 for ns in report["ns"][LATENCY_WARMUP:]]
    finally:
        await delete_namespace(admin, namespace)


async def delete_namespace(admin: Redis, namespace: str) -> None:
    """Every key of one measurement (the namespaces are random, so a match is ours)."""
    keys = [key async for key in admin.scan_iter(match=f"*{namespace}*", count=1000)]
    if keys:
        await admin.delete(*keys)


async def measure(peer: str, url: str, n: int, count: int, round_: int) -> Run:
    admin = Redis.from_url(url)
    try:
        meter = LoadMeter(await redis_cpu_seconds(admin))
        publish_rate, drain_rate, worker_cpu, redis_cpu = await drain(peer, url, admin, n)
        latencies = await latency(peer, url, admin, count)
        load = meter.read(await redis_cpu_seconds(admin))
    finally:
        await admin.aclose()
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    return Run(peer, round_, n, publish_rate, drain_rate, worker_cpu, redis_cpu, p50, p99, load)


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(url: str, args: argparse.Namespace) -> list[Run]:
    """Every peer once per round, in the same order each round."""
    runs = []
    for round_ in range(1, args.rounds + 1):
        for peer in args.peers:
            r = asyncio.run(measure(peer, url, args.messages, args.latency_messages, round_))
            runs.append(r)
            progress(
                f"round {round_} {peer}: drain {r.drain_rate:,.0f}/s, publish "
                f"{r.publish_rate:,.0f}/s, p50 {r.p50_ms:.2f} ms, others {fmt_cores(r.load)}"
            )
    return runs


# -- reporting ----------------------------------------------------------------------------------


def spread(values: Sequence[float], digits: int = 0) -> str:
    """``median (min-max)`` of a row's runs (an en dash between), or the one value."""
    one = f"{{:,.{digits}f}}"
    if len(values) == 1:
        return one.format(values[0])
    low, high = one.format(min(values)), one.format(max(values))
    return f"{one.format(statistics.median(values))} ({low}{DASH}{high})"


def fmt_cores(load: Load) -> str:
    return "-" if load.others is None else f"{load.others:.2f}"


def load_cell(runs: Sequence[Run]) -> str:
    others = [r.load.others for r in runs if r.load.others is not None]
    steal = [r.load.steal for r in runs if r.load.steal is not None]
    parts = [f"load avg {spread([r.load.load1 for r in runs], 1)}"]
    if others:
        parts.append(f"others {spread(others, 2)} cores")
    if steal:
        parts.append(f"steal ≤ {max(steal):.1%}")
    return ", ".join(parts)


def summary_rows(runs: Sequence[Run]) -> list[list[str]]:
    """One row per peer: the median and range of its rounds, and the load beside them."""
    peers = list(dict.fromkeys(r.peer for r in runs))
    by_peer = {p: [r for r in runs if r.peer == p] for p in peers}
    bare = by_peer.get("bare")
    base = statistics.median(r.drain_rate for r in bare) if bare else None
    rows = []
    for peer in peers:
        rs = by_peer[peer]
        rows.append(
            [
                LABELS[peer],
                _peers.CONCURRENCY[peer],
                spread([r.drain_rate for r in rs]),
                f"{statistics.median(r.drain_rate for r in rs) / base:.1%}" if base else "-",
                spread([r.worker_cpu_us for r in rs], 1),
                spread([r.redis_cpu_us for r in rs], 1),
                spread([r.publish_rate for r in rs]),
                f"{spread([r.p50_ms for r in rs], 2)} / {spread([r.p99_ms for r in rs], 2)}",
                load_cell(rs),
            ]
        )
    return rows


SUMMARY_HEADER = [
    "peer",
    "worker concurrency (one process)",
    "drain, jobs/s",
    "drain, of bare loop (medians)",
    "worker CPU per job, µs",
    "Redis CPU per job, drain, µs",
    "one-call publish, jobs/s",
    "enqueue → start p50 / p99, ms",
    "machine load during its runs",
]


def run_rows(runs: Sequence[Run]) -> list[list[str]]:
    return [
        [
            str(r.round),
            r.peer,
            f"{r.drain_rate:,.0f}",
            f"{r.worker_cpu_us:.1f}",
            f"{r.redis_cpu_us:.1f}",
            f"{r.publish_rate:,.0f}",
            f"{r.p50_ms:.2f} / {r.p99_ms:.2f}",
            f"{r.load.load1:.2f}",
            fmt_cores(r.load),
            "-" if r.load.steal is None else f"{r.load.steal:.1%}",
        ]
        for r in runs
    ]


def median_of(runs: Sequence[Run], peer: str, figure: str) -> float:
    return statistics.median(getattr(r, figure) for r in runs if r.peer == peer)


#: The figures compared in the ratio lines, in their order.
RATIOS = [
    ("drain", "drain_rate"),
    ("worker CPU per job", "worker_cpu_us"),
    ("Redis CPU per job", "redis_cpu_us"),
    ("one-call publish", "publish_rate"),
    ("latency p50", "p50_ms"),
    ("p99", "p99_ms"),
]


def ratio_lines(runs: Sequence[Run]) -> list[str]:
    """streamflow against each other peer, as ratios of the medians (the robust reading)."""
    peers = list(dict.fromkeys(r.peer for r in runs))
    if "streamflow" not in peers:
        return []
    lines = [
        "streamflow's medians over each other peer's (jobs/s: above 1 is faster; CPU and ms: "
        "below 1 is less):",
        "",
    ]
    for peer in (p for p in peers if p != "streamflow"):
        cells = [
            f"{name} {TIMES}{median_of(runs, 'streamflow', f) / median_of(runs, peer, f):.2f}"
            for name, f in RATIOS
        ]
        lines.append(f"- against {LABELS[peer]}: {', '.join(cells)}")
    return lines


RUN_HEADER = [
    "round",
    "peer",
    "drain jobs/s",
    "worker CPU µs/job",
    "Redis CPU µs/job",
    "publish jobs/s",
    "p50 / p99 ms",
    "load avg 1 min",
    "others, cores",
    "steal",
]


def render_markdown(runs: Sequence[Run], meta: dict[str, str]) -> str:
    """The ``## Peers`` section of docs/benchmarks.md."""
    rounds = max(r.round for r in runs)
    versions = ", ".join(f"{name} {v}" for name, v in _peers.versions().items())
    intro = (
        f"Measured {meta['date']} by `benchmarks/peers/run.py{meta['argv']}` (`make "
        f"bench-peers`); machine: **2 cores, shared machine** (other work ran beside it: see the "
        f"load columns); redis-server {meta['redis']} (one private server on a loopback port, no "
        f"persistence, shared by all peers); Python {sys.version.split()[0]}; {versions}; "
        f"streamflow {git_revision()}. N = {runs[0].messages:,} no-op jobs per drain and per "
        f"publish run, {meta['latency']} latency samples per run; {rounds} rounds, the peers "
        "alternated in each (A B C D A B C D ...); each cell is the median of the rounds and "
        f"their min{DASH}max."
    )
    method = (
        "One-call publish: N jobs, one awaited publish call at a time, each peer's own call "
        "(`XADD` with redis-py's asyncio client, `Client.publish`, taskiq's `task.kiq`, "
        "dramatiq's `actor.send`, which is synchronous and so skips the asyncio client's "
        "per-call cost). Drain: those N jobs queued, then one worker process started with its "
        "peer's default concurrency; from the start of consuming until all N ran and Redis "
        "shows them acknowledged. Worker CPU is that process's CPU time (every thread) over the "
        "drain; Redis CPU is `INFO cpu` (used_cpu_user + used_cpu_sys) over the worker's life. "
        "Latency: publish to handler start, one job every 2 ms to an idle running worker. "
        "Machine load: the 1-minute load average, the cores other processes kept busy meanwhile "
        "(`/proc/stat` less this benchmark, its workers and redis-server) and the hypervisor's "
        "steal. On a shared machine wall-clock rates move by tens of percent between runs, and "
        "most for the bare loop, a strict ping-pong between one process and redis-server that "
        "stalls whenever either waits for a core; CPU per job is the steadier figure, and the "
        "ratios of medians are what to compare."
    )
    return "\n".join(
        [
            SECTION,
            "",
            intro,
            "",
            markdown_table(SUMMARY_HEADER, summary_rows(runs)),
            "",
            *ratio_lines(runs),
            "",
            method,
            "",
            "Every run, in the order run:",
            "",
            markdown_table(RUN_HEADER, run_rows(runs)),
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer jobs and rounds, ~1 minute")
    parser.add_argument("--messages", type=int, help=f"N (default {DEFAULT_MESSAGES:,})")
    parser.add_argument(
        "--latency-messages", type=int, help=f"latency samples (default {DEFAULT_LATENCY})"
    )
    parser.add_argument("--rounds", type=int, help=f"rounds (default {DEFAULT_ROUNDS})")
    parser.add_argument(
        "--peers", nargs="+", choices=PEERS, default=list(PEERS), help="which, in this order"
    )
    parser.add_argument("--redis-url", help="use this Redis instead of starting a private one")
    parser.add_argument("--write", action="store_true", help=f"replace '{SECTION}' in {DOC}")
    args = parser.parse_args(argv)
    quick = args.quick
    if args.messages is None:
        args.messages = QUICK_MESSAGES if quick else DEFAULT_MESSAGES
    if args.latency_messages is None:
        args.latency_messages = QUICK_LATENCY if quick else DEFAULT_LATENCY
    if args.rounds is None:
        args.rounds = QUICK_ROUNDS if quick else DEFAULT_ROUNDS
    if args.messages < 100 or args.latency_messages < 10 or args.rounds < 1:
        parser.error("--messages must be >= 100, --latency-messages >= 10, --rounds >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from streamflow.errors import UnknownRoleWarning

    # Jobs are published before their worker starts, by design.
    warnings.simplefilter("ignore", UnknownRoleWarning)
    meta = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "argv": "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv)),
        "latency": f"{args.latency_messages:,}",
    }
    with redis_url(args.redis_url) as url:
        meta["redis"] = asyncio.run(redis_version(url))
        runs = run(url, args)
    print()
    print(text_table(SUMMARY_HEADER, summary_rows(runs)))
    print()
    print(text_table(RUN_HEADER, run_rows(runs)))
    print("\n".join(ratio_lines(runs)))
    markdown = render_markdown(runs, meta)
    print()
    print(markdown)
    if args.write:
        replace_section(DOC, SECTION, markdown)
        progress(f"wrote {SECTION!r} to {DOC}")


if __name__ == "__main__":
    main()
