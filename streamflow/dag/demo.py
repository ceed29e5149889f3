"""The demo's app and task graph: a sensor pipeline that streams batches through a DAG.

``streamflow demo`` runs it in-process; any worker can serve it too::

    streamflow worker --app streamflow.dag.demo:app
    python -m streamflow.dag.demo | streamflow submit - --wait --params '{"batches": 50}'

The graph (``graph()``)::

    readings --batch--> clean --batch--> enrich --batch--> totals --done--> report

* ``readings`` (role ``demo.readings``, the source) emits ``batches`` batches of
  ``batch_size`` sensor readings, pausing ``pause`` seconds after each like a slow paged API;
* ``clean`` (``demo.clean``) runs once per reading batch as soon as it is recorded: it drops
  glitched readings and adds Fahrenheit;
* ``enrich`` (``demo.enrich``) runs once per clean batch: it adds the site and an alert flag;
* ``totals`` is the built-in coordinator function ``metrics.aggregate``, fed per batch;
* ``report`` (``demo.report``) runs once, when ``totals`` is done, and emits the summary.

The role ``demo.alert`` is for plain (non-task) jobs:
``streamflow publish demo.alert --json '{"sensor": "s1", "celsius": 41.5}'``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
from pydantic import BaseModel

from streamflow.app import App
from streamflow.context import Context
from streamflow.dag.graph import Graph

__all__ = ["BATCH_SIZE", "PAUSE", "SOURCE", "app", "graph"]

#: Readings per source batch.
BATCH_SIZE = 100
#: Seconds the source waits after each batch (a slow source makes the streaming visible).
PAUSE = 0.1
#: The source node's id; its per-batch child is ``clean``.
SOURCE = "readings"
#: Readings hotter than this raise the alert flag.
ALERT_CELSIUS = 30.0
#: Every this many readings, one is a glitch that ``clean`` drops.
GLITCH_EVERY = 97
SITES = ("north", "south", "east", "west")

app = App()


class Alert(BaseModel):
    """The payload of a plain ``demo.alert`` job."""

    sensor: str
    celsius: float


def reading(seq: int) -> dict[str, Any]:
    """The ``seq``-th reading: the same on every run, so a rerun emits the same batches."""
    celsius = 999.0 if seq % GLITCH_EVERY == GLITCH_EVERY - 1 else 18 + (seq * 37 % 150) / 10
    return {"seq": seq, "sensor": f"s{seq % 8}", "celsius": celsius}


@app.role("demo.readings")
async def readings(ctx: Context, params: dict[str, Any]) -> AsyncIterator[list[dict[str, Any]]]:
    """The source: ``batches`` batches of ``batch_size`` readings, one every ``pause`` s."""
    size = int(params.get("batch_size", BATCH_SIZE))
    pause = float(params.get("pause", PAUSE))
    for index in range(int(params["batches"])):
        ctx.cancel.raise_if_cancelled()  # a cancelled task stops between batches
        yield [reading(index * size + i) for i in range(size)]
        if pause > 0:
            await anyio.sleep(pause)


@app.role("demo.clean")
async def clean(ctx: Context, params: dict[str, Any]) -> None:
    """Per reading batch: drop glitches (outside -50..60 °C) and add Fahrenheit."""
    assert ctx.batch is not None
    await ctx.emit(
        {**item, "fahrenheit": round(item["celsius"] * 9 / 5 + 32, 1)}
        for item in ctx.batch.items
        if -50 <= item["celsius"] <= 60
    )


@app.role("demo.enrich")
async def enrich(ctx: Context, params: dict[str, Any]) -> None:
    """Per clean batch: add each sensor's site and an ``alert`` flag (1 when hot)."""
    assert ctx.batch is not None
    await ctx.emit(
        {
            **item,
            "site": SITES[int(item["sensor"][1:]) % len(SITES)],
            "alert": int(item["celsius"] > ALERT_CELSIUS),
        }
        for item in ctx.batch.items
    )


@app.role("demo.report")
async def report(ctx: Context, params: dict[str, Any]) -> None:
    """Once ``totals`` is done: one summary item from its aggregate."""
    async for batch in ctx.inputs():
        for total in batch.items:
            count = total["count"]
            sums = total["sums"]
            await ctx.emit(
                [
                    {
                        "readings": count,
                        "alerts": sums.get("alert", 0),
                        "mean_celsius": round(sums.get("celsius", 0) / count, 2) if count else None,
                    }
                ]
            )


@app.role("demo.alert")
async def alert(ctx: Context, job: Alert) -> None:
    """A plain job: log the alert (try ``streamflow publish demo.alert --json ...``)."""
    ctx.log.warning("ALERT: sensor %s reads %.1f °C", job.sensor, job.celsius)


def graph(batches: int = 20, *, pause: float = PAUSE) -> Graph:
    """The demo's streaming task graph (see the module docstring)."""
    demo = Graph(
        "sensor-demo", params={"batches": batches, "batch_size": BATCH_SIZE, "pause": pause}
    )
    demo.node(SOURCE, role="demo.readings")
    demo.node("clean", role="demo.clean")
    demo.node("enrich", role="demo.enrich")
    demo.node("totals", function="metrics.aggregate", params={"fields": ["celsius", "alert"]})
    demo.node("report", role="demo.report")
    demo.edge(SOURCE, "clean", on="batch").edge("clean", "enrich", on="batch")
    demo.edge("enrich", "totals", on="batch").edge("totals", "report", on="done")
    return demo


if __name__ == "__main__":
    # The graph as JSON, for `python -m streamflow.dag.demo | streamflow submit -`.
    print(graph().spec().to_json().decode())
