"""What a handler receives besides its payload: the message's context and its cancel token."""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Awaitable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import orjson

from streamflow.lifecycle import NO_RESOURCES, Resources
from streamflow.protocol import carrier_of

if TYPE_CHECKING:
    from streamflow.dag.graph import Graph, GraphSpec
    from streamflow.events import EventLog
    from streamflow.followups import FollowUps
    from streamflow.nodes import NodeRun
    from streamflow.protocol import Job

logger = logging.getLogger("streamflow.handler")
T = TypeVar("T")
_NO_HEADERS: Mapping[str, str] = MappingProxyType({})

#: ``Context._progress_at`` of a run that never reported progress.
NEVER = -math.inf

#: The largest progress value (a JSON object), encoded.
MAX_PROGRESS_BYTES = 4096


def check_progress(value: Any, message: str | None) -> None:
    """Refuse a progress value that is not a finite number or a small JSON object.

    Raises:
        ValueError: Naming what is wrong.
    """
    if message is not None and (not isinstance(message, str) or len(message) > 1000):
        raise ValueError("a progress message is a string of at most 1000 characters")
    if isinstance(value, bool) or not isinstance(value, int | float | dict):
        raise ValueError(f"progress is a number or a JSON object, not {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"progress must be finite, not {value}")
    if isinstance(value, dict):
        try:
            size = len(orjson.dumps(value))
        except TypeError as exc:
            raise ValueError(f"progress is not JSON-serializable: {exc}") from None
        if size > MAX_PROGRESS_BYTES:
            raise ValueError(f"progress is {size} bytes encoded, limit {MAX_PROGRESS_BYTES}")


class CancelToken:
    """A read-only view of whether the message's work was cancelled.

    Handlers check it cooperatively: ``ctx.cancel.cancelled``, ``ctx.cancel.raise_if_cancelled()``
    or ``await ctx.cancel.wait_cancelled()``. The worker sets it; handlers never do.
    """

    __slots__ = ("_event", "_reason")

    def __init__(self) -> None:
        self._event: anyio.Event | None = None
        self._reason: str | None = None

    @property
    def cancelled(self) -> bool:
        """Whether cancel was requested."""
        return self._reason is not None

    @property
    def reason(self) -> str | None:
        """The reason given with the cancel, or None while not cancelled."""
        return self._reason

    async def wait_cancelled(self) -> None:
        """Return once cancel has been requested."""
        if self._reason is not None:
            return
        if self._event is None:
            self._event = anyio.Event()
        await self._event.wait()

    def raise_if_cancelled(self) -> None:
        """Raise :class:`Cancelled` if cancel was requested."""
        if self._reason is not None:
            raise Cancelled(self._reason)

    def _set(self, reason: str) -> None:
        """Request cancel (worker side only)."""
        if self._reason is None:
            self._reason = reason or "cancelled"
            if self._event is not None:
                self._event.set()


class Cancelled(Exception):
    """Raised by :meth:`CancelToken.raise_if_cancelled` to stop a cancelled handler."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ShuttingDown(Exception):
    """Raised by :meth:`Context.raise_if_shutting_down` once the worker is shutting down.

    Not a failure: whatever a handler raises after shutdown began hands its message back to
    another worker (released, not counted as an attempt).
    """

    def __init__(self, reason: str = "worker shutting down") -> None:
        super().__init__(reason)


class Retry(Exception):
    """Raise in a handler to retry the message, after ``delay`` seconds if given.

    It counts as an attempt: past the role's ``max_attempts`` the message is dead-lettered.
    Without a delay the role's backoff applies.
    """

    def __init__(self, reason: str = "retry requested", *, delay: float | None = None) -> None:
        super().__init__(reason)
        self.delay = delay


class Fatal(Exception):
    """Raise in a handler when retrying cannot help: the message goes to dead letters at once."""


@dataclass(frozen=True, slots=True)
class Batch:
    """One batch of a task node's output, as a child node receives it.

    Attributes:
        node: The node that produced it.
        index: Its index among that node's batches (0, 1, ...).
        items: The items.
    """

    node: str
    index: int
    items: list[Any]


class Context:
    """The context of one delivery of a message, passed to the handler.

    Attributes:
        message_id: The publisher's message id (kept across retries).
        entry_id: The stream entry id of this delivery.
        role: The role being run.
        attempt: 1 for the first attempt.
        consumer: The consumer name of the worker running it.
        created_at_ms: When the message was first published (ms since the epoch).
        deadline_ms: The message's deadline, if any.
        task_id: The DAG task, if any.
        node_id: The DAG node, if any.
        invocation: For a task node: which run of the node (one per parent batch when it is
            fed per batch).
        batch: For a node fed per batch: the parent batch to process (parent, index, items).
        failures: For a remediation node: the error of each failed parent.
        fencing_token: A number that rises with every change of owner of this message's run:
            the job's attempt in the high 32 bits, the pending list's delivery count of this
            entry in the low 32 (an adoption by another worker adds 1; a retry is a new entry
            with a higher attempt). A worker that lost its lease (frozen, or blocked past the
            lease TTL) still runs with its older, lower token, so a store that refuses writes
            carrying a lower token than the last one it accepted for ``message_id`` keeps
            such a late write from overwriting the new owner's. Equal tokens mean the same run,
            or an entry handed back at shutdown after its handler stopped. It fits a signed
            64-bit column while attempts stay below 2**31. Example (SQL)::

                UPDATE orders SET status = :status, fence = :token
                WHERE id = :message_id AND fence <= :token

            (0 rows updated: a newer run owns this message; stop). A Redis example is in
            the Concepts page, under "Fencing side effects".
        cancel: The cancel token: set only when a user cancels this message or its task.
            A worker shutting down does not set it (see :attr:`shutting_down`).
        resources: What the app's ``@app.on_startup`` hooks stored for this process, by type:
            ``ctx.resources[Pool]`` is typed ``Pool`` (see :mod:`streamflow.lifecycle`).
    """

    __slots__ = (
        "_calls",
        "_cancel",
        "_events",
        "_followups",
        "_job",
        "_log",
        "_node",
        "_progress_at",
        "_progress_next",
        "_shutdown",
        "attempt",
        "batch",
        "consumer",
        "created_at_ms",
        "deadline_ms",
        "entry_id",
        "failures",
        "fencing_token",
        "invocation",
        "message_id",
        "node_id",
        "resources",
        "role",
        "task_id",
    )
    # Set by the worker after __init__ (unset in a context made by hand): the job, for
    # ``headers``; what publishes follow-ups; and this run's follow-up calls per role.
    _job: Job
    _followups: FollowUps
    _calls: dict[str, int]

    # Not keyword-only: the worker builds one per message, and a positional call costs half
    # as much as one with ten keywords (0.35 us against 0.65).
    def __init__(
        self,
        message_id: str,
        entry_id: str,
        role: str,
        attempt: int,
        consumer: str,
        created_at_ms: int,
        deadline_ms: int | None = None,
        task_id: str | None = None,
        node_id: str | None = None,
        fencing_token: int = 0,
        resources: Resources = NO_RESOURCES,
    ) -> None:
        self.message_id = message_id
        self.entry_id = entry_id
        self.role = role
        self.attempt = attempt
        self.consumer = consumer
        self.created_at_ms = created_at_ms
        self.deadline_ms = deadline_ms
        self.task_id = task_id
        self.node_id = node_id
        self.fencing_token = fencing_token
        self.resources = resources
        self._cancel: CancelToken | None = None  # made on first use: most handlers never look
        self._log: logging.LoggerAdapter[logging.Logger] | None = None
        self._node: NodeRun | None = None
        # Where progress goes (None: the role's events are off), and its rate limit's state.
        self._events: EventLog | None = None
        self._progress_at = NEVER  # a constant: float("-inf") parses a string, 0.2 us a message
        self._progress_next: dict[str, Any] | None = None
        # None: running; an Event (set) once the worker began to shut down.
        self._shutdown: anyio.Event | None = None
        self.invocation: int | None = None
        self.batch: Batch | None = None
        self.failures: dict[str, str] = {}

    @property
    def headers(self) -> Mapping[str, str]:
        """The job's headers (read-only): trace context, correlation ids, set by the publisher.

        Empty when it has none. Follow-up jobs (:meth:`publish`, :meth:`submit`) inherit them.
        """
        # Set by the worker only for a job that has headers: the others pay nothing for them.
        try:
            job = self._job
        except AttributeError:
            return _NO_HEADERS
        return MappingProxyType(job.headers) if job.headers else _NO_HEADERS

    async def publish(
        self,
        role: str,
        payload: Any = None,
        *,
        idempotency_key: str | None = None,
        key: str | None = None,
        deadline: datetime | timedelta | None = None,
        delay: datetime | timedelta | float | None = None,
        headers: Mapping[str, str] | None = None,
        priority: int | None = None,
    ) -> str:
        """Publish a follow-up job, once per parent message however often the handler runs.

        A retry or a redelivery of this message (its worker died) runs the handler again; the
        same call then publishes nothing and returns the first child's id. The call is named
        by this message's id and ``idempotency_key``, or, without one, by the call's ordinal
        among this run's publishes to ``role`` (the first is ``role#0``): pass a key when the
        calls a run makes to one role may differ from one run to the next. Children are
        remembered for the client's dedup window (24 hours). Async handlers only.

        Args:
            role: The child's role.
            payload: Any JSON-serializable value or a pydantic model.
            idempotency_key: Names this call among the handler's calls (see above).
            key: The partition key (see :meth:`streamflow.Client.publish`).
            deadline: When the child must not start any more.
            delay: Start the child no earlier than this.
            headers: Headers for the child, added to (and overriding) this job's own.
            priority: The child's priority level (see :meth:`streamflow.Client.publish`).

        Returns:
            The child's message id.

        Raises:
            RuntimeError: The context does not come from a worker.
        """
        call_key = self._call_key(role, idempotency_key)
        return await self._follow().publish(
            self,
            role,
            payload,
            call_key=call_key,
            key=key,
            deadline=deadline,
            delay=delay,
            headers=headers,
            priority=priority,
        )

    async def submit(
        self,
        graph: Graph | GraphSpec | dict[str, Any],
        *,
        idempotency_key: str | None = None,
        params: dict[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        roles: Iterable[str] | None = None,
        functions: Iterable[str] | None = None,
    ) -> str:
        """Submit a DAG task, once per parent message however often the handler runs.

        As :meth:`publish`: the task's id is derived from this message's id and
        ``idempotency_key`` (by default the call's ordinal among this run's submits), so a
        second run finds the task submitted and returns its id. Its node jobs carry this
        job's headers, updated with ``headers``. Async handlers only.

        Args:
            graph: The task graph (see :meth:`streamflow.Client.submit`).
            idempotency_key: Names this call among the handler's calls.
            params: Task parameters.
            headers: Headers for every node job, added to this job's own.
            roles: The roles to check the graph against, instead of those registered.
            functions: The functions to check the graph against, instead of those registered.

        Returns:
            The task id.

        Raises:
            RuntimeError: The context does not come from a worker.
            GraphError: The graph is invalid.
        """
        call_key = self._call_key("submit", idempotency_key)
        return await self._follow().submit(
            self,
            graph,
            call_key=call_key,
            params=params,
            headers=headers,
            roles=roles,
            functions=functions,
        )

    def _call_key(self, kind: str, explicit: str | None) -> str:
        """The per-call key of a follow-up: ``explicit``, else ``kind#ordinal`` of this run."""
        if explicit is not None:
            return explicit
        try:
            calls = self._calls
        except AttributeError:
            calls = self._calls = {}
        ordinal = calls.get(kind, 0)
        calls[kind] = ordinal + 1
        return f"{kind}#{ordinal}"

    def _follow(self) -> FollowUps:
        try:
            return self._followups
        except AttributeError:
            raise RuntimeError(
                "ctx.publish() and ctx.submit() need a context made by a worker"
            ) from None

    @property
    def cancel(self) -> CancelToken:
        """The cancel token."""
        token = self._cancel
        if token is None:
            token = self._cancel = CancelToken()
        return token

    @property
    def shutting_down(self) -> bool:
        """Whether the worker running this handler is shutting down (SIGTERM, :meth:`stop`).

        Not a cancel: the handler may finish within the shutdown grace (its message is then
        acknowledged as usual). One that would rather stop early saves its progress and raises
        (e.g. :meth:`raise_if_shutting_down`): its message is handed back to another worker,
        not counted as a failed attempt. Past the grace the handler is cancelled hard and its
        message handed back all the same.
        """
        return self._shutdown is not None and self._shutdown.is_set()

    async def wait_shutdown(self) -> None:
        """Return once the worker running this handler begins to shut down."""
        if self._shutdown is None:
            self._shutdown = anyio.Event()
        await self._shutdown.wait()

    def raise_if_shutting_down(self) -> None:
        """Raise :class:`ShuttingDown` once the worker is shutting down (:attr:`shutting_down`)."""
        if self.shutting_down:
            raise ShuttingDown()

    def _shut_down(self) -> None:
        """Tell the handler that its worker is shutting down (worker side only)."""
        if self._shutdown is None:
            self._shutdown = anyio.Event()
        self._shutdown.set()

    async def emit(self, items: Iterable[Any]) -> None:
        """Emit one batch of this task node's output (a list of JSON values).

        The batch is stored once and each child fed per batch starts on it as soon as the
        coordinator hears of it. Emit batches in a deterministic order: when a run is retried,
        batches it emits under numbers already recorded from an earlier run are dropped.

        Raises:
            RuntimeError: This message is not a task node.
            PayloadError: The batch is not JSON-serializable or too large.
        """
        if self._node is None:
            raise RuntimeError("ctx.emit() is only for task nodes (jobs with a task and node)")
        await self._node.emit(items)

    async def progress(self, value: float | dict[str, Any], message: str | None = None) -> None:
        """Report how far this run got: a number (e.g. a percentage) or a small JSON object.

        It appears on the lifecycle events stream (``streamflow events``, ``client.events()``)
        as a ``progress`` event, and while the job runs in its status (``client.job()``,
        ``streamflow job``). Call it as often as you like: at most one event per
        :data:`streamflow.events.PROGRESS_INTERVAL` is written per run, the last value of an
        interval later (or just before the job's final event); the others are dropped. Nothing
        is written when the role's events are off. It does not wait for Redis.

        Args:
            value: A finite number, or a JSON object of at most 4 KiB encoded.
            message: An optional text of at most 1000 characters.

        Raises:
            ValueError: ``value`` or ``message`` is not valid.
        """
        if self._events is not None:
            self._events.progress(self, value, message)
        else:
            check_progress(value, message)

    @property
    def trace_context(self) -> Mapping[str, str] | None:
        """The W3C trace context of the span this task node's run is traced in, or None.

        Set by a tracing middleware (``streamflow.otel.OpenTelemetry``) around the handler;
        the run's batches and its end are reported with it, so that a tracing coordinator's
        spans, and the successors' runs, continue this run's trace. Always None for a job
        that is not a task node (nothing would carry it).
        """
        return self._node.trace if self._node is not None else None

    @trace_context.setter
    def trace_context(self, carrier: Mapping[str, str] | None) -> None:
        if self._node is not None:
            # Only ``traceparent`` and ``tracestate`` are kept (bounded): what the reports carry.
            self._node.trace = carrier_of(carrier)

    @property
    def emitted(self) -> int:
        """How many batches this run has emitted."""
        return self._node.emitted if self._node is not None else 0

    def inputs(self) -> AsyncIterator[Batch]:
        """Every batch of the parents, parent by parent in order (nodes fed ``on: done``).

        Raises:
            RuntimeError: This message is not a task node.
        """
        if self._node is None:
            raise RuntimeError("ctx.inputs() is only for task nodes (jobs with a task and node)")
        return self._node.inputs()

    @property
    def log(self) -> logging.LoggerAdapter[logging.Logger]:
        """A logger whose lines carry the role, message id, attempt (task and node ids for a node).

        Both log formats show them (``--log-format``, see :mod:`streamflow.logs`).
        """
        if self._log is None:
            extra: dict[str, Any] = {
                "role": self.role,
                "message_id": self.message_id,
                "attempt": self.attempt,
            }
            if self.task_id is not None:
                extra["task_id"] = self.task_id
            if self.node_id is not None:
                extra["node_id"] = self.node_id
            self._log = logging.LoggerAdapter(logger, extra)
        return self._log

    async def cancellable(self, awaitable: Awaitable[T]) -> T:
        """Await ``awaitable``, abandoning it if the message is cancelled first.

        Raises:
            Cancelled: Cancel arrived before ``awaitable`` finished (it was cancelled).
        """
        results: list[T] = []
        async with anyio.create_task_group() as tg:

            async def run() -> None:
                results.append(await awaitable)
                tg.cancel_scope.cancel()

            async def watch() -> None:
                await self.cancel.wait_cancelled()
                tg.cancel_scope.cancel()

            tg.start_soon(run)
            tg.start_soon(watch)
        if results:
            return results[0]
        raise Cancelled(self.cancel.reason or "cancelled")

    def shield(self) -> anyio.CancelScope:
        """A scope that protects a critical section from hard cancel (use with ``with``).

        The cancel token still reports the cancel; the hard cancel lands when the section ends.
        """
        return anyio.CancelScope(shield=True)

    def __repr__(self) -> str:
        return (
            f"Context(role={self.role!r}, message_id={self.message_id!r}, "
            f"attempt={self.attempt}, entry_id={self.entry_id!r})"
        )
