"""OpenTelemetry traces: spans for publishes and handler runs, trace context in job headers.

Needs the ``otel`` extra (``pip install 'streamflow[otel]'``: the OpenTelemetry API). The
application installs the SDK and configures a tracer provider and its exporters, as for any
instrumented library; without a configured provider every span is a no-op.

:class:`OpenTelemetry` is a :class:`~streamflow.middleware.Middleware`; add it to the app (the
workers' handler runs, retries and dead letters) and to each client that publishes:

* a publish is a ``PRODUCER`` span ``send <role>`` (each job of ``publish_many`` and of a
  :class:`~streamflow.SyncClient` too); the job carries its W3C trace context in its headers
  (``traceparent``, ``tracestate``); a submit is a ``PRODUCER`` span ``submit <graph name>``
  whose context the task's headers carry;
* a handler run is a ``CONSUMER`` span ``process <role>``, the child of the publisher's span
  (read from ``ctx.headers``), with the attributes of the OpenTelemetry messaging semantic
  conventions (``messaging.system`` = ``streamflow``, ``messaging.destination.name`` = the
  role, ``messaging.message.id``, ``messaging.operation.type``) and streamflow's own
  (``streamflow.attempt``, ``streamflow.task_id``, ``streamflow.node_id``);
* a scheduled retry and a dead letter are short ``INTERNAL`` spans ``retry <role>`` and
  ``dead_letter <role>``, children of the failed run's span;
* what a handler publishes with ``ctx.publish`` or submits with ``ctx.submit`` is sent from
  inside its span, so the follow-up's run (or the task's) is a grandchild of it;
* in a coordinator whose app has it (see :mod:`streamflow.dag.tracing`), applying a node run's
  batch or end is an ``INTERNAL`` span ``step <node>`` (the child of the run, whose context
  the run's reports carry: ``ctx.trace_context``), each job it sends a ``PRODUCER`` span
  ``dispatch <role>`` under it (the successor's run is its child), and a coordinator
  function's map or reduce an ``INTERNAL`` span ``function <node>``.

A task submitted through a client without the middleware joins a trace when given
``headers=trace_headers()``: its first dispatches hang from that context.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from streamflow import extras
from streamflow.context import Context
from streamflow.middleware import CallNext, DeadLettered, Middleware, Publish, PublishNext, Retrying

extras.require("otel", "streamflow.otel")

from opentelemetry import propagate, trace  # noqa: E402  (after the extra's check)
from opentelemetry.context import Context as TraceContext  # noqa: E402
from opentelemetry.trace import SpanKind  # noqa: E402

__all__ = ["OpenTelemetry", "trace_headers"]

#: The ``messaging.system`` of every span.
SYSTEM = "streamflow"
#: How many failed runs' spans are remembered for their retry or dead-letter span.
MAX_FAILED = 4096


def trace_headers(headers: Mapping[str, str] | None = None) -> dict[str, str]:
    """``headers`` with the current trace context added (``traceparent``, ``tracestate``).

    For a client without the middleware, such as a task given ``headers=trace_headers()`` in
    :meth:`Client.submit <streamflow.Client.submit>`: every node job of the task carries them.
    """
    carrier = dict(headers or {})
    propagate.inject(carrier)
    return carrier


def _job_attributes(ctx: Context) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "messaging.system": SYSTEM,
        "messaging.destination.name": ctx.role,
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.message.id": ctx.message_id,
        "streamflow.attempt": ctx.attempt,
        "streamflow.entry_id": ctx.entry_id,
    }
    if ctx.task_id is not None:
        attributes["streamflow.task_id"] = ctx.task_id
    if ctx.node_id is not None:
        attributes["streamflow.node_id"] = ctx.node_id
    return attributes


@dataclass(slots=True)
class CoordinatorSpan:
    """An open span of a coordinator and its trace context (``carrier``)."""

    span: trace.Span
    carrier: dict[str, str]

    def set_attribute(self, name: str, value: str | int | bool) -> None:
        """Add an attribute to the span."""
        self.span.set_attribute(name, value)


class OpenTelemetry(Middleware):
    """Traces publishes, handler runs, retries and dead letters (see the module).

    Args:
        tracer_provider: Where spans go; the global provider when omitted.

    Example:
        ```python
        from streamflow.otel import OpenTelemetry

        tracing = OpenTelemetry()
        app.add_middleware(tracing)      # workers: handler runs, retries, dead letters
        client.add_middleware(tracing)   # publishers: publishes
        ```
    """

    def __init__(self, *, tracer_provider: trace.TracerProvider | None = None) -> None:
        self._tracer = trace.get_tracer("streamflow", tracer_provider=tracer_provider)
        # The span context of each failed run, by (message id, attempt), until its retry or
        # dead letter is told (bounded: a failed run may end in neither, e.g. on shutdown).
        self._failed: OrderedDict[tuple[str, int], trace.SpanContext] = OrderedDict()

    async def publish(self, message: Publish, call_next: PublishNext) -> str:
        """Send ``message`` inside a ``PRODUCER`` span whose context its headers carry.

        A job's span is ``send <role>``; a task's (a submit) ``submit <graph name>``.
        """
        task = message.kind == "task"
        operation = "submit" if task else "send"
        attributes = {
            "messaging.system": SYSTEM,
            "messaging.operation.type": "send",
            "messaging.operation.name": operation,
        }
        attributes["streamflow.task.name" if task else "messaging.destination.name"] = message.role
        with self._tracer.start_as_current_span(
            f"{operation} {message.role}", kind=SpanKind.PRODUCER, attributes=attributes
        ) as span:
            propagate.inject(message.headers)
            sent_id = await call_next(message)
            span.set_attribute("streamflow.task_id" if task else "messaging.message.id", sent_id)
            return sent_id

    async def handle(self, ctx: Context, payload: Any, call_next: CallNext) -> Any:
        """Run the handler inside a ``CONSUMER`` span, the child of the job's trace context."""
        with self._tracer.start_as_current_span(
            f"process {ctx.role}",
            # A job without trace context starts a trace of its own (extract's context is
            # fresh, not the caller's: a harness drained inside a span does not adopt it).
            context=propagate.extract(ctx.headers),
            kind=SpanKind.CONSUMER,
            attributes=_job_attributes(ctx),
        ) as span:
            if ctx.node_id is not None:
                # The run's batches and end carry it: the coordinator's spans continue it.
                ctx.trace_context = trace_headers()
            try:
                return await call_next(ctx, payload)
            except BaseException:
                self._remember(ctx, span.get_span_context())
                raise

    @contextmanager
    def coordinator_span(
        self,
        name: str,
        parent: Mapping[str, str],
        *,
        producer: bool,
        attributes: Mapping[str, str | int | bool],
    ) -> Iterator[CoordinatorSpan | None]:
        """A coordinator's ``step``, ``function`` or ``dispatch`` span (see the module).

        The child of ``parent`` (a trace context read back from Redis: untrusted); None, and no
        span, when it is not a valid one.
        """
        context = propagate.extract(parent)
        if not trace.get_current_span(context).get_span_context().is_valid:
            yield None
            return
        kind = SpanKind.PRODUCER if producer else SpanKind.INTERNAL
        with self._tracer.start_span(
            name, context=context, kind=kind, attributes=attributes
        ) as span:
            carrier: dict[str, str] = {}
            propagate.inject(carrier, context=trace.set_span_in_context(span))
            yield CoordinatorSpan(span, carrier)

    def _remember(self, ctx: Context, span: trace.SpanContext) -> None:
        self._failed[(ctx.message_id, ctx.attempt)] = span
        while len(self._failed) > MAX_FAILED:
            self._failed.popitem(last=False)

    def _parent(self, ctx: Context | None) -> TraceContext:
        """The failed run's span if known, else the job's own trace context (maybe none)."""
        if ctx is None:
            return TraceContext()
        failed = self._failed.pop((ctx.message_id, ctx.attempt), None)
        if failed is not None:
            return trace.set_span_in_context(trace.NonRecordingSpan(failed), TraceContext())
        return propagate.extract(ctx.headers)

    async def on_retry(self, event: Retrying) -> None:
        """Record the scheduled retry as a ``retry <role>`` span."""
        ctx = event.context
        attributes = {
            **_job_attributes(ctx),
            "streamflow.retry.delay": event.delay,
            "streamflow.detail": event.detail,
        }
        span = self._tracer.start_span(
            f"retry {ctx.role}", context=self._parent(ctx), attributes=attributes
        )
        span.end()

    async def on_dead_letter(self, event: DeadLettered) -> None:
        """Record the dead letter as a ``dead_letter <role>`` span."""
        attributes: dict[str, Any] = {
            "messaging.system": SYSTEM,
            "messaging.destination.name": event.role,
            "streamflow.entry_id": event.entry_id,
            "streamflow.dead_letter.reason": event.reason,
            "streamflow.detail": event.detail,
        }
        if event.context is not None:
            attributes.update(_job_attributes(event.context))
        elif event.message_id is not None:
            attributes["messaging.message.id"] = event.message_id
        span = self._tracer.start_span(
            f"dead_letter {event.role}", context=self._parent(event.context), attributes=attributes
        )
        span.set_status(trace.StatusCode.ERROR, event.reason)
        span.end()
