"""The application object: roles and the handlers registered for them."""

from __future__ import annotations

import dataclasses
import inspect
import random
import re
import typing
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from pydantic import TypeAdapter, ValidationError

from streamflow.context import Context
from streamflow.errors import ConfigError, PayloadError
from streamflow.functions import BUILTINS, Function, MapFn, ReduceFn, concatenate
from streamflow.keys import MAX_PARTITIONS, MAX_PRIORITIES, validate_name
from streamflow.lifecycle import Hook, Lifecycle, Resources
from streamflow.middleware import Middleware, check_all
from streamflow.protocol import keep_result_ms

#: Coordinator function names: dotted identifiers such as ``metrics.aggregate``.
#: A rate: ``<count>/<period>``, the period a unit (``s``, ``m``, ``h``, ``d``) after an
#: optional whole number of them (``10/s``, ``100/m``, ``5/2h``).
RATE_PATTERN = re.compile(r"([1-9][0-9]{0,8})/([1-9][0-9]{0,5})?(ms|s|m|h|d)")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_rate(text: str) -> tuple[int, int]:
    """``"10/s"`` -> (10, 1000): a start count and its period in ms.

    Raises:
        ConfigError: ``text`` is not ``<count>/[<n>]<unit>`` with unit ms, s, m, h or d.
    """
    found = RATE_PATTERN.fullmatch(text.strip()) if isinstance(text, str) else None
    if found is None:
        raise ConfigError(f"invalid rate {text!r}: expected COUNT/PERIOD, e.g. 10/s, 100/m, 5/2h")
    count, times, unit = found.groups()
    return int(count), int(times or 1) * _UNIT_MS[unit]


def format_rate(count: int, period_ms: int) -> str:
    """(10, 1000) -> ``"10/s"``: the shortest spelling :func:`parse_rate` reads back."""
    for unit in ("d", "h", "m", "s"):
        if period_ms % _UNIT_MS[unit] == 0:
            times = period_ms // _UNIT_MS[unit]
            return f"{count}/{'' if times == 1 else times}{unit}"
    return f"{count}/{period_ms}ms"


FUNCTION_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z][A-Za-z0-9_]*)*")

HandlerT = TypeVar("HandlerT", bound=Callable[..., Any])
HookT = TypeVar("HookT", bound=Hook)

#: What a handler looks like: ``async def handle(ctx, payload)`` or a plain ``def``.
Handler = Callable[[Context, Any], Awaitable[Any]] | Callable[[Context, Any], Any]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a role retries a failed message: capped exponential backoff with jitter.

    The n-th retry waits a random time between half and all of
    ``min(max_backoff, backoff * factor ** (n - 1))`` seconds.

    Attributes:
        max_attempts: Attempts in all (1 means never retry); then the message is dead-lettered.
        backoff: The first retry's base delay in seconds.
        factor: Growth of the base delay per attempt.
        max_backoff: The cap on the base delay in seconds.
    """

    max_attempts: int = 3
    backoff: float = 1.0
    factor: float = 2.0
    max_backoff: float = 300.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.backoff < 0 or self.factor < 1 or self.max_backoff < 0:
            raise ConfigError(f"invalid retry policy {self!r}")

    def delay(self, attempt: int) -> float:
        """Seconds to wait before the attempt after ``attempt`` (1-based)."""
        base = min(self.max_backoff, self.backoff * self.factor ** max(attempt - 1, 0))
        return random.uniform(base / 2, base)


@dataclass(frozen=True, slots=True)
class Role:
    """A role: its name, handler and how its payload is validated.

    Attributes:
        name: The role name (validated; it becomes part of key names).
        handler: The function that handles one message.
        is_async: Whether the handler is a coroutine function (else it runs in a thread).
        payload_type: The declared type of the payload parameter (``Any`` when undeclared).
        retry: The retry policy.
        timeout: Seconds a handler may run before it is cancelled (a failed attempt).
        max_deliveries: Deliveries (first read, adoptions after crashes) before the message is
            dead-lettered as poison without being started again.
        cancel_grace: Seconds a cancelled handler gets to stop by itself before it is
            hard-cancelled.
        partitions: How many partition streams the role has (see :mod:`streamflow.partitions`).
        priorities: How many priority levels it has (1: none); each is a stream per partition.
        keep_result_ms: Keep every job's outcome this many ms (0: only when its publisher
            asks, see ``Client.result``).
        events: Whether its jobs write lifecycle events (see :mod:`streamflow.events`).
        rate_limit: At most ``count`` starts per ``period_ms`` across all workers, or None.
        concurrency_limit: At most this many of its jobs held at once across all workers.
        key_rate_limit: Per limit key (a job's ``streamflow-limit-key`` header): at most
            ``count`` starts per ``period_ms`` across all workers, or None.
        key_concurrency: Per limit key: at most this many of its jobs running at once.
    """

    name: str
    handler: Handler
    is_async: bool
    payload_type: Any
    _adapter: TypeAdapter[Any] | None
    retry: RetryPolicy = RetryPolicy()
    timeout: float | None = None
    max_deliveries: int = 5
    cancel_grace: float = 5.0
    partitions: int = 1
    priorities: int = 1
    keep_result_ms: int = 0
    events: bool = True
    rate_limit: tuple[int, int] | None = None
    concurrency_limit: int | None = None
    key_rate_limit: tuple[int, int] | None = None
    key_concurrency: int | None = None

    def validate_payload(self, payload: Any) -> Any:
        """Validate ``payload`` against the handler's declared type.

        Raises:
            PayloadError: The payload does not fit the declared type.
        """
        if self._adapter is None:
            return payload
        try:
            return self._adapter.validate_python(payload)
        except ValidationError as exc:
            raise PayloadError(_first_errors(exc)) from None


class App:
    """A set of roles and their handlers, loaded by ``streamflow worker --app module:attr``.

    Example:
        ```python
        app = streamflow.App()

        @app.role("resize")
        async def resize(ctx: streamflow.Context, job: ResizeJob) -> None:
            ...
        ```
    """

    def __init__(self) -> None:
        self._roles: dict[str, Role] = {}
        self._functions: dict[str, Function] = dict(BUILTINS)
        self._startup: list[Hook] = []
        self._shutdown: list[Hook] = []
        self._middleware: list[Middleware] = []

    def role(
        self,
        name: str,
        *,
        payload: Any = None,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
        max_deliveries: int = 5,
        cancel_grace: float = 5.0,
        partitions: int = 1,
        priorities: int = 1,
        keep_result: timedelta | float | None = None,
        events: bool = True,
        rate_limit: str | None = None,
        concurrency_limit: int | None = None,
        key_rate_limit: str | None = None,
        key_concurrency: int | None = None,
    ) -> Callable[[HandlerT], HandlerT]:
        """Register the decorated function as the handler of role ``name``.

        The function takes ``(ctx, payload)``. The payload parameter's annotation (a pydantic
        model or any type pydantic validates) is checked on every message; a payload that fails
        goes to the dead-letter stream. Plain functions run in worker threads.

        Args:
            name: The role name.
            payload: The payload type, when it cannot be read from the annotation (e.g. a class
                defined inside a function under ``from __future__ import annotations``).
            retry: The retry policy; by default 3 attempts, waiting 0.5-1 s then 1-2 s.
            timeout: Seconds an async handler may run before it is cancelled as a failed
                attempt (a plain-function handler runs in a thread and cannot be cancelled).
            max_deliveries: Deliveries (including adoptions after a worker died) after which a
                message is dead-lettered as poison instead of started again.
            cancel_grace: Seconds a cancelled handler gets to stop by itself (checking
                ``ctx.cancel``) before it is hard-cancelled.
            partitions: Split the role into this many streams, spread over a Redis Cluster's
                masters (see :mod:`streamflow.partitions`). Fixed when the role is created:
                a worker whose app declares another number refuses to start.
            priorities: Give the role this many priority levels (2 to
                ``keys.MAX_PRIORITIES``, 5): jobs published with ``priority=0`` (the default)
                to ``priorities - 1`` wait in one stream per level, and workers take higher
                levels first while guaranteeing the lower ones a share of the reads (see
                docs/concepts.md#priorities). Recorded with the role: a worker whose app
                declares another number refuses to start.
            keep_result: Keep each job's outcome (its return value, or how it failed) for this
                long (seconds or a timedelta, at most 30 days), for ``Client.result`` and
                ``streamflow job``. Without it, only jobs whose publisher asks are kept.
            events: Write its jobs' lifecycle events (``started``, ``progress``, ``succeeded``,
                ...: see :mod:`streamflow.events`). Off, its jobs cost no event writes and
                ``ctx.progress()`` writes nothing; a coordinator still reports tasks and nodes.
            rate_limit: At most this many starts per period across all workers and processes:
                ``"100/m"``, ``"10/s"``, ``"5/2h"`` (see :func:`parse_rate`); ``streamflow
                limit`` overrides it at run time.
            concurrency_limit: At most this many of its jobs running at once across all
                workers; ``streamflow limit`` overrides it at run time.
            key_rate_limit: Like ``rate_limit``, for each limit key on its own: a job
                published with ``limit_key="cust-42"`` (the ``streamflow-limit-key`` header)
                counts against its key's rate (see :mod:`streamflow.keylimits`).
            key_concurrency: At most this many jobs of one limit key running at once across
                all workers; jobs of a saturated key are parked, other keys go on.

        Raises:
            InvalidNameError: The role name is not valid.
            ConfigError: The role already has a handler, or the function's signature is wrong.
        """
        validate_name(name, "role")
        if max_deliveries < 1 or (timeout is not None and timeout <= 0) or cancel_grace < 0:
            raise ConfigError(
                "max_deliveries must be at least 1, timeout positive, cancel_grace not negative"
            )
        if not 1 <= partitions <= MAX_PARTITIONS:
            raise ConfigError(f"partitions must be 1 to {MAX_PARTITIONS}")
        if type(priorities) is not int or not 1 <= priorities <= MAX_PRIORITIES:
            raise ConfigError(f"priorities must be 1 to {MAX_PRIORITIES}")
        try:
            keep_ms = keep_result_ms(keep_result) or 0
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        rate, key_rate = _limits(rate_limit, concurrency_limit, key_rate_limit, key_concurrency)

        def register(func: HandlerT) -> HandlerT:
            if name in self._roles:
                raise ConfigError(f"role {name!r} already has a handler")
            role = _make_role(name, func, payload, retry or RetryPolicy(), timeout, max_deliveries)
            self._roles[name] = dataclasses.replace(
                role,
                cancel_grace=cancel_grace,
                partitions=partitions,
                priorities=priorities,
                keep_result_ms=keep_ms,
                events=events,
                rate_limit=rate,
                concurrency_limit=concurrency_limit,
                key_rate_limit=key_rate,
                key_concurrency=key_concurrency,
            )
            return func

        return register

    def function(self, name: str, *, reduce: ReduceFn = concatenate) -> Callable[[MapFn], MapFn]:
        """Register the decorated ``map(params, batches) -> partial`` as a coordinator function.

        Task nodes with ``function: name`` run it inside the coordinator (see
        :mod:`streamflow.functions`): ``map`` per invocation, then ``reduce(params, partials)``
        once for the node's output batch; by default the partials (lists) are concatenated.

        Raises:
            ConfigError: The name is taken or not a dotted name.
        """
        if FUNCTION_NAME.fullmatch(name) is None or name in self._functions:
            raise ConfigError(f"function name {name!r} is taken or invalid")

        def register(func: MapFn) -> MapFn:
            self._functions[name] = Function(name, func, reduce)
            return func

        return register

    def on_startup(self, hook: HookT) -> HookT:
        """Register ``hook(resources)`` to run once per process before it serves.

        Hooks run in registration order, in every worker process and in a coordinator or
        test harness that runs this app; ``async def`` or plain ``def`` (run in a thread).
        What a hook stores in its :class:`~streamflow.lifecycle.Resources` (keyed by type)
        handlers read as ``ctx.resources[Type]``. A hook that raises stops the process (see
        :mod:`streamflow.lifecycle`).

        Raises:
            ConfigError: ``hook`` does not take one parameter (the resources).

        Example:
            ```python
            @app.on_startup
            async def open_pool(resources: streamflow.Resources) -> None:
                resources[Pool] = await Pool.connect(DSN)
            ```
        """
        self._startup.append(_check_hook(hook))
        return hook

    def on_shutdown(self, hook: HookT) -> HookT:
        """Register ``hook(resources)`` to run once per process after it drained.

        Shutdown hooks run in registration order, even after a startup hook failed (use
        ``resources.get(Type)``: it may never have been stored), within the shutdown grace;
        one that raises is logged and the next one runs.

        Raises:
            ConfigError: ``hook`` does not take one parameter (the resources).
        """
        self._shutdown.append(_check_hook(hook))
        return hook

    def add_middleware(self, *middleware: Middleware) -> None:
        """Run ``middleware`` around every handler call and tell it of retries and dead letters.

        Its ``publish`` runs around the handlers' follow-ups (``ctx.publish``).

        The first added is the outermost (see :mod:`streamflow.middleware`). Add it before
        workers are built: each composes its chains once, when it is built.

        Raises:
            ConfigError: An argument is not a :class:`~streamflow.middleware.Middleware`.
        """
        check_all(middleware)
        self._middleware.extend(middleware)

    @property
    def middleware(self) -> tuple[Middleware, ...]:
        """The middleware added, the outermost first."""
        return tuple(self._middleware)

    def lifecycle(self, resources: Resources | None = None) -> Lifecycle:
        """The app's hooks, ready to run over ``resources`` (fresh ones by default)."""
        return Lifecycle(
            self._startup, self._shutdown, Resources() if resources is None else resources
        )

    @property
    def has_hooks(self) -> bool:
        """Whether any startup or shutdown hook is registered."""
        return bool(self._startup or self._shutdown)

    @property
    def functions(self) -> Mapping[str, Function]:
        """The coordinator functions by name, the built-in ones included."""
        return dict(self._functions)

    @property
    def roles(self) -> Mapping[str, Role]:
        """The registered roles by name."""
        return dict(self._roles)

    def get_role(self, name: str) -> Role:
        """The role called ``name``.

        Raises:
            ConfigError: No handler is registered for it.
        """
        try:
            return self._roles[name]
        except KeyError:
            known = ", ".join(sorted(self._roles)) or "none"
            raise ConfigError(f"unknown role {name!r} (this app has: {known})") from None


def _check_hook(hook: Hook) -> Hook:
    if len(inspect.signature(hook).parameters) != 1:
        raise ConfigError(
            f"lifecycle hook {getattr(hook, '__qualname__', hook)!r} must take (resources)"
        )
    return hook


def _make_role(
    name: str,
    func: Callable[..., Any],
    payload_type: Any,
    retry: RetryPolicy,
    timeout: float | None,
    max_deliveries: int,
) -> Role:
    params = list(inspect.signature(func).parameters.values())
    if len(params) != 2:
        raise ConfigError(
            f"handler {func.__qualname__} of role {name!r} must take (ctx, payload), "
            f"not {len(params)} parameters"
        )
    if payload_type is None:
        payload_type = _annotation(func, params[1].name)
    adapter = None if payload_type is Any else TypeAdapter(payload_type)
    handler: Handler = func
    if inspect.isasyncgenfunction(func):
        handler = _emitting(func)
    is_async = inspect.iscoroutinefunction(handler)
    return Role(name, handler, is_async, payload_type, adapter, retry, timeout, max_deliveries)


def _emitting(func: Callable[..., Any]) -> Callable[[Context, Any], Awaitable[None]]:
    """Run an async generator handler, emitting each value it yields as one batch."""

    async def handler(ctx: Context, payload: Any) -> None:
        batches = func(ctx, payload)
        try:
            async for batch in batches:
                await ctx.emit(batch)
        finally:
            await batches.aclose()

    handler.__qualname__ = func.__qualname__
    return handler


def _annotation(func: Callable[..., Any], parameter: str) -> Any:
    try:
        hints = typing.get_type_hints(func)
    except Exception as exc:  # a forward reference that cannot be resolved
        raise ConfigError(
            f"cannot resolve the annotations of {func.__qualname__} ({exc}); "
            "pass the payload type explicitly: @app.role(name, payload=Model)"
        ) from None
    return hints.get(parameter, Any)


def _first_errors(exc: ValidationError, limit: int = 3) -> str:
    parts = []
    for err in exc.errors()[:limit]:
        where = ".".join(str(p) for p in err["loc"]) or "payload"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def _limits(
    rate: str | None, concurrency: int | None, key_rate: str | None, key_concurrency: int | None
) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """A role's declared rates, parsed; its concurrency limits checked.

    Raises:
        ConfigError: A rate is not ``COUNT/PERIOD``, or a concurrency limit is below 1.
    """
    for name, cap in (("concurrency_limit", concurrency), ("key_concurrency", key_concurrency)):
        if cap is not None and cap < 1:
            raise ConfigError(f"{name} must be at least 1")
    return (
        parse_rate(rate) if rate is not None else None,
        parse_rate(key_rate) if key_rate is not None else None,
    )
