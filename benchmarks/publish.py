"""Publishing against a raw redis-py XADD loop, in alternating rounds on one private redis-server.

Each measurement runs in its own subprocess, which imports ``streamflow`` through
``PYTHONPATH``: this work tree, and with ``--before DIR`` also another snapshot of it (e.g.
``git archive BASE streamflow | tar -x -C DIR``), so the old and the new code are measured in
the same rounds. Modes, N jobs each (after a warm-up of 500):

* ``raw``: ``await redis.xadd(stream, {"message": body})`` one call at a time (redis-py's
  asyncio client from ``Redis.from_url``, JSON body), the loop a publisher would write by hand;
* ``publish``: ``await Client.publish(role, payload)`` one call at a time;
* ``raw x100`` / ``publish x100``: the same from 100 concurrent tasks (``asyncio.gather``) on
  one client;
* ``publish id``: ``Client.publish`` with a chosen ``message_id`` (with its cancel lookup);
* ``raw sync`` / ``SyncClient``: the blocking twins, one call at a time;
* ``publish_many``: ``Client.publish_many`` with the default chunk of 1,000.

The figure is the median of the rounds; ratios are taken against ``raw`` (``raw x100`` for the
concurrent mode, ``raw sync`` for ``SyncClient``) of the same round.

    PYTHONPATH=. .venv/bin/python benchmarks/publish.py [-n 20000] [--rounds 5] [--before DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
ROLE = "bench"
WARMUP = 500
CONCURRENCY = 100
#: (mode, what it is compared with).
MODES = {
    "raw": "raw",
    "publish": "raw",
    "raw x100": "raw x100",
    "publish x100": "raw x100",
    "publish id": "raw",
    "raw sync": "raw sync",
    "SyncClient": "raw sync",
    "publish_many": "raw",
}
#: Modes that need streamflow (measured for each tree); the raw ones run once per round.
STREAMFLOW_MODES = ("publish", "publish x100", "publish id", "SyncClient", "publish_many")


# -- the child: one measurement ------------------------------------------------------------------


async def _gather(send: Any, n: int) -> None:
    async def one(start: int) -> None:
        for i in range(start, n, CONCURRENCY):
            await send(i)

    await asyncio.gather(*(one(k) for k in range(CONCURRENCY)))


async def _sequential(send: Any, n: int) -> None:
    for i in range(n):
        await send(i)


#: (jobs/s, the publishing process's CPU per job in microseconds).
Figures = tuple[float, float]


def _figures(n: int, t0: float, cpu0: float) -> Figures:
    return n / (time.perf_counter() - t0), (time.process_time() - cpu0) / n * 1e6


async def _timed_async(send: Any, n: int, concurrent: bool) -> Figures:
    run = _gather if concurrent else _sequential
    await run(send, WARMUP)
    t0, cpu0 = time.perf_counter(), time.process_time()
    await run(send, n)
    return _figures(n, t0, cpu0)


async def _raw(url: str, ns: str, n: int, concurrent: bool) -> Figures:
    from redis.asyncio import Redis

    redis = Redis.from_url(url)
    stream = f"{ns}:raw"

    async def send(i: int) -> None:
        await redis.xadd(stream, {b"message": json.dumps({"i": i}).encode()})

    try:
        return await _timed_async(send, n, concurrent)
    finally:
        await redis.aclose()


async def _client(url: str, ns: str, n: int, mode: str) -> Figures:
    from streamflow import Client

    client = Client.from_url(url, namespace=ns)
    try:
        if mode == "publish_many":
            await client.publish_many(ROLE, [{"i": i} for i in range(WARMUP)])
            payloads = [{"i": i} for i in range(n)]
            t0, cpu0 = time.perf_counter(), time.process_time()
            await client.publish_many(ROLE, payloads)
            return _figures(n, t0, cpu0)
        if mode == "publish id":

            async def send(i: int) -> None:
                await client.publish(ROLE, {"i": i}, message_id=uuid.uuid4().hex)

        else:

            async def send(i: int) -> None:
                await client.publish(ROLE, {"i": i})

        return await _timed_async(send, n, mode == "publish x100")
    finally:
        await client.aclose()


def _sync(url: str, ns: str, n: int, mode: str) -> Figures:
    if mode == "raw sync":
        import redis

        client = redis.Redis.from_url(url)
        stream = f"{ns}:raw"

        def send(i: int) -> None:
            client.xadd(stream, {b"message": json.dumps({"i": i}).encode()})

    else:
        from streamflow import SyncClient

        sync = SyncClient(url, namespace=ns)

        def send(i: int) -> None:
            sync.publish(ROLE, {"i": i})

    for i in range(WARMUP):
        send(i)
    t0, cpu0 = time.perf_counter(), time.process_time()
    for i in range(n):
        send(i)
    return _figures(n, t0, cpu0)


def child(mode: str, url: str, ns: str, n: int) -> None:
    """Measure one mode and print its rate (jobs/s) and CPU per job (us) as JSON."""
    warnings.simplefilter("ignore")  # the role has no worker: UnknownRoleWarning, once a second
    if mode in ("raw sync", "SyncClient"):
        rate, cpu = _sync(url, ns, n, mode)
    elif mode.startswith("raw"):
        rate, cpu = asyncio.run(_raw(url, ns, n, mode == "raw x100"))
    else:
        rate, cpu = asyncio.run(_client(url, ns, n, mode))
    print(json.dumps({"rate": rate, "cpu": cpu}))


# -- the driver ----------------------------------------------------------------------------------


def measure(tree: Path | None, mode: str, url: str, n: int) -> Figures:
    """Run one mode in a subprocess importing streamflow from ``tree``; its figures."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree or REPO_ROOT)
    ns = f"pb{uuid.uuid4().hex[:8]}"
    argv = [sys.executable, str(Path(__file__)), "_child", mode, url, ns, str(n)]
    out = subprocess.run(argv, env=env, check=True, capture_output=True, text=True, cwd="/")
    report = json.loads(out.stdout.strip().splitlines()[-1])
    return float(report["rate"]), float(report["cpu"])


def run(n: int, rounds: int, before: Path | None) -> dict[str, list[Figures]]:
    """Every mode, alternated, ``rounds`` times; the figures by label."""
    import redis

    from streamflow.ops.server import RedisServer

    trees: dict[str, Path | None] = {"after": REPO_ROOT}
    if before is not None:
        trees = {"before": before, "after": REPO_ROOT}
    rates: dict[str, list[Figures]] = {}
    with RedisServer() as server:
        admin = redis.Redis.from_url(server.url)
        for round_ in range(1, rounds + 1):
            for mode in MODES:
                for name, tree in trees.items() if mode in STREAMFLOW_MODES else [("", None)]:
                    label = f"{mode} ({name})" if name else mode
                    rate, cpu = measure(tree, mode, server.url, n)
                    admin.flushdb()
                    rates.setdefault(label, []).append((rate, cpu))
                    print(f"round {round_} {label}: {rate:,.0f}/s, {cpu:.1f} us", file=sys.stderr)
    return rates


def report(figures: dict[str, list[Figures]]) -> str:
    """A markdown table: medians, min-max, and the medians of the per-round ratios."""
    lines = [
        "| mode | jobs/s, median (min-max) | against | jobs/s ratio, median of rounds "
        "| publisher CPU per job, us | CPU ratio |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for label, values in figures.items():
        base = MODES[label.split(" (")[0]]
        rates, cpus = [v[0] for v in values], [v[1] for v in values]
        rate_ratios = [v[0] / b[0] for v, b in zip(values, figures[base], strict=True)]
        cpu_ratios = [v[1] / b[1] for v, b in zip(values, figures[base], strict=True)]
        lines.append(
            f"| {label} | {statistics.median(rates):,.0f} ({min(rates):,.0f}-"
            f"{max(rates):,.0f}) | {base} | x{statistics.median(rate_ratios):.2f} "
            f"| {statistics.median(cpus):.1f} | x{statistics.median(cpu_ratios):.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--before", type=Path, help="Another streamflow snapshot to measure.")
    args = parser.parse_args()
    rates = run(args.messages, args.rounds, args.before)
    print(report(rates))


if __name__ == "__main__":
    main()
