"""The task commands (coordinator, submit, status, tasks, result) as real subprocesses."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from streamflow.keys import Keys
from tests.helpers import ROOT, clean_env, wait_for
from tests.test_cli import CLI, kill_tree, run_cli

pytestmark = pytest.mark.redis

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
            [*CLI, "worker", "--app", "tests.test_tasks:app", "--block-ms", "200", *conn],
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
