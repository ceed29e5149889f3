"""The runner: one delivery's way from entry to decision, decode -> preflight -> execute.

:meth:`Runner.process` decodes a delivery, checks it (cancelled? expired? too large? see
:mod:`streamflow.decisions`) and runs its handler; it returns the :class:`Decision` that
:mod:`streamflow.settle` applies. Entries delivered before (adopted, or resumed) are suspects:
their starts are counted so that a poison message is dead-lettered rather than adopted for
ever, and one that already failed after a rerun runs alone among suspects. An entry held past
its lease's unsafe age is confirmed before it starts, so that two workers never start it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from functools import partial
from types import FrameType
from typing import Any, cast

import anyio
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from streamflow import connect, decisions, nodes, streams
from streamflow.app import Role
from streamflow.context import Context
from streamflow.decisions import ACK, RELEASE, dead
from streamflow.delivery import Decision, Delivery
from streamflow.errors import InputError
from streamflow.events import EventLog
from streamflow.followups import FollowUps
from streamflow.keylimits import KeyLimiter
from streamflow.keys import Keys
from streamflow.leases import LeaseKeeper
from streamflow.lifecycle import NO_RESOURCES, Resources
from streamflow.logs import shown
from streamflow.middleware import CallNext, Chain, Middleware, chain, wraps
from streamflow.protocol import Job
from streamflow.scripts import Scripts
from streamflow.signals import CancelBook

logger = logging.getLogger(__name__)


def fencing_token(attempt: int, deliveries: int) -> int:
    """A delivery's fencing token: the attempt in the high 32 bits, the delivery count below.

    Both only rise while a message changes hands (see :attr:`Context.fencing_token`); the
    coordinator orders a task node's runs by the same pair.
    """
    return (attempt << 32) | (deliveries & 0xFFFFFFFF)


class Runner:
    """Takes a worker's deliveries from entry to decision.

    Args:
        redis: The client.
        scripts: The registered Lua scripts.
        keys: Key names.
        consumer: The worker's consumer name.
        leases: Confirms the leases of entries held long, and counts lost ones.
        book: The cancels known to the worker.
        stopping: Set when the worker stops: entries not started yet are handed back.
        flush: Sends the acknowledgements queued so far (before a suspect runs alone).
        concurrency: How many plain-function handlers run in threads at once.
        max_message_bytes: Larger entries are dead-lettered before parsing.
        resources: What the app's startup hooks stored; every Context carries them.
    """

    def __init__(
        self,
        redis: Redis,
        scripts: Scripts,
        keys: Keys,
        consumer: str,
        leases: LeaseKeeper,
        book: CancelBook,
        stopping: anyio.Event,
        flush: Callable[[], Awaitable[None]],
        *,
        concurrency: int,
        max_message_bytes: int,
        resources: Resources = NO_RESOURCES,
    ) -> None:
        self._redis = redis
        self._scripts = scripts
        self._keys = keys
        self._consumer = consumer
        self._leases = leases
        self._book = book
        self._stopping = stopping
        self._flush = flush
        self._max_bytes = max_message_bytes
        self._resources = resources
        self._threads = anyio.CapacityLimiter(concurrency)
        self._followups = FollowUps(redis, keys.namespace)
        self._suspects = anyio.Lock()
        self._confirming = anyio.Lock()
        self._confirm_backoff = connect.Backoff("confirming held leases")
        self._unsafe_after = leases.settings.unsafe_after
        # Each role's middleware chain around its handler (and around it under a job's own
        # timeout, in _timed); None: handlers are called directly.
        self._chains: dict[str, Chain] | None = None
        self._timed: dict[str, Chain] = {}
        #: Deliveries of entries delivered before (adopted, or resumed), by role.
        self.redeliveries: dict[str, int] = {}
        #: Where ``started`` and ``progress`` events go, or None (no events at all).
        self.events: EventLog | None = None
        #: The per-key limits' gate, asked before a job with a limit key starts.
        self.key_gate: KeyLimiter | None = None

    def use(self, middleware: Sequence[Middleware], roles: Iterable[Role]) -> None:
        """Compose each role's chain once: ``middleware`` around its handler, first outermost.

        Without middleware that overrides ``handle``, handlers are called directly (no cost).
        Follow-up publishes (``ctx.publish``) run the publish hooks of ``middleware``.
        """
        self._followups.use(middleware)
        if not wraps(middleware):
            self._chains, self._timed = None, {}
            return
        roles = list(roles)
        self._chains = {role.name: chain(middleware, self._innermost(role)) for role in roles}
        self._timed = {role.name: chain(middleware, self._timed_innermost(role)) for role in roles}

    def _innermost(self, role: Role) -> CallNext:
        """The end of a role's chain: its handler, under its timeout, in a thread if plain."""
        if role.is_async and not role.timeout:
            return cast(CallNext, role.handler)
        return partial(self._execute, role, timeout=role.timeout)

    def _timed_innermost(self, role: Role) -> CallNext:
        """The end of a role's chain for a job with its own timeout (a task node's)."""

        def call(ctx: Context, payload: Any) -> Awaitable[Any]:
            return self._execute(role, ctx, payload, ctx._job.timeout or role.timeout)

        return call

    async def before_start(self, delivery: Delivery) -> Decision | None:
        """Check a delivery held long or read while stopping; the decision if it must not start.

        Held so long (this process froze, or its event loop was blocked) that its lease may
        have expired and another worker adopted it: its lease is confirmed first, so that two
        workers never start it. Read but not started when the worker stops: handed back.
        """
        if not await self.still_ours(delivery):
            return decisions.LOST
        return RELEASE if self._stopping.is_set() else None

    async def _confirm_held(self, delivery: Delivery) -> None:
        """Renew every held entry until ``delivery``'s lease is confirmed or lost.

        One renewal round trip per stream for everything held (not one per entry), by one
        consumer at a time: the others find their entries confirmed by it.
        """
        async with self._confirming:
            while (
                time.monotonic() - delivery.confirmed_at > self._unsafe_after
                and not delivery.lost
                and not self._stopping.is_set()
            ):
                try:
                    await self._leases.renew_held()
                except connect.TRANSIENT_ERRORS as exc:
                    await self._confirm_backoff.failed(exc)
                else:
                    self._confirm_backoff.succeeded()

    def describe_stall(self, frame: FrameType | None) -> str:
        """What runs on the stalled loop: the handler whose run ``frame``'s stack holds.

        Called from the watchdog's thread while the loop is blocked, so it only reads.
        """
        while frame is not None and frame.f_code is not _RUN_CODE:
            frame = frame.f_back
        delivery = frame.f_locals.get("delivery") if frame is not None else None
        if not isinstance(delivery, Delivery):
            return "code outside any handler (streamflow, a library, or the garbage collector)"
        handler = delivery.role.handler
        name = f"{getattr(handler, '__module__', '?')}.{getattr(handler, '__qualname__', '?')}"
        job = delivery.job
        return (
            f"handler {name} (role {delivery.role.name!r}, message "
            f"{job.id if job else '?'}, entry {delivery.entry.id.decode()})"
        )

    def process(
        self, delivery: Delivery, scope: anyio.CancelScope
    ) -> Decision | Coroutine[Any, Any, Decision]:
        """Decode and check a delivery: its decision, or the coroutine that runs its handler.

        Not a coroutine itself: the hot path awaits the handler's runner directly, one coroutine
        fewer per message.
        """
        checked = decisions.preflight(delivery, self._book, self._max_bytes)
        if isinstance(checked, Decision):
            return checked
        job, payload = checked
        delivery.job = job
        if job.priority is not None:  # rare: only jobs published at a level above 0 carry one
            self._check_level(delivery, job.priority)
        # Each field of the job read once: a pydantic model's attribute costs ~40 ns to read
        # (three times a slot's), and from here the context's slots are read instead.
        entry, task_id, attempt = delivery.entry, job.task_id, job.attempt
        ctx = Context(
            job.id,
            entry.id.decode(),
            delivery.role.name,
            attempt,
            self._consumer,
            job.created_at_ms,
            job.deadline_ms,
            task_id,
            job.node_id,
            # fencing_token(), inline: a function call per message costs more than this.
            (attempt << 32) | (entry.deliveries & 0xFFFFFFFF),
            self._resources,
        )
        ctx._job = job  # for ctx.headers, read only when a handler asks
        ctx._followups = self._followups
        delivery.context = ctx
        gate = self.key_gate
        gated = gate is not None and job.headers is not None and gate.limits(job.role)
        if task_id is None and entry.deliveries == 1 and not gated:
            return self._run(delivery, scope, job, payload, ctx)  # the hot path
        return self._process_special(delivery, scope, job, payload, ctx)

    async def _process_special(
        self, delivery: Delivery, scope: anyio.CancelScope, job: Job, payload: Any, ctx: Context
    ) -> Decision:
        """Run a task node's job, a redelivered entry or one of a key-limited role."""
        gate = self.key_gate
        if gate is None:
            return await self._process_started(delivery, scope, job, payload, ctx)
        # First: a job its key holds back is parked before anything counts it as started.
        held_back = await gate.gate(delivery, job)
        if held_back is not None:
            return held_back
        try:
            return await self._process_started(delivery, scope, job, payload, ctx)
        finally:
            gate.finished(delivery)  # its key's slot is freed at the next sweep, soon

    async def _process_started(
        self, delivery: Delivery, scope: anyio.CancelScope, job: Job, payload: Any, ctx: Context
    ) -> Decision:
        if job.task_id is not None and nodes.is_node_job(job):
            failed = await self._start_node(delivery, job, ctx)
            if failed is not None:
                return failed
        if delivery.entry.deliveries > 1:
            # A suspect: delivered before, so its last worker may have died running it.
            role = delivery.role
            self.redeliveries[role.name] = self.redeliveries.get(role.name, 0) + 1
            return await self._run_suspect(delivery, scope, job, payload, ctx)
        if not await self.still_ours(delivery):  # it may have waited for its input batch
            return decisions.stopped(delivery)
        return await self._run(delivery, scope, job, payload, ctx)

    async def still_ours(self, delivery: Delivery) -> bool:
        """Whether a delivery may still start: False if its lease turned out lost.

        One held longer than the lease's unsafe age (queued, waiting for its input or behind
        another suspect, while this process froze or its loop was blocked) is confirmed first.
        """
        if time.monotonic() - delivery.confirmed_at > self._unsafe_after:
            await self._confirm_held(delivery)
        return not delivery.lost

    async def _start_node(self, delivery: Delivery, job: Job, ctx: Context) -> Decision | None:
        """Prepare a task node's run: its input batch, its emitter, the ``accepted`` event."""
        run = delivery.node = nodes.NodeRun(
            self._redis,
            self._scripts,
            self._keys,
            job,
            stream=delivery.stream,
            shard=delivery.shard,
            entry_id=delivery.entry.id,
            delivery=delivery.entry.deliveries,
            consumer=self._consumer,
            max_batch_bytes=self._max_bytes,
        )
        ctx._node = run
        ctx.invocation = job.invocation
        ctx.failures = dict(job.failures or {})
        try:
            ctx.batch = await run.start()
        except LookupError as exc:
            return dead("missing_input", str(exc), job)
        except InputError as exc:
            return dead("invalid_input", str(exc), job)
        except connect.TRANSIENT_ERRORS:
            return RELEASE  # cannot read its input now: hand it back
        return None

    def _check_level(self, delivery: Delivery, priority: int) -> None:
        """Warn when a job's ``priority`` is not the level it is on (a raw publisher's slip).

        The stream decides: the job runs, and retries, at the level it is on; a replay sends
        it to its ``priority``, clamped to the role's levels (see docs/protocol.md).
        """
        level = self._keys.level_of_stream(delivery.stream)
        if priority != level:
            logger.warning(
                "%s message %s says priority %d but was published at level %d of %s: it runs "
                "at level %d",
                delivery.role.name,
                delivery.entry.id.decode(),
                priority,
                level,
                delivery.shard,
                level,
            )

    async def _run_suspect(
        self, delivery: Delivery, scope: anyio.CancelScope, job: Job, payload: Any, ctx: Context
    ) -> Decision:
        """Run an entry delivered before, counting its starts to catch poison messages.

        The pending list's delivery counter rises for every entry a dead worker held, started or
        not, so it cannot tell a poison message from its neighbours. Starts can. The first rerun
        of an adopted entry runs alongside others (recovery stays fast); an entry that already
        failed to finish after a rerun runs alone among suspects, with completed work
        acknowledged first, so a poison message stops taking its neighbours down with it.
        """
        key = self._keys.starts(delivery.shard, delivery.entry.id.decode())
        try:
            reruns = await streams.get_count(self._redis, key)
        except connect.TRANSIENT_ERRORS:
            return RELEASE  # cannot count: hand it back rather than risk a poison loop
        except (ResponseError, ValueError) as exc:
            return _uncountable(key, exc, job)
        if reruns == 0:
            return await self._count_and_run(key, delivery, scope, job, payload, ctx)
        async with self._suspects:
            await self._flush()
            return await self._count_and_run(key, delivery, scope, job, payload, ctx)

    async def _count_and_run(
        self,
        key: str,
        delivery: Delivery,
        scope: anyio.CancelScope,
        job: Job,
        payload: Any,
        ctx: Context,
    ) -> Decision:
        # Counted only now, as it starts: waiting behind another suspect is not a start, and
        # neither is an entry found owned by another worker after that wait.
        if not await self.still_ours(delivery):
            return decisions.stopped(delivery)
        try:
            reruns = await streams.count_start(self._redis, key)
        except connect.TRANSIENT_ERRORS:
            return RELEASE
        except ResponseError as exc:
            return _uncountable(key, exc, job)
        starts = reruns + 2  # its first start, the reruns before, and this one
        if starts > delivery.role.max_deliveries:
            detail = (
                f"started {starts - 1} times (limit {delivery.role.max_deliveries}) without an "
                "outcome: each run ended with its lease expired before its outcome was "
                "settled, because its worker died (crash, OOM kill), was frozen, or had its "
                "event loop blocked past the lease TTL (an async handler that does not yield: "
                "look for 'event loop blocked' warnings naming it)"
            )
            return dead("max_deliveries", detail, job)
        return await self._run(delivery, scope, job, payload, ctx)

    async def _run(
        self, delivery: Delivery, scope: anyio.CancelScope, job: Job, payload: Any, ctx: Context
    ) -> Decision:
        role = delivery.role
        if delivery.lost or delivery.cancel is not None:  # while it waited in the queue
            return decisions.stopped(delivery)
        delivery.scope = scope
        delivery.started = True
        events = self.events
        if events is not None and role.events:
            ctx._events = events
            events.started(ctx)
        timeout = job.timeout or role.timeout
        chains = self._chains
        try:
            if chains is not None:  # middleware: the role's chain, composed at start-up
                handle, call_next = (self._timed if job.timeout else chains)[role.name]
                result = await handle(ctx, payload, call_next)
            elif role.is_async and not timeout:
                result = await role.handler(ctx, payload)  # the hot path, without a wrapper
            else:
                result = await self._execute(role, ctx, payload, timeout)
        except nodes.LeaseLost:
            # An owner-checked write of the handler (a task node's emit) was refused.
            if not delivery.lost:
                self._leases.count_loss("settle")
            delivery.stop("lease_lost", "lease lost", hard=False)
            return decisions.LOST
        except Exception as exc:
            return decisions.after_error(delivery, job, exc)
        finally:
            delivery.scope = None
        if delivery.lost or delivery.cancel is not None:
            return decisions.stopped(delivery)
        if role.keep_result_ms or job.keep_result_ms:  # asked for: kept by the settler
            return decisions.succeeded(job, result)
        return ACK

    async def _execute(
        self,
        role: Role,
        ctx: Context,
        payload: Any,
        timeout: float | None,  # noqa: ASYNC109 - the node's or the role's limit, applied here
    ) -> Any:
        with anyio.fail_after(timeout) if timeout else contextlib.nullcontext():
            if role.is_async:
                return await role.handler(ctx, payload)
            return await anyio.to_thread.run_sync(
                partial(role.handler, ctx, payload), limiter=self._threads
            )


#: The code of the coroutine that runs a handler: the stall watchdog finds it on the stack.
_RUN_CODE = Runner._run.__code__


def _uncountable(key: str, exc: Exception, job: Job) -> Decision:
    """The decision for a redelivered entry whose start count holds garbage (not a counter).

    Anyone with write access to the namespace may have written it. Running the entry uncounted
    would let a poison message loop for ever, so it is dead-lettered, visibly and replayable.
    """
    detail = f"its start count {key} is not a counter ({shown(exc)}): delete it, then replay"
    return dead("max_deliveries", detail, job)
