"""Publishing from any Python service, DAG tasks, and dead-letter operations.

:class:`Client` (async) and :class:`SyncClient` publish jobs, both through
:mod:`streamflow.publishing` (written once, run on an asyncio or a blocking Redis client), and
read kept results; :class:`Client` also follows lifecycle events, and inherits its task, cancel
and dead-letter methods from :mod:`streamflow.client_ops` (submits and follows tasks, cancels,
and lists, shows, replays and purges dead letters through :mod:`streamflow.deadletters`).

Near 700 lines: most of it is the public methods' docstrings (the API reference is generated
from them), for two clients.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Self

from redis.asyncio import Redis

from streamflow import connect, flow, jobs, partitions, pipelines, results, steps
from streamflow import events as lifecycle
from streamflow.client_ops import ControlMethods, TaskMethods, public_method
from streamflow.dag.store import TaskStore
from streamflow.deadletters import DeadLetters
from streamflow.jobs import JobStatus
from streamflow.keylimits import with_limit_key
from streamflow.keys import Keys, validate_name
from streamflow.logs import BadKeys
from streamflow.middleware import (
    Middleware,
    Publish,
    PublishNext,
    check_all,
    compose_publish,
    many_messages,
    overrides,
    publish_blocking,
    publish_each,
)
from streamflow.publishing import DEFAULT_DEDUP_WINDOW, Publisher, When
from streamflow.records import JobResult as JobRecord
from streamflow.records import LifecycleEvent
from streamflow.scripts import Scripts

#: How long :meth:`Client.call` keeps a job's outcome by default.
CALL_KEEP = timedelta(minutes=5)


def _job_options(
    key: str | None,
    message_id: str | None,
    dedup_key: str | None,
    deadline: datetime | timedelta | None,
    delay: When,
    task_id: str | None,
    node_id: str | None,
    strict: bool,
    keep_result: timedelta | float | None,
    priority: int | None,
    headers: Mapping[str, str] | None,
    limit_key: str | None,
) -> tuple[dict[str, Any], Mapping[str, str] | None]:
    """A publish's keyword arguments (``Publish.options``) and headers, for both clients.

    The headers carry ``limit_key`` when one is given.
    """
    if limit_key is not None:
        headers = with_limit_key(headers, limit_key)
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
        "priority": priority,
    }
    return options, headers


class Client(TaskMethods, ControlMethods):
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
        self._bad_keys = BadKeys()
        # One warning and count per bad registry key, whether submit read or wrote it.
        self._tasks = TaskStore(redis, self.keys, self._scripts, bad_key=self._bad_keys.seen)
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
        priority: int | None = None,
        limit_key: str | None = None,
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
            priority: The job's priority level, for a role declared with ``priorities=N``:
                ``0`` (the default, lowest) to ``N - 1`` (highest, taken first; see
                docs/concepts.md#priorities). Its retries, delays and replays keep the level.
            limit_key: The key the role's per-key limits count it under (a customer id, say:
                1 to 128 letters, digits and ``_.:@+=/-``), sent as the
                ``streamflow-limit-key`` header (see :mod:`streamflow.keylimits`).

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
            ValueError: The message id, dedup key, deadline, headers or limit key are out of the
                protocol's bounds, or the priority is not one of the role's levels.
        """
        options, headers = _job_options(
            key,
            message_id,
            dedup_key,
            deadline,
            delay,
            task_id,
            node_id,
            strict,
            keep_result,
            priority,
            headers,
            limit_key,
        )
        if self._publish_chain is not None:
            message = Publish(role, payload, dict(headers or {}), options)
            return await self._publish_chain(message)
        try:
            lane = self._lane
            plain = None if lane is None else self._pub.plain_for(role, payload, options, headers)
            if lane is not None and plain is not None:  # one round trip, shared with others
                return self._pub.check_plain(plain, await lane.call(plain.commands))
            return await steps.run(self._pub.publish(role, payload, headers=headers, **options))
        except Exception:
            # Translated here, not in a with block around the call: that costs every publish.
            with connect.public_errors(f"publishing to role {role!r}"):
                raise

    async def _publish_message(self, message: Publish) -> str:
        """The end of the publish chain: ``message`` by the full path (no shared pipeline).

        A task (``kind`` ``"task"``, from :meth:`submit`) is submitted.
        """
        if message.kind == "task":
            return await self._submit_message(message)
        with connect.public_errors(f"publishing to role {message.role!r}"):
            return await steps.run(
                self._pub.publish(
                    message.role,
                    message.payload,
                    headers=message.headers or None,
                    **message.options,
                )
            )

    @property
    def bad_records(self) -> dict[str, int]:
        """Registry records read back from Redis and skipped, by kind.

        ``known_roles``, ``known_functions`` (the key holds another type: read as empty) and
        ``coordinators`` (that registry holds another type or malformed entries), each
        warned of and counted once until it reads again.
        """
        return dict(self._bad_keys.counts)

    def add_middleware(self, *middleware: Middleware) -> None:
        """Run ``middleware`` around every publish and submit, the first added outermost.

        :meth:`publish` then goes by the full path: one round trip of its own, not shared with
        concurrent publishes. Each job of :meth:`publish_many` passes through it on its own,
        and the jobs that reach its end are still sent together. :meth:`submit` passes
        through it as one :class:`~streamflow.middleware.Publish` of kind ``"task"``. See
        :mod:`streamflow.middleware`.

        Raises:
            ConfigError: An argument is not a :class:`~streamflow.middleware.Middleware`.
        """
        check_all(middleware)
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
        priorities: Iterable[int] | None = None,
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
            priorities: One priority level per payload (see :meth:`publish`); all are checked
                before anything is published. Without them every job is at level 0.

        With a publish middleware each job passes through it on its own (see
        :meth:`add_middleware`); those of a chunk that reach the end of the chain go in one
        call, and a job the middleware refused fails the call once its chunk is sent (the
        chunks after it are not).

        Raises:
            RedisUnavailable: Redis could not be reached or refused for now; some chunks may
                have been published (each chunk holds jobs of one partition, in order): retry
                with dedup keys.
            RedisCommandError: Redis refused for good (e.g. ``NOPERM`` under an ACL).
            ValueError: ``keys`` or ``priorities`` and ``payloads`` differ in length, or a
                priority is not one of the role's levels.
        """
        if self._publish_chain is not None:
            ids: list[str] = []
            for chunk in many_messages(
                role, payloads, keys, headers, strict, chunk_size, priorities
            ):
                ids += await publish_each(self._middleware, chunk, self._send_many)
            return ids
        with connect.public_errors(f"publishing to role {role!r}"):
            return await steps.run(
                self._pub.publish_many(
                    role,
                    payloads,
                    keys=keys,
                    chunk_size=chunk_size,
                    strict=strict,
                    headers=headers,
                    priorities=priorities,
                )
            )

    async def _send_many(self, messages: list[Publish]) -> list[str]:
        """The end of ``publish_many``'s chains: the messages that reached it, in one go."""
        with connect.public_errors(f"publishing to role {messages[0].role!r}"):
            return await steps.run(self._pub.publish_messages(messages, len(messages)))

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
        ``node``), as :class:`~streamflow.records.LifecycleEvent` models. Any number of
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
                least its last 500 entries, of up to 100 events each); None: only events
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

    @public_method("reading a result")
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

        news = results.EndEvents(self.redis, pub.keys, message_id)
        return results.outcome(await results.wait_kept(read, message_id, timeout, news))

    @public_method("calling a role")
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

    @public_method("reading a job's status")
    async def job(self, message_id: str, *, role: str | None = None) -> JobStatus:
        """Where a job is now: queued, delayed, running, retrying, parked, ended, or unknown.

        Derived from what Redis holds (see :mod:`streamflow.jobs`): its kept outcome, the role
        streams and pending lists, the delayed schedules, the parked lists of per-key limits
        (``parked``: waiting for its limit key), the dead letters and cancel markers.
        Without a kept outcome, an acknowledged job leaves nothing behind: it is ``unknown``.

        Args:
            message_id: The job's message id.
            role: Its role: only that role's keys are read.

        Raises:
            InvalidNameError: ``message_id`` is not a message id the protocol allows.
        """
        return await jobs.status(self.redis, self.keys, self._layouts, message_id, role=role)

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
        # The middleware overriding ``publish``; empty: publishes run as without middleware.
        self._middleware: tuple[Middleware, ...] = ()

    def add_middleware(self, *middleware: Middleware) -> None:
        """Run ``middleware`` around every publish (see :meth:`Client.add_middleware`).

        A blocking client has no event loop: it drives each middleware's ``publish`` itself,
        so it may await ``call_next`` and code that does not suspend (a tracing span, a
        header), not I/O (that raises ``RuntimeError``).

        Raises:
            ConfigError: An argument is not a :class:`~streamflow.middleware.Middleware`.
        """
        check_all(middleware)
        self._middleware += tuple(m for m in middleware if overrides(m, "publish"))

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
        priority: int | None = None,
        limit_key: str | None = None,
    ) -> str:
        """Publish one job and return its message id (see :meth:`Client.publish`)."""
        options, headers = _job_options(
            key,
            message_id,
            dedup_key,
            deadline,
            delay,
            task_id,
            node_id,
            strict,
            keep_result,
            priority,
            headers,
            limit_key,
        )
        if self._middleware:
            message = Publish(role, payload, dict(headers or {}), options)
            [message_id] = publish_blocking(self._middleware, [message], self._send_one)
            return message_id
        try:
            plain = self._pub.plain_for(role, payload, options, headers)
            if plain is not None:  # one round trip on the held connection
                return self._pub.check_plain(plain, self._lane.call(plain.commands))
            return steps.run_blocking(self._pub.publish(role, payload, headers=headers, **options))
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
        priorities: Iterable[int] | None = None,
    ) -> list[str]:
        """Publish many jobs to one role; returns their ids (see :meth:`Client.publish_many`)."""
        if self._middleware:
            ids: list[str] = []
            for chunk in many_messages(
                role, payloads, keys, headers, strict, chunk_size, priorities
            ):
                ids += publish_blocking(self._middleware, chunk, self._send_many)
            return ids
        with connect.public_errors(f"publishing to role {role!r}"):
            return steps.run_blocking(
                self._pub.publish_many(
                    role,
                    payloads,
                    keys=keys,
                    chunk_size=chunk_size,
                    strict=strict,
                    headers=headers,
                    priorities=priorities,
                )
            )

    def _send_one(self, messages: list[Publish]) -> list[str]:
        """The end of a publish's middleware chain: the message by the full path."""
        [message] = messages
        with connect.public_errors(f"publishing to role {message.role!r}"):
            publishing = self._pub.publish(
                message.role, message.payload, headers=message.headers or None, **message.options
            )
            return [steps.run_blocking(publishing)]

    def _send_many(self, messages: list[Publish]) -> list[str]:
        """The end of ``publish_many``'s chains: the messages that reached it, in one go."""
        with connect.public_errors(f"publishing to role {messages[0].role!r}"):
            return steps.run_blocking(self._pub.publish_messages(messages, len(messages)))

    def pause(self, role: str, *, force: bool = False) -> bool:
        """Pause ``role`` (see :meth:`Client.pause`); True if it was running."""
        with connect.public_errors(f"pausing role {role!r}"):
            return steps.run_blocking(flow.pause(self.redis, self._pub.keys, role, force=force))

    def resume(self, role: str) -> bool:
        """Resume a paused ``role``; True if it was paused."""
        with connect.public_errors(f"resuming role {role!r}"):
            return steps.run_blocking(flow.resume(self.redis, self._pub.keys, role))

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
