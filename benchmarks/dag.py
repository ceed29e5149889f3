"""DAG tasks: a chain source -> n1 -> n2 -> n3 fed per batch; latency, coordinator rate, checks.

Starts a private redis-server, ``--workers`` ``python -m streamflow worker --app
benchmarks._dag_app:app`` processes and one ``python -m streamflow coordinator`` process, then
submits one task per ``--work-ms`` value: a source that emits ``--batches`` batches of one item
as fast as it can, each item carrying the wall-clock time just before its emit, and n1, n2, n3,
each fed ``on: batch`` by the node before. Every run of n1..n3 records, at its start, its input
batch's age (its start minus the time in the item: batch-ack-to-child-start latency), works
``--work-ms`` (an ``anyio.sleep``), emits one batch with the current time and records its own
handler time. Handlers append one JSON line per run to a record file read at the end.

It prints JSON and a markdown table, and exits 1 when a check fails: every run of n1..n3 exactly
once per parent batch index, every source batch through n3 exactly once, the task succeeded
with the expected counts. ``--write`` replaces the ``## DAG tasks`` section of
docs/benchmarks.md. Not run by CI.

    PYTHONPATH=. .venv/bin/python benchmarks/dag.py [--batches 10000] [--work-ms 0 2] [--write]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import orjson
import psutil
from _common import REPO_ROOT, git_revision, markdown_table, redis_url, replace_section, text_table
from redis.asyncio import Redis

from streamflow import Client, Graph, TaskState
from streamflow.keys import Keys

DOC = REPO_ROOT / "docs" / "benchmarks.md"
SECTION = "## DAG tasks"
APP = "benchmarks._dag_app:app"
SOURCE_ROLE, STEP_ROLE = "dag_source", "dag_step"
CHAIN = ("n1", "n2", "n3")
PARENT = {"n1": "source", "n2": "n1", "n3": "n2"}
MACHINE = "2 cores, shared"
POLL = 0.02


# -- processes ----------------------------------------------------------------------------------


@dataclass
class Proc:
    """One ``streamflow`` CLI process; its stderr goes to ``log``."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def stderr_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with code {self.process.returncode}:\n{self.stderr_tail()}"
            )

    def logged(self, text: str) -> bool:
        self.check_alive()
        return text in self.log.read_text(errors="replace")


@dataclass
class Procs:
    """The worker and coordinator processes; :meth:`close` always ends every one."""

    url: str
    namespace: str
    directory: Path
    record: Path
    started: list[Proc] = field(default_factory=list)

    def start(self, name: str, command: Sequence[str], prefix: Sequence[str] = ()) -> Proc:
        env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMFLOW_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(REPO_ROOT)]))
        env["SFBENCH_DAG_RECORD"] = str(self.record)
        log = self.directory / f"{name}.log"
        argv = [sys.executable, *prefix, "-m", "streamflow", *command]
        argv += ["--redis-url", self.url, "--namespace", self.namespace]
        with open(log, "wb") as err:
            # Not the work tree: `-m` puts the cwd first on sys.path, and PYTHONPATH must be
            # able to put an older streamflow (a snapshot) before this one.
            process = subprocess.Popen(
                argv, cwd=self.directory, env=env, stdin=subprocess.DEVNULL, stdout=err, stderr=err
            )
        proc = Proc(name, process, log)
        self.started.append(proc)
        return proc

    def check_alive(self) -> None:
        for proc in self.started:
            proc.check_alive()

    def close(self) -> None:
        """SIGTERM (graceful: a profiled coordinator writes its stats), then SIGKILL."""
        running = [p for p in self.started if p.process.poll() is None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in running:
            try:
                proc.process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.process.kill()
                proc.process.wait()


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(POLL)


@dataclass
class Cluster:
    """The started processes."""

    procs: Procs
    workers: list[Proc]
    coordinator: Proc

    def pids(self) -> tuple[int, list[int]]:
        return self.coordinator.process.pid, [w.process.pid for w in self.workers]


def start_processes(procs: Procs, args: argparse.Namespace) -> Cluster:
    worker_cmd = ["worker", "--app", APP, "--concurrency", str(args.concurrency)]
    if args.source_worker:
        commands = [[*worker_cmd, "--role", STEP_ROLE] for _ in range(args.workers)]
        commands.append(["worker", "--app", APP, "--role", SOURCE_ROLE, "--concurrency", "1"])
    else:
        commands = [worker_cmd for _ in range(args.workers)]
    workers = []
    for i, command in enumerate(commands):
        profiled = args.profile_worker is not None and i == 0
        prefix = ["-m", "cProfile", "-o", str(args.profile_worker)] if profiled else []
        workers.append(procs.start(f"worker-{i}", command, prefix))
    for worker in workers:
        wait_for(lambda w=worker: w.logged(" serving "), 60, f"{worker.name} ready")
    prefix = ["-m", "cProfile", "-o", str(args.profile)] if args.profile else []
    coordinator = procs.start("coordinator", ["coordinator"], prefix)
    wait_for(lambda: coordinator.logged("coordinator coord-"), 60, "coordinator ready")
    return Cluster(procs, workers, coordinator)


# -- one task -----------------------------------------------------------------------------------


def build_graph(batches: int, work_ms: float) -> Graph:
    graph = Graph("dag-bench", params={"batches": batches, "work_ms": work_ms})
    graph.node("source", role=SOURCE_ROLE)
    for node_id in CHAIN:
        graph.node(node_id, role=STEP_ROLE)
        graph.edge(PARENT[node_id], node_id, on="batch")
    return graph


def cpu_seconds(pids: Sequence[int]) -> float:
    total = 0.0
    for pid in pids:
        times = psutil.Process(pid).cpu_times()
        total += times.user + times.system
    return total


async def redis_cpu(redis: Redis) -> float:
    info = await redis.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def entries_added(redis: Redis, streams: Sequence[str]) -> int:
    """Entries ever added to ``streams`` (XINFO ``entries-added``; they are deleted once read)."""
    total = 0
    for stream in streams:
        if await redis.exists(stream):
            total += int((await redis.xinfo_stream(stream))["entries-added"])
    return total


@dataclass
class Counters:
    """What is measured outside the task around one run."""

    events: int = 0
    jobs: int = 0
    coordinator_cpu: float = 0.0
    worker_cpu: float = 0.0
    redis_cpu: float = 0.0

    async def sample(self, redis: Redis, keys: Keys, cluster: Cluster) -> None:
        coordinator, workers = cluster.pids()
        self.events = await entries_added(redis, [keys.events(SOURCE_ROLE), keys.events(STEP_ROLE)])
        streams = [keys.role_stream(SOURCE_ROLE), keys.role_stream(STEP_ROLE)]
        self.jobs = await entries_added(redis, streams)
        self.coordinator_cpu = cpu_seconds([coordinator])
        self.worker_cpu = cpu_seconds(workers)
        self.redis_cpu = await redis_cpu(redis)

    def minus(self, before: Counters) -> Counters:
        return Counters(*(getattr(self, f) - getattr(before, f) for f in self.__dataclass_fields__))


@dataclass
class Run:
    """One task's raw results."""

    work_ms: float
    batches: int
    task: TaskState
    commits: int
    observed_s: float
    counters: Counters


async def wait_done(client: Client, task_id: str, procs: Procs, timeout: float) -> TaskState:
    task = None
    with anyio.move_on_after(timeout):
        while True:
            task = await client.task(task_id)
            if task is not None and task.terminal:
                return task
            procs.check_alive()
            await anyio.sleep(POLL)  # the state lives in Redis: poll it
    progress = task.model_dump_json(include={"state", "nodes"}) if task else "unknown task"
    raise TimeoutError(f"task {task_id} not finished after {timeout:g} s: {progress}")


async def run_task(
    url: str, namespace: str, args: argparse.Namespace, work_ms: float, cluster: Cluster
) -> Run:
    keys = Keys(namespace)
    redis = Redis.from_url(url)
    client = Client.from_url(url, namespace=namespace)
    try:
        before, after = Counters(), Counters()
        await before.sample(redis, keys, cluster)
        started = time.perf_counter()
        task_id = await client.submit(build_graph(args.batches, work_ms))
        task = await wait_done(client, task_id, cluster.procs, args.timeout)
        observed = time.perf_counter() - started
        await after.sample(redis, keys, cluster)
        commits = int(await redis.hget(keys.task_state(task_id), "v") or 0)
    finally:
        await client.aclose()
        await redis.aclose()
    return Run(work_ms, args.batches, task, commits, observed, after.minus(before))


async def run_all(
    url: str, namespace: str, args: argparse.Namespace, cluster: Cluster
) -> tuple[list[Run], str]:
    runs: list[Run] = []
    for work_ms in args.work_ms:
        runs.append(await run_task(url, namespace, args, work_ms, cluster))
        print(f"work {work_ms:g} ms: task {runs[-1].task.state}", file=sys.stderr)
    redis = Redis.from_url(url)
    version = str((await redis.info("server"))["redis_version"])
    await redis.aclose()
    return runs, version


# -- analysis -----------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def read_records(path: Path) -> dict[str, list[dict[str, Any]]]:
    """The record file's lines by task id."""
    by_task: dict[str, list[dict[str, Any]]] = {}
    if path.exists():
        for line in path.read_bytes().splitlines():
            record = orjson.loads(line)
            by_task.setdefault(record["task"], []).append(record)
    return by_task


def check_node(node_id: str, records: list[dict[str, Any]], n: int) -> list[str]:
    """Each parent batch index 0..n-1 exactly once, invocations 0..n-1, the right parent."""
    problems = []
    if len(records) != n:
        problems.append(f"{node_id} ran {len(records):,} invocations, expected {n:,}")
    for what in ("index", "invocation"):
        counts = Counter(r[what] for r in records)
        twice = sorted(k for k, c in counts.items() if c > 1)
        missing = sorted(set(range(n)) - set(counts))
        if twice:
            problems.append(f"{node_id}: {what} seen more than once: {twice[:10]}")
        if missing:
            problems.append(f"{node_id}: {what} never seen ({len(missing):,}): {missing[:10]}")
    parents = {r["parent"] for r in records}
    if parents - {PARENT[node_id]}:
        problems.append(f"{node_id}: fed by {sorted(parents)}, expected {PARENT[node_id]!r}")
    return problems


def check_run(run: Run, records: list[dict[str, Any]]) -> list[str]:
    n = run.batches
    problems = []
    source = [r for r in records if r["node"] == "source"]
    if [r["emitted"] for r in source] != [n]:
        problems.append(f"source runs recorded {[r['emitted'] for r in source]}, expected [{n}]")
    for node_id in CHAIN:
        problems += check_node(node_id, [r for r in records if r["node"] == node_id], n)
    seqs = Counter(r["seq"] for r in records if r["node"] == CHAIN[-1])
    if seqs != Counter(range(n)):
        problems.append("n3 did not see every source batch exactly once")
    if run.task.state != "succeeded":
        problems.append(f"task {run.task.state}: {run.task.error}")
    for node_id, node in run.task.nodes.items():
        runs = 1 if node_id == "source" else n
        got = (node.dispatched, node.completed, node.batches_out)
        if got != (runs, runs, n):
            problems.append(
                f"{node_id}: dispatched/completed/batches_out {got}, expected {(runs, runs, n)}"
            )
    if run.counters.events != 10 * n + 2:
        problems.append(f"{run.counters.events:,} events written, expected {10 * n + 2:,}")
    if run.counters.jobs != 3 * n + 1:
        problems.append(f"{run.counters.jobs:,} jobs published, expected {3 * n + 1:,}")
    return problems


def stats_ms(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    ms = [v * 1000 for v in values]
    qs = {"p50": 0.5, "p90": 0.9, "p99": 0.99}
    out = {name: round(percentile(ms, q), 2) for name, q in qs.items()}
    out["max"] = round(max(ms), 2)
    return out


def summarize(run: Run, records: list[dict[str, Any]]) -> dict[str, Any]:
    steps = [r for r in records if r["node"] in CHAIN]
    source_s = sum(r["handler_s"] for r in records if r["node"] == "source")
    steps_s = sum(r["handler_s"] for r in steps)
    task = run.task
    span_s = ((task.finished_at_ms or 0) - task.created_at_ms) / 1000
    c = run.counters
    return {
        "work_ms": run.work_ms,
        "batches": run.batches,
        "task_state": task.state,
        "end_to_end_s": round(span_s, 3),
        "end_to_end_observed_s": round(run.observed_s, 3),
        "handler_sum_s": round(source_s + steps_s, 3),
        "source_handler_s": round(source_s, 3),
        "step_handler_sum_s": round(steps_s, 3),
        "latency_ms": stats_ms([r["latency_s"] for r in steps]),
        "latency_ms_by_node": {
            node_id: stats_ms([r["latency_s"] for r in steps if r["node"] == node_id])
            for node_id in CHAIN
        },
        "to_dispatch_ms": stats_ms([r["to_dispatch_s"] for r in steps]),
        "dispatch_to_publish_ms": stats_ms([r["to_publish_s"] - r["to_dispatch_s"] for r in steps]),
        "publish_to_start_ms": stats_ms([r["latency_s"] - r["to_publish_s"] for r in steps]),
        "emit_ms": stats_ms([r["emit_s"] for r in steps]),
        "events": c.events,
        "events_per_s": round(c.events / span_s) if span_s > 0 else None,
        "commits": run.commits,
        "events_per_commit": round(c.events / run.commits, 1) if run.commits else None,
        "dispatches": sum(n.dispatched for n in task.nodes.values()),
        "jobs_published": c.jobs,
        "coordinator_cpu_s": round(c.coordinator_cpu, 2),
        "coordinator_cpu_us_per_event": round(c.coordinator_cpu / c.events * 1e6, 1)
        if c.events
        else None,
        "worker_cpu_s": round(c.worker_cpu, 2),
        "redis_cpu_s": round(c.redis_cpu, 2),
    }


# -- report -------------------------------------------------------------------------------------


def table_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    def row(label: str, cell: Callable[[dict[str, Any]], str]) -> list[str]:
        return [label, *(cell(r) for r in results), MACHINE]

    def lat(stats: dict[str, float]) -> str:
        return " / ".join(
            f"{stats[k]:,.1f}" if stats else "-" for k in ("p50", "p90", "p99", "max")
        )

    rows = [
        row("end to end, submit -> task succeeded", lambda r: f"{r['end_to_end_s']:.2f} s"),
        row(
            "sum of handler times (source + every n1..n3 run)",
            lambda r: f"{r['handler_sum_s']:.2f} s (source {r['source_handler_s']:.2f} s)",
        ),
        row(
            "end to end minus the source's handler time",
            lambda r: f"{r['end_to_end_s'] - r['source_handler_s']:.2f} s",
        ),
        row(
            "end to end / sum of handler times",
            lambda r: f"{r['end_to_end_s'] / r['handler_sum_s']:.2f}",
        ),
        row("batch-ack-to-child-start p50 / p90 / p99 / max, ms", lambda r: lat(r["latency_ms"])),
    ]
    for node_id in CHAIN:
        rows.append(
            row(
                f"... {PARENT[node_id]} -> {node_id} only",
                lambda r, n=node_id: lat(r["latency_ms_by_node"][n]),
            )
        )
    rows += [
        row(
            "... parent's emit -> child's job built (coordinator)",
            lambda r: lat(r["to_dispatch_ms"]),
        ),
        row(
            "... child's job built -> added to the role stream (commit, publish)",
            lambda r: lat(r["dispatch_to_publish_ms"]),
        ),
        row(
            "... added to the role stream -> child start (worker)",
            lambda r: lat(r["publish_to_start_ms"]),
        ),
        row(
            "ctx.emit() in n1..n3, p50 / p90 / p99 / max, ms",
            lambda r: lat(r["emit_ms"]),
        ),
        row(
            "coordinator events processed per second",
            lambda r: f"{r['events_per_s']:,}/s ({r['events']:,} events)",
        ),
        row(
            "coordinator commits (events per commit)",
            lambda r: f"{r['commits']:,} ({r['events_per_commit']})",
        ),
        row("dispatches (jobs published by the coordinator)", lambda r: f"{r['dispatches']:,}"),
        row(
            "CPU: coordinator / workers / redis-server",
            lambda r: (
                f"{r['coordinator_cpu_s']:.1f} s / {r['worker_cpu_s']:.1f} s / "
                f"{r['redis_cpu_s']:.1f} s"
            ),
        ),
        row(
            "coordinator CPU per event; busy (CPU / end to end)",
            lambda r: (
                f"{r['coordinator_cpu_us_per_event']} us; "
                f"{r['coordinator_cpu_s'] / r['end_to_end_s']:.0%} of one core"
            ),
        ),
        row("correctness checks", lambda r: "passed" if not r["problems"] else "FAILED"),
    ]
    return rows


def header(results: list[dict[str, Any]]) -> list[str]:
    return ["figure", *(f"work {r['work_ms']:g} ms" for r in results), "machine"]


def render_markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    n = results[0]["batches"]
    return "\n".join(
        [
            SECTION,
            "",
            f"Measured {meta['date']} by `benchmarks/dag.py {meta['argv']}`; machine: {MACHINE}; "
            f"{meta['workers']} `python -m streamflow worker` processes (concurrency "
            f"{meta['concurrency']}), one `python -m streamflow coordinator` process (defaults), "
            f"private redis-server {meta['redis_version']}; streamflow {git_revision()}; Python "
            f"{sys.version.split()[0]}.",
            "",
            f"A chain source -> n1 -> n2 -> n3, each fed `on: batch`; the source emits {n:,} "
            "batches of one item as fast as it can, each step emits one batch per run, so "
            f"{3 * n:,} step runs. Each column is one task, in one run of the script.",
            "",
            markdown_table(header(results), table_rows(results)),
            "",
            "End to end is the task's `created_at_ms` (submit) to its `finished_at_ms` (the "
            "coordinator committing `succeeded`). Batch-ack-to-child-start is a step's start "
            "(wall clock, first line of its handler) minus the time its parent put in the item "
            "just before `ctx.emit()`. Events are the entries added to the two role events "
            "streams during the task (XINFO `entries-added`): per source batch one `batch`, per "
            "step run `accepted` + `batch` + `done`, plus the source's `accepted` and `done` "
            f"({10 * n + 2:,}); divided by the end-to-end time. Commits are the task's state "
            "version. CPU is user + system time of the processes (psutil) and `INFO cpu` over "
            "the task. Work is an `anyio.sleep` in each step. A handler's time is wall-clock "
            "from its first line to its return, so it includes waiting for its worker's event "
            "loop, shared by up to the concurrency of handlers: the sum of handler times is what "
            "the runs would take one after another at that speed, not CPU time. The split of the "
            "latency uses the job's `created_at_ms` (set by the coordinator as it decides the "
            "dispatch) and its role-stream entry id (the time Redis added it), both in whole ms.",
        ]
    )


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--batches", type=int, default=10_000, help="source batches (10,000)")
    parser.add_argument(
        "--work-ms", type=float, nargs="+", default=[0.0], help="step work; one task per value"
    )
    parser.add_argument("--workers", type=int, default=2, help="worker processes (2)")
    parser.add_argument("--concurrency", type=int, default=64, help="per worker process (64)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per task (900)")
    parser.add_argument("--redis-url", help="use this Redis instead of starting a private one")
    parser.add_argument(
        "--profile", type=Path, metavar="FILE", help="run the coordinator under cProfile"
    )
    parser.add_argument(
        "--profile-worker", type=Path, metavar="FILE", help="run worker 0 under cProfile"
    )
    parser.add_argument(
        "--source-worker",
        action="store_true",
        help="one more worker process for the source alone; the others serve only the steps",
    )
    parser.add_argument("--write", action="store_true", help=f"replace '{SECTION}' in {DOC}")
    args = parser.parse_args(argv)
    if args.batches < 1 or args.workers < 1 or args.concurrency < 1:
        parser.error("--batches, --workers and --concurrency must be at least 1")
    if args.write and (args.profile or args.profile_worker):
        parser.error("--write takes no profiled run: cProfile inflates every figure")
    return args


def measure(args: argparse.Namespace) -> tuple[list[dict[str, Any]], str]:
    namespace = f"dag-{uuid.uuid4().hex[:8]}"
    with redis_url(args.redis_url) as url, tempfile.TemporaryDirectory() as tmp:
        procs = Procs(url, namespace, Path(tmp), Path(tmp) / "record.jsonl")
        try:
            cluster = start_processes(procs, args)
            runs, version = anyio.run(run_all, url, namespace, args, cluster)
        finally:
            procs.close()
        by_task = read_records(procs.record)
    results = []
    for run in runs:
        records = by_task.get(run.task.id, [])
        result = summarize(run, records)
        result["problems"] = check_run(run, records)
        results.append(result)
    return results, version


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    date = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    started = time.perf_counter()
    results, version = measure(args)
    wall = time.perf_counter() - started
    meta = {
        "date": date,
        "argv": " ".join(sys.argv[1:] if argv is None else argv),
        "workers": args.workers,
        "concurrency": args.concurrency,
        "redis_version": version,
        "machine": MACHINE,
        "script_wall_s": round(wall, 1),
        "streamflow": git_revision(),
    }
    print(json.dumps({"meta": meta, "runs": results}, indent=2))
    print(text_table(header(results), table_rows(results)), file=sys.stderr)
    problems = [f"work {r['work_ms']:g} ms: {p}" for r in results for p in r["problems"]]
    if problems:
        print("\nCHECKS FAILED:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    if args.write:
        replace_section(DOC, SECTION, render_markdown(results, meta))
        print(f"\nwrote {SECTION!r} to {DOC}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
