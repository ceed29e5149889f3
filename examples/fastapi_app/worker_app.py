"""The worker side of the FastAPI recipe: the roles and the task graph the web app uses.

Run it next to the web app (the coordinator runs the task graph's ``metrics.aggregate``):

    streamflow worker --app examples.fastapi_app.worker_app:app
    streamflow coordinator
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio.lowlevel
from pydantic import BaseModel, ConfigDict

import streamflow

app = streamflow.App()

#: Made-up prices in cents: a stand-in for a database table.
PRICES = {"tea": 350, "cake": 425, "scone": 275}


class Welcome(BaseModel):
    """A new user to greet (published by ``POST /jobs``)."""

    email: str


# keep_result: the outcome is kept a minute, so anyone can read it (`streamflow result ID`).
@app.role("welcome", keep_result=60)
async def welcome(ctx: streamflow.Context, user: Welcome) -> str:
    """Send a welcome mail (here: return what would be sent)."""
    ctx.log.info("welcoming %s", user.email)
    return f"Welcome, {user.email}!"


class Order(BaseModel):
    """What ``POST /call`` asks the ``quote`` role about."""

    item: str
    qty: int = 1


@app.role("quote")
async def quote(ctx: streamflow.Context, order: Order) -> dict[str, Any]:
    """Price an order: the reply to a request/reply call."""
    if order.item not in PRICES:
        raise streamflow.Fatal(f"no such item: {order.item!r}")  # no retry: dead-lettered
    return {"item": order.item, "qty": order.qty, "cents": order.qty * PRICES[order.item]}


class Report(BaseModel):
    """The report task's parameters (a node's payload: the task's params and its own)."""

    model_config = ConfigDict(extra="ignore")

    pages: int = 4


@app.role("scan")
async def scan(ctx: streamflow.Context, report: Report) -> AsyncIterator[list[dict[str, int]]]:
    """Read the pages one by one, emit each as a batch, and report how far it got."""
    for page in range(report.pages):
        await anyio.lowlevel.checkpoint()  # stands in for reading a page
        yield [{"page": page, "rows": 10 + page}]
        await ctx.progress({"done": page + 1, "total": report.pages}, f"page {page + 1}")


#: The task ``POST /tasks`` submits: ``scan`` streams pages, ``rows`` totals them as they come.
report = streamflow.Graph("report", params={"pages": 4})
report.node("scan", role="scan")
report.node("rows", function="metrics.aggregate", params={"fields": ["rows"]})
report.edge("scan", "rows", on="batch")
