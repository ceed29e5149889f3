"""DAG tasks at scale: a chain of no-op nodes and as many independent ones, end to end.

Starts a private redis-server, one ``python -m streamflow worker --app
benchmarks._dag_scale_app:app`` process and one ``python -m streamflow coordinator`` process,
then for each ``--sizes`` value submits two tasks, one after the other, of no-op nodes (a
handler that returns at once): a chain ``n0 -> n1 -> ...`` (each node fed ``on: done`` by the
one before: one node at a time, every step of the coordinator on a graph of that size), and the
same number of independent nodes (all sources: every node at once). It measures the time from
submit to the task's end, the coordinator's CPU time and the commits of the task's state.

A task that does not end within ``--timeout`` seconds is reported as such (the old coordinator
needed ~40 s for a 150-node chain). ``--json-out`` saves the figures; ``--before FILE`` adds
figures saved by a run of an older streamflow (``PYTHONPATH=<old tree> python
benchmarks/dag_scale.py --json-out FILE``) to the table. ``--write`` replaces the
``## DAG tasks at scale`` section of docs/benchmarks.md. Not run by CI.

    PYTHONPATH=. .venv/bin/python benchmarks/dag_scale.py [--sizes 150 400 1000] [--write]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from statistics import fmean
from typing import Any

import anyio
import psutil
from _common import REPO_ROOT, git_revision, markdown_table, redis_url, replace_section
from redis.asyncio import Redis

from streamflow import Client, Graph, TaskState
from streamflow.keys import Keys

DOC = REPO_ROOT / "docs" / "benchmarks.md"
SECTION = "## DAG tasks at scale"
APP = "benchmarks._dag_scale_app:app"
ROLE = "dag_noop"
MACHINE = "2 cores, shared"
CPU_PROFILE = REPO_ROOT / "benchmarks" / "_cpu_profile.py"


@contextmanager
def services(
    url: str, namespace: str, logs: Path, profile: Path | None = None
) -> Iterator[dict[str, psutil.Process]]:
    """One worker and one coordinator process (under cProfile with ``profile``); always ended."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMFLOW_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(REPO_ROOT)]))
    conn = ["--redis-url", url, "--namespace", namespace]
    commands = {
        "worker": ["worker", "--app", APP, "--block-ms", "200"],
        "coordinator": ["coordinator", "--block-ms", "200"],
    }
    started: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, command in commands.items():
            # Timed by CPU time: a wall-clock profile on a shared machine charges the waits.
            prefix = [str(CPU_PROFILE), str(profile)] if profile and name != "worker" else []
            with open(logs / f"{name}.log", "wb") as log:
                started[name] = subprocess.Popen(
                    [sys.executable, *prefix, "-m", "streamflow", *command, *conn],
                    # Not the work tree: `-m` puts the cwd first on sys.path, and PYTHONPATH
                    # must be able to put an older streamflow before this one.
                    cwd=logs,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                )
        yield {name: psutil.Process(p.pid) for name, p in started.items()}
    finally:
        for process in started.values():
            process.terminate()
        for process in started.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def shape_graph(shape: str, size: int) -> Graph:
    graph = Graph(f"{shape}-{size}")
    for i in range(size):
        graph.node(f"n{i}", role=ROLE)
        if shape == "chain" and i:
            graph.edge(f"n{i - 1}", f"n{i}")
    return graph


def phases(task: TaskState) -> dict[str, float]:
    """Means, in ms, of a node's dispatch -> start (publish, worker pickup) and start -> end.

    A node's start is the ``accepted`` time its worker reported; its end, the coordinator's
    commit of its completion (in a chain, the same step dispatches the next node).
    """
    nodes = list(task.nodes.values())
    to_start = [(n.started_at_ms or 0) - (n.dispatched_at_ms or 0) for n in nodes]
    to_end = [(n.finished_at_ms or 0) - (n.started_at_ms or 0) for n in nodes]
    return {"dispatch_to_start_ms": fmean(to_start), "start_to_end_ms": fmean(to_end)}


def cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


async def run_one(
    client: Client, procs: dict[str, psutil.Process], shape: str, size: int, timeout: float
) -> dict[str, Any]:
    """Submit one task, wait for its end (or the timeout), return its figures."""
    before = {name: cpu(p) for name, p in procs.items()}
    started = time.perf_counter()
    row: dict[str, Any] = {"shape": shape, "size": size}
    try:
        task_id = await client.submit(shape_graph(shape, size), roles=[ROLE])
    except RecursionError:  # the old graph check was recursive
        return {**row, "state": "refused", "error": "RecursionError at submit"}
    try:
        task = await client.wait(task_id, timeout=timeout, poll=0.05)
    except TimeoutError:
        state = await client.task(task_id)
        done = sum(1 for n in state.nodes.values() if n.terminal) if state else 0
        row.update(state="timeout", seconds=timeout, nodes_done=done)
        await client.cancel(task_id, target="task", reason="benchmark timeout")
    else:
        seconds = (task.finished_at_ms or 0) / 1000 - task.created_at_ms / 1000
        row.update(state=task.state, seconds=seconds, nodes_done=size, **phases(task))
    row["wall"] = time.perf_counter() - started
    version = await client.redis.hget(client.keys.task_state(task_id), "v")
    row["commits"] = int(version or 0)
    row.update({f"cpu_{name}": cpu(p) - before[name] for name, p in procs.items()})
    return row


async def measure(
    url: str, sizes: Sequence[int], timeout: float, profile: Path | None = None
) -> list[dict[str, Any]]:
    namespace = "scale" + uuid.uuid4().hex[:6]
    rows = []
    with (
        tempfile.TemporaryDirectory() as logs,
        services(url, namespace, Path(logs), profile) as procs,
    ):
        redis = Redis.from_url(url)
        client = Client(redis, namespace=namespace)
        try:
            # Wait for the worker to register its role (submit checks the roles it is given).
            with anyio.fail_after(30):
                while not await redis.sismember(Keys(namespace).known_roles(), ROLE):
                    await anyio.sleep(0.05)
            for size in sizes:
                for shape in ("chain", "independent"):
                    row = await run_one(client, procs, shape, size, timeout)
                    print(json.dumps(row), file=sys.stderr)
                    rows.append(row)
        finally:
            await redis.aclose()
    return rows


def seconds_cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "not run"
    if row["state"] == "refused":
        return f"cannot be submitted ({row['error']})"
    if row["state"] == "timeout":
        return f"> {row['seconds']:.0f} s ({row['nodes_done']:,} of {row['size']:,} nodes done)"
    per_node = row["seconds"] / row["size"] * 1000
    return f"{row['seconds']:.2f} s ({per_node:.1f} ms/node)"


def cpu_cell(row: dict[str, Any] | None) -> str:
    if row is None or row["state"] == "refused":
        return "-"
    per_commit = row["cpu_coordinator"] / max(row["commits"], 1) * 1000
    cells = f"{row['cpu_coordinator']:.1f} s / {row['cpu_worker']:.1f} s; {row['commits']:,}"
    return f"{cells} ({per_commit:.1f} ms coordinator CPU per commit)"


def table(rows: list[dict[str, Any]], before: list[dict[str, Any]]) -> str:
    old = {(r["shape"], r["size"]): r for r in before}
    new = {(r["shape"], r["size"]): r for r in rows}
    header = ["task", "before: submit -> end", "after: submit -> end"]
    header += ["before: CPU coordinator / worker; commits", "after: same", "machine"]
    out = []
    for key in sorted(old.keys() | new.keys(), key=lambda k: (k[0], k[1])):
        shape, size = key
        name = f"{size:,}-node {'chain' if shape == 'chain' else 'independent nodes'}"
        cells = [seconds_cell(old.get(key)), seconds_cell(new.get(key))]
        cells += [cpu_cell(old.get(key)), cpu_cell(new.get(key))]
        out.append([name, *cells, MACHINE])
    return markdown_table(header, out)


def section(rows: list[dict[str, Any]], before: list[dict[str, Any]], before_rev: str) -> str:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"""{SECTION}

Measured {now} by `benchmarks/dag_scale.py --write`; machine: 2 cores, shared by other
engineers' test runs; one `python -m streamflow worker` process and one `python -m streamflow
coordinator` process (defaults), private redis-server; after: streamflow {git_revision()},
before: {before_rev}, measured by earlier runs of this script on a snapshot of that commit
(`PYTHONPATH=<snapshot> ... --json-out`, then `--before`); Python {sys.version.split()[0]}.

Each task is no-op nodes of role `{ROLE}` (the handler returns at once): a chain `n0 -> n1 ->
...` fed `on: done` (one node runs at a time, so every node costs the coordinator a few steps on
the whole graph), or the same number of independent nodes (all dispatched at once). Submit ->
end is the task's `created_at_ms` to its `finished_at_ms`; CPU is user + system time of the
process over the task (psutil); commits is the task's state version. Before, the coordinator
recomputed the graph's order and looked nodes and edges up by scanning the spec on every step,
so a step cost grew with the square of the graph; now what a graph implies is indexed once per
task, a step looks only at the nodes its events touched (and their children), the coordinator
keeps the state it committed instead of reading it again, and a commit writes the nodes the
step touched, not every node: the coordinator CPU per commit no longer grows with the graph
(the chains). Independent nodes come in bigger steps (many events per commit), so their cost
per commit is per event.

{table(rows, before)}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[150, 400, 1000])
    parser.add_argument("--timeout", type=float, default=300.0, help="Seconds per task.")
    parser.add_argument("--redis-url", help="Use this Redis instead of a private one.")
    parser.add_argument("--json-out", type=Path, help="Save the figures here.")
    parser.add_argument(
        "--before", type=Path, nargs="*", default=[], help="Figures saved by runs of older code."
    )
    parser.add_argument("--revision", help="Name the code measured (default: git's).")
    parser.add_argument("--write", action="store_true", help="Update docs/benchmarks.md.")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="FILE",
        help="Run the coordinator under cProfile (CPU time).",
    )
    args = parser.parse_args()
    if args.write and args.profile:
        parser.error("--write takes no profiled run: cProfile inflates every figure")
    with redis_url(args.redis_url) as url:
        rows = anyio.run(measure, url, args.sizes, args.timeout, args.profile)
    saved = {"revision": args.revision or git_revision(), "rows": rows}
    if args.json_out:
        args.json_out.write_text(json.dumps(saved, indent=1))
    saved_before = [json.loads(path.read_text()) for path in args.before]
    before = [row for run in saved_before for row in run["rows"]]
    revisions = ", ".join(sorted({run["revision"] for run in saved_before})) or "not measured"
    print(table(rows, before))
    if args.write:
        replace_section(DOC, SECTION, section(rows, before, revisions))


if __name__ == "__main__":
    main()
