"""The FastAPI recipe end to end: its test client, a real redis-server, a worker, a coordinator.

Run with ``pytest examples/fastapi_app``. FastAPI's ``TestClient`` runs the app in-process (no
network) with its lifespan, so the app's one ``Client`` connects to the suite's private
redis-server; the ``serve`` fixture runs the worker side and a coordinator in the background.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import pytest
from fastapi.testclient import TestClient

from examples.fastapi_app import app as recipe
from examples.fastapi_app import worker_app
from streamflow import App, SyncClient, Worker

pytestmark = [pytest.mark.redis, pytest.mark.slow]

Serve = Callable[[App], AbstractContextManager[Worker]]


# --8<-- [start:fixture]
@pytest.fixture
def web(redis_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    """The app with its lifespan run, configured by environment as in production."""
    monkeypatch.setenv("STREAMFLOW_REDIS_URL", redis_url)
    monkeypatch.setenv("STREAMFLOW_NAMESPACE", namespace)
    with TestClient(recipe.app) as client:  # `with`: the lifespan opens the app's Client
        yield client
    # --8<-- [end:fixture]


def server_sent_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    """``(event name, data)`` of each event in a ``text/event-stream`` body."""
    found = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        found.append((fields["event"], json.loads(fields["data"])))
    return found


def test_post_jobs_publishes_a_job_that_a_worker_runs(
    web: TestClient, serve: Serve, redis_url: str, namespace: str
) -> None:
    with serve(worker_app.app):
        response = web.post("/jobs", json={"email": "ada@example.com"})
        assert response.status_code == 202
        message_id = response.json()["message_id"]
        with SyncClient(redis_url, namespace=namespace) as client:
            assert client.result(message_id, timeout=10) == "Welcome, ada@example.com!"


# --8<-- [start:progress]
def test_a_task_streams_its_progress_until_it_ends(web: TestClient, serve: Serve) -> None:
    with serve(worker_app.app):
        response = web.post("/tasks", json={"pages": 3})
        assert response.status_code == 202
        task_id = response.json()["task_id"]
        with web.stream("GET", f"/tasks/{task_id}/progress") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            events = server_sent_events(stream.read().decode())

    assert all(data["task_id"] == task_id for _, data in events)
    assert events[-1][0] == "task" and events[-1][1]["state"] == "succeeded"
    progress = [data["progress"] for name, data in events if name == "progress"]
    assert progress and progress[-1] == {"done": 3, "total": 3}  # the last value is never lost
    nodes = {(data["node_id"], data["state"]) for name, data in events if name == "node"}
    assert {("scan", "succeeded"), ("rows", "succeeded")} <= nodes
    # --8<-- [end:progress]


def test_a_task_that_ended_long_ago_gets_its_final_state_only(
    web: TestClient, serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    with serve(worker_app.app):
        task_id = web.post("/tasks", json={"pages": 2}).json()["task_id"]
        first = server_sent_events(web.get(f"/tasks/{task_id}/progress").text)
    monkeypatch.setattr(recipe, "REPLAY_ENDED_MS", -1)  # every ended task is "long ago"
    again = server_sent_events(web.get(f"/tasks/{task_id}/progress").text)

    assert len(first) > 1 and first[-1][1]["state"] == "succeeded"  # the task has ended
    [(name, data)] = again
    assert (name, data["task_id"], data["state"]) == ("task", task_id, "succeeded")


def test_the_progress_of_an_unknown_task_is_404(web: TestClient) -> None:
    assert web.get("/tasks/no-such-task/progress").status_code == 404


def test_post_call_answers_with_the_role_result(web: TestClient, serve: Serve) -> None:
    with serve(worker_app.app):
        tea = web.post("/call", json={"item": "tea", "qty": 2})
        coffee = web.post("/call", json={"item": "coffee"})

    assert (tea.status_code, tea.json()) == (200, {"item": "tea", "qty": 2, "cents": 700})
    assert coffee.status_code == 502  # the handler raised Fatal: dead-lettered, never retried
    assert coffee.json()["detail"]["reason"] == "fatal"


def test_post_call_is_504_when_no_worker_answers_in_time(web: TestClient) -> None:
    response = web.post("/call", params={"timeout": 0.3}, json={"item": "tea"})

    assert response.status_code == 504
    assert response.json()["detail"]["message_id"]  # the job waits for a worker to start
