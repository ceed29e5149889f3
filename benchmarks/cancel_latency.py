"""Cancel latency: signal sent -> handler observes it, and -> handler finished.

Four worker processes are kept busy with other work (a steady stream of short sleeping jobs)
while, one at a time, a cancellable job is started and then cancelled through
``Client.cancel``. Each handler traces when it observes the cancel and when it has finished;
the script reports p50/p99 of both latencies. Not run by CI.

    PYTHONPATH=. .venv/bin/python benchmarks/cancel_latency.py [--cancels 200] [--workers 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio

from streamflow import Client, connect
from streamflow.ops.server import RedisServer

ROOT = Path(__file__).resolve().parents[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def read_trace(path: Path) -> dict[tuple[str, str], float]:
    events: dict[tuple[str, str], float] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            event, message_id, at = line.split()
            events[(event, message_id)] = float(at)
    return events


async def wait_event(path: Path, event: str, message_id: str, timeout: float = 20.0) -> float:
    with anyio.fail_after(timeout):
        while (at := read_trace(path).get((event, message_id))) is None:
            await anyio.sleep(0.001)
    return at


async def keep_busy(client: Client, stop: anyio.Event) -> None:
    """About 400 short jobs per second across the workers."""
    while not stop.is_set():
        await client.publish_many("busy", [{"seconds": 0.05}] * 20)
        await anyio.sleep(0.05)


async def measure(url: str, namespace: str, trace: Path, cancels: int) -> dict[str, list[float]]:
    observed, finished = [], []
    redis = connect.connect(url)
    client = Client(redis, namespace=namespace)
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(keep_busy, client, stop)
        for i in range(cancels):
            message_id = f"c{i}"
            await client.publish("cancellable", None, message_id=message_id)
            await wait_event(trace, "START", message_id)
            sent = time.time()
            await client.cancel(message_id, target="message", reason="benchmark")
            observed.append(await wait_event(trace, "OBSERVED", message_id) - sent)
            finished.append(await wait_event(trace, "FINISHED", message_id) - sent)
        stop.set()
    await redis.aclose()
    return {"observed": observed, "finished": finished}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cancels", type=int, default=200)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    namespace = "bench-cancel"
    with RedisServer() as server, tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace"
        env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMFLOW_")}
        env.update(
            STREAMFLOW_REDIS_URL=server.url,
            STREAMFLOW_NAMESPACE=namespace,
            SFBENCH_TRACE=str(trace),
            PYTHONPATH=str(ROOT),
        )
        cmd = [
            sys.executable,
            "-m",
            "streamflow",
            "--log-level",
            "ERROR",
            "worker",
            "--app",
            "benchmarks._cancel_app:app",
            "--concurrency",
            "64",
        ]
        workers = [
            subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
            for _ in range(args.workers)
        ]
        try:
            results = anyio.run(measure, server.url, namespace, trace, args.cancels)
        finally:
            for proc in workers:
                proc.kill()
                proc.wait()
    print(
        f"cancel latency over {args.cancels} cancels, {args.workers} busy worker processes "
        "(machine: 2 cores, shared)"
    )
    for name, values in results.items():
        ms = [v * 1000 for v in values]
        print(
            f"  sent -> handler {name:8}: p50 {percentile(ms, 0.5):6.2f} ms   "
            f"p99 {percentile(ms, 0.99):6.2f} ms   mean {statistics.fmean(ms):6.2f} ms"
        )


if __name__ == "__main__":
    main()
