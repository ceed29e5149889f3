"""Traced apps for tests/test_otel.py, and how its tests read spans.

``app`` is what a ``streamflow worker --app tests.otel_apps:app`` subprocess serves: its
handler runs are traced and every finished span is appended, as one JSON line, to the file
named by ``SFTEST_SPANS``. :func:`traced_app` builds the same roles for in-process tests.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

import streamflow
from streamflow.otel import OpenTelemetry


def describe(span: ReadableSpan) -> dict[str, Any]:
    """A finished span as plain data: name, kind, ids (hex), parent span id, attributes."""
    assert span.context is not None
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": format(span.context.trace_id, "032x"),
        "span_id": format(span.context.span_id, "016x"),
        "parent": format(span.parent.span_id, "016x") if span.parent else None,
        "attributes": dict(span.attributes or {}),
    }


class FileExporter(SpanExporter):
    """Appends each finished span to a file, one JSON line (:func:`describe`) each."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with open(self.path, "a") as out:
            for span in spans:
                out.write(json.dumps(describe(span)) + "\n")
        return SpanExportResult.SUCCESS


def read_spans(path: Path) -> list[dict[str, Any]]:
    """The spans a :class:`FileExporter` wrote (none yet if the file is missing)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def fulfilment() -> streamflow.Graph:
    """``pick`` emits one batch, ``pack`` runs on it, ``ship`` once ``pack`` is done."""
    graph = streamflow.Graph("fulfil")
    graph.node("pick", role="step").node("pack", role="step").node("ship", role="step")
    return graph.edge("pick", "pack", on="batch").edge("pack", "ship")


def traced_app(tracing: OpenTelemetry) -> streamflow.App:
    """``first`` publishes its payload to ``second`` as a follow-up; ``fail`` always fails;
    ``order`` submits the :func:`fulfilment` task, whose nodes ``step`` runs."""
    app = streamflow.App()
    app.add_middleware(tracing)

    @app.role("order")
    async def order(ctx: streamflow.Context, n: int) -> str:
        return await ctx.submit(fulfilment(), params={"order": n})

    @app.role("first")
    async def first(ctx: streamflow.Context, n: int) -> None:
        ctx.log.info("first got %s", n)
        await ctx.publish("second", n + 1)

    @app.role("second")
    async def second(ctx: streamflow.Context, n: int) -> int:
        return n

    @app.role("fail", retry=streamflow.RetryPolicy(max_attempts=2, backoff=0))
    async def fail(ctx: streamflow.Context, n: int) -> None:
        raise ValueError(f"no {n}")

    @app.role("step")
    async def step(ctx: streamflow.Context, params: dict[str, Any]) -> None:
        await ctx.emit([ctx.node_id])

    return app


def _worker_app() -> streamflow.App:
    provider = TracerProvider()
    spans = os.environ.get("SFTEST_SPANS")
    if spans:
        provider.add_span_processor(SimpleSpanProcessor(FileExporter(Path(spans))))
    return traced_app(OpenTelemetry(tracer_provider=provider))


app = _worker_app()
