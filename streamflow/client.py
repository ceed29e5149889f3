"""Publishing from any Python service, DAG tasks, and dead-letter operations.

:class:`Client` (async) and :class:`SyncClient` publish jobs, both through
:mod:`streamflow.publishing` (written once, run on an asyncio or a blocking Redis client);
:class:`Client` also submits and follows tasks, cancels, and lists, shows, replays and purges
dead letters (through :mod:`streamflow.deadletters`, which does that work).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Literal, ParamSpec, Self, TypeVar

import anyio
from redis.asyncio import Redis

from streamflow import (
    connect,
    jobs,
    partitions,
    pipelines,
    registry,
    results,
    signals,
    steps,
    streams,
)
from streamflow import events as lifecycle
from streamflow.dag import graph as graphs
from streamflow.dag.store import TaskStore
from streamflow.dag.tasks import TaskState, TaskStatus
from streamflow.deadletters import DeadLetterEntry, DeadLetters, ReplayResult
from streamflow.errors import ConfigError, NoCoordinatorWarning
from streamflow.functions import BUILTINS
from streamflow.jobs import JobStatus
from streamflow.keys import NAME_PATTERN, Keys, validate_name
from streamflow.middleware import Middleware, Publish, PublishNext, compose_publish, overrides
from streamflow.protocol import JobResult as JobRecord
from streamflow.protocol import (
    LifecycleEvent,
    check_headers,
    check_publish_fields,
    new_message_id,
    now_ms,
)
from streamflow.publishing import DEFAULT_DEDUP_WINDOW, Publisher, When
from streamflow.scripts import Scripts

#: How long :meth:`Client.call` keeps a job's outcome by default.
CALL_KEEP = timedelta(minutes=5)

#: Seconds between reads of the cancel reports by ``cancel(wait=True)`` when no event comes.
CANCEL_RECHECK = 0.1

_P = ParamSpec("_P")
_T = TypeVar("_T")


@dataclass(slots=True)
class CancelResult:
    """What a cancel did, as far as the workers reported.

    Attributes:
        signal_id: The id of the cancel signal.
        stopped: (consumer, message id) of each handler stopped or message refused.
        running_on: Live workers still running something matching (or not yet reporting).
        complete: With ``wait``: something was stopped and nothing matching still runs.
    """

    signal_id: str
    stopped: list[tuple[str, str]] = field(default_factory=list)
    running_on: list[str] = field(default_factory=list)
    complete: bool = False


def _public(
    what: str,
) -> Callable[[Callable[_P, Awaitable[_T]]], Callable[_P, Coroutine[Any, Any, _T]]]:
    """A public coroutine method whose Redis failures are documented errors.

    See :func:`streamflow.connect.public_errors`: an outage raises :class:`RedisUnavailable`,
    another refusal :class:`RedisCommandError`, never a redis-py exception.
    """

    def wrap(method: Callable[_P, Awaitable[_T]]) -> Callable[_P, Coroutine[Any, Any, _T]]:
        @functools.wraps(method)
        async def public(*args: _P.args, **kwargs: _P.kwargs) -> _T:
            with connect.public_errors(what):
                return await method(*args, **kwargs)

        return public

    return wrap


class Client:
    """Publishes jobs to roles from async code, cancels them, and manages dead letters.

    Publishing is never retried behind your back: a retried XADD whose first reply was lost
    would publish twice. On an outage (connection lost, Redis full, read-only, loading, a
    cluster moving slots) every method raises :class:`RedisUnavailable`, on any other refusal
    :class:`RedisCommandError`, never a redis-py exception; pass a ``dedup_key`` to make a
    retry of your own safe.

    Args:
        redis: An asyncio Redis client, e.g. from :meth:`from_url`.
        namespace: The key namespace shared with the workers.
        dedup_window: How long a dedup key is remembered.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        namespace: str = "sf",
        dedup_window: timedelta = DEFAULT_DEDUP_WINDOW,
    ) -> None:
        self.redis = redis
        self.keys = Keys(namespace)
        self._scripts = Scripts(redis)
        self._tasks = TaskStore(redis, self.keys, self._scripts)
        self._layouts = partitions.Layouts(redis, self.keys)
        self._dead = DeadLetters(redis, self.keys, self._scripts, self._layouts)
        # A cluster sends each command to its slot's node: no one connection serves them all.
        self._lane = None if connect.is_cluster(redis) else pipelines.AutoPipeline(redis)
        self._pub = Publisher(
            redis,
            self.keys,
            dedup_window,
            self._layouts,
            dedup_script=self._scripts.publish_dedup,
            many_script=self._scripts.publish_many,
            lane=self._lane,
        )
        self._middleware: list[Middleware] = []
        # The publish middleware composed once; None: publish() runs as without middleware.
        self._publish_chain: PublishNext | None = None

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        namespace: str = "sf",
        socket_timeout: float = 5.0,
        tls_ca_file: connect.TLSPath | None = None,
        tls_cert_file: connect.TLSPath | None = None,
        tls_key_file: connect.TLSPath | None = None,
        **kwargs: Any,
    ) -> Self:
        """A client connected to ``url`` (``redis[s]://``, ``unix://`` or ``redis+cluster://``).

        Args:
            url: The Redis URL.
            namespace: The key namespace shared with the workers.
            socket_timeout: Seconds a command may wait for Redis before it fails.
            tls_ca_file: ``rediss://``: the CA certificates that signed the server's (PEM).
            tls_cert_file: ``rediss://``: a client certificate (PEM).
            tls_key_file: ``rediss://``: the client certificate's unencrypted key (PEM).
            **kwargs: More options for the client (``dedup_window``).

        Raises:
            ConfigError: The URL is invalid or the TLS files do not fit it.
        """
        redis = connect.connect(
            url,
            socket_timeout=socket_timeout,
            name="streamflow-client",
            tls_ca_file=tls_ca_file,
            tls_cert_file=tls_cert_file,
            tls_key_file=tls_key_file,
        )
        return cls(redis, namespace=namespace, **kwargs)

    async def publish(
        self,
        role: str,
        payload: Any = None,
        *,
        key: str | None = None,
        message_id: str | None = None,
        dedup_key: str | None = None,
        deadline: datetime | timedelta | None = None,
        delay: When = None,
        task_id: str | None = None,
        node_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        strict: bool = False,
        keep_result: timedelta | float | None = None,
    ) -> str:
        """Publish one job and return its message id.

        Args:
            role: The role that handles it.
            payload: Any JSON-serializable value or a pydantic model.
            key: For a partitioned role: jobs with the same key go to the same partition, in
                publishing order. Without it, a partition is picked round-robin (or by the
                dedup key, when given). Ignored for a role with one partition.
            message_id: The message id; a random one by default. For a chosen id a cancel
                in force (a pre-emptive one) is looked up, in the same round trip as the
                publish (one more with a dedup key or a delay, or on a cluster), and a
                :class:`~streamflow.errors.CancelledIdWarning` says that workers will
                refuse the job.
            dedup_key: When given, publishing again with the same key within the dedup window
                publishes nothing and returns the first message's id. On a partitioned role
                the dedup key is remembered per partition: repeat the same ``key`` with it.
            deadline: When the job must not start any more (absolute, or relative to now).
            delay: Start no earlier than this: seconds or a timedelta from now, or a datetime.
                The job waits in the role's delayed schedule, not in a worker.
            task_id: The DAG task it belongs to.
            node_id: The DAG node it belongs to.
            headers: Metadata for the handler (``ctx.headers``): string names to string
                values, such as a ``traceparent`` or a correlation id; bounded (see
                docs/protocol.md). Follow-up jobs the handler publishes inherit them.
            strict: Refuse a role that no worker ever served (see below) instead of warning.
            keep_result: Keep the job's outcome this long (seconds or a timedelta, at most
                30 days) for :meth:`result` and :meth:`job`, whatever its role says.

        A role that no worker serving it ever started in the namespace (a misspelt role, or
        workers not deployed yet) gets a :class:`~streamflow.errors.UnknownRoleWarning` naming
        the known roles: the job waits until such a worker starts. Whether the role exists is
        read with its partitions, once per role and client (again a second later while it
        does not): no extra round trip per publish.

        Concurrent calls on one client share round trips: the client holds one connection
        for publishing (not on a cluster), and calls made while a publish is on its way go
        out together as the next pipeline, each getting its own reply or error. A call
        cancelled while it waits is not sent.

        Raises:
            ConfigError: ``strict`` and no worker ever served the role.
            RedisUnavailable: Redis could not be reached or refused for now (full, read-only,
                loading, failing over); the job may or may not be published.
            RedisCommandError: Redis refused for good (e.g. ``NOPERM`` under an ACL).
            PayloadError: The payload cannot be encoded as JSON.
            InvalidNameError: A role, task or node name is invalid.
            ValueError: The message id, dedup key, deadline or headers are out of the protocol's
                bounds.
        """
        if self._publish_chain is not None:
            options = {
                "key": key,
                "message_id": message_id,
                "dedup_key": dedup_key,
                "deadline": deadline,
                "delay": delay,
                "task_id": task_id,
                "node_id": node_id,
                "strict": strict,
                "keep_result": keep_result,
            }
            message = Publish(role, payload, dict(headers or {}), options)
            return await self._publish_chain(message)
        try:
            # Headers and kept outcomes take the full path (plain() carries neither).
            simple = dedup_key is None and delay is None and headers is None and keep_result is None
            if simple and self._lane is not None:
                plain = self._pub.plain(
                    role, payload, key, message_id, deadline, task_id, node_id, strict
                )
                if plain is not None:  # one round trip, shared with concurrent publishes
                    return self._pub.check_plain(plain, await self._lane.call(plain.commands))
            return await steps.run(
                self._pub.publish(
                    role,
                    payload,
                    key=key,
                    message_id=message_id,
                    dedup_key=dedup_key,
                    deadline=deadline,
                    delay=delay,
                    task_id=task_id,
                    node_id=node_id,
                    headers=headers,
                    strict=strict,
                    keep_result=keep_result,
                )
            )
        except Exception:
            # Translated here, not in a with block around the call: that costs every publish.
            with connect.public_errors(f"publishing to role {role!r}"):
                raise

    async def _publish_message(self, message: Publish) -> str:
        """The end of the publish chain: ``message`` by the full path (no shared pipeline)."""
        with connect.public_errors(f"publishing to role {message.role!r}"):
            return await steps.run(
                self._pub.publish(
                    message.role,
                    message.payload,
                    headers=message.headers or None,
                    **message.options,
                )
            )

    def add_middleware(self, *middleware: Middleware) -> None:
        """Run ``middleware`` around every :meth:`publish`, the first added outermost.

        Only :meth:`publish` passes through it (not :meth:`publish_many` or :meth:`submit`),
        by the full path: one round trip of its own, not shared with concurrent publishes.
        See :mod:`streamflow.middleware`.

        Raises:
            ConfigError: An argument is not a :class:`~streamflow.middleware.Middleware`.
        """
        for each in middleware:
            if not isinstance(each, Middleware):
                raise ConfigError(f"{each!r} is not a streamflow.Middleware (an instance)")
        self._middleware.extend(middleware)
        if any(overrides(each, "publish") for each in self._middleware):
            self._publish_chain = compose_publish(self._middleware, self._publish_message)

    async def publish_many(
        self,
        role: str,
        payloads: Iterable[Any],
        *,
        keys: Iterable[str] | None = None,
        chunk_size: int = 1000,
        headers: Mapping[str, str] | None = None,
        strict: bool = False,
    ) -> list[str]:
        """Publish many jobs to one role, one script call per chunk; returns their message ids.

        Args:
            role: The role that handles them.
            payloads: The payloads.
            keys: For a partitioned role, one key per payload (see :meth:`publish`); without
                them the jobs are spread round-robin over the partitions.
            chunk_size: Jobs per script call.
            headers: Headers every job carries (see :meth:`publish`).
            strict: Refuse a role that no worker ever served instead of warning (see
                :meth:`publish`).

        Raises:
            RedisUnavailable: Redis could not be reached or refused for now; some chunks may
                have been published (each chunk holds jobs of one partition, in order): retry
                with dedup keys.
            RedisCommandError: Redis refused for good (e.g. ``NOPERM`` under an ACL).
            ValueError: ``keys`` and ``payloads`` differ in length.
        """
        with connect.public_errors(f"publishing to role {role!r}"):
            return await steps.run(
                self._pub.publish_many(
                    role,
                    payloads,
                    keys=keys,
                    chunk_size=chunk_size,
                    strict=strict,
                    headers=headers,
                )
            )

    # -- dead letters -----------------------------------------------------------------------

    @_public("listing dead letters")
    async def dead_letters(
        self, role: str, *, count: int = 100, after: str = "-"
    ) -> list[DeadLetterEntry]:
        """The oldest ``count`` dead letters of ``role`` after id ``after`` (exclusive).

        A partitioned role's dead letters are listed partition by partition, with ids
        ``<partition>:<entry id>``.
        """
        return await self._dead.page(role, count=count, after=after)

    @_public("reading a dead letter")
    async def dead_letter(self, role: str, dead_id: str) -> DeadLetterEntry | None:
        """One dead letter by its id, or None (also for a partition the role does not have)."""
        return await self._dead.get(role, dead_id)

    @_public("counting dead letters")
    async def dead_letter_count(self, role: str) -> int:
        """How many dead letters ``role`` has (in all its partitions)."""
        return await self._dead.count(role)

    @_public("replaying dead letters")
    async def replay(self, role: str, dead_ids: Sequence[str] | None = None) -> ReplayResult:
        """Send dead letters back to the role's stream with their attempts reset.

        Each dead letter is sent back exactly once, even when two replays run at the same time:
        the one that deletes it from the dead-letter stream is the one that publishes it.

        Args:
            role: The role.
            dead_ids: The dead letters to replay; all of them when None.
        """
        return await self._dead.replay(role, dead_ids)

    @_public("purging dead letters")
    async def purge_dead_letters(self, role: str) -> int:
        """Delete every dead letter of ``role``; returns how many there were."""
        return await self._dead.purge(role)

    # -- cancel -----------------------------------------------------------------------------

    @_public("cancelling")
    async def cancel(
        self,
        target_id: str,
        *,
        target: Literal["task", "message", "any"] = "any",
        reason: str = "cancelled",
        requested_by: str = "",
        wait: bool = False,
        timeout: float = 30.0,  # noqa: ASYNC109 - part of the public API, as in httpx
        preemptive: bool = False,
    ) -> CancelResult:
        """Cancel a task's messages or one message, wherever they are.

        Running handlers see ``ctx.cancel`` set at once and are hard-cancelled after their
        role's grace; queued, delayed or later-adopted messages are never started. Either way
        they are acknowledged with outcome ``cancelled``.

        Args:
            target_id: A task id or a message id.
            target: ``task``, ``message``, or ``any`` (either).
            reason: Shown to handlers as ``ctx.cancel.reason`` and in logs.
            requested_by: Who asked, for the logs.
            wait: Return only when something matching was stopped and no live worker still
                runs a matching handler (or when ``timeout`` passes).
            timeout: Seconds to wait at most.
            preemptive: Cancel the id even if it names nothing yet: a task submitted or a
                message published under it within 7 days (the marker's life) is refused at
                once. Without it, an id that names no known task and no queued, delayed or
                running message is refused (see :func:`streamflow.signals.check_target`).

        Raises:
            UnknownTargetError: The id names nothing to cancel and ``preemptive`` is False.
        """
        check_publish_fields(target_id, None, None)
        if not preemptive:
            await signals.check_target(self.redis, self.keys, target, target_id)
        sig = await signals.send_cancel(
            self.redis,
            self._scripts,
            self.keys,
            target=target,
            target_id=target_id,
            reason=reason,
            requested_by=requested_by,
        )
        result = CancelResult(sig.id)
        if not wait:
            return result
        with anyio.move_on_after(timeout):
            # The workers' reports are the truth; a ``cancelled`` event says when to read them
            # again. Workers that stopped nothing report without an event: read at least every
            # CANCEL_RECHECK seconds too.
            cancelled = {"cancelled"}
            async with lifecycle.watching(self.redis, self.keys, types=cancelled) as news:
                while not await self._cancel_done(result):
                    await news.wait(CANCEL_RECHECK)
        return result

    # -- lifecycle events -------------------------------------------------------------------

    async def events(
        self,
        *,
        roles: Iterable[str] | None = None,
        message_id: str | None = None,
        task_id: str | None = None,
        types: Iterable[str] | None = None,
        since_ms: int | None = None,
    ) -> AsyncIterator[LifecycleEvent]:
        """Follow the namespace's lifecycle events (see :mod:`streamflow.events`), for ever.

        Jobs' ``started``, ``progress``, ``retrying``, ``succeeded``, ``failed``,
        ``dead_lettered`` and ``cancelled``, and tasks' and nodes' state changes (``task``,
        ``node``), as :class:`~streamflow.protocol.LifecycleEvent` models. Any number of
        subscribers may follow at once, each with its own position. Best effort: the state in
        Redis is the truth, and an event may be missing (a worker died before writing it).

        Example:
            ```python
            async for event in client.events(message_id=job_id):
                print(event.type, event.progress)
                if event.type in ("succeeded", "failed", "dead_lettered", "cancelled"):
                    break
            ```

        Args:
            roles: Only events of these roles.
            message_id: Only events of this job.
            task_id: Only events of this task, its nodes and their jobs.
            types: Only events of these types.
            since_ms: Replay the events written since this time (ms since the epoch, by the
                Redis server's clock) first, as far back as the capped stream holds them (at
                least its last 2,000 entries, of up to 100 events each); None: only events
                written from now on.
        """
        role_set = None if roles is None else {validate_name(r, "role") for r in roles}
        type_set = None if types is None else set(types)
        with connect.public_errors("following lifecycle events"):
            async for event in lifecycle.follow(
                self.redis,
                self.keys,
                roles=role_set,
                message_id=message_id,
                task_id=task_id,
                types=type_set,
                since_ms=since_ms,
            ):
                yield event

    # -- tasks --------------------------------------------------------------------------------

    @_public("submitting a task")
    async def submit(
        self,
        graph: graphs.Graph | graphs.GraphSpec | dict[str, Any],
        *,
        params: dict[str, Any] | None = None,
        task_id: str | None = None,
        roles: Iterable[str] | None = None,
        functions: Iterable[str] | None = None,
        registration_wait: float = 5.0,
        headers: Mapping[str, str] | None = None,
    ) -> str:
        """Submit a DAG task; returns its id.

        The graph is checked first and nothing is written for an invalid one. Its roles must be
        served by a worker (one that ever started in this namespace) and its functions provided
        by a coordinator, unless ``roles`` and ``functions`` say which exist. A graph whose
        only problems are roles or functions not registered yet (a worker or coordinator
        still starting) is checked again every 0.2 s for up to ``registration_wait`` seconds
        before it is refused.

        Args:
            graph: A :class:`~streamflow.Graph`, a parsed spec, or a JSON-like dict.
            params: Task parameters, updating the graph's own ``params``.
            task_id: The task's id (default: a fresh random one).
            roles: The roles to check the graph against, instead of those registered.
            functions: The coordinator functions to check against, instead of those registered.
            registration_wait: Seconds to wait for unregistered roles and functions to appear.
            headers: Headers every node job of the task carries (``ctx.headers``), added to
                the graph's own ``headers``.

        Raises:
            GraphError: The graph is invalid; every problem is listed.
            ValueError: The task id is taken or invalid, or the headers out of bounds.

        Warns:
            CancelledIdWarning: A cancel of ``task_id`` is in force (a pre-emptive one): the
                task is submitted, and its nodes are refused as cancelled.
            NoCoordinatorWarning: No coordinator is running: the task stays queued until one
                starts.
        """
        spec = graphs.parse(graph)
        if params:
            spec = spec.model_copy(update={"params": {**spec.params, **params}})
        if headers:
            merged = check_headers({**(spec.headers or {}), **headers})
            spec = spec.model_copy(update={"headers": merged})
        fixed = (
            None if roles is None else set(roles),
            None if functions is None else set(functions),
        )
        spec = await self._validated(spec, fixed, registration_wait)
        if not await registry.live_coordinator(self.redis, self.keys):
            warnings.warn(
                f"no coordinator is running in namespace {self.keys.namespace!r}: the task "
                "stays queued until one starts (streamflow coordinator)",
                NoCoordinatorWarning,
                stacklevel=2,
            )
        if task_id is not None:
            validate_name(task_id, "task id")
            await steps.run(self._pub.warn_if_cancelled("task", task_id))
        task_id = validate_name(task_id or new_message_id(), "task id")
        await self._tasks.create(spec, TaskState.new(task_id, spec, now_ms()))
        return task_id

    @_public("reading a task")
    async def task(self, task_id: str) -> TaskState | None:
        """A task's state (with every node's), or None if unknown or expired."""
        return await self._tasks.state(validate_name(task_id, "task id"))

    @_public("listing tasks")
    async def tasks(self, *, state: TaskStatus | None = None, limit: int = 100) -> list[TaskState]:
        """The newest tasks first, optionally only those in ``state``."""
        return await self._tasks.find(state=state, limit=limit)

    @_public("reading a result")
    async def result(
        self,
        message_id: str,
        node: str | None = None,
        *,
        role: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - public API, as in httpx
    ) -> Any:
        """A job's result, waiting for it; or, for a task's id, the task's items by node.

        A job's outcome is there when its role keeps results (``keep_result=``) or its
        publisher asked (``publish(..., keep_result=...)``, :meth:`call`). It is read with a
        plain ``GET`` of the job's result key (docs/protocol.md), in every partition of its
        role (of every role workers registered, without ``role``).

        Args:
            message_id: The job's message id; or a task's id (then the call is
                :meth:`task_result`, which ``node`` and the task's own state select).
            node: For a task: only this node's items.
            role: The job's role: the lookup reads that role's partitions only.
            timeout: Seconds to wait for the outcome at most; None waits for ever.

        Returns:
            The handler's return value, as JSON decodes it.

        Raises:
            JobDeadLetteredError: The job was dead-lettered (its ``reason`` and ``detail``
                say why; :class:`JobExpiredError` when its deadline had passed).
            JobCancelledError: The job was cancelled.
            ResultTimeoutError: No outcome within ``timeout`` (still running, or not kept).
        """
        if node is not None or await self._is_task(message_id):
            return await self.task_result(message_id, node)
        return await self._job_result(message_id, role, timeout)

    async def _is_task(self, task_id: str) -> bool:
        """Whether a task with this id is known (its state is kept)."""
        if NAME_PATTERN.fullmatch(task_id) is None:
            return False
        # HGET of the version (every task has one): what a publisher's ACL rules allow.
        return await self.redis.hget(self.keys.task_state(task_id), "v") is not None

    async def _job_result(
        self,
        message_id: str,
        role: str | None,
        timeout: float | None,  # noqa: ASYNC109 - applied by results.wait_kept
    ) -> Any:
        pub = self._pub
        keys = await steps.run(
            results.result_keys(self.redis, pub.keys, pub.layouts, message_id, role)
        )

        async def read() -> JobRecord | None:
            return await steps.run(results.read_kept(self.redis, keys))

        return results.outcome(await results.wait_kept(read, message_id, timeout))

    @_public("calling a role")
    async def call(
        self,
        role: str,
        payload: Any = None,
        *,
        timeout: float,  # noqa: ASYNC109 - public API, as in httpx
        keep_result: timedelta | float = CALL_KEEP,
        **options: Any,
    ) -> Any:
        """Publish a job and wait for its handler's return value (request/reply).

        Args:
            role: The role that handles it.
            payload: Its payload.
            timeout: Seconds to wait for the result.
            keep_result: How long its outcome is kept (the caller reads it at once; the
                default, 5 minutes, covers a slow reader).
            **options: More :meth:`publish` options (``key``, ``deadline``, ``message_id``...).

        Raises:
            JobDeadLetteredError: It failed for good (attempts used up, fatal, invalid...).
            JobCancelledError: It was cancelled.
            ResultTimeoutError: No result within ``timeout``: the job may still run; its
                id is the error's ``message_id``.
        """
        message_id = await self.publish(role, payload, keep_result=keep_result, **options)
        return await self._job_result(message_id, role, timeout)

    @_public("reading a job's status")
    async def job(self, message_id: str, *, role: str | None = None) -> JobStatus:
        """Where a job is now: queued, delayed, running, retrying, ended, or unknown.

        Derived from what Redis holds (see :mod:`streamflow.jobs`): its kept outcome, the role
        streams and pending lists, the delayed schedules, the dead letters and cancel markers.
        Without a kept outcome, an acknowledged job leaves nothing behind: it is ``unknown``.

        Args:
            message_id: The job's message id.
            role: Its role: only that role's keys are read.
        """
        return await jobs.status(self.redis, self.keys, self._layouts, message_id, role=role)

    @_public("reading a task's result")
    async def task_result(self, task_id: str, node: str | None = None) -> dict[str, list[Any]]:
        """The items each node produced (by default the nodes without children), by node id.

        Raises:
            LookupError: The task is unknown or a batch expired.
        """
        spec = await self._tasks.spec(validate_name(task_id, "task id"))
        if spec is None:
            raise LookupError(f"unknown task {task_id!r}")
        if node is not None:
            if node not in {n.id for n in spec.nodes}:
                raise LookupError(f"task {task_id!r} has no node {node!r}")
            names = [node]
        else:
            names = [n.id for n in spec.nodes if not spec.children(n.id)]
        return {name: await self._tasks.output(task_id, name) for name in names}

    @_public("waiting for a task")
    async def wait(
        self,
        task_id: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - public API, as in httpx
        poll: float = 0.1,
    ) -> TaskState:
        """Wait until a task finishes; returns its final state.

        Raises:
            LookupError: The task is unknown.
            TimeoutError: It did not finish within ``timeout`` seconds.
        """
        validate_name(task_id, "task id")
        with anyio.fail_after(timeout):
            while True:
                # The task's own state only (one field): its nodes are read once it has ended.
                own = await self._tasks.own_state(task_id)
                if own is not None and own.terminal:
                    task = await self._tasks.state(task_id)
                    if task is not None:
                        return task
                if own is None:
                    raise LookupError(f"unknown task {task_id!r}")
                await anyio.sleep(poll)  # the state lives in Redis: poll it

    async def _validated(
        self,
        spec: graphs.GraphSpec,
        fixed: tuple[set[str] | None, set[str] | None],
        wait: float,
    ) -> graphs.GraphSpec:
        """The graph checked against the registered (or given) roles and functions.

        While its only problems are names not registered yet, wait up to ``wait`` seconds.
        """
        deadline = anyio.current_time() + wait
        while True:
            roles, functions = await self._registered(*fixed)
            try:
                return graphs.validated(spec, roles=roles, functions=functions)
            except graphs.GraphError:
                named_roles = {n.role for n in spec.nodes if n.role} | roles
                named_functions = {n.function for n in spec.nodes if n.function} | functions
                names_only = not graphs.check(spec, roles=named_roles, functions=named_functions)
                if not names_only or anyio.current_time() >= deadline:
                    raise
            await anyio.sleep(0.2)  # registrations live in Redis: poll them

    async def _registered(
        self, roles: set[str] | None, functions: set[str] | None
    ) -> tuple[set[str], set[str]]:
        """The given roles and functions, or those workers and coordinators registered."""
        if roles is None:
            found = await self.redis.smembers(self.keys.known_roles())
            roles = {streams.text(r) for r in found}
        if functions is None:
            found = await self.redis.smembers(self.keys.known_functions())
            functions = {*BUILTINS, *(streams.text(f) for f in found)}
        return roles, functions

    async def _cancel_done(self, result: CancelResult) -> bool:
        reports = await signals.read_reports(self.redis, self.keys, result.signal_id)
        live = await signals.live_consumers(self.redis, self.keys)
        result.stopped = [(c, m) for c, r in sorted(reports.items()) for m in r.stopped]
        result.running_on = sorted(c for c in live if c not in reports or reports[c].running)
        result.complete = bool(result.stopped) and not result.running_on
        return result.complete

    async def aclose(self) -> None:
        """Close the connections."""
        if self._lane is not None:
            await self._lane.aclose()
        await self.redis.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class SyncClient:
    """The blocking twin of :class:`Client`'s publishing, for services that are not async.

    Args:
        url: A ``redis://``, ``rediss://`` or ``unix://`` URL (not a cluster or Sentinel one).
        namespace: The key namespace shared with the workers.
        dedup_window: How long a dedup key is remembered.
        tls_ca_file: ``rediss://``: the CA certificates that signed the server's (PEM).
        tls_cert_file: ``rediss://``: a client certificate (PEM).
        tls_key_file: ``rediss://``: the client certificate's unencrypted key (PEM).
    """

    def __init__(
        self,
        url: str,
        *,
        namespace: str = "sf",
        dedup_window: timedelta = DEFAULT_DEDUP_WINDOW,
        tls_ca_file: connect.TLSPath | None = None,
        tls_cert_file: connect.TLSPath | None = None,
        tls_key_file: connect.TLSPath | None = None,
    ) -> None:
        self.redis = connect.connect_sync(
            url, tls_ca_file=tls_ca_file, tls_cert_file=tls_cert_file, tls_key_file=tls_key_file
        )
        self._lane = pipelines.HeldConnection(self.redis)
        self._pub = Publisher(
            self.redis,
            Keys(namespace),
            dedup_window,
            partitions.LayoutCache(),
            dedup_script=self.redis.register_script(Scripts.source("publish_dedup.lua")),
            many_script=self.redis.register_script(Scripts.source("publish_many.lua")),
            lane=self._lane,
        )

    def publish(
        self,
        role: str,
        payload: Any = None,
        *,
        key: str | None = None,
        message_id: str | None = None,
        dedup_key: str | None = None,
        deadline: datetime | timedelta | None = None,
        delay: When = None,
        task_id: str | None = None,
        node_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        strict: bool = False,
        keep_result: timedelta | float | None = None,
    ) -> str:
        """Publish one job and return its message id (see :meth:`Client.publish`)."""
        try:
            # Headers and kept outcomes take the full path (plain() carries neither).
            if dedup_key is None and delay is None and headers is None and keep_result is None:
                plain = self._pub.plain(
                    role, payload, key, message_id, deadline, task_id, node_id, strict
                )
                if plain is not None:  # one round trip on the held connection
                    return self._pub.check_plain(plain, self._lane.call(plain.commands))
            return steps.run_blocking(
                self._pub.publish(
                    role,
                    payload,
                    key=key,
                    message_id=message_id,
                    dedup_key=dedup_key,
                    deadline=deadline,
                    delay=delay,
                    task_id=task_id,
                    node_id=node_id,
                    headers=headers,
                    strict=strict,
                    keep_result=keep_result,
                )
            )
        except Exception:
            with connect.public_errors(f"publishing to role {role!r}"):
                raise

    def result(
        self,
        message_id: str,
        *,
        role: str | None = None,
        timeout: float | None = None,
    ) -> Any:
        """A job's kept result, waiting for it (see :meth:`Client.result`; jobs only)."""
        with connect.public_errors(f"reading the result of job {message_id!r}"):
            keys = steps.run_blocking(
                results.result_keys(self.redis, self._pub.keys, self._pub.layouts, message_id, role)
            )
            record = results.wait_kept_blocking(
                lambda: steps.run_blocking(results.read_kept(self.redis, keys)),
                message_id,
                timeout,
            )
        return results.outcome(record)

    def call(
        self,
        role: str,
        payload: Any = None,
        *,
        timeout: float,
        keep_result: timedelta | float = CALL_KEEP,
        **options: Any,
    ) -> Any:
        """Publish a job and wait for its result (see :meth:`Client.call`)."""
        message_id = self.publish(role, payload, keep_result=keep_result, **options)
        return self.result(message_id, role=role, timeout=timeout)

    def publish_many(
        self,
        role: str,
        payloads: Iterable[Any],
        *,
        keys: Iterable[str] | None = None,
        chunk_size: int = 1000,
        headers: Mapping[str, str] | None = None,
        strict: bool = False,
    ) -> list[str]:
        """Publish many jobs to one role; returns their ids (see :meth:`Client.publish_many`)."""
        with connect.public_errors(f"publishing to role {role!r}"):
            return steps.run_blocking(
                self._pub.publish_many(
                    role,
                    payloads,
                    keys=keys,
                    chunk_size=chunk_size,
                    strict=strict,
                    headers=headers,
                )
            )

    def close(self) -> None:
        """Close the connections."""
        self._lane.close()
        self.redis.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
