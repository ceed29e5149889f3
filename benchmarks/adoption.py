"""Adoption latency after a SIGKILL, and the cost of lease renewal.

Two measurements against a private redis-server (or ``--redis-url``):

1. **Adoption after SIGKILL**, for each lease TTL of ``--ttls``: a victim worker process
   (``streamflow worker --app tests.apps:app --role work``) runs ``--victim-entries`` handlers
   that would take minutes; a second worker process is idle. The victim is SIGKILLed (at a
   random phase of the adopter's reclaim cycle); the
   figures are the time from the kill until the last of its entries was adopted (no longer
   pending under the victim: XPENDING polled every 10 ms) and until the last one finished on
   the adopter (its handler takes 0.1 s there), next to the window the lease settings predict:
   an entry is adoptable TTL after its last renewal (which was at most one renewal interval
   before the kill) and is picked up at the next reclaim step, so adoption should land in
   [TTL - renew interval, TTL + reclaim interval].

2. **Renewal cost**: ONE worker (in this process, ``Worker.run``) with concurrency
   ``--inflight`` (1000) drains ``--slow-messages`` jobs whose handler sleeps ``--handler-seconds``
   (1 s), so that ~1000 entries are in flight and renewed at every tick; once with a short
   renewal interval and once with a long one (same TTL). For each it reports the drain rate
   (ideal: inflight / handler seconds), the renewal ticks (client-side duration of one
   ``renew_once``, entries held at the tick), Redis round trips per tick and the server-side
   time of each renewal script call (from SLOWLOG with a 0 us threshold during the run; the
   previous SLOWLOG settings are restored).

    PYTHONPATH=. .venv/bin/python benchmarks/adoption.py [--ttls 1,2,5] [--inflight 1000]
"""

from __future__ import annotations

import argparse
import hashlib
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import redis
from crash_load import CliWorkers, pending, read_record, redis_for, wait_for
from redis.asyncio import Redis

from streamflow import App, Client, Context, Outcome, SyncClient, Worker, connect
from streamflow.keys import Keys
from streamflow.leases import LeaseKeeper, LeaseSettings
from streamflow.scripts import Scripts

ROLE = "work"


# -- 1. adoption after SIGKILL -------------------------------------------------------------------


@dataclass
class Adoption:
    ttl: float
    renew: float
    reclaim: float
    idle_at_kill: float
    adopted: float
    finished: float

    @property
    def window(self) -> tuple[float, float]:
        return self.ttl - self.renew, self.ttl + self.reclaim


def adoption_after_kill(url: str, ttl: float, reclaim: float, entries: int) -> Adoption:
    namespace = "adopt" + uuid.uuid4().hex[:8]
    stream = Keys(namespace).role_stream(ROLE)
    lease = ["--lease-ttl", str(ttl), "--reclaim-interval", str(reclaim), "--block-ms", "200"]
    victim_name, adopter_name = f"victim-{namespace}", f"adopter-{namespace}"
    client = redis.Redis.from_url(url)
    with tempfile.TemporaryDirectory(prefix="adoption-") as tmp:
        record = Path(tmp) / "record.txt"
        workers = CliWorkers(url, namespace, Path(tmp), record)
        try:
            victim = workers.start(victim_name, ["--concurrency", str(entries), *lease])
            wait_for(victim.ready, 60, "victim ready")
            payload = {"seconds_by_consumer": {victim_name: 3600, adopter_name: 0.1}}
            with SyncClient(url, namespace=namespace) as publisher:
                ids = publisher.publish_many(ROLE, [payload] * entries)

            def started_on_victim() -> int:
                return sum(
                    1
                    for line in read_record(record)
                    if line.event == "START" and line.message_id in ids
                )

            wait_for(lambda: started_on_victim() == entries, 30, "victim starts every entry")
            # The adopter starts only now, so that the victim alone read the entries.
            adopter = workers.start(adopter_name, ["--concurrency", str(2 * entries), *lease])
            wait_for(adopter.ready, 60, "adopter ready")

            # The adopter's reclaim steps run every reclaim interval from its start: kill at a
            # random phase of that cycle, not always just after the adopter came up.
            time.sleep(random.uniform(0, reclaim))
            victim.kill()
            killed_at, killed_wall = time.monotonic(), time.time()
            rows = pending(client, stream, victim_name)
            idle = max(int(row["time_since_delivered"]) for row in rows) / 1000
            idle -= time.monotonic() - killed_at
            wait_for(
                lambda: not pending(client, stream, victim_name),
                ttl + reclaim + 60,
                "adoption",
                0.01,
            )
            adopted = time.monotonic() - killed_at

            def finished() -> list[float]:
                return [
                    line.at
                    for line in read_record(record)
                    if line.event == "DONE" and line.consumer == adopter_name
                ]

            wait_for(lambda: len(finished()) == entries, 60, "the adopter finishes them")
            done = max(finished()) - killed_wall
        finally:
            workers.close()
            client.close()
    renew = ttl / 3
    return Adoption(ttl, renew, reclaim, idle, adopted, done)


# -- 2. renewal cost -----------------------------------------------------------------------------


@dataclass
class RenewalRun:
    renew_interval: float
    messages: int
    inflight: int
    handler_seconds: float
    elapsed: float = 0.0
    ticks: list[tuple[float, int]] = field(default_factory=list)  # (seconds, entries held)
    renew_calls: int = 0
    alive_calls: int = 0
    renew_server_us: list[int] = field(default_factory=list)
    redis_cpu: float = 0.0

    @property
    def rate(self) -> float:
        return self.messages / self.elapsed if self.elapsed else 0.0

    @property
    def loaded_ticks(self) -> list[float]:
        """Durations of ticks that renewed at least 90% of ``inflight`` entries."""
        return [s for s, held in self.ticks if held >= 0.9 * self.inflight]


def _sha(name: str) -> str:
    return hashlib.sha1(Scripts.source(name).encode()).hexdigest()


async def _slowlog_on(redis_client: Redis) -> tuple[str, str]:
    config: Any = await redis_client.config_get("slowlog-*")
    await redis_client.config_set("slowlog-log-slower-than", 0)
    await redis_client.config_set("slowlog-max-len", 1_000_000)
    await redis_client.slowlog_reset()
    return str(config["slowlog-log-slower-than"]), str(config["slowlog-max-len"])


async def _count_script_calls(admin: Redis, run: RenewalRun) -> None:
    """Renewal and liveness script calls, and the renewal calls' durations, from SLOWLOG."""
    renew_sha, alive_sha = _sha("renew.lua").encode(), _sha("alive.lua").encode()
    log: Any = await admin.slowlog_get(1_000_000)
    for entry in log:
        command = entry.get("command", b"")
        if isinstance(command, str):
            command = command.encode()
        parts = command.split()
        if len(parts) < 2 or parts[0].lower() != b"evalsha":
            continue
        if parts[1] == renew_sha:
            run.renew_calls += 1
            run.renew_server_us.append(int(entry["duration"]))
        elif parts[1] == alive_sha:
            run.alive_calls += 1


async def renewal_cost(
    url: str, renew_interval: float, ttl: float, inflight: int, messages: int, seconds: float
) -> RenewalRun:
    run = RenewalRun(renew_interval, messages, inflight, seconds)
    namespace = "renew" + uuid.uuid4().hex[:8]
    app = App()

    @app.role(ROLE)
    async def slow(ctx: Context, payload: Any) -> None:
        await anyio.sleep(seconds)

    async with Client.from_url(url, namespace=namespace) as client:
        await client.publish_many(ROLE, [{} for _ in range(messages)])

    acked = 0
    worker: Worker | None = None

    def on_outcome(outcome: Outcome) -> None:
        nonlocal acked
        if outcome.status == "acked":
            acked += 1
            if acked == messages and worker is not None:
                worker.stop()

    original: Callable[[LeaseKeeper], Coroutine[Any, Any, None]] = LeaseKeeper.renew_once

    async def timed(self: LeaseKeeper) -> None:
        held = worker.statistics().in_flight if worker is not None else 0
        start = time.perf_counter()
        await original(self)
        run.ticks.append((time.perf_counter() - start, held))

    redis_client = connect.connect(url)
    admin = connect.connect(url)
    settings = LeaseSettings(ttl=ttl, renew_interval=renew_interval, reclaim_interval=ttl)
    try:
        previous = await _slowlog_on(admin)
        cpu = await admin.info("cpu")
        cpu0 = float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
        LeaseKeeper.renew_once = timed  # type: ignore[method-assign]
        try:
            worker = Worker(
                app,
                redis_client,
                namespace=namespace,
                concurrency=inflight,
                read_count=inflight,
                block_ms=200,
                lease=settings,
                on_outcome=on_outcome,
            )
            started = time.perf_counter()
            with anyio.fail_after(messages / inflight * seconds * 10 + 60):
                await worker.run()
            run.elapsed = time.perf_counter() - started
        finally:
            LeaseKeeper.renew_once = original  # type: ignore[method-assign,assignment]
        cpu = await admin.info("cpu")
        run.redis_cpu = float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]) - cpu0
        await _count_script_calls(admin, run)
        await admin.config_set("slowlog-log-slower-than", previous[0])
        await admin.config_set("slowlog-max-len", previous[1])
    finally:
        await redis_client.aclose()
        await admin.aclose()
    return run


# -- report --------------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def report_adoption(rows: Sequence[Adoption]) -> None:
    print("Adoption after SIGKILL (victim's entries: kill -> adopted / finished on the adopter)")
    print(
        f"{'TTL s':>6} {'renew s':>8} {'reclaim s':>9} {'window s':>12} {'renewed s ago':>14} "
        f"{'adopted s':>10} {'finished s':>11} {'expected s':>12}"
    )
    for row in rows:
        low, high = row.window
        # Adoptable TTL after the last renewal, picked up within one reclaim interval.
        expect = row.ttl - row.idle_at_kill
        print(
            f"{row.ttl:>6.1f} {row.renew:>8.2f} {row.reclaim:>9.2f} "
            f"{f'{low:.2f}-{high:.2f}':>12} {row.idle_at_kill:>14.2f} {row.adopted:>10.2f} "
            f"{row.finished:>11.2f} {f'{expect:.2f}-{expect + row.reclaim:.2f}':>12}"
        )


def report_renewal(runs: Sequence[RenewalRun]) -> None:
    print()
    print("Renewal cost (one worker, one role, handlers sleeping; drain of all messages)")
    for run in runs:
        loaded = run.loaded_ticks or [s for s, _ in run.ticks]
        ticks = len(run.ticks)
        # The liveness script also runs once to acquire and once to release the name.
        per_tick = (run.renew_calls + max(run.alive_calls - 2, 0)) / ticks if ticks else 0.0
        server = run.renew_server_us
        print(
            f"renew every {run.renew_interval:g}s: drain {run.rate:,.0f} msgs/s "
            f"(ideal {run.inflight / run.handler_seconds:,.0f}); {run.messages} messages in "
            f"{run.elapsed:.2f}s; Redis CPU {run.redis_cpu:.2f}s"
        )
        if ticks:
            print(
                f"  ticks {ticks}; tick with ~{run.inflight} held: median "
                f"{_ms(statistics.median(loaded))} ms, max {_ms(max(loaded))} ms "
                f"(client side, one renew_once)"
            )
        print(
            f"  round trips per tick {per_tick:.2f} (renew script calls {run.renew_calls}, "
            f"liveness calls {run.alive_calls})"
        )
        if server:
            print(
                f"  renew script in Redis: median {statistics.median(server)} us, "
                f"max {max(server)} us per call"
            )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--ttls", default="1,2,5", help="comma-separated lease TTLs (seconds)")
    parser.add_argument("--reclaim-interval", type=float, default=0.5)
    parser.add_argument("--victim-entries", type=int, default=8)
    parser.add_argument("--inflight", type=int, default=1000)
    parser.add_argument("--slow-messages", type=int, default=5000)
    parser.add_argument("--handler-seconds", type=float, default=1.0)
    parser.add_argument("--renew-ttl", type=float, default=30.0, help="TTL of the renewal runs")
    parser.add_argument("--renew-short", type=float, default=0.2)
    parser.add_argument("--renew-long", type=float, default=10.0)
    parser.add_argument("--skip-adoption", action="store_true")
    parser.add_argument("--skip-renewal", action="store_true")
    parser.add_argument("--redis-url", help="use this Redis instead of a private redis-server")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    ttls = [float(t) for t in args.ttls.split(",") if t]
    with redis_for(args.redis_url) as url:
        if not args.skip_adoption:
            rows = [
                adoption_after_kill(url, ttl, args.reclaim_interval, args.victim_entries)
                for ttl in ttls
            ]
            report_adoption(rows)
        if not args.skip_renewal:
            runs = [
                anyio.run(
                    renewal_cost,
                    url,
                    interval,
                    args.renew_ttl,
                    args.inflight,
                    args.slow_messages,
                    args.handler_seconds,
                )
                for interval in (args.renew_short, args.renew_long)
            ]
            report_renewal(runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
