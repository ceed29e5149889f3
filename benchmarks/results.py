"""Results benchmark: what keeping results costs a drain, and the round trip of ``Client.call``.

In ONE invocation against ONE private redis-server: the bare redis-py loop, the worker draining
a role that keeps no results, and the same role declared with ``keep_result`` (each job's
result written by ``result.lua`` with its acknowledgement), alternating so drift hits all
three; then ``Client.call`` round trips, one at a time (idle) and from 16 concurrent callers
(loaded). See docs/benchmarks.md ("Results and call").

With ``--baseline DIR`` (a snapshot of another commit's ``streamflow`` package, e.g. from
``git archive <commit> streamflow | tar -x -C DIR``), each round also drains the kept role with
a worker importing that snapshot, and the calls run once more from a process importing it:
before and after in one run, alternating, on the same Redis.

    PYTHONPATH=. .venv/bin/python benchmarks/results.py [--quick] [--write] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

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
from throughput import Drain, bare_loop, on_loop, percentile, progress

from streamflow import Client
from streamflow.keys import GROUP, Keys

DOC = REPO_ROOT / "docs" / "benchmarks.md"
SECTION = "## Results and call"
DEFAULT_MESSAGES, QUICK_MESSAGES = 50_000, 10_000
ROUNDS = 3
CALLS, CALL_WARMUP, CALLERS = 1000, 20, 16
KEEP_SECONDS = 600


async def drain(url: str, n: int, label: str, keep: float | None) -> Drain:
    """Publish n jobs, then drain them with one worker process (keeping results or not)."""
    namespace = f"res-{uuid.uuid4().hex[:8]}"
    keys = Keys(namespace)
    stream = keys.role_stream(ROLE)
    admin = Redis.from_url(url)
    client = Client.from_url(url, namespace=namespace)
    try:
        cpu0 = await redis_cpu_seconds(admin)
        ids = await client.publish_many(ROLE, [{"i": i} for i in range(n)])
        async with WorkerProcess("drain", url, namespace, {"keep_result": keep}) as worker:
            async with asyncio.timeout(120 + n / 200):
                report = await worker.wait_event("drained")
                await worker.wait()
        cpu1 = await redis_cpu_seconds(admin)
        left, pending = await admin.xlen(stream), await pending_count(admin, stream, GROUP)
        if report["acked"] != n or left or pending:
            raise RuntimeError(f"{label}: acked {report['acked']}/{n}, xlen {left}, {pending=}")
        kept = await admin.exists(*(keys.result(ROLE, mid) for mid in ids[:100]))
        if kept != (100 if keep else 0):
            raise RuntimeError(f"{label}: {kept} of the first 100 results kept")
        return Drain(
            label,
            n,
            report["elapsed"],
            (cpu1 - cpu0) / n * 1e6,
            consumer_cpu_us=report["cpu"] / n * 1e6,
        )
    finally:
        async for key in admin.scan_iter(match=f"{namespace}:*", count=1000):
            await admin.delete(key)
        await admin.aclose()
        await client.aclose()


async def calls(url: str) -> tuple[list[float], list[float]]:
    """Milliseconds per ``Client.call``: one at a time, then from CALLERS concurrent callers."""
    namespace = f"call-{uuid.uuid4().hex[:8]}"
    total = CALL_WARMUP + 2 * CALLS
    client = Client.from_url(url, namespace=namespace)
    options = {"expected": total, "keep_result": KEEP_SECONDS}

    async def one() -> float:
        t0 = time.perf_counter()
        await client.call(ROLE, {"t": time.time_ns()}, timeout=30)
        return (time.perf_counter() - t0) * 1000

    async def caller(count: int, out: list[float]) -> None:
        for _ in range(count):
            out.append(await one())

    try:
        async with WorkerProcess("latency", url, namespace, options) as worker:
            async with asyncio.timeout(60):
                await worker.wait_event("ready")
            for _ in range(CALL_WARMUP):
                await one()
            idle = [await one() for _ in range(CALLS)]
            loaded: list[float] = []
            async with asyncio.timeout(120), asyncio.TaskGroup() as tg:
                for _ in range(CALLERS):
                    tg.create_task(caller(CALLS // CALLERS, loaded))
            for _ in range(CALLS - CALLERS * (CALLS // CALLERS)):
                await one()  # the rest of --expected, so that the worker exits
            async with asyncio.timeout(60):
                await worker.wait_event("latencies")
                await worker.wait()
        return idle, loaded
    finally:
        async for key in client.redis.scan_iter(match=f"{namespace}:*", count=1000):
            await client.redis.delete(key)
        await client.aclose()


@contextlib.contextmanager
def importing(baseline: Path) -> Iterator[None]:
    """Worker processes started in the block import ``streamflow`` from ``baseline``."""
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(baseline)
    try:
        yield
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before


def baseline_calls(url: str, baseline: Path) -> tuple[list[float], list[float]]:
    """:func:`calls` in a process that imports ``streamflow`` from ``baseline``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(baseline), str(Path(__file__).parent)])}
    out = subprocess.run(
        [sys.executable, __file__, "--calls-only", "--redis-url", url],
        env=env,
        capture_output=True,
        check=True,
        text=True,
    )
    found = json.loads(out.stdout.splitlines()[-1])
    return found["idle"], found["loaded"]


Calls = dict[str, tuple[list[float], list[float]]]


def run(url: str, n: int, baseline: Path | None) -> tuple[dict[str, list[Drain]], Calls, str]:
    version = on_loop("asyncio", redis_version, url)
    drains: dict[str, list[Drain]] = {"bare": [], "plain": [], "kept": []}
    if baseline is not None:
        drains["kept_before"] = []
    for i in range(ROUNDS):
        drains["bare"].append(on_loop("asyncio", bare_loop, url, n))
        drains["plain"].append(on_loop("asyncio", drain, url, n, "worker, results not kept", None))
        if baseline is not None:
            with importing(baseline):
                drains["kept_before"].append(
                    on_loop("asyncio", drain, url, n, "results kept, before", KEEP_SECONDS)
                )
        drains["kept"].append(
            on_loop("asyncio", drain, url, n, "worker, results kept", KEEP_SECONDS)
        )
        rates = ", ".join(f"{k} {v[-1].rate:,.0f}" for k, v in drains.items())
        progress(f"round {i + 1}: {rates} msgs/s")
    timed: Calls = {}
    if baseline is not None:
        timed["before"] = baseline_calls(url, baseline)
    timed["now"] = on_loop("asyncio", calls, url)
    return drains, timed, version


def rows(drains: dict[str, list[Drain]], timed: Calls, before: str) -> list[list[str]]:
    bare = statistics.median(d.rate for d in drains["bare"])
    out = []
    for key, label in (
        ("bare", "bare redis-py loop"),
        ("plain", "worker, results not kept"),
        ("kept_before", f"worker, results kept ({KEEP_SECONDS} s), before ({before})"),
        ("kept", f"worker, results kept ({KEEP_SECONDS} s)"),
    ):
        if key not in drains:
            continue
        rate = statistics.median(d.rate for d in drains[key])
        cpu = statistics.median(d.redis_cpu_us for d in drains[key])
        mine = statistics.median(d.consumer_cpu_us or 0.0 for d in drains[key])
        every = " / ".join(f"{d.rate:,.0f}" for d in drains[key])
        cells = [f"{rate:,.0f} msgs/s", f"{rate / bare:.2f}", f"{cpu:.1f} µs", f"{mine:.1f} µs"]
        out.append([label, *cells, every])
    for when, (idle, loaded) in timed.items():
        for label, ms in (("idle", idle), (f"{CALLERS} concurrent callers", loaded)):
            p50, p99 = percentile(ms, 50), percentile(ms, 99)
            figure = f"`call` round trip, {label}"
            if when == "before":
                figure += f", before ({before})"
            out.append([figure, f"p50 {p50:.2f} ms", "", "", "", f"p99 {p99:.2f} ms"])
    return out


HEADER = [
    "figure",
    "median",
    "vs bare",
    "Redis CPU / msg",
    "consumer CPU / msg",
    f"each of {ROUNDS} rounds",
]


def render(table: Sequence[Sequence[str]], n: int, version: str, date: str) -> str:
    intro = (
        f"Measured {date} by `benchmarks/results.py`; N = {n:,} messages per drain, {ROUNDS} "
        f"rounds alternating the drains; {CALLS:,} calls each way; machine: 2 cores, "
        f"shared; redis-server {version} (private, loopback, no persistence); streamflow "
        f"{git_revision()}; Python {sys.version.split()[0]}; asyncio. A role that keeps no "
        "results runs the same code path as before results existed (one attribute check per "
        "job); kept results are written by `result.lua` from the batched acker (one call per "
        "stream per flush: an owner check and a `SET` per job), and the consumer does not wait "
        "for it, as for a plain acknowledgement. `call` publishes, then polls the result key "
        "(0.5 ms, growing) for about 0.13 s, then waits for the job's final lifecycle event "
        "(re-reading every 0.5 s)."
    )
    if any("before (" in row[0] for row in table):  # with --baseline
        intro += (
            " Rows marked before: the same role and calls with the streamflow of that commit, "
            "in the same run (its drain alternating with the others in each round)."
        )
    return "\n".join([SECTION, "", intro, "", markdown_table(HEADER, table)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help=f"N = {QUICK_MESSAGES:,}")
    parser.add_argument("--redis-url", help="use this Redis instead of starting a private one")
    parser.add_argument("--write", action="store_true", help=f"replace '{SECTION}' in {DOC}")
    parser.add_argument("--baseline", type=Path, help="also measure this streamflow snapshot")
    parser.add_argument("--baseline-name", default="baseline", help="its name in the table")
    parser.add_argument("--calls-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.calls_only:  # the baseline's calls (see baseline_calls)
        idle, loaded = on_loop("asyncio", calls, args.redis_url)
        print(json.dumps({"idle": idle, "loaded": loaded}))
        return
    n = QUICK_MESSAGES if args.quick else DEFAULT_MESSAGES
    date = run_date()
    with redis_url(args.redis_url) as url:
        drains, timed, version = run(url, n, args.baseline)
    table = rows(drains, timed, args.baseline_name)
    print(text_table(HEADER, table))
    markdown = render(table, n, version, date)
    print_section(markdown, DOC, SECTION, write=args.write)


if __name__ == "__main__":
    main()
