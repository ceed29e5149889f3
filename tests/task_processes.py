"""DAG task processes and what the task crash tests check, shared with the cluster tests.

The task is always the same chain of ``tests.task_apps:app`` (see tests/test_task_crash.py):
``src`` --batch--> ``step`` --batch--> ``total``. :class:`Processes` starts workers and
coordinators (:class:`Process`, killed at a chosen moment by :meth:`Process.kill_when`);
:class:`Record` reads the handlers' record file, :class:`Store` what Redis holds; the
``assert_*`` functions are the checks every test makes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import orjson
import redis

from streamflow import Client, Graph
from streamflow.dag.graph import GraphSpec
from streamflow.dag.store import decode_state, node_field
from streamflow.dag.tasks import Invocation, TaskState
from streamflow.keys import COORDINATORS, GROUP, Keys
from tests.helpers import CLI, clean_env, wait_for
from tests.processes import Process, kill_all, popen_logged
from tests.task_apps import Line, read_trace

APP = "tests.task_apps:app"
ROLES = ("src", "step")
WORKER_LEASE = ("--lease-ttl", "1", "--reclaim-interval", "0.2", "--block-ms", "200")
COORDINATOR_LEASE = ("--lease-ttl", "1", "--sweep-interval", "0.2", "--block-ms", "200")
BATCHES, SIZE, PAUSE, STEP_SECONDS = 40, 5, 0.1, 0.3
ITEMS = BATCHES * SIZE
#: What ``total`` must hold: every source item, doubled by ``step``, counted once.
EXPECTED_TOTAL = [{"count": ITEMS, "sum": 2 * sum(range(ITEMS)), "sums": {}}]
#: A task's whole run, kills and adoptions included, on a loaded 2-core machine.
TASK_DEADLINE = 40.0


# -- processes --------------------------------------------------------------------------------


class Processes:
    """Starts workers and coordinators of one namespace; all are SIGKILLed at teardown."""

    def __init__(self, tmp_path: Path, redis_url: str, namespace: str, record: Path) -> None:
        self._tmp = tmp_path
        self._connection = ["--redis-url", redis_url, "--namespace", namespace]
        self._env = clean_env(SFTEST_RECORD=str(record))
        self.started: list[Process] = []

    def worker(self, name: str, *, concurrency: int = 4) -> Process:
        """A worker serving ``src`` and ``step`` with consumer name ``name``."""
        command = [*CLI, "worker", "--app", APP, *self._connection]
        for role in ROLES:
            command += ["--role", role]
        command += ["--consumer-name", name, "--concurrency", str(concurrency), *WORKER_LEASE]
        return self._start(name, command, " serving ")

    def coordinator(self, name: str) -> Process:
        command = [*CLI, "coordinator", *self._connection, "--consumer-name", name]
        return self._start(name, [*command, *COORDINATOR_LEASE], f" coordinator {name} on ")

    def _start(self, name: str, command: list[str], ready_line: str) -> Process:
        log = self._tmp / f"{name}.log"
        process = popen_logged(command, log, self._env)
        started = Process(name, process, log, ready_line, ("Traceback", "gave up"))
        self.started.append(started)
        return started

    def kill_all(self) -> None:
        kill_all(self.started)


# -- the record and Redis, as the tests see them ----------------------------------------------


class Record:
    """The trace file every handler of a test appends to."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def lines(self, event: str | None = None, node: str | None = None) -> list[Line]:
        return [
            line
            for line in read_trace(self.path)
            if (event is None or line.event == event) and (node is None or line.node == node)
        ]

    def in_flight(self, node: str, pid: int) -> set[int]:
        """Invocations of ``node`` that process ``pid`` started and has not finished."""
        started = {line.invocation for line in self.lines("START", node) if line.pid == pid}
        return started - {line.invocation for line in self.lines("DONE", node) if line.pid == pid}


class Store:
    """Read-only views of one namespace's keys."""

    def __init__(self, client: redis.Redis, namespace: str) -> None:
        self.client = client
        self.keys = Keys(namespace)

    def task(self, task_id: str) -> TaskState:
        key = self.keys.task_state(task_id)
        raw, spec = self.client.hmget(key, ["task", "spec"])  # type: ignore[misc]
        assert raw is not None, f"task {task_id} not found"
        ids = [n.id for n in GraphSpec.model_validate_json(spec).nodes]
        nodes: Any = self.client.hmget(key, [node_field(n) for n in ids])
        return decode_state(raw, dict(zip(ids, nodes, strict=True)))

    def invocation(self, task_id: str, node: str, number: int) -> Invocation:
        raw: Any = self.client.hget(self.keys.task_state(task_id), f"inv:{node}:{number}")
        assert raw is not None, f"no record of invocation {node}:{number}"
        return Invocation.model_validate_json(raw)

    def outbox(self, task_id: str) -> int:
        return int(self.client.hlen(self.keys.task_outbox(task_id)))

    def outbox_jobs(self, task_id: str) -> set[int]:
        """Invocations of the jobs the task's outbox holds (decided, not confirmed published)."""
        return self.outbox_and_stream(task_id, "step")[0]

    def outbox_and_stream(self, task_id: str, role: str) -> tuple[set[int], set[int]]:
        """One snapshot (MULTI/EXEC) of the invocations of the jobs in the task's outbox and of
        those in the role's stream (published, not yet acknowledged)."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hvals(self.keys.task_outbox(task_id))
        pipe.xrange(self.keys.role_stream(role))
        outbox, rows = pipe.execute()
        items = [orjson.loads(value) for value in outbox]
        decided = {orjson.loads(i["job"])["invocation"] for i in items if i["kind"] == "job"}
        return decided, {orjson.loads(fields[b"message"])["invocation"] for _, fields in rows}

    def unread_events(self, role: str) -> int:
        """Events of the role that no coordinator read yet (acknowledged ones are deleted)."""
        events = self.keys.events(role)
        return int(self.client.xlen(events)) - _pending(self.client, events, COORDINATORS)

    def events_held(self, consumer: str) -> int:
        """Task events that coordinator ``consumer`` read and has not acknowledged."""
        held = 0
        for role in ROLES:
            stream = self.keys.events(role)
            rows: Any = self.client.xpending_range(
                stream, COORDINATORS, "-", "+", 1000, consumername=consumer
            )
            held += len(rows)
        return held

    def jobs_published(self, role: str) -> int:
        """Entries ever added to the role's stream (acknowledged ones are deleted, not these)."""
        info: Any = self.client.xinfo_stream(self.keys.role_stream(role))
        return int(info["entries-added"])

    def leftovers(self, task_id: str) -> dict[str, int]:
        """Everything that should be gone once a task ended and its events were handled."""
        found = {"outbox": self.outbox(task_id)}
        for role in ROLES:
            stream, events = self.keys.role_stream(role), self.keys.events(role)
            found[f"{role} stream"] = int(self.client.xlen(stream))
            found[f"{role} pending"] = _pending(self.client, stream, GROUP)
            found[f"{role} events"] = int(self.client.xlen(events))
            found[f"{role} events pending"] = _pending(self.client, events, COORDINATORS)
            found[f"{role} dead letters"] = int(self.client.xlen(self.keys.dead_letters(role)))
        return {name: n for name, n in found.items() if n}


def _pending(client: redis.Redis, stream: str, group: str) -> int:
    info: Any = client.xpending(stream, group)
    return int(info["pending"])


def submit(redis_url: str, namespace: str, gate: Path | None = None) -> str:
    """Submit the test chain (see the module docstring); returns the task id.

    With ``gate``, the source stops after half its batches until that file exists.
    """
    params: dict[str, Any] = {"n": BATCHES, "size": SIZE, "pause": PAUSE}
    if gate is not None:
        params.update(gate=str(gate), gate_after=BATCHES // 2)
    graph = Graph("crash", params=params)
    graph.node("src", role="src")
    graph.node("step", role="step", params={"seconds": STEP_SECONDS})
    graph.node("total", function="metrics.aggregate")
    graph.edge("src", "step", on="batch").edge("step", "total", on="batch")

    async def send() -> str:
        async with Client.from_url(redis_url, namespace=namespace) as client:
            return await client.submit(graph)

    return anyio.run(send)


def result(redis_url: str, namespace: str, task_id: str) -> dict[str, list[Any]]:
    async def fetch() -> dict[str, list[Any]]:
        async with Client.from_url(redis_url, namespace=namespace) as client:
            return await client.result(task_id)

    return anyio.run(fetch)


def wait_finished(store: Store, task_id: str) -> TaskState:
    wait_for(lambda: store.task(task_id).terminal, TASK_DEADLINE, "the task ends", 0.1)
    task = store.task(task_id)
    assert task.state == "succeeded", task.model_dump_json(indent=1)
    wait_for(lambda: not store.leftovers(task_id), 10, "nothing left over", 0.1)
    return task


# -- the checks shared by every test -----------------------------------------------------------


def assert_counts_exact(task: TaskState) -> None:
    """Every node ran once per input and produced exactly what it should, no more."""
    src, step, total = task.nodes["src"], task.nodes["step"], task.nodes["total"]
    assert (src.state, src.dispatched, src.completed) == ("succeeded", 1, 1), src
    assert (src.batches_out, src.items_out) == (BATCHES, ITEMS), src
    assert step.state == "succeeded", step
    assert step.dispatched == step.completed == BATCHES, step
    assert step.batches_in == step.batches_out == BATCHES, step
    assert step.fed == {"src": BATCHES} and step.items_out == ITEMS, step
    assert total.state == "succeeded", total
    assert total.dispatched == total.completed == total.batches_in == BATCHES, total
    assert total.batches_out == 1, total


def assert_each_invocation_ran_once(
    record: Record, store: Store, task_id: str, killed: set[int]
) -> None:
    """Per node, every invocation has exactly one run that finished and was accepted: its last
    run, which traced DONE. Earlier runs of it (START, maybe DONE) may only come from a killed
    process; a live process never runs an invocation twice. Each ``step`` invocation processes
    its own parent batch: invocations and source batches match one to one."""
    for node, expected in (("src", 1), ("step", BATCHES)):
        starts: dict[int, list[Line]] = defaultdict(list)
        for line in sorted(record.lines("START", node), key=lambda line: line.at):
            assert line.task == task_id and line.attempt == 1, line
            starts[line.invocation].append(line)
        done: dict[int, list[int]] = defaultdict(list)
        for line in record.lines("DONE", node):
            done[line.invocation].append(line.pid)
        assert sorted(starts) == list(range(expected)), f"{node}: invocations {sorted(starts)}"
        for number, runs in starts.items():
            *earlier, last = runs
            where = f"{node}:{number} runs {[(r.pid, r.consumer) for r in runs]}"
            assert all(run.pid in killed for run in earlier), f"run again by a live {where}"
            assert last.pid in done[number], f"the last run did not finish: {where}"
            live_done = [pid for pid in done[number] if pid not in killed]
            assert len(live_done) <= 1, f"{where}: DONE on live pids {live_done}"
            inv = store.invocation(task_id, node, number)
            assert inv.state == "done" and inv.counted and inv.attempt == 1, (where, inv)
            if earlier:
                assert inv.delivery >= 2, (where, inv)
        if node == "step":
            fed = {n: {(run.parent, run.index) for run in runs} for n, runs in starts.items()}
            assert all(len(batches) == 1 for batches in fed.values()), fed
            every = sorted(batch for batches in fed.values() for batch in batches)
            assert every == [("src", index) for index in range(BATCHES)], every


def assert_task_exact(
    redis_url: str,
    namespace: str,
    store: Store,
    record: Record,
    task_id: str,
    *,
    killed: set[int],
    survivors: Sequence[Process],
) -> None:
    task = wait_finished(store, task_id)
    assert_counts_exact(task)
    assert result(redis_url, namespace, task_id) == {"total": EXPECTED_TOTAL}
    # No duplicated dispatch: one job ever published per invocation.
    published = {role: store.jobs_published(role) for role in ROLES}
    assert published == {"src": 1, "step": BATCHES}, f"jobs ever published: {published}"
    assert_each_invocation_ran_once(record, store, task_id, killed)
    for process in survivors:
        assert process.alive(), process.stderr()
        process.assert_clean_log()
