"""The cost of ``WAIT 1`` after each publish, on a master with one replica.

Starts a private master and a replica on free loopback ports (``streamflow.ops.server.RedisServer``)
and publishes ``--messages`` jobs to a role stream, each as one XADD of a job the size of a
small streamflow message, in two ways:

* ``plain``: the XADD alone (what ``Client.publish`` sends);
* ``wait``: XADD then ``WAIT 1 <timeout>`` in one pipeline, i.e. on the same connection: WAIT
  waits for the writes of the connection it is sent on, so a WAIT sent on another pooled
  connection would return at once and prove nothing. The XADD is acknowledged once the
  replica has it too; a WAIT that returns 0 (timed out) is counted.

Each is run with ``--concurrency`` publishing tasks (1: one publish at a time, the latency
bound; more: publishers in parallel, as a busy service would), alternated ``--repeats`` times;
the best run of each is kept. Nothing here is run by CI.

    PYTHONPATH=. .venv/bin/python benchmarks/sentinel_wait.py [--messages N] [--concurrency 1,16]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import redis as redis_sync
from redis.asyncio import Redis

from streamflow import connect
from streamflow.ops.server import RedisServer

STREAM = "bench:{role:wait}"
BODY = b'{"v":1,"id":"0123456789abcdef0123456789abcdef","role":"wait","payload":{"n":1}}' * 2


@dataclass
class Run:
    mode: str
    concurrency: int
    seconds: float
    latencies: list[float]
    timed_out: int

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def plain(redis: Redis) -> int:
    await redis.xadd(STREAM, {b"message": BODY})
    return 1


def waiting(timeout_ms: int) -> Callable[[Redis], Awaitable[int]]:
    async def publish(redis: Redis) -> int:
        pipe = redis.pipeline(transaction=False)
        pipe.xadd(STREAM, {b"message": BODY})
        pipe.execute_command("WAIT", 1, timeout_ms)
        _, replicas = await pipe.execute()
        return int(replicas)

    return publish


async def measure(
    redis: Redis,
    mode: str,
    publish: Callable[[Redis], Awaitable[int]],
    messages: int,
    concurrency: int,
) -> Run:
    await redis.delete(STREAM)
    latencies: list[float] = []
    timed_out = 0
    remaining = messages

    async def publisher() -> None:
        nonlocal remaining, timed_out
        while remaining > 0:
            remaining -= 1
            began = time.perf_counter()
            if await publish(redis) < 1:
                timed_out += 1
            latencies.append(time.perf_counter() - began)

    began = time.perf_counter()
    await asyncio.gather(*(publisher() for _ in range(concurrency)))
    return Run(mode, concurrency, time.perf_counter() - began, latencies, timed_out)


def wait_replica_online(master: RedisServer) -> None:
    deadline = time.monotonic() + 20
    with redis_sync.Redis(host=master.host, port=master.port) as client:
        while client.execute_command("WAIT", 1, 100) < 1:
            if time.monotonic() > deadline:
                raise RuntimeError("the replica did not come online")
            client.set("probe", 1)


async def main(args: argparse.Namespace) -> None:
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    master_args = ("--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0")
    with RedisServer(extra_args=master_args) as master:
        replica_args = ("--replicaof", master.host, str(master.port))
        with RedisServer(extra_args=replica_args):
            wait_replica_online(master)
            redis = connect.connect(master.url, max_connections=max(concurrencies) + 4)
            modes = {"plain": plain, "wait": waiting(args.wait_timeout_ms)}
            best: dict[tuple[str, int], Run] = {}
            try:
                for concurrency in concurrencies:
                    for _ in range(args.repeats):
                        for mode, publish in modes.items():
                            run = await measure(redis, mode, publish, args.messages, concurrency)
                            key = (mode, concurrency)
                            if key not in best or run.rate > best[key].rate:
                                best[key] = run
            finally:
                await redis.aclose()
    print(
        f"{args.messages} publishes per run, best of {args.repeats}; master + 1 replica on loopback"
    )
    print("| publishers | mode | msgs/s | p50 ms | p99 ms | WAIT timed out | ratio to plain |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for concurrency in concurrencies:
        base = best[("plain", concurrency)].rate
        for mode in modes:
            run = best[(mode, concurrency)]
            print(
                f"| {concurrency} | {mode} | {run.rate:,.0f} | {run.percentile(0.5):.3f} | "
                f"{run.percentile(0.99):.3f} | {run.timed_out} | {run.rate / base:.2f} |"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--wait-timeout-ms", type=int, default=1000)
    asyncio.run(main(parser.parse_args()))
