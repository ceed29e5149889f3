"""The app the supervised workers serve: a small streaming task that sums squares.

``numbers`` yields 0 .. n-1 in batches, ``square`` squares each batch as it comes, and the
built-in coordinator function ``metrics.aggregate`` sums the squares. See the Procfile for how
the workers and the coordinator run, and test_supervised.py for a run under honcho.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import streamflow

app = streamflow.App()


@app.role("numbers")
async def numbers(ctx: streamflow.Context, params: dict[str, Any]) -> AsyncIterator[list[int]]:
    """Source node: the numbers 0 .. n-1, in batches of ``size``."""
    n, size = params["n"], params["size"]
    for start in range(0, n, size):
        yield list(range(start, min(start + size, n)))


@app.role("square")
async def square(ctx: streamflow.Context, params: dict[str, Any]) -> None:
    """Per-batch node: the squares of one batch."""
    assert ctx.batch is not None
    await ctx.emit([x * x for x in ctx.batch.items])


#: numbers -> square (per batch) -> total (per batch, in the coordinator).
graph = streamflow.Graph("squares", params={"n": 10, "size": 3})
graph.node("numbers", role="numbers").node("square", role="square")
graph.node("total", function="metrics.aggregate")
graph.edge("numbers", "square", on="batch").edge("square", "total", on="batch")
