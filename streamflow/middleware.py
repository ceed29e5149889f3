"""Middleware: your code around every handler call and publish, told of retries and dead letters.

A :class:`Middleware` subclass overrides what it needs:

* :meth:`~Middleware.handle` wraps each handler call, an "onion" like Starlette's and httpx's:
  code before ``await call_next(ctx, payload)`` runs before the handler, code after it once the
  handler returned (its return value passes through), an ``except`` around it sees the
  handler's error (and may translate it: what ``handle`` raises is the attempt's error);
* :meth:`~Middleware.publish` wraps each job a client sends
  (:meth:`Client.publish <streamflow.Client.publish>`, each job of ``publish_many``, a
  :class:`~streamflow.SyncClient`'s) and each task it submits (a :class:`Publish` of kind
  ``"task"``): it may change the outgoing job (add headers, such as a trace context) before
  ``call_next``; an app's middleware also wraps its handlers' follow-ups (``ctx.publish``,
  ``ctx.submit``), from inside their ``handle``;
* :meth:`~Middleware.on_retry` and :meth:`~Middleware.on_dead_letter` are told after a failed
  attempt's retry was scheduled, or its message dead-lettered (for any reason, malformed input
  included), once that is applied in Redis.

Order: the first middleware added is the outermost. ``app.add_middleware(a, b)`` runs
``a.handle`` -> ``b.handle`` -> handler -> back through ``b`` -> ``a``; outcome hooks are told
in the same order (``a`` first). The handler's ``timeout`` bounds the handler alone, not the
middleware around it.

Cost: none when unused. A worker whose app has no middleware (and whose metrics are off) calls
each handler directly, as before; otherwise each role's chain is composed once, when the worker
is built (or its metrics enabled), never per message, and only from the middleware that
override :meth:`~Middleware.handle`. The same goes for a client's publish chain: without one,
every publish, ``publish_many`` and submit runs as before. ``publish_many`` runs each job's
chain (concurrently, :func:`publish_each`) and still sends the jobs that reach its end in one
call; a :class:`~streamflow.SyncClient`, without an event loop, drives the chains by hand
(:func:`publish_blocking`: its middleware may await only ``call_next`` and code that does not
suspend). See docs/benchmarks.md, "Middleware".

Failures: what a middleware's ``handle`` raises fails the attempt like a handler's error (the
role's retry policy applies). What ``publish`` raises fails the publish (nothing is written if
it raised before ``call_next``). An outcome hook that raises is logged with its traceback and
the next middleware is still told: the outcome stands, it was applied before.

Tracing fits this seam: a publish middleware writes the current trace context into
``message.headers`` (``traceparent``), and a handler middleware reads ``ctx.headers`` and runs
``call_next`` inside a span (setting ``ctx.trace_context`` for a task node's reports);
``on_retry`` and ``on_dead_letter`` record events on the job's trace. The coordinator's spans
are not this seam's: a middleware that also provides ``coordinator_span`` (see
:mod:`streamflow.dag.tracing`) traces the coordinator of the app it is added to.
streamflow's Prometheus metrics are a middleware too (the handler-duration histogram, installed
innermost by ``Worker.enable_metrics`` so that it times the handler alone).
"""

from __future__ import annotations

import logging
from collections.abc import (
    Awaitable,
    Callable,
    Coroutine,
    Generator,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import anyio

from streamflow.context import Context
from streamflow.errors import ConfigError

if TYPE_CHECKING:
    from streamflow.delivery import Decision, Delivery, OutcomeStatus
    from streamflow.records import ErrorInfo

logger = logging.getLogger("streamflow.worker")

#: The rest of a handler's chain: the next middleware, or the handler itself.
CallNext = Callable[[Context, Any], Awaitable[Any]]
#: A middleware's ``handle``, bound.
Handle = Callable[[Context, Any, CallNext], Awaitable[Any]]
#: A composed chain: the outermost ``handle`` and the rest, so that the runner calls
#: ``handle(ctx, payload, rest)`` directly (one link fewer per message).
Chain = tuple[Handle, CallNext]


@dataclass(slots=True)
class Publish:
    """One job (or task) on its way out of a client.

    A job of :meth:`Client.publish <streamflow.Client.publish>`, of ``publish_many`` (one
    each), of :class:`~streamflow.SyncClient`, or of a handler's ``ctx.publish``; or, with
    ``kind`` ``"task"``, a task of :meth:`Client.submit <streamflow.Client.submit>` (or of
    ``ctx.submit``). A publish middleware may change it in place
    (``message.headers["x"] = "y"``) or pass another to ``call_next``.

    Attributes:
        role: The role that will handle it; for a task, the graph's ``name``.
        payload: Its payload, as given; for a task, its graph (a ``GraphSpec``).
        headers: Its headers (``ctx.headers`` in the handler; a task's go to every node
            job); empty when it has none.
        options: The other keyword arguments of the call, as given: for a job ``key``,
            ``message_id``, ``dedup_key``, ``deadline``, ``delay``, ``task_id``, ``node_id``,
            ``strict``, ``keep_result``, ``priority`` (``publish_many``: ``key``, ``strict`` and
            ``priority`` when given); for a task
            ``task_id``, ``roles``, ``functions``, ``registration_wait``.
        kind: ``"job"``, or ``"task"`` for a submit (``call_next`` returns the task id).
    """

    role: str
    payload: Any
    headers: dict[str, str] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    kind: Literal["job", "task"] = "job"


#: The rest of a publish chain: the next middleware, or the publish itself (returns the id).
PublishNext = Callable[[Publish], Awaitable[str]]


@dataclass(frozen=True, slots=True)
class Retrying:
    """A failed attempt whose next attempt is scheduled (told to :meth:`Middleware.on_retry`).

    Attributes:
        context: The failed attempt's context (``attempt`` is the one that failed).
        detail: What went wrong, in words.
        error: The error's type, message and traceback, when an exception caused it.
        delay: Seconds until the next attempt.
    """

    context: Context
    detail: str
    error: ErrorInfo | None
    delay: float


@dataclass(frozen=True, slots=True)
class DeadLettered:
    """A message moved to its role's dead letters (told to :meth:`Middleware.on_dead_letter`).

    Attributes:
        role: The role.
        entry_id: The stream entry that was dead-lettered.
        message_id: The message id; None when the entry could not be decoded.
        reason: Why (``failed``, ``fatal``, ``invalid_payload``, ``too_large``, ...; see
            docs/protocol.md).
        detail: What went wrong, in words.
        error: The error's type, message and traceback, when an exception caused it.
        context: The delivery's context when it decoded that far (a handler that failed, a
            poison message); None when it was refused before (malformed, too large, invalid
            payload, expired).
    """

    role: str
    entry_id: str
    message_id: str | None
    reason: str
    detail: str
    error: ErrorInfo | None
    context: Context | None


class Middleware:
    """Code around handler calls and publishes; override what you need (see the module).

    Register it with :meth:`App.add_middleware <streamflow.App.add_middleware>` (handlers and
    outcome hooks, in every worker and test harness running the app) and with
    :meth:`Client.add_middleware <streamflow.Client.add_middleware>` (publishes). One object
    may be both.

    Example:
        ```python
        class Timing(streamflow.Middleware):
            async def handle(self, ctx, payload, call_next):
                started = time.perf_counter()
                try:
                    return await call_next(ctx, payload)
                finally:
                    ctx.log.info("took %.3fs", time.perf_counter() - started)
        ```
    """

    async def handle(self, ctx: Context, payload: Any, call_next: CallNext) -> Any:
        """Run around one handler call: return ``await call_next(ctx, payload)``'s result.

        The handler's error comes out of ``call_next``; cancellation too (``BaseException``:
        do not swallow it). A plain ``def`` handler runs in a thread inside ``call_next``;
        the middleware runs on the event loop.
        """
        return await call_next(ctx, payload)

    async def publish(self, message: Publish, call_next: PublishNext) -> str:
        """Run around one publish: return ``await call_next(message)`` (the message id)."""
        return await call_next(message)

    async def on_retry(self, event: Retrying) -> None:
        """Told once a failed attempt's retry is scheduled."""

    async def on_dead_letter(self, event: DeadLettered) -> None:
        """Told once a message is dead-lettered."""


def check_all(middleware: Iterable[object]) -> None:
    """Refuse anything that is not a :class:`Middleware` instance (``add_middleware``'s check).

    Raises:
        ConfigError: One of ``middleware`` is not a :class:`Middleware` instance.
    """
    for each in middleware:
        if not isinstance(each, Middleware):
            raise ConfigError(f"{each!r} is not a streamflow.Middleware (an instance)")


def overrides(middleware: Middleware, name: str) -> bool:
    """Whether ``middleware`` overrides the method ``name`` of :class:`Middleware`."""
    return getattr(type(middleware), name) is not getattr(Middleware, name)


def compose(middleware: Sequence[Middleware], handler: CallNext) -> CallNext:
    """``handler`` wrapped in each middleware's ``handle``, the first one outermost.

    Middleware that do not override ``handle`` are left out of the chain (no cost).
    """
    call = handler
    for each in reversed(middleware):
        if overrides(each, "handle"):
            call = _link(each, call)
    return call


def wraps(middleware: Iterable[Middleware]) -> bool:
    """Whether any of ``middleware`` overrides ``handle`` (else handlers are called bare)."""
    return any(overrides(each, "handle") for each in middleware)


def chain(middleware: Sequence[Middleware], handler: CallNext) -> Chain:
    """``handler`` in ``middleware``'s chain, split at its outermost ``handle``.

    Raises:
        ValueError: No middleware overrides ``handle`` (see :func:`wraps`).
    """
    wrapping = [each for each in middleware if overrides(each, "handle")]
    if not wrapping:
        raise ValueError("no middleware wraps handlers")
    return wrapping[0].handle, compose(wrapping[1:], handler)


def compose_publish(middleware: Sequence[Middleware], publish: PublishNext) -> PublishNext:
    """``publish`` wrapped in each middleware's ``publish``, the first one outermost."""
    call = publish
    for each in reversed(middleware):
        if overrides(each, "publish"):
            call = _publish_link(each, call)
    return call


def many_messages(
    role: str,
    payloads: Iterable[Any],
    keys: Iterable[str] | None,
    headers: Mapping[str, str] | None,
    strict: bool,
    chunk_size: int,
    priorities: Iterable[int] | None = None,
) -> Iterator[list[Publish]]:
    """``publish_many``'s jobs as messages for the publish middleware, one each, by chunk.

    Raises:
        ValueError: ``keys`` or ``priorities`` and ``payloads`` differ in length.
    """
    pairs: Iterable[tuple[Any, str | None]] = (
        zip(payloads, keys, strict=True) if keys is not None else ((p, None) for p in payloads)
    )
    messages = [
        Publish(role, payload, dict(headers or {}), {"key": key, "strict": strict})
        for payload, key in pairs
    ]
    if priorities is not None:
        levels = list(priorities)
        if len(levels) != len(messages):
            raise ValueError("priorities and payloads differ in length")
        for message, level in zip(messages, levels, strict=True):
            message.options["priority"] = level
    for start in range(0, len(messages), chunk_size):
        yield messages[start : start + chunk_size]


async def publish_each(
    middleware: Sequence[Middleware],
    messages: Sequence[Publish],
    send: Callable[[list[Publish]], Awaitable[list[str]]],
) -> list[str]:
    """Each of ``messages`` through the publish chain, those that reach its end sent at once.

    For ``publish_many``: every message runs its own chain (concurrently: a middleware may
    await), and the end of each chain waits until every chain has either reached it or
    finished without it; then ``send`` publishes the messages that reached it in one call,
    and each chain gets its own id back (or ``send``'s error). Returns the ids, in order.

    Raises:
        Exception: The first error of a chain (the others' messages may be published).
    """
    gather = _Gather(len(messages), send)
    results: list[str | None] = [None] * len(messages)
    errors: list[BaseException | None] = [None] * len(messages)

    async def run(index: int) -> None:
        arrived = False

        async def end(message: Publish) -> str:
            nonlocal arrived
            arrived = True
            return await gather.arrive(index, message)

        try:
            results[index] = await compose_publish(middleware, end)(messages[index])
        except Exception as exc:
            errors[index] = exc
        finally:
            if not arrived:
                await gather.left()

    async with anyio.create_task_group() as tg:
        for index in range(len(messages)):
            tg.start_soon(run, index)
    for error in errors:
        if error is not None:
            raise error
    return [result for result in results if result is not None]


class _Gather:
    """The end of :func:`publish_each`'s chains: sends what reached it once all are in."""

    def __init__(self, expected: int, send: Callable[[list[Publish]], Awaitable[list[str]]]):
        self._pending = expected
        self._send = send
        self._arrived: list[tuple[int, Publish]] = []
        self._ids: dict[int, str] = {}
        self._error: BaseException | None = None
        self._sent = anyio.Event()

    async def arrive(self, index: int, message: Publish) -> str:
        if self._sent.is_set() or index in dict(self._arrived):
            raise RuntimeError("a publish middleware called call_next twice")
        self._arrived.append((index, message))
        await self.left()
        await self._sent.wait()
        if self._error is not None:
            raise self._error
        return self._ids[index]

    async def left(self) -> None:
        """One chain reached the end or finished without it; the last one sends."""
        self._pending -= 1
        if self._pending:
            return
        try:
            if self._arrived:
                ids = await self._send([message for _, message in self._arrived])
                self._ids = {index: id_ for (index, _), id_ in zip(self._arrived, ids, strict=True)}
        except Exception as exc:
            self._error = exc
        finally:
            self._sent.set()


class _Arrival:
    """What a chain driven by :func:`publish_blocking` awaits at its end: the id, once sent."""

    __slots__ = ("message",)

    def __init__(self, message: Publish) -> None:
        self.message = message

    def __await__(self) -> Generator[Any, Any, str]:
        id_: str = yield self
        return id_


async def _arrive(message: Publish) -> str:
    return await _Arrival(message)


#: Why a blocking client's publish middleware failed.
SUSPENDED = (
    "a publish middleware of a SyncClient awaited something that waits for the event loop "
    "(a SyncClient has none): it may only await call_next and code that does not suspend"
)


def publish_blocking(
    middleware: Sequence[Middleware],
    messages: Sequence[Publish],
    send: Callable[[list[Publish]], list[str]],
) -> list[str]:
    """:func:`publish_each` for a blocking client, without an event loop.

    Each chain's coroutine is driven by hand until it reaches the chain's end; so a
    middleware may await ``call_next`` and anything that does not suspend (a tracing span, a
    header), not real I/O (``RuntimeError``).

    Raises:
        Exception: The first error of a chain (the others' messages may be published).
        RuntimeError: A middleware suspended.
    """
    chain = compose_publish(middleware, _arrive)

    async def run(message: Publish) -> str:
        return await chain(message)

    coros = [run(message) for message in messages]
    outcomes = [_step(coro, None) for coro in coros]
    arrived = [i for i, outcome in enumerate(outcomes) if isinstance(outcome, _Arrival)]
    if arrived:
        sending = [outcome.message for outcome in outcomes if isinstance(outcome, _Arrival)]
        try:
            ids = send(sending)
        except Exception as exc:
            for index in arrived:
                outcomes[index] = _step(coros[index], None, exc)
        else:
            for index, id_ in zip(arrived, ids, strict=True):
                outcomes[index] = _step(coros[index], id_)
    results = []
    for coro, outcome in zip(coros, outcomes, strict=True):
        if isinstance(outcome, _Arrival):
            coro.close()
            outcome = RuntimeError("a publish middleware called call_next twice")
        if isinstance(outcome, BaseException):
            raise outcome
        results.append(outcome)
    return results


def _step(
    coro: Coroutine[Any, Any, str], value: str | None, error: BaseException | None = None
) -> str | _Arrival | BaseException:
    """Resume ``coro`` (with ``value`` or ``error``) up to its end or the chain's end."""
    try:
        yielded = coro.send(value) if error is None else coro.throw(error)
    except StopIteration as stop:
        result: str = stop.value
        return result
    except Exception as exc:
        return exc
    if isinstance(yielded, _Arrival):
        return yielded
    coro.close()
    return RuntimeError(SUSPENDED)


def _link(middleware: Middleware, call_next: CallNext) -> CallNext:
    handle = middleware.handle

    def call(ctx: Context, payload: Any) -> Awaitable[Any]:
        # Not a coroutine itself: the middleware's coroutine is awaited directly.
        return handle(ctx, payload, call_next)

    return call


def _publish_link(middleware: Middleware, call_next: PublishNext) -> PublishNext:
    publish = middleware.publish

    def call(message: Publish) -> Awaitable[str]:
        return publish(message, call_next)

    return call


class OutcomeHooks:
    """Tells middleware of retries and dead letters, in order, each failure logged apart.

    Args:
        middleware: All the middleware; those overriding neither hook are left out.
    """

    def __init__(self, middleware: Iterable[Middleware]) -> None:
        self._retry = [m for m in middleware if overrides(m, "on_retry")]
        self._dead = [m for m in middleware if overrides(m, "on_dead_letter")]

    def __bool__(self) -> bool:
        return bool(self._retry or self._dead)

    async def settled(self, delivery: Delivery, decision: Decision, status: OutcomeStatus) -> None:
        """Tell of a settle the worker applied, if it is a retry or a dead letter."""
        context = delivery.context
        if status == "retried" and context is not None:
            await self.retrying(Retrying(context, decision.detail, decision.error, decision.delay))
        elif status == "dead_lettered":
            job = decision.job or delivery.job
            event = DeadLettered(
                delivery.role.name,
                delivery.entry.id.decode(),
                job.id if job is not None else None,
                decision.reason or "failed",
                decision.detail,
                decision.error,
                context,
            )
            await self.dead_lettered(event)

    async def retrying(self, event: Retrying) -> None:
        """Tell each middleware overriding ``on_retry``."""
        for each in self._retry:
            try:
                await each.on_retry(event)
            except Exception:
                logger.exception("middleware %r failed in on_retry (ignored)", each)

    async def dead_lettered(self, event: DeadLettered) -> None:
        """Tell each middleware overriding ``on_dead_letter``."""
        for each in self._dead:
            try:
                await each.on_dead_letter(event)
            except Exception:
                logger.exception("middleware %r failed in on_dead_letter (ignored)", each)
