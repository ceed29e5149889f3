"""The :class:`~streamflow.client.Client`'s DAG task, cancel and dead-letter methods, as mixins.

:class:`~streamflow.client.Client` publishes, reads results and follows events; it inherits
from :class:`TaskMethods` (submit, read, list and wait for tasks, read their results) and
:class:`ControlMethods` (cancel, and list, show, replay and purge dead letters), which use the
client's connection, keys and stores. Every public method goes through :func:`public_method`:
a Redis failure is a documented error.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, ParamSpec, TypeVar

import anyio
from redis.asyncio import Redis

from streamflow import connect, flow, registry, signals, steps, streams
from streamflow import events as lifecycle
from streamflow.dag import graph as graphs
from streamflow.dag.store import TaskStore
from streamflow.dag.submissions import SubmissionResult, decode_result
from streamflow.dag.tasks import TaskState, TaskStatus
from streamflow.deadletters import DeadLetterEntry, DeadLetters, ReplayResult
from streamflow.errors import NoCoordinatorWarning
from streamflow.functions import BUILTINS
from streamflow.keys import NAME_PATTERN, Keys, validate_name
from streamflow.logs import BadKeys
from streamflow.middleware import Publish, PublishNext
from streamflow.protocol import check_headers, check_publish_fields, new_message_id, now_ms
from streamflow.publishing import Publisher
from streamflow.scripts import Scripts

#: Seconds between reads of the cancel reports by ``cancel(wait=True)`` when no event comes.
CANCEL_RECHECK = 0.1

_P = ParamSpec("_P")
_T = TypeVar("_T")

logger = logging.getLogger(__name__)


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


def public_method(
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


class ControlMethods:
    """Work already published: cancel it; list, show, replay and purge dead letters."""

    redis: Redis
    keys: Keys
    _scripts: Scripts
    _dead: DeadLetters

    # -- flow control -----------------------------------------------------------------------

    @public_method("pausing a role")
    async def pause(self, role: str, *, force: bool = False) -> bool:
        """Pause ``role``: workers start no new jobs of it until :meth:`resume`.

        Takes effect within one read cycle of each worker (about a second); running jobs
        finish, publishing goes on (jobs wait in the stream), and the pause outlives worker
        restarts. See docs/operations.md, "Pausing a role".

        Args:
            role: The role.
            force: Pause it even if nothing is known of it yet (no stream, never served).

        Returns:
            True if the role was running, False if it was paused already.

        Raises:
            UnknownRoleError: Nothing is known of ``role`` and ``force`` is False.
        """
        return await steps.run(flow.pause(self.redis, self.keys, role, force=force))

    @public_method("resuming a role")
    async def resume(self, role: str) -> bool:
        """Resume a paused ``role``; True if it was paused."""
        return await steps.run(flow.resume(self.redis, self.keys, role))

    @public_method("setting limits")
    async def limit(
        self,
        role: str,
        *,
        rate: str | None = None,
        concurrency: int | None = None,
        key_rate: str | None = None,
        key_concurrency: int | None = None,
        reset: bool = False,
    ) -> flow.Limits:
        """Set a role's limits at run time, over the ones its app declares; returns them.

        Workers apply a change within half a second. See docs/operations.md, "Rate and
        concurrency limits".

        Args:
            role: The role.
            rate: At most this many starts per period across all workers (``"10/s"``,
                ``"100/m"``, ``"5/2h"``), or ``"off"``; None leaves it as it is.
            concurrency: At most this many of its jobs held at once across all workers, 0 for
                no limit; None leaves it as it is.
            key_rate: Like ``rate``, for each limit key of the role on its own (jobs published
                with ``limit_key=``, see :mod:`streamflow.keylimits`).
            key_concurrency: Like ``concurrency``, for each limit key on its own.
            reset: Drop the run-time settings first: the declared limits apply again.

        Raises:
            ConfigError: A rate or a concurrency is not valid.
        """
        return await steps.run(
            flow.set_limits(
                self.redis,
                self.keys,
                role,
                rate=rate,
                concurrency=concurrency,
                key_rate=key_rate,
                key_concurrency=key_concurrency,
                reset=reset,
            )
        )

    @public_method("reading paused roles")
    async def paused(self, roles: Sequence[str]) -> dict[str, int]:
        """The roles of ``roles`` that are paused, each with when it was paused (ms)."""
        return await steps.run(flow.paused_since(self.redis, self.keys, roles))

    @public_method("listing dead letters")
    async def dead_letters(
        self, role: str, *, count: int = 100, after: str = "-"
    ) -> list[DeadLetterEntry]:
        """The oldest ``count`` dead letters of ``role`` after id ``after`` (exclusive).

        A partitioned role's dead letters are listed partition by partition, with ids
        ``<partition>:<entry id>``.
        """
        return await self._dead.page(role, count=count, after=after)

    @public_method("reading a dead letter")
    async def dead_letter(self, role: str, dead_id: str) -> DeadLetterEntry | None:
        """One dead letter by its id, or None (also for a partition the role does not have)."""
        return await self._dead.get(role, dead_id)

    @public_method("counting dead letters")
    async def dead_letter_count(self, role: str) -> int:
        """How many dead letters ``role`` has (in all its partitions)."""
        return await self._dead.count(role)

    @public_method("replaying dead letters")
    async def replay(self, role: str, dead_ids: Sequence[str] | None = None) -> ReplayResult:
        """Send dead letters back to the role's stream with their attempts reset.

        Each dead letter is sent back exactly once, even when two replays run at the same time:
        the one that deletes it from the dead-letter stream is the one that publishes it.

        Args:
            role: The role.
            dead_ids: The dead letters to replay; all of them when None.
        """
        return await self._dead.replay(role, dead_ids)

    @public_method("purging dead letters")
    async def purge_dead_letters(self, role: str) -> int:
        """Delete every dead letter of ``role``; returns how many there were."""
        return await self._dead.purge(role)

    # -- cancel -----------------------------------------------------------------------------

    @public_method("cancelling")
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

    async def _cancel_done(self, result: CancelResult) -> bool:
        reports = await signals.read_reports(self.redis, self.keys, result.signal_id)
        live = await signals.live_consumers(self.redis, self.keys)
        result.stopped = [(c, m) for c, r in sorted(reports.items()) for m in r.stopped]
        result.running_on = sorted(c for c in live if c not in reports or reports[c].running)
        result.complete = bool(result.stopped) and not result.running_on
        return result.complete


class TaskMethods:
    """DAG tasks: submit them, read and list their state, wait for them, read their items."""

    redis: Redis
    keys: Keys
    _tasks: TaskStore
    _pub: Publisher
    _bad_keys: BadKeys
    #: The client's publish middleware, composed; None without any (see ``Client``).
    _publish_chain: PublishNext | None

    @public_method("submitting a task")
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

        With a publish middleware (:meth:`~streamflow.Client.add_middleware`) the submit
        passes through it as one :class:`~streamflow.middleware.Publish` of kind ``"task"``
        (a tracing middleware's span then heads the task's trace).

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
        options: dict[str, Any] = {
            "task_id": task_id,
            "roles": roles,
            "functions": functions,
            "registration_wait": registration_wait,
        }
        if self._publish_chain is not None:
            # A submit passes through the publish middleware too (kind "task"): a tracing
            # middleware's span is then the parent of the task's dispatches.
            merged = {**(spec.headers or {}), **(headers or {})}
            return await self._publish_chain(Publish(spec.name, spec, merged, options, "task"))
        if headers:
            spec = spec.model_copy(update={"headers": {**(spec.headers or {}), **headers}})
        return await self._submit_spec(spec, **options)

    async def _submit_message(self, message: Publish) -> str:
        """The end of the publish chain for a task: submit ``message``'s graph and headers."""
        spec = graphs.parse(message.payload)
        spec = spec.model_copy(update={"headers": message.headers or None})
        return await self._submit_spec(spec, **message.options)

    async def _submit_spec(
        self,
        spec: graphs.GraphSpec,
        *,
        task_id: str | None,
        roles: Iterable[str] | None,
        functions: Iterable[str] | None,
        registration_wait: float,
    ) -> str:
        if spec.headers:
            spec = spec.model_copy(update={"headers": check_headers(spec.headers)})
        fixed = (
            None if roles is None else set(roles),
            None if functions is None else set(functions),
        )
        spec = await self._validated(spec, fixed, registration_wait)
        if not await self._coordinator_running():
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

    @public_method("reading a submission's outcome")
    async def submission(self, submission_id: str) -> SubmissionResult | None:
        """What became of a task submitted by XADD to the submissions stream, by its id.

        See :mod:`streamflow.dag.submissions`: ``accepted`` (the task ``submission_id`` runs) or
        ``rejected`` with every problem; None while no coordinator has taken it (or after
        :data:`~streamflow.dag.submissions.RESULT_TTL_MS`).

        Raises:
            InvalidNameError: The id is not a valid task id.
        """
        raw = await self.redis.get(self.keys.submission(submission_id))
        return None if raw is None else decode_result(raw)

    @public_method("reading a task")
    async def task(self, task_id: str) -> TaskState | None:
        """A task's state (with every node's), or None if unknown or expired."""
        return await self._tasks.state(validate_name(task_id, "task id"))

    @public_method("listing tasks")
    async def tasks(self, *, state: TaskStatus | None = None, limit: int = 100) -> list[TaskState]:
        """The newest tasks first, optionally only those in ``state``."""
        return await self._tasks.find(state=state, limit=limit)

    async def _is_task(self, task_id: str) -> bool:
        """Whether a task with this id is known (its state is kept)."""
        if NAME_PATTERN.fullmatch(task_id) is None:
            return False
        # HGET of the version (every task has one): what a publisher's ACL rules allow.
        return await self.redis.hget(self.keys.task_state(task_id), "v") is not None

    @public_method("reading a task's result")
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

    @public_method("waiting for a task")
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
            roles = await self._registry_set("known_roles", self.keys.known_roles())
        if functions is None:
            key = self.keys.known_functions()
            functions = {*BUILTINS, *await self._registry_set("known_functions", key)}
        return roles, functions

    async def _registry_set(self, kind: str, key: str) -> set[str]:
        """A registry set's members; empty (warned of and counted) if it holds another type."""
        found = await streams.set_members(self.redis, key)
        problem = "another type of key is there, read as empty; DEL it" if found is None else None
        self._bad_keys.seen(kind, key, problem)
        return found or set()

    async def _coordinator_running(self) -> bool:
        """Whether a coordinator is live; an unreadable registry lists none (counted)."""
        problems: list[str] = []

        def warn(message: str, *args: object) -> None:
            problems.append(message % args)

        found = await registry.coordinators(self.redis, self.keys, warn=warn)
        self._bad_keys.seen("coordinators", self.keys.coordinators(), "; ".join(problems) or None)
        return any(info.live() for info in found)
