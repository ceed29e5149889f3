"""The Django recipe end to end: Django's test client, a real redis-server and a worker.

Run with ``pytest examples/django_view``. The view runs in the test's thread, as under a
threaded server; the ``serve`` fixture runs the worker in the background.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import django
import pytest
from django.test import Client as DjangoClient
from django.test import override_settings

from examples.django_view import views, worker_app
from streamflow import App, SyncClient, Worker

pytestmark = [pytest.mark.redis, pytest.mark.slow]

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django_view.settings")
django.setup()

Serve = Callable[[App], AbstractContextManager[Worker]]


@pytest.fixture
def web(redis_url: str, namespace: str) -> Iterator[DjangoClient]:
    """Django's test client, the project's settings pointed at the test's redis-server."""
    with override_settings(STREAMFLOW_REDIS_URL=redis_url, STREAMFLOW_NAMESPACE=namespace):
        yield DjangoClient()
        views.close_client()  # the next test's view opens a client with its own settings


def place(web: DjangoClient, order_id: int, email: str) -> tuple[int, dict[str, str]]:
    body = json.dumps({"order_id": order_id, "email": email})
    response = web.post("/orders/", body, content_type="application/json")
    return response.status_code, response.json()


def test_the_view_publishes_a_job_that_a_worker_runs(
    web: DjangoClient, serve: Serve, redis_url: str, namespace: str
) -> None:
    with serve(worker_app.app):
        status, body = place(web, 7, "ada@example.com")
        assert status == 202
        with SyncClient(redis_url, namespace=namespace) as client:
            result = client.result(body["message_id"], timeout=10)

    assert result == "invoice for order 7 sent to ada@example.com"


def test_the_same_order_twice_publishes_one_job_on_one_shared_client(web: DjangoClient) -> None:
    first = place(web, 8, "bob@example.com")
    client = views.streamflow_client()
    again = place(web, 8, "bob@example.com")
    other = place(web, 9, "bob@example.com")

    assert first[0] == again[0] == other[0] == 202
    assert first[1]["message_id"] == again[1]["message_id"] != other[1]["message_id"]
    assert views.streamflow_client() is client  # created once, on first use


def test_a_get_is_refused(web: DjangoClient) -> None:
    assert web.get("/orders/").status_code == 405


def test_redis_out_of_reach_is_503(web: DjangoClient) -> None:
    with override_settings(STREAMFLOW_REDIS_URL="redis://127.0.0.1:1/0"):  # nothing listens
        views.close_client()
        status, body = place(web, 10, "eve@example.com")

    assert (status, body) == (503, {"error": "queue unavailable, try again"})
