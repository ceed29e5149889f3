"""The ETL task end to end: on fakeredis with the harness, then on a real redis-server.

Run with ``pytest examples/etl``. The real-Redis test starts its own redis-server on a free
loopback port (the suite's ``redis_url`` fixture) and skips when redis-server is missing.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from examples.etl.app import app, graph
from streamflow import Client, Coordinator, TaskState, Worker
from streamflow.dag.graph import load
from streamflow.testing import Harness

pytestmark = pytest.mark.anyio

HERE = Path(__file__).parent

#: 23 orders, of which 9 and 19 are void: 21 paid rows, 50 items, 7,100 cents.
TOTALS = {"count": 21, "sum": 0, "sums": {"qty": 50, "revenue_cents": 7100}}


def assert_streamed_per_page(state: TaskState) -> None:
    """5 pages of at most 5 rows: one transform run per page, one aggregate run per batch."""
    assert state.state == "succeeded", state.error
    extract, transform, totals = (state.nodes[n] for n in ("extract", "transform", "totals"))
    assert (extract.batches_out, extract.items_out) == (5, 23)
    assert (transform.dispatched, transform.completed, transform.items_out) == (5, 5, 21)
    assert (totals.dispatched, totals.batches_out) == (5, 1)


def test_the_yaml_file_is_the_python_graph() -> None:
    path = HERE / "etl.yaml"
    assert load(path.read_text(), filename=path.name) == graph.spec()


async def test_etl_totals_with_the_harness_on_fakeredis() -> None:
    async with Harness(app) as h:
        run = await h.run_task(graph)

    assert run.results == {"totals": [TOTALS]}
    assert_streamed_per_page(run.state)


@pytest.mark.redis
async def test_etl_totals_on_redis_with_a_worker_and_a_coordinator(
    redis_url: str, namespace: str
) -> None:
    spec = load((HERE / "etl.yaml").read_text(), filename="etl.yaml")
    async with Client.from_url(redis_url, namespace=namespace) as client:
        # What `streamflow worker` and `streamflow coordinator` run, here in one process.
        worker = Worker(app, client.redis, namespace=namespace, block_ms=100)
        coordinator = Coordinator(client.redis, app=app, namespace=namespace, block_ms=100)
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                await tg.start(worker.run)  # registers the roles the graph is checked against
                await tg.start(coordinator.run)
                try:
                    task_id = await client.submit(spec, params={"page_size": 5})
                    state = await client.wait(task_id, timeout=20, poll=0.02)
                finally:
                    worker.stop()
                    coordinator.stop()
            results = await client.result(task_id)

    assert results == {"totals": [TOTALS]}
    assert_streamed_per_page(state)
