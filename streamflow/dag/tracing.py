"""Trace context through the coordinator: the seam a tracing middleware fills, and what caused what.

A worker's node run reports its batches and its end with the W3C trace context of its handler
span (``TaskEvent.trace``, set by a tracing middleware through ``ctx.trace_context``). When the
app given to the :class:`~streamflow.dag.coordinator.Coordinator` has a middleware that is a
:class:`TaskTracing` (``streamflow.otel.OpenTelemetry`` is), the coordinator continues those
traces:

* applying a traced event is a span ``step <node>``, the child of the run that reported it;
* each outbox item (a node's job, a coordinator function's map or reduce) stores the trace
  context of the step that decided it (:class:`Causes` picks it: the batch that feeds it, else
  the latest traced event of one of its parents or of the node itself), so a crashed
  coordinator's outbox, finished by another, still knows it;
* publishing a node's job is a span ``dispatch <role>`` under it, whose context the job's
  headers carry (``traceparent``): the successor's run is that span's child. A coordinator
  function's map or reduce is a span ``function <node>``, which the steps it leads to continue.

Nothing here imports OpenTelemetry: without a :class:`TaskTracing` middleware the coordinator
does none of this, and what it reads is only copied, never interpreted. Everything read back
(an event's ``trace``, an outbox item's) is untrusted: :func:`carrier_of` keeps only well-formed
strings, and a tracer ignores a context it cannot parse (no span, never an error).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack
from typing import Protocol, runtime_checkable

from streamflow.dag.graph import GraphSpec
from streamflow.errors import ProtocolError
from streamflow.protocol import (
    MESSAGE_FIELD,
    TRACE_FIELDS,
    Carrier,
    carrier_of,
    check_headers,
    decode_job,
    encode,
)

__all__ = [
    "TRACE_FIELDS",
    "Carrier",
    "Causes",
    "CoordinatorSpan",
    "TaskTracing",
    "carrier_of",
    "dispatch_span",
    "span_attributes",
    "tracing_of",
]


class CoordinatorSpan(Protocol):
    """An open span of the coordinator (what :meth:`TaskTracing.coordinator_span` yields).

    Attributes:
        carrier: Its trace context, for what it leads to (an outbox item, a job's headers).
    """

    carrier: Carrier

    def set_attribute(self, name: str, value: str | int | bool) -> None:
        """Add an attribute to the span."""


@runtime_checkable
class TaskTracing(Protocol):
    """What a middleware provides to trace the coordinator's steps and dispatches."""

    def coordinator_span(
        self,
        name: str,
        parent: Mapping[str, str],
        *,
        producer: bool,
        attributes: Mapping[str, str | int | bool],
    ) -> AbstractContextManager[CoordinatorSpan | None]:
        """A span named ``name``, the child of the trace context ``parent`` (untrusted).

        Yields None, and records nothing, when ``parent`` is not a valid trace context.
        ``producer``: a ``PRODUCER`` span (a dispatch), else ``INTERNAL``.
        """
        ...


def tracing_of(middleware: Iterable[object]) -> TaskTracing | None:
    """The first of ``middleware`` that traces coordinators, if any."""
    for each in middleware:
        if isinstance(each, TaskTracing):
            return each
    return None


class Causes:
    """The trace context each outbox item of one step continues.

    Args:
        spec: The task's graph.
        traced: The step's events that have a trace context, in the order applied: (node id,
            the batch key the event reported or None, the context of its step span).
    """

    def __init__(self, spec: GraphSpec, traced: Sequence[tuple[str, str | None, Carrier]]) -> None:
        self._spec = spec
        self._traced = traced
        self._by_ref = {ref: carrier for _, ref, carrier in traced if ref is not None}

    def __bool__(self) -> bool:
        return bool(self._traced)

    def of(self, node_id: str, batch_ref: str | None = None) -> Carrier | None:
        """The context of what caused an item of ``node_id`` (fed the batch ``batch_ref``).

        The event that reported that batch; else the latest traced event of one of the node's
        parents or of the node itself; else the latest traced event of the step.
        """
        if batch_ref is not None and batch_ref in self._by_ref:
            return self._by_ref[batch_ref]
        related = {edge.source for edge in self._spec.parents(node_id)} | {node_id}
        for node, _, carrier in reversed(self._traced):
            if node in related:
                return carrier
        return self._traced[-1][2] if self._traced else None


def span_attributes(
    task_id: str, node_id: str, more: Mapping[str, str | int | bool | None] | None = None
) -> dict[str, str | int | bool]:
    """The attributes of a coordinator span: the messaging system, task, node and ``more``."""
    attributes: dict[str, str | int | bool] = {
        "messaging.system": "streamflow",
        "streamflow.task_id": task_id,
        "streamflow.node_id": node_id,
    }
    for name, value in (more or {}).items():
        if value is not None:
            attributes[name] = value
    return attributes


def dispatch_span(
    tracing: TaskTracing | None,
    role: str,
    body: bytes,
    trace: Carrier | None,
    spans: ExitStack,
) -> tuple[bytes, CoordinatorSpan | None]:
    """A node's job (``body``) to publish, in a ``dispatch`` span whose context it carries.

    The span (entered on ``spans``, open until the job is sent) is the child of ``trace``, the
    step that decided the job, else of the task's own trace context (the job's headers); with
    neither, or without ``tracing``, the job goes as it is, without a span.
    """
    if tracing is None:
        return body, None
    try:
        job = decode_job({MESSAGE_FIELD: body})
    except ProtocolError:
        return body, None  # published as it is: its worker dead-letters it
    headers = dict(job.headers or {})
    parent = trace or carrier_of(headers)
    if parent is None:
        return body, None
    more: dict[str, str | int | bool | None] = {
        "messaging.destination.name": role,
        "messaging.operation.type": "send",
        "messaging.operation.name": "dispatch",
        "messaging.message.id": job.id,
        "streamflow.invocation": job.invocation,
    }
    attributes = span_attributes(job.task_id or "", job.node_id or "", more)
    span = spans.enter_context(
        tracing.coordinator_span(f"dispatch {role}", parent, producer=True, attributes=attributes)
    )
    if span is None:
        return body, None
    for name in TRACE_FIELDS:
        headers.pop(name, None)
    try:
        headers = check_headers({**headers, **span.carrier})
    except ValueError:  # no room left in its headers: it keeps the task's context
        return body, span
    return encode(job.model_copy(update={"headers": headers})), span
