"""A streaming ETL task: read orders page by page, price each page, total everything.

``extract`` (a role) reads the source table in pages and yields each page as one batch;
``transform`` (a role) runs once per batch, as soon as that batch exists, and emits the priced
rows; ``totals`` is the built-in coordinator function ``metrics.aggregate``, which counts the
rows and sums ``qty`` and ``revenue_cents`` exactly.

Run it:

    streamflow worker --app examples.etl.app:app        # serves extract and transform
    streamflow coordinator                              # metrics.aggregate is built in
    streamflow submit examples/etl/etl.yaml --wait
    streamflow result TASK_ID                           # {"totals": [{"count": ..., ...}]}
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio.lowlevel
from pydantic import BaseModel, ConfigDict

import streamflow

app = streamflow.App()


class EtlParams(BaseModel):
    """The task's parameters, as every node's payload carries them.

    A node's payload is the task's params updated with the node's own, so the model ignores
    the keys it does not use instead of refusing them.
    """

    model_config = ConfigDict(extra="ignore")

    rows: int = 23
    page_size: int = 5


def order(i: int) -> dict[str, Any]:
    """Row ``i`` of the made-up ``orders`` table: a deterministic stand-in for a database."""
    return {
        "id": i,
        "sku": f"sku-{i % 3}",
        "qty": i % 4 + 1,
        "price_cents": 100 + 25 * (i % 5),
        "status": "void" if i % 10 == 9 else "paid",
    }


async def read_pages(rows: int, page_size: int) -> AsyncIterator[list[dict[str, Any]]]:
    """Page through the table in a fixed order, as a database cursor would.

    The order matters: a rerun of ``extract`` (a retry, or another worker adopting it) must
    emit the same batches in the same order, because batches are recorded by their number.
    """
    for offset in range(0, rows, page_size):
        await anyio.lowlevel.checkpoint()  # stands in for the round trip to the database
        yield [order(i) for i in range(offset, min(offset + page_size, rows))]


@app.role("extract")
async def extract(
    ctx: streamflow.Context, params: EtlParams
) -> AsyncIterator[list[dict[str, Any]]]:
    """Source node: each page read is one batch, handed to ``transform`` at once."""
    async for page in read_pages(params.rows, params.page_size):
        ctx.log.info("read %d rows", len(page))
        yield page


def price(row: dict[str, Any]) -> dict[str, Any]:
    """The transform of one row: keep what the totals need."""
    return {"id": row["id"], "qty": row["qty"], "revenue_cents": row["qty"] * row["price_cents"]}


@app.role("transform")
async def transform(ctx: streamflow.Context, params: EtlParams) -> None:
    """Per-batch node: price the paid orders of one page (void orders are dropped)."""
    assert ctx.batch is not None  # fed on: batch, so the worker loaded the parent batch
    await ctx.emit([price(row) for row in ctx.batch.items if row["status"] == "paid"])


#: The graph built in Python; etl.yaml is the same graph as a file for `streamflow submit`.
graph = streamflow.Graph("etl", params={"rows": 23, "page_size": 5})
graph.node("extract", role="extract")
graph.node("transform", role="transform")
graph.node("totals", function="metrics.aggregate", params={"fields": ["qty", "revenue_cents"]})
graph.edge("extract", "transform", on="batch").edge("transform", "totals", on="batch")
