"""Middleware: your code around every handler call and publish, told of retries and dead letters.

A :class:`Middleware` subclass overrides what it needs:

* :meth:`~Middleware.handle` wraps each handler call, an "onion" like Starlette's and httpx's:
  code before ``await call_next(ctx, payload)`` runs before the handler, code after it once the
  handler returned (its return value passes through), an ``except`` around it sees the
  handler's error (and may translate it: what ``handle`` raises is the attempt's error);
* :meth:`~Middleware.publish` wraps each :meth:`Client.publish <streamflow.Client.publish>`:
  it may change the outgoing job (add headers, such as a trace context) before ``call_next``;
  an app's middleware also wraps its handlers' follow-ups (``ctx.publish``), from inside
  their ``handle``;
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
override :meth:`~Middleware.handle`. The same goes for a :class:`~streamflow.Client`'s publish
chain. See docs/benchmarks.md, "Middleware".

Failures: what a middleware's ``handle`` raises fails the attempt like a handler's error (the
role's retry policy applies). What ``publish`` raises fails the publish (nothing is written if
it raised before ``call_next``). An outcome hook that raises is logged with its traceback and
the next middleware is still told: the outcome stands, it was applied before.

Tracing fits this seam: a publish middleware writes the current trace context into
``message.headers`` (``traceparent``), and a handler middleware reads ``ctx.headers`` and runs
``call_next`` inside a span; ``on_retry`` and ``on_dead_letter`` record events on the job's trace.
streamflow's Prometheus metrics are a middleware too (the handler-duration histogram, installed
innermost by ``Worker.enable_metrics`` so that it times the handler alone).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

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
    """One job on its way out of :meth:`Client.publish <streamflow.Client.publish>`.

    A publish middleware may change it in place (``message.headers["x"] = "y"``) or pass
    another to ``call_next``.

    Attributes:
        role: The role that will handle it.
        payload: Its payload, as given.
        headers: Its headers (``ctx.headers`` in the handler); empty when it has none.
        options: The other keyword arguments of the call (``key``, ``message_id``,
            ``dedup_key``, ``deadline``, ``delay``, ``task_id``, ``node_id``, ``strict``,
            ``keep_result``), as given.
    """

    role: str
    payload: Any
    headers: dict[str, str] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)


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
