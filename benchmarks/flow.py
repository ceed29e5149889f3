"""What flow control costs: limited roles against a plain one, and the scheduler's CPU.

One invocation, one private redis-server, two parts:

1. **Drains.** Each round publishes N no-op jobs per variant (:data:`VARIANTS`: one
   ``app.role()`` option dict each, and ``Client.publish_many`` options) and drains them with one
   worker process (``_worker.py drain --role-options JSON``), the order reversed every other
   round; medians of msgs/s, worker CPU per message (the worker's process time during the drain),
   Redis CPU per message (``INFO cpu``, publish + drain) and the drain's ``EVALSHA`` and
   ``XREADGROUP`` calls per message (``INFO commandstats`` after ``CONFIG RESETSTAT``). The limits
   of the ``not binding`` variants are far above what one worker reaches, so the figures are the
   limiter's own cost. Then, in the same rounds, rate limits that do bind (``--bound-rates``,
   ``--bound-seconds`` worth of jobs each): the measured starts/s against the limit.
2. **Scheduler.** One ``streamflow scheduler`` process per scenario (:data:`SCENARIOS`: 10
   schedules, 1,000 of the same mix, 1,000 without the every-second ones, and 1,000 whose ticks
   are a day apart, so none fires: the cost of polling alone), each in its own namespace, the
   order reversed every other round. The schedules (half interval, half cron) are added with
   ``streamflow.scheduler.add``; :data:`WARM_UP` seconds after the first pass (every new
   schedule has its first tick recorded) the process's CPU (psutil) and Redis CPU are measured
   over ``--seconds``. :data:`SETTLE` seconds later the jobs of the window's ticks are read back
   (no worker drains them; their message ids name the tick): fired against due (computed with
   ``next_tick``), duplicates, and lateness, each job's stream entry time minus its tick.

    PYTHONPATH=. .venv/bin/python benchmarks/flow.py [--quick] [--rounds R] [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import psutil  # type: ignore[import-untyped]
from _common import (
    REPO_ROOT,
    ROLE,
    WorkerProcess,
    git_revision,
    pending_count,
    print_section,
    redis_cpu_seconds,
    redis_url,
    redis_version,
    run_date,
)
from redis.asyncio import Redis

from streamflow import Client, flow, partitions
from streamflow.keys import GROUP, Keys
from streamflow.protocol import decode_job
from streamflow.scheduler import add
from streamflow.schedules import Schedule, next_tick

DOC = REPO_ROOT / "docs" / "benchmarks.md"
SECTION = "## Schedules and flow control"
DEFAULT_MESSAGES, QUICK_MESSAGES = 20_000, 2_000


@dataclass(frozen=True)
class Variant:
    """One way of declaring (and publishing to) the drained role."""

    role: Mapping[str, Any] = field(default_factory=dict)  # app.role() keyword arguments
    publish: Mapping[str, Any] = field(default_factory=dict)  # Client.publish_many options
    max_messages: int | None = None  # fewer jobs than N for a slow variant (figures per job)

    def messages(self, n: int) -> int:
        return min(n, self.max_messages or n)


#: The drain variants, compared with ``plain``. One entry adds one (e.g. priorities: the role's
#: levels in ``role``, the level published at in ``publish``).
VARIANTS: dict[str, Variant] = {
    "plain": Variant(),
    # Far above the worker's concurrency: every acquire is granted in full.
    "concurrency limit 1,000,000 (not binding)": Variant({"concurrency_limit": 1_000_000}),
    # One start per microsecond: every start a read wants is due (the burst, 100,000, is far
    # above a read's worth), so this is the limiter's own cost.
    "rate limit 1,000,000/s (not binding)": Variant({"rate_limit": "1000000/s"}),
}


@dataclass
class Drain:
    """One worker drain of N jobs."""

    messages: int
    elapsed: float
    worker_cpu: float  # seconds, the worker process during the drain
    redis_cpu: float  # seconds, publish + drain
    commands: dict[str, int]  # the drain's calls by command (lower case)
    limit_waits: int

    @property
    def rate(self) -> float:
        return self.messages / self.elapsed

    def starts(self, rate: int) -> float:
        """Starts per second under a binding ``rate``: the first burst's worth start at once,
        the rest one interval apart."""
        return (self.messages - burst(rate)) / self.elapsed

    def per_msg(self, what: str) -> float:
        return float(getattr(self, what)) / self.messages * 1e6

    def calls(self, command: str) -> float:
        return self.commands.get(command, 0) / self.messages


async def command_calls(redis: Redis) -> dict[str, int]:
    stats = await redis.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


async def drain(url: str, n: int, variant: Variant) -> Drain:
    """Publish ``n`` jobs and drain them with one worker process declaring the role so."""
    namespace = f"flow-{uuid.uuid4().hex[:8]}"
    keys = Keys(namespace)
    admin = Redis.from_url(url)
    client = Client.from_url(url, namespace=namespace)
    try:
        await partitions.ensure(admin, keys, ROLE, 1)  # as a worker records it: no warning
        cpu0 = await redis_cpu_seconds(admin)
        await client.publish_many(ROLE, [{"i": i} for i in range(n)], **variant.publish)
        await admin.config_resetstat()
        options = {"role_options": json.dumps(dict(variant.role))}
        async with WorkerProcess("drain", url, namespace, options) as worker:
            async with asyncio.timeout(120 + n / 50):
                report = await worker.wait_event("drained")
                await worker.wait()
        cpu1, calls = await redis_cpu_seconds(admin), await command_calls(admin)
        stream = keys.role_stream(ROLE)
        left, pending = await admin.xlen(stream), await pending_count(admin, stream, GROUP)
        if report["acked"] != n or left or pending:
            raise RuntimeError(f"{variant}: acked {report['acked']}/{n}, xlen {left}, {pending=}")
        waits = sum(report.get("limit_waits", {}).values())
        return Drain(n, report["elapsed"], report["cpu"], cpu1 - cpu0, calls, waits)
    finally:
        await admin.flushdb()  # the namespace's streams, limiter keys and dedup markers
        await admin.aclose()
        await client.aclose()


def ordered(items: Sequence[Any], round_no: int) -> list[Any]:
    return list(items) if round_no % 2 == 0 else list(reversed(items))


def drain_round(
    url: str, n: int, rates: Sequence[int], seconds: float, round_no: int
) -> dict[str, Drain]:
    """One drain of every variant and bound rate, in this round's order."""
    jobs = [(label, v.messages(n), v) for label, v in VARIANTS.items()]
    jobs += [(bound_label(r), max(2, round(r * seconds)), bound(r)) for r in rates]
    out: dict[str, Drain] = {}
    for label, count, variant in ordered(jobs, round_no):
        out[label] = asyncio.run(drain(url, count, variant))
        print(f"  {label}: {out[label].rate:,.1f} msgs/s", file=sys.stderr, flush=True)
    return out


def bound_label(rate: int) -> str:
    return f"rate limit {rate}/s (binding)"


def burst(rate: int) -> int:
    """The starts a rate of ``rate``/s grants at once (``limit.lua``'s burst)."""
    return max(1, int(rate * flow.RATE_BURST))


def bound(rate: int) -> Variant:
    return Variant({"rate_limit": f"{rate}/s"})


# -- the scheduler ----------------------------------------------------------------------------

#: Ten schedules, five interval and five cron; a scenario of K schedules repeats them K/10 times.
MIXED: tuple[dict[str, Any], ...] = (
    {"every": 1},
    {"every": 10},
    {"every": 60},
    {"every": 300},
    {"every": 3600},
    {"cron": "* * * * * *"},  # every second (six fields: seconds first)
    {"cron": "*/10 * * * * *"},
    {"cron": "* * * * *"},
    {"cron": "*/5 * * * *"},
    {"cron": "0 * * * *"},
)
#: The same without the two every-second schedules: ticks 10 s to an hour apart.
SLOWER = tuple(p for p in MIXED if p not in ({"every": 1}, {"cron": "* * * * * *"}))
#: Ticks a day apart, at hours this run is not at (the interval's tick is midnight UTC).
IDLE: tuple[dict[str, Any], ...] = (
    {"every": 86400},
    {"cron": "30 2 * * *", "timezone": "Europe/Berlin"},
)
#: Seconds measured after the first pass, and waited after the window before stopping.
WARM_UP, SETTLE = 3.0, 3.0


@dataclass(frozen=True)
class Scenario:
    label: str
    count: int
    patterns: tuple[dict[str, Any], ...]

    def schedules(self) -> list[Schedule]:
        out = []
        for i in range(self.count):
            pattern = self.patterns[i % len(self.patterns)]
            payload = {"at": "{scheduled_at}"}
            out.append(Schedule(id=f"s{i}", role="scheduled", payload=payload, **pattern))
        return out


SCENARIOS = (
    Scenario("10 schedules", 10, MIXED),
    Scenario("1,000 schedules", 1000, MIXED),
    Scenario("1,000 schedules, 10 s to 1 h apart", 1000, SLOWER),
    Scenario("1,000 schedules, none due", 1000, IDLE),
)


@dataclass
class SchedulerRun:
    seconds: float
    cpu: float  # the scheduler process, seconds
    redis_cpu: float
    expected: int  # ticks in the window
    fired: dict[str, int]  # run id -> entry time minus tick (ms), of the window's ticks
    duplicates: int  # jobs of the window's ticks beyond one per tick
    skipped: int  # missed ticks logged as skipped, the whole run

    def late(self, q: float) -> float:
        if not self.fired:
            return float("nan")
        ordered_ms = sorted(self.fired.values())
        return ordered_ms[min(len(ordered_ms) - 1, int(q * len(ordered_ms)))]


def ticks_between(schedule: Schedule, start_ms: int, end_ms: int) -> int:
    """How many ticks of ``schedule`` fall in [start_ms, end_ms)."""
    count, tick = 0, next_tick(schedule, start_ms - 1)
    while tick < end_ms:
        count, tick = count + 1, next_tick(schedule, tick)
    return count


@contextlib.contextmanager
def scheduler_process(
    url: str, namespace: str, log: IO[bytes]
) -> Iterator[subprocess.Popen[bytes]]:
    """``streamflow scheduler`` in a subprocess, its output to ``log``; always reaped."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(REPO_ROOT)]))
    argv = [sys.executable, "-m", "streamflow", "scheduler", "--redis-url", url]
    process = subprocess.Popen([*argv, "--namespace", namespace], env=env, stderr=log, stdout=log)
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.returncode not in (0, -15):
            log.seek(0)
            print(log.read().decode(errors="replace")[-2000:], file=sys.stderr)


def skipped_logged(log: IO[bytes]) -> int:
    """The missed ticks the scheduler logged as skipped (its whole run)."""
    log.seek(0)
    text = log.read().decode(errors="replace")
    return sum(int(n) for n in re.findall(r"(\d+) missed tick\(s\) skipped", text))


async def wait_first_pass(redis: Redis, keys: Keys, count: int, process: Any) -> None:
    """Until the scheduler has recorded every schedule's first tick (its first pass)."""
    async with asyncio.timeout(60):
        while await redis.zcard(keys.schedule_ticks()) < count:
            if process.poll() is not None:
                raise RuntimeError(f"the scheduler exited with {process.returncode}")
            await asyncio.sleep(0.05)


async def fired_in(
    redis: Redis, stream: str, start_ms: int, end_ms: int
) -> tuple[dict[str, int], int]:
    """The jobs of the ticks in [start_ms, end_ms): run id -> lateness (ms), and duplicates."""
    fired: dict[str, int] = {}
    duplicates = 0
    for entry_id, fields in await redis.xrange(stream):
        run = decode_job(fields).id  # sched.<schedule id>.<tick ms>
        tick = int(run.rsplit(".", 1)[1])
        if start_ms <= tick < end_ms:
            duplicates += run in fired
            fired[run] = int(entry_id.split(b"-")[0]) - tick
    return fired, duplicates


async def measure_scheduler(url: str, scenario: Scenario, seconds: float) -> SchedulerRun:
    namespace = f"sched-{uuid.uuid4().hex[:8]}"
    keys = Keys(namespace)
    stream = keys.role_stream("scheduled")
    redis = Redis.from_url(url)
    try:
        schedules = scenario.schedules()
        await partitions.ensure(redis, keys, "scheduled", 1)
        for schedule in schedules:
            await add(redis, keys, schedule)
        with tempfile.TemporaryFile() as log, scheduler_process(url, namespace, log) as process:
            await wait_first_pass(redis, keys, scenario.count, process)
            await asyncio.sleep(WARM_UP)  # past the first pass's one-off writes
            proc = psutil.Process(process.pid)
            cpu0, rcpu0, t0 = sum(proc.cpu_times()[:2]), await redis_cpu_seconds(redis), time.time()
            await asyncio.sleep(seconds)
            cpu1, rcpu1, t1 = sum(proc.cpu_times()[:2]), await redis_cpu_seconds(redis), time.time()
            await asyncio.sleep(SETTLE)  # the window's last ticks are fired late, not missed
            skipped = skipped_logged(log)
        start_ms, end_ms = int(t0 * 1000), int(t1 * 1000)
        fired, duplicates = await fired_in(redis, stream, start_ms, end_ms)
        expected = sum(ticks_between(s, start_ms, end_ms) for s in schedules)
        return SchedulerRun(
            t1 - t0, cpu1 - cpu0, rcpu1 - rcpu0, expected, fired, duplicates, skipped
        )
    finally:
        await redis.flushdb()
        await redis.aclose()


def scheduler_round(url: str, seconds: float, round_no: int) -> dict[str, SchedulerRun]:
    out: dict[str, SchedulerRun] = {}
    for scenario in ordered(SCENARIOS, round_no):
        run = asyncio.run(measure_scheduler(url, scenario, seconds))
        out[scenario.label] = run
        print(
            f"  {scenario.label}: CPU {run.cpu / run.seconds:.1%}, fired {len(run.fired)} of "
            f"{run.expected} ticks, {run.duplicates} duplicates, p50 late {run.late(0.5):.0f} ms, "
            f"{run.skipped} ticks logged as skipped (whole run)",
            file=sys.stderr,
            flush=True,
        )
    return out


# -- the report -------------------------------------------------------------------------------


def med(values: Sequence[float]) -> float:
    return statistics.median(values)


def drain_rows(rounds: list[dict[str, Drain]]) -> list[str]:
    plain = "plain"
    lines = [
        "| role | jobs | msgs/s | of plain | worker CPU µs/msg | Redis CPU µs/msg "
        "| EVALSHA per 1,000 msgs | XREADGROUP per 1,000 msgs | reads held back |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label in VARIANTS:
        runs = [r[label] for r in rounds]
        ratio = med([r[label].rate / r[plain].rate for r in rounds])
        cells = [
            f"{runs[0].messages:,}",
            f"{med([d.rate for d in runs]):,.0f}",
            f"{ratio:.1%}" if ratio < 0.1 else f"{ratio:.0%}",
            f"{med([d.per_msg('worker_cpu') for d in runs]):,.1f}",
            f"{med([d.per_msg('redis_cpu') for d in runs]):,.1f}",
            f"{med([d.calls('evalsha') * 1000 for d in runs]):,.0f}",
            f"{med([d.calls('xreadgroup') * 1000 for d in runs]):,.0f}",
            f"{med([d.limit_waits for d in runs]):,.0f}",
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def bound_rows(rounds: list[dict[str, Drain]], rates: Sequence[int]) -> list[str]:
    lines = [
        "| limit | jobs | starts/s (median) | of the limit | every round | worker CPU µs/msg |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for rate in rates:
        runs = [r[bound_label(rate)] for r in rounds]
        starts = [d.starts(rate) for d in runs]
        every = ", ".join(f"{s:,.1f}" for s in starts)
        cells = [f"{runs[0].messages:,}", f"{med(starts):,.1f}", f"{med(starts) / rate:.0%}"]
        cells += [every, f"{med([d.per_msg('worker_cpu') for d in runs]):,.0f}"]
        lines.append(f"| {rate}/s | " + " | ".join(cells) + " |")
    return lines


def scheduler_rows(rounds: list[dict[str, SchedulerRun]]) -> list[str]:
    lines = [
        "| schedules | scheduler CPU | Redis CPU | jobs/s | ticks fired / due (all rounds) "
        "| scheduler CPU ms/job | late p50 / p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for scenario in SCENARIOS:
        runs = [r[scenario.label] for r in rounds]
        fired, due = sum(len(r.fired) for r in runs), sum(r.expected for r in runs)
        duplicates = sum(r.duplicates for r in runs)
        jobs = med([len(r.fired) / r.seconds for r in runs])
        cells = [
            f"{med([r.cpu / r.seconds for r in runs]):.1%}",
            f"{med([r.redis_cpu / r.seconds for r in runs]):.1%}",
            f"{jobs:,.1f}",
            f"{fired:,} / {due:,}" + (f", {duplicates} twice" if duplicates else ""),
            f"{med([r.cpu / len(r.fired) * 1e3 for r in runs]):.2f}" if fired else "n/a",
            f"{med([r.late(0.5) for r in runs]):,.0f} / {med([r.late(0.99) for r in runs]):,.0f}"
            if fired
            else "n/a",
        ]
        lines.append(f"| {scenario.label} | " + " | ".join(cells) + " |")
    return lines


@dataclass
class Report:
    date: str
    redis: str
    revision: str
    seconds: float
    rates: Sequence[int]
    drains: list[dict[str, Drain]]
    schedulers: list[dict[str, SchedulerRun]]


def drain_median(rounds: list[dict[str, Drain]], label: str, what: str) -> float:
    if what in ("evalsha", "xreadgroup"):
        return med([r[label].calls(what) for r in rounds])
    if what in ("rate", "limit_waits"):
        return med([float(getattr(r[label], what)) for r in rounds])
    return med([r[label].per_msg(what) for r in rounds])


CONCURRENCY, RATE = list(VARIANTS)[1:3]


def reading_limits(rounds: list[dict[str, Drain]]) -> list[str]:
    """What the drains say: the concurrency limit's and the rate limit's cost, and why."""

    def m(label: str, what: str) -> float:
        return drain_median(rounds, label, what)

    def more(label: str, what: str) -> float:
        return m(label, what) - m("plain", what)

    return [
        "A concurrency limit that does not bind costs the worker "
        f"{more(CONCURRENCY, 'worker_cpu'):+.1f} µs and Redis "
        f"{more(CONCURRENCY, 'redis_cpu'):+.1f} µs per message. Its script calls are per read "
        "and per sweep, not per message: the reader asks `limit.lua` once per read for up to a "
        "read's worth of slots (one `ZADD` each), and the worker frees the slots of settled "
        "jobs once per 50 ms sweep (one `ZREM` each); "
        f"{m(CONCURRENCY, 'evalsha') * 1000:.0f} script calls per 1,000 messages against "
        f"{m('plain', 'evalsha') * 1000:.0f} for plain. What is per message is the slot's `ZADD` "
        "and `ZREM` inside them.",
        "",
        "A rate limit that does not bind costs the worker "
        f"{more(RATE, 'worker_cpu'):+.1f} µs and Redis {more(RATE, 'redis_cpu'):+.1f} µs per "
        "message: one `limit.lua` call grants every start that is due (up to a read's worth; "
        "the burst is a tenth of a second of the rate), and a reader whose stream flows reads "
        f"without blocking, so {m(RATE, 'evalsha') * 1000:.0f} script calls and "
        f"{m(RATE, 'xreadgroup') * 1000:.0f} `XREADGROUP` per 1,000 messages (plain: "
        f"{m('plain', 'evalsha') * 1000:.0f} and {m('plain', 'xreadgroup') * 1000:.0f}). "
        "Before (GCRA without burst, one start per call; b39c056, the same machine): "
        "561 msgs/s, 891 µs worker and 229 µs Redis CPU per message, 2,216 script calls and "
        "1,001 `XREADGROUP` per 1,000 messages.",
        "",
    ]


def reading_bound(rounds: list[dict[str, Drain]], rates: Sequence[int]) -> list[str]:
    if not rates:
        return []
    held = ", ".join(
        f"{med([r[bound_label(x)].starts(x) for r in rounds]):,.0f} of {x}/s" for x in rates
    )
    return [
        f"A rate that binds is reached by one worker ({held}; starts/s counts the first "
        "burst's worth as immediate). The reader sleeps exactly until the next start is due, "
        "and time it loses before asking again (the sleep's overshoot, the round trip) is made "
        "up within the burst: the next call grants every start due since. Before (no burst, "
        "b39c056): 82 of 100/s and 334 of 500/s, the lost time never made up. Across four "
        "worker processes, 50/s over 10 s started 501 and 503 jobs, no second more than 54 "
        "(`tests/test_flow.py`, issue 23).",
        "",
    ]


def reading_scheduler(rounds: list[dict[str, SchedulerRun]]) -> list[str]:
    ten, full, slow, idle = ([r[s.label] for r in rounds] for s in SCENARIOS)

    def cpu(runs: list[SchedulerRun], of: str = "cpu") -> float:
        return med([float(getattr(r, of)) / r.seconds for r in runs])

    jobs = med([len(r.fired) / r.seconds for r in full])
    fired, due = sum(len(r.fired) for r in full), sum(r.expected for r in full)
    per_fire = (cpu(full) - cpu(idle)) / jobs * 1e3 if jobs else float("nan")
    lost = (
        f"{due - fired:,} of {due:,} due ticks (of the every-second schedules) came more than a "
        "second late and were skipped (the missed-tick policy, `catch_up` 0, logged)"
        if fired < due
        else "no tick was skipped"
    )
    slow_fired = sum(len(r.fired) for r in slow)
    bursts = (
        f" With ticks 10 s to an hour apart, up to 250 come due at once (every 10 s): "
        f"{slow_fired:,} of {sum(r.expected for r in slow):,} fired, late p99 "
        f"{med([r.late(0.99) for r in slow]):,.0f} ms."
        if slow_fired
        else ""
    )
    return [
        f"Polling 1,000 schedules costs the scheduler {cpu(idle):.1%} of a core and Redis "
        f"{cpu(idle, 'redis_cpu'):.1%} (10 schedules, with their few fires: {cpu(ten):.1%} and "
        f"{cpu(ten, 'redis_cpu'):.1%}): every pass reads every definition, the paused set and "
        "both tick sets in one round trip, four passes a second. Firing costs about "
        f"{per_fire:.2f} ms of scheduler CPU per job (1,000 schedules firing less none due, per "
        "job), but a pass fires one tick after another, three round trips each (the cancel "
        "lookup of the chosen message id, the dedup publish script, the `ZADD GT` pipeline), so "
        "a pass lasts as long as its ticks' round trips, whatever the CPU "
        f"({cpu(full):.0%} of a core at {jobs:,.0f} jobs/s): late p99 "
        f"{med([r.late(0.99) for r in full]):,.0f} ms, and {lost}.{bursts}",
        "",
    ]


def render(report: Report) -> str:
    rounds = len(report.drains)
    lines = [
        SECTION,
        "",
        f"_{report.date}; streamflow {report.revision}; Redis {report.redis}; 2 cores, shared "
        f"with other work; {rounds} rounds, "
        "order reversed every other round; medians. Reproduce: `PYTHONPATH=. .venv/bin/python "
        "benchmarks/flow.py --write`._",
        "",
        "**Limited roles against a plain one.** No-op jobs, one worker process per drain "
        "(default settings), Redis CPU of publish + drain, the drain's commands; reads held "
        "back = the worker's reads a limit made wait (`limit_waits`):",
        "",
        *drain_rows(report.drains),
        "",
        "**Rate limits that bind** (one worker, the same rounds; starts/s = (jobs - burst) / "
        "drain time, the burst being a tenth of a second's worth):",
        "",
        *bound_rows(report.drains, report.rates),
        "",
        f"**The scheduler** (one `streamflow scheduler` process, default `--poll` 0.25 s, "
        f"{report.seconds:.0f} s measured per scenario, {WARM_UP:.0f} s after its first pass; "
        "jobs published, none drained; CPU as a share of one core; the jobs of the window's ticks "
        "counted after it (duplicates too) against the ticks due; late = the job's stream entry "
        "time minus its tick):",
        "",
        *scheduler_rows(report.schedulers),
        "",
        *reading_limits(report.drains),
        *reading_bound(report.drains, report.rates),
        *reading_scheduler(report.schedulers),
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, help=f"N per drain ({DEFAULT_MESSAGES:,})")
    parser.add_argument("--quick", action="store_true", help="N = 2,000, 2 rounds, 10 s")
    parser.add_argument("--rounds", type=int, help="rounds (3; --quick 2)")
    parser.add_argument("--bound-rates", type=int, nargs="*", default=[100, 500])
    parser.add_argument("--bound-seconds", type=float, help="seconds of jobs per bound rate (5)")
    parser.add_argument("--seconds", type=float, help="seconds measured per scheduler run (30)")
    parser.add_argument("--write", action="store_true", help=f"replace '{SECTION}' in {DOC}")
    args = parser.parse_args(argv)
    args.messages = args.messages or (QUICK_MESSAGES if args.quick else DEFAULT_MESSAGES)
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.bound_seconds = args.bound_seconds or (2.0 if args.quick else 5.0)
    args.seconds = args.seconds or (10.0 if args.quick else 30.0)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    date = run_date()
    drains: list[dict[str, Drain]] = []
    schedulers: list[dict[str, SchedulerRun]] = []
    with redis_url(None) as url:
        version = asyncio.run(redis_version(url))
        for i in range(args.rounds):
            print(f"round {i + 1}: drains", file=sys.stderr, flush=True)
            drains.append(drain_round(url, args.messages, args.bound_rates, args.bound_seconds, i))
            print(f"round {i + 1}: scheduler", file=sys.stderr, flush=True)
            schedulers.append(scheduler_round(url, args.seconds, i))
    rates = args.bound_rates
    report = Report(date, version, git_revision(), args.seconds, rates, drains, schedulers)
    print_section(render(report), DOC, SECTION, write=args.write)


if __name__ == "__main__":
    main()
