"""The task commands (coordinator, submit, status, tasks, result) as real subprocesses."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from streamflow.keys import Keys
from tests.helpers import CLI, ROOT, clean_env, kill_tree, run_cli, wait_for

pytestmark = [pytest.mark.redis, pytest.mark.slow]

GRAPH = {
    "name": "cli",
    "params": {"n": 12, "size": 4},
    "nodes": [
        {"id": "source", "role": "source"},
        {"id": "enrich", "role": "enrich"},
        {"id": "total", "function": "metrics.aggregate"},
    ],
    "edges": [
        {"from": "source", "to": "enrich", "on": "batch"},
        {"from": "enrich", "to": "total", "on": "batch"},
    ],
}

YAML_GRAPH_AS_JSON = {
    "name": "yaml",
    "params": {"n": 3, "size": 3},
    "nodes": [{"id": "source", "role": "source"}],
    "edges": [],
}

YAML_GRAPH = """
name: yaml
params: {n: 3, size: 3}
nodes:
  - id: source
    role: source
edges: []
"""


@pytest.fixture
def services(redis_url: str, namespace: str) -> Iterator[list[str]]:
    """A worker and a coordinator process on the test namespace; yields the connection args."""
    conn = ["--redis-url", redis_url, "--namespace", namespace]
    procs = [
        subprocess.Popen(
            [*CLI, "worker", "--app", "tests.dag.helpers:app", "--block-ms", "200", *conn],
            cwd=ROOT,
            env=clean_env(),
            stderr=subprocess.DEVNULL,
        ),
        subprocess.Popen(
            [*CLI, "coordinator", "--block-ms", "200", "--sweep-interval", "0.2", *conn],
            cwd=ROOT,
            env=clean_env(),
            stderr=subprocess.DEVNULL,
        ),
    ]
    client = redis.Redis.from_url(redis_url)
    try:
        # Submit checks graphs against the roles workers registered when they started.
        wait_for(lambda: client.scard(Keys(namespace).known_roles()) > 0, 20, "worker registered")
        yield conn
    finally:
        client.close()
        for proc in procs:
            kill_tree(proc)


def test_submit_wait_status_tasks_result(services: list[str], tmp_path: Path) -> None:
    graph = tmp_path / "graph.json"
    graph.write_text(json.dumps(GRAPH))
    submitted = run_cli("submit", str(graph), "--wait", "--timeout", "30", *services)
    assert submitted.returncode == 0, submitted.stderr
    task_id = submitted.stdout.splitlines()[0]
    assert submitted.stdout.splitlines()[-1] == f"task {task_id} succeeded"
    assert any(line.startswith("enrich") for line in submitted.stdout.splitlines())

    status = run_cli("status", task_id, "--json", *services)
    state = json.loads(status.stdout)
    assert state["state"] == "succeeded"
    assert state["nodes"]["enrich"]["dispatched"] == 3
    assert "succeeded" in run_cli("status", task_id, *services).stdout

    listed = run_cli("tasks", "--state", "succeeded", *services)
    assert task_id in listed.stdout
    assert run_cli("tasks", "--state", "failed", *services).stdout.strip() == (
        "no tasks in state failed"
    )

    result = run_cli("result", task_id, *services)
    assert json.loads(result.stdout) == {"total": [{"count": 12, "sum": 78, "sums": {}}]}
    enriched = run_cli("result", task_id, "--node", "enrich", *services)
    # A per-batch node's batches are indexed in the order they were acknowledged.
    assert sorted(json.loads(enriched.stdout)["enrich"]) == list(range(1, 13))


def test_submit_yaml_with_params(services: list[str], tmp_path: Path) -> None:
    graph = tmp_path / "graph.yaml"
    graph.write_text(YAML_GRAPH)
    submitted = run_cli(
        "submit", str(graph), "--params", '{"n": 5}', "--wait", "--timeout", "30", *services
    )
    assert submitted.returncode == 0, submitted.stderr
    task_id = submitted.stdout.splitlines()[0]
    assert json.loads(run_cli("result", task_id, *services).stdout) == {"source": [0, 1, 2, 3, 4]}


def test_invalid_graph_lists_every_problem(redis_url: str, namespace: str, tmp_path: Path) -> None:
    bad = {
        "nodes": [{"id": "a", "role": "x"}, {"id": "a", "role": "y"}, {"id": "b"}],
        "edges": [{"from": "a", "to": "zz"}],
    }
    graph = tmp_path / "bad.json"
    graph.write_text(json.dumps(bad))
    done = run_cli("submit", str(graph), "--redis-url", redis_url, "--namespace", namespace)
    assert done.returncode == 2
    for part in ("duplicate node id 'a'", "unknown role 'x'", "'role' or 'function'", "'zz'"):
        assert part in done.stderr
    assert "Traceback" not in done.stderr


def test_unknown_task(redis_url: str, namespace: str) -> None:
    done = run_cli("status", "nope", "--redis-url", redis_url, "--namespace", namespace)
    assert done.returncode == 2
    assert "unknown task 'nope'" in done.stderr


@pytest.mark.parametrize(
    ("document", "error"),
    [
        pytest.param(
            {
                "nodes": [{"id": f"n{i}", "role": "work"} for i in range(1_000)],
                "edges": [{"from": f"n{i}", "to": f"n{(i + 1) % 1_000}"} for i in range(1_000)],
            },
            "error: invalid task graph: cycle: n0 -> n1 -> ",
            id="1000-node-cycle",
        ),
        pytest.param(
            {"nodes": [{"id": f"n{i}", "role": "work"} for i in range(20_001)]},
            "error: invalid task graph: the graph has 20,001 nodes; at most 10,000 are allowed",
            id="over-the-node-limit",
        ),
    ],
)
def test_a_huge_or_cyclic_graph_is_refused_in_one_line(
    redis_url: str, namespace: str, tmp_path: Path, document: dict[str, object], error: str
) -> None:
    with redis.Redis.from_url(redis_url) as client:
        client.sadd(Keys(namespace).known_roles(), "work")
    graph = tmp_path / "graph.json"
    graph.write_text(json.dumps(document))

    done = run_cli("submit", str(graph), "--redis-url", redis_url, "--namespace", namespace)

    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(error)
    assert len(done.stderr.splitlines()) == 1
    assert "Traceback" not in done.stderr


def test_a_cancelled_task_is_worded_for_what_it_is(services: list[str], tmp_path: Path) -> None:
    """``status`` labels a cancel's reason ``reason:`` (not ``error:``; the default reason reads
    "none given", not "cancelled: cancelled"); ``tasks`` counts nodes by state instead of a
    "4/4 nodes" that reads as complete."""
    graph = tmp_path / "graph.json"
    graph.write_text(
        json.dumps(
            {
                "name": "stopped",
                "params": {"n": 2, "size": 2},
                "nodes": [{"id": "source", "role": "source"}, {"id": "slow", "role": "slow"}],
                "edges": [{"from": "source", "to": "slow", "on": "done"}],
            }
        )
    )
    task_id = run_cli("submit", str(graph), *services).stdout.strip()

    def slow_running() -> bool:
        state = json.loads(run_cli("status", task_id, "--json", *services).stdout)
        return bool(state["nodes"]["slow"]["state"] == "running")

    wait_for(slow_running, 30, "the slow node runs")
    assert run_cli("cancel", task_id, "--task", *services).returncode == 0

    def cancelled() -> bool:
        return '"state": "cancelled"' in run_cli("status", task_id, "--json", *services).stdout

    wait_for(cancelled, 30, "the task is cancelled")
    lines = run_cli("status", task_id, *services).stdout.splitlines()
    assert lines[0] == f"task {task_id} (stopped): cancelled (2 nodes: 1 succeeded, 1 cancelled)"
    assert lines[1] == "reason: none given"
    assert not any(line.startswith("error:") for line in lines)
    listed = run_cli("tasks", *services).stdout
    assert f"{task_id}  cancelled (2 nodes: 1 succeeded, 1 cancelled)  stopped" in listed


def _coordinator(conn: list[str], *options: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*CLI, "coordinator", "--block-ms", "200", "--sweep-interval", "0.2", *options, *conn],
        cwd=ROOT,
        env=clean_env(),
        stderr=subprocess.DEVNULL,
    )


def test_no_coordinator_is_said_and_coordinators_are_listed_with_their_health(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    """Without a coordinator, submit warns and ``--wait`` ends saying so (not "still running");
    ``workers`` lists coordinators, live ones with their functions, and none once stopped."""
    conn = ["--redis-url", redis_url, "--namespace", namespace]
    graph = tmp_path / "graph.json"
    graph.write_text(json.dumps(YAML_GRAPH_AS_JSON))
    with redis.Redis.from_url(redis_url) as plain:
        plain.sadd(Keys(namespace).known_roles(), "source")  # as a worker would at start
    listed = run_cli("workers", *conn)
    assert f"no coordinator in namespace {namespace}: tasks stay queued" in listed.stdout
    waited = run_cli("submit", str(graph), "--wait", "--timeout", "2", *conn)
    assert waited.returncode == 1
    assert "warning: no coordinator is running" in waited.stderr
    assert "queued: no coordinator is running (start streamflow coordinator) after 2s" in (
        waited.stderr
    )
    assert "still running" not in waited.stderr

    coordinator = _coordinator(conn, "--app", "tests.dag.helpers:app", "--consumer-name", "c1")
    try:
        wait_for(lambda: "live (seen" in run_cli("workers", *conn).stdout, 30, "listed")
        lines = run_cli("workers", *conn).stdout.splitlines()
        (row,) = [line for line in lines if line.startswith("c1 ")]
        assert "tests.count" in row and "live (seen" in row
        (doc,) = [
            json.loads(line)
            for line in run_cli("workers", "--json", *conn).stdout.splitlines()
            if '"coordinator"' in line
        ]
        assert doc["kind"] == "coordinator" and doc["live"] and doc["consumer"] == "c1"
        quiet = run_cli("submit", str(graph), *conn)
        assert quiet.returncode == 0 and "warning" not in quiet.stderr, quiet.stderr
        coordinator.send_signal(signal.SIGTERM)
        assert coordinator.wait(timeout=30) == 0
        assert "no coordinator in namespace" in run_cli("workers", *conn).stdout
    finally:
        kill_tree(coordinator)


def test_submit_right_after_a_coordinator_starts_waits_for_its_functions(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    """A graph naming a function that the coordinator starting now will provide is accepted
    (submit waits a few seconds for it to register) instead of failing "unknown function"."""
    conn = ["--redis-url", redis_url, "--namespace", namespace]
    graph = tmp_path / "graph.json"
    graph.write_text(
        json.dumps(
            {
                "name": "counted",
                "params": {"n": 4, "size": 2},
                "nodes": [
                    {"id": "source", "role": "source"},
                    {"id": "count", "function": "tests.count"},
                ],
                "edges": [{"from": "source", "to": "count", "on": "done"}],
            }
        )
    )
    with redis.Redis.from_url(redis_url) as plain:
        plain.sadd(Keys(namespace).known_roles(), "source")
    coordinator = _coordinator(conn, "--app", "tests.dag.helpers:app")
    try:
        submitted = run_cli("submit", str(graph), *conn)  # at once: the coordinator is starting
        assert submitted.returncode == 0, submitted.stderr
        assert "unknown" not in submitted.stderr
    finally:
        kill_tree(coordinator)
