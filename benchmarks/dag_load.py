"""DAG coordinator load: events/s at saturation (one and two coordinators), latency under load.

The coordinator alone is measured: the workers of the load are played by this script with raw
redis-py (a worker process costs several times the coordinator per node, so on a small machine
real workers saturate long before the coordinator does). ``--tasks`` load tasks ``src ->
kid`` (``kid`` fed ``on: batch``) are submitted; this script writes their source's ``batch``
events (the batch stored at its key, as a worker's emit does) and answers every ``kid`` job the
coordinator publishes with ``accepted`` and ``done`` events, as a worker does for a handler that
returns at once: three events per load batch, one job.

* **Capacity**: batches are written as fast as the coordinators take them (at most
  ``--backlog`` events waiting), with one and with two ``python -m streamflow coordinator``
  processes; events processed per second over ``--window`` seconds, after a warm-up.
* **Latency under load**: the load is paced at fractions (``--levels``) of the one-coordinator
  capacity just measured while a probe task ``src -> n1`` (``n1`` of role ``dag_step``, served
  by one real ``python -m streamflow worker`` process running ``_dag_app.py``) gets
  ``--probe-rate`` batches per second, each item carrying the time just before its event is
  written (batch acknowledged); ``n1`` records its start: batch-acked -> child-started.

``--before DIR`` also measures the streamflow package in ``DIR`` (a ``git archive`` snapshot,
see benchmarks/README.md) in the same run, its child processes imported from there; rounds
alternate before and after (``--rounds``). ``--write`` replaces the ``## DAG coordinator load``
section of docs/benchmarks.md. Not run by CI.

    PYTHONPATH=. .venv/bin/python benchmarks/dag_load.py [--before /tmp/sf-old] [--write]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import orjson
import psutil
from _common import REPO_ROOT, git_revision, markdown_table, redis_url, replace_section
from redis.asyncio import Redis

from streamflow import Client, Graph
from streamflow.keys import Keys
from streamflow.protocol import MESSAGE_FIELD
from streamflow.records import EVENT_FIELD

DOC = REPO_ROOT / "docs" / "benchmarks.md"
SECTION = "## DAG coordinator load"
APP = "benchmarks._dag_app:app"
SRC, KID, STEP = "load_src", "load_kid", "dag_step"
MACHINE = "2 cores, shared"
FAKE_GROUP = "bench-fake-workers"
BATCH_TTL_MS = 3_600_000


# -- processes ----------------------------------------------------------------------------------


@dataclass
class Services:
    """Coordinator and probe-worker processes importing streamflow from ``tree``."""

    url: str
    namespace: str
    tree: Path
    logs: Path
    record: Path
    profile: Path | None = None
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)
    coordinators: list[psutil.Process] = field(default_factory=list)

    def coordinator_cpu(self) -> float:
        """CPU seconds (user + system) the coordinator processes used so far."""
        return sum(sum(p.cpu_times()[:2]) for p in self.coordinators)

    def start(self, name: str, command: Sequence[str], ready: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMFLOW_")}
        # The tree first, then the work tree for the benchmark app; cwd is not the work tree,
        # as `-m` puts the cwd first on sys.path.
        env["PYTHONPATH"] = os.pathsep.join([str(self.tree), str(REPO_ROOT)])
        env["SFBENCH_DAG_RECORD"] = str(self.record)
        log = self.logs / f"{name}-{len(self.started)}.log"
        profiled = self.profile is not None and name == "coordinator"
        prefix = ["-m", "cProfile", "-o", str(self.profile)] if profiled else []
        self.profile = None if profiled else self.profile  # the first coordinator only
        argv = [sys.executable, *prefix, "-m", "streamflow", *command]
        argv += ["--redis-url", self.url, "--namespace", self.namespace]
        with open(log, "wb") as out:
            process = subprocess.Popen(
                argv, cwd=self.logs, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out
            )
        self.started.append(process)
        if name == "coordinator":
            self.coordinators.append(psutil.Process(process.pid))
        deadline = time.monotonic() + 60
        while ready not in log.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.02)

    def coordinator(self) -> None:
        self.start("coordinator", ["coordinator"], "coordinator coord-")

    def worker(self) -> None:
        command = ["worker", "--app", APP, "--role", STEP, "--concurrency", "16"]
        self.start("worker", command, " serving ")

    def close(self) -> None:
        for process in self.started:
            if process.poll() is None:
                process.terminate()
        for process in self.started:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextlib.contextmanager
def services(
    url: str, namespace: str, tree: Path, record: Path, profile: Path | None
) -> Iterator[Services]:
    with tempfile.TemporaryDirectory() as logs:
        procs = Services(url, namespace, tree, Path(logs), record, profile)
        try:
            yield procs
        finally:
            procs.close()


# -- the played workers -------------------------------------------------------------------------


def event(kind: str, task_id: str, node_id: str, invocation: int, **extra: Any) -> bytes:
    fields = {"protocol": 1, "kind": "event", "type": kind, "task_id": task_id}
    fields.update(node_id=node_id, invocation=invocation, attempt=1, delivery=1)
    fields.update(at_ms=time.time_ns() // 1_000_000, **extra)
    return orjson.dumps(fields)


@dataclass
class Source:
    """One task's source node, played: its batches, numbered from 0."""

    task_id: str
    sent: int = 0

    def write(self, pipe: Any, keys: Keys, items: bytes) -> None:
        ref = keys.batch(SRC, self.task_id, "src", 0, self.sent)
        pipe.set(ref, items, px=BATCH_TTL_MS)
        body = event("batch", self.task_id, "src", 0, seq=self.sent, ref=ref, items=1)
        pipe.xadd(keys.events(SRC), {EVENT_FIELD: body})
        self.sent += 1


async def play_kids(redis: Redis, keys: Keys, stop: anyio.Event) -> None:
    """Answer every ``kid`` job with ``accepted`` and ``done`` (a handler that returns at once)."""
    stream = keys.role_stream(KID)
    with contextlib.suppress(Exception):
        await redis.xgroup_create(stream, FAKE_GROUP, id="0", mkstream=True)
    while not stop.is_set():
        reply = await redis.xreadgroup(FAKE_GROUP, "kid", {stream: ">"}, count=500, block=100)
        for _, rows in reply or []:
            pipe = redis.pipeline(transaction=False)
            for _entry_id, fields in rows:
                job = orjson.loads(fields[MESSAGE_FIELD])
                args = (job["task_id"], job["node_id"], job["invocation"])
                pipe.xadd(keys.events(KID), {EVENT_FIELD: event("accepted", *args)})
                pipe.xadd(keys.events(KID), {EVENT_FIELD: event("done", *args, total=0)})
            pipe.xack(stream, FAKE_GROUP, *(r[0] for r in rows))
            pipe.xdel(stream, *(r[0] for r in rows))
            await pipe.execute()


async def backlog(redis: Redis, keys: Keys) -> int:
    """Events written and not yet acknowledged and deleted by a coordinator."""
    return int(await redis.xlen(keys.events(SRC))) + int(await redis.xlen(keys.events(KID)))


async def processed(redis: Redis, keys: Keys) -> int:
    """Events the coordinators processed so far (added, minus those still in the streams)."""
    total = 0
    for stream in (keys.events(SRC), keys.events(KID)):
        if await redis.exists(stream):
            total += int((await redis.xinfo_stream(stream))["entries-added"])
    return total - await backlog(redis, keys)


async def play_sources(
    redis: Redis, keys: Keys, sources: list[Source], rate: float | None, limit: int, stop: Any
) -> None:
    """Load batches at ``rate`` per second (None: as fast as at most ``limit`` wait)."""
    started, sent, turn = time.perf_counter(), 0, 0
    while not stop.is_set():
        if rate is None:
            due = 200 if await backlog(redis, keys) < limit else 0
        else:
            due = min(int((time.perf_counter() - started) * rate) - sent, 500)
        if due <= 0:
            await anyio.sleep(0.002)
            continue
        pipe = redis.pipeline(transaction=False)
        for _ in range(due):
            sources[turn % len(sources)].write(pipe, keys, b"[0]")
            turn += 1
        await pipe.execute()
        sent += due


async def play_probe(
    redis: Redis, keys: Keys, source: Source, rate: float, stop: anyio.Event
) -> None:
    """The probe's batches, each item with the time just before its event is written."""
    while not stop.is_set():
        pipe = redis.pipeline(transaction=False)
        items = orjson.dumps([{"seq": source.sent, "t": time.time()}])
        source.write(pipe, keys, items)
        await pipe.execute()
        await anyio.sleep(1 / rate)


# -- one variant --------------------------------------------------------------------------------


async def submit_sources(client: Client, kid_role: str, count: int) -> list[Source]:
    """Submit ``count`` tasks ``src -> kid``; wait for each source's dispatch."""
    graph = Graph("load")
    graph.node("src", role=SRC)
    graph.node("kid", role=kid_role)
    graph.edge("src", "kid", on="batch")
    ids = [await client.submit(graph, roles=[SRC, kid_role]) for _ in range(count)]
    with anyio.fail_after(60):
        for task_id in ids:
            while True:
                task = await client.task(task_id)
                if task is not None and task.nodes["src"].dispatched:
                    break
                await anyio.sleep(0.02)
    return [Source(task_id) for task_id in ids]


async def capacity(
    redis: Redis, keys: Keys, sources: list[Source], args: Any, procs: Services
) -> dict[str, float]:
    """Events per second the running coordinators process at saturation, and their CPU."""
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(play_sources, redis, keys, sources, None, args.backlog, stop)
        await anyio.sleep(args.warmup)
        first, t0, cpu0 = await processed(redis, keys), time.perf_counter(), procs.coordinator_cpu()
        waiting = []
        while time.perf_counter() - t0 < args.window:
            await anyio.sleep(0.25)
            waiting.append(await backlog(redis, keys))
        last, t1, cpu1 = await processed(redis, keys), time.perf_counter(), procs.coordinator_cpu()
        stop.set()
    with anyio.fail_after(60):  # let the backlog drain before the next measurement
        while await backlog(redis, keys):
            await anyio.sleep(0.05)
    rate = (last - first) / (t1 - t0)
    return {
        "events_per_s": round(rate),
        "cpu_us_per_event": round((cpu1 - cpu0) / max(last - first, 1) * 1e6, 1),
        "busy": round((cpu1 - cpu0) / (t1 - t0), 2),
        # Saturated only if events were always waiting: the mean of the samples.
        "waiting": round(sum(waiting) / len(waiting)),
    }


def read_records(path: Path) -> list[dict[str, Any]]:
    lines = path.read_bytes().splitlines() if path.exists() else []
    return [orjson.loads(line) for line in lines]


def latency_stats(records: list[dict[str, Any]]) -> dict[str, float]:
    ms = sorted(r["latency_s"] * 1000 for r in records)
    if not ms:
        return {}

    def at(q: float) -> float:
        return round(ms[min(len(ms) - 1, round(q * (len(ms) - 1)))], 2)

    split = {
        # The coordinator builds the child's job (created_at_ms) when it decides to dispatch it;
        # the role stream's entry id is when Redis added it.
        "to_job_p50": p50([r["to_dispatch_s"] for r in records]),
        "to_stream_p50": p50([r["to_publish_s"] for r in records]),
    }
    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "n": len(ms), **split}


def p50(seconds: list[float]) -> float:
    return round(sorted(seconds)[len(seconds) // 2] * 1000, 2)


async def level(
    client: Client, sources: list[Source], rate: float, args: Any, procs: Services
) -> dict[str, Any]:
    """Load at ``rate`` events/s with the probe; batch-acked -> child-started of the probe."""
    redis, keys = client.redis, client.keys
    (probe,) = await submit_sources(client, STEP, 1)
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        if rate > 0:
            tg.start_soon(play_sources, redis, keys, sources, rate / 3, args.backlog, stop)
        await anyio.sleep(1.0)
        first, t0, cpu0 = await processed(redis, keys), time.perf_counter(), procs.coordinator_cpu()
        tg.start_soon(play_probe, redis, keys, probe, args.probe_rate, stop)
        await anyio.sleep(args.window)
        last, t1, cpu1 = await processed(redis, keys), time.perf_counter(), procs.coordinator_cpu()
        stop.set()
    await anyio.sleep(0.5)  # the last probe runs record
    records = [r for r in read_records(procs.record) if r["task"] == probe.task_id]
    return {
        "events_per_s": round((last - first) / (t1 - t0)),
        "cpu_us_per_event": round((cpu1 - cpu0) / max(last - first, 1) * 1e6, 1),
        "busy": round((cpu1 - cpu0) / (t1 - t0), 2),
        **latency_stats(records),
    }


async def variant(url: str, tree: Path, args: Any) -> dict[str, Any]:
    namespace = "load" + uuid.uuid4().hex[:6]
    record = Path(tempfile.mkdtemp()) / "record.jsonl"
    out: dict[str, Any] = {"tree": str(tree)}
    profile = args.profile if tree == REPO_ROOT else None
    with services(url, namespace, tree, record, profile) as procs:
        procs.worker()
        procs.coordinator()
        client = Client.from_url(url, namespace=namespace)
        stop = anyio.Event()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(play_kids, client.redis, client.keys, stop)
                sources = await submit_sources(client, KID, args.tasks)
                one = await capacity(client.redis, client.keys, sources, args, procs)
                out["capacity_1"] = one
                out["levels"] = []
                for fraction in args.levels:
                    rate = fraction * one["events_per_s"]
                    row = await level(client, sources, rate, args, procs)
                    out["levels"].append({"fraction": fraction, **row})
                procs.coordinator()
                two = await capacity(client.redis, client.keys, sources, args, procs)
                out["capacity_2"] = two
                stop.set()
        finally:
            await client.aclose()
    return out


# -- report -------------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def summary(runs: list[dict[str, Any]], levels: Sequence[float]) -> dict[str, Any]:
    """Medians over the rounds of one variant."""
    out: dict[str, Any] = {"levels": []}
    for n in ("capacity_1", "capacity_2"):
        out[n] = {k: median([r[n][k] for r in runs]) for k in runs[0][n]}
    for i, fraction in enumerate(levels):
        rows = [r["levels"][i] for r in runs]
        names = ("p50", "p90", "p99", "to_job_p50", "to_stream_p50", "cpu_us_per_event", "busy")
        cells = {k: median([row[k] for row in rows if k in row]) for k in names}
        cells["events_per_s"] = median([row["events_per_s"] for row in rows])
        out["levels"].append({"fraction": fraction, **cells})
    return out


def table(results: dict[str, dict[str, Any]]) -> str:
    names = list(results)
    header = ["figure", *names, "machine"]
    rows = []

    def row(label: str, cell: Any) -> None:
        rows.append([label, *(cell(results[n]) for n in names), MACHINE])

    def cap(c: dict[str, float]) -> str:
        busy = f"{c['busy']:.0%} of a core" if c["busy"] <= 1 else f"{c['busy']:.2f} cores"
        return (
            f"{c['events_per_s']:,.0f} ({c['cpu_us_per_event']} us CPU/event; {busy}; "
            f"{c['waiting']:,.0f} events waiting)"
        )

    row("coordinator events/s at saturation, 1 coordinator", lambda s: cap(s["capacity_1"]))
    row("... 2 coordinators", lambda s: cap(s["capacity_2"]))
    row(
        "... 2 / 1",
        lambda s: f"{s['capacity_2']['events_per_s'] / s['capacity_1']['events_per_s']:.2f}x",
    )
    for i, fraction in enumerate(results[names[0]]["levels"]):
        label = f"batch-acked -> child-started p50 / p90 / p99 ms, load {fraction['fraction']:.0%}"

        def cell(s: dict[str, Any], i: int = i) -> str:
            lv = s["levels"][i]
            return (
                f"{lv['p50']:.1f} / {lv['p90']:.1f} / {lv['p99']:.1f} "
                f"({lv['events_per_s']:,.0f} events/s, {lv['cpu_us_per_event']} us CPU/event, "
                f"{lv['busy']:.0%} of a core; p50 to job built {lv['to_job_p50']:.1f}, "
                f"to stream {lv['to_stream_p50']:.1f})"
            )

        row(label, cell)
    return markdown_table(header, rows)


def section(text: str, args: Any, rounds: int, load: str) -> str:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"""{SECTION}

Measured {now} by `benchmarks/dag_load.py {" ".join(sys.argv[1:])}`; machine: {MACHINE} (2
cores; 1-minute load average {load} at the start and end of the run); streamflow
{git_revision()}; {rounds} round(s), before and after alternated, medians; {args.tasks} load
tasks; private redis-server; Python {sys.version.split()[0]}.

Capacity is the events the coordinator processes per second when more are always waiting (the
load's workers are played by the script: three events and one job per load batch). Latency is
a probe task's batch-acked -> child-started (a real worker process runs the child) while the
load runs at that fraction of the 1-coordinator capacity measured in the same round (in
parentheses: the events/s measured).

{text}
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tasks", type=int, default=32, help="load tasks (32)")
    parser.add_argument("--levels", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.8])
    parser.add_argument("--window", type=float, default=6.0, help="seconds measured (6)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before (2)")
    parser.add_argument("--backlog", type=int, default=3000, help="events waiting at most")
    parser.add_argument("--probe-rate", type=float, default=50.0, help="probe batches/s (50)")
    parser.add_argument("--before", type=Path, help="a streamflow snapshot to measure too")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--redis-url", help="use this Redis instead of a private one")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--profile", type=Path, help="run the first coordinator under cProfile")
    parser.add_argument("--write", action="store_true", help=f"replace '{SECTION}' in {DOC}")
    args = parser.parse_args()
    if args.write and args.profile:
        parser.error("--write takes no profiled run: cProfile inflates every figure")
    return args


def main() -> None:
    args = parse_args()
    trees = {"after": REPO_ROOT}
    if args.before:
        trees = {"before": args.before.resolve(), **trees}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    loads = [os.getloadavg()[0]]
    with redis_url(args.redis_url) as url:
        for _ in range(args.rounds):
            for name, tree in trees.items():
                runs[name].append(anyio.run(variant, url, tree, args))
                print(name, json.dumps(runs[name][-1]), file=sys.stderr)
    loads.append(os.getloadavg()[0])
    load = " / ".join(f"{x:.1f}" for x in loads)
    results = {name: summary(rs, args.levels) for name, rs in runs.items()}
    text = table(results)
    print(f"load average {load}\n{text}")
    if args.json_out:
        saved = {"runs": runs, "results": results, "load_average": loads}
        args.json_out.write_text(json.dumps(saved, indent=1))
    if args.write:
        replace_section(DOC, SECTION, section(text, args, args.rounds, load))


if __name__ == "__main__":
    main()
