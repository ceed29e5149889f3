"""The app of benchmarks/dag_scale.py: one role whose handler does nothing."""

from __future__ import annotations

from typing import Any

import streamflow

app = streamflow.App()


@app.role("dag_noop")
async def noop(ctx: streamflow.Context, payload: Any) -> None:
    """Nothing: the node's cost is the coordinator's and the worker's, not the handler's."""
