"""The worker: reads role streams, runs handlers concurrently and settles every delivery.

One anyio task group owns all of a worker's loops:

* per role, a **reader** fetches only as many entries as there are free handler slots
  (XREADGROUP COUNT = free capacity, BLOCK when idle) into a bounded memory stream; an
  **adopter** takes over entries idle past the lease TTL; a **promoter** moves due retries from
  the delayed schedule back to the stream;
* ``concurrency`` **consumer** tasks take entries from the memory stream and run the pipeline
  decode -> preflight -> execute -> apply, one entry at a time each;
* the **acker** batches acknowledgements: all entries finished while the previous batch was in
  flight go in one owner-checked script call (XPENDING owner check, XACK, XDEL);
* the **lease keeper** renews every held entry each tick and cancels handlers whose lease is lost.

A consumer drains the memory stream with ``receive_nowait`` and awaits only when it is empty, so
a burst of fast handlers costs no event-loop round trip per message.

Every delivery ends in exactly one decision, applied in one place (:meth:`Worker._apply`):
ack, retry (the next attempt goes to the delayed schedule), dead-letter, release (shutdown: hand
back for immediate adoption, not a failed attempt) or lost (another consumer owns it: apply
nothing).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import traceback
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import anyio
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from streamflow import streams
from streamflow.app import App, Role
from streamflow.context import Context, Fatal, Retry
from streamflow.errors import PayloadError, ProtocolError
from streamflow.keys import Keys, validate_name
from streamflow.leases import Delivery, InFlight, LeaseKeeper, LeaseSettings
from streamflow.protocol import (
    DEAD_LETTER_FIELD,
    DEFAULT_MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    RAW_FIELD_PREFIX,
    DeadLetter,
    DeadLetterReason,
    ErrorInfo,
    Job,
    decode_job,
    encode,
    now_ms,
)

logger = logging.getLogger(__name__)

OutcomeStatus = Literal["acked", "retried", "dead_lettered", "released", "lost"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one delivery ended, as reported to ``on_outcome`` listeners.

    Attributes:
        role: The role stream it came from.
        entry_id: The stream entry id.
        message_id: The job's id, if the entry decoded far enough.
        status: ``acked``; ``retried`` (next attempt scheduled); ``dead_lettered``;
            ``released`` (handed back on shutdown); ``lost`` (another consumer owns it now).
        reason: The dead-letter reason, when dead-lettered.
        error: The handler's or decoder's error, when there was one.
    """

    role: str
    entry_id: str
    message_id: str | None
    status: OutcomeStatus
    reason: str | None = None
    error: ErrorInfo | None = None


@dataclass(slots=True)
class WorkerStatistics:
    """Counters of one worker since it started."""

    received: int = 0
    acked: int = 0
    retried: int = 0
    dead_lettered: int = 0
    released: int = 0
    lost: int = 0
    adopted: int = 0
    renewals: int = 0
    in_flight: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)


DecisionKind = Literal["ack", "retry", "dead_letter", "release", "lost"]


@dataclass(frozen=True, slots=True)
class _Decision:
    """How a delivery ends; applied by :meth:`Worker._apply`."""

    kind: DecisionKind
    job: Job | None = None
    reason: DeadLetterReason | None = None
    detail: str = ""
    error: ErrorInfo | None = None
    delay: float = 0.0


_RELEASE = _Decision("release")
_LOST = _Decision("lost")


def _dead(
    reason: DeadLetterReason, detail: str, job: Job | None = None, error: ErrorInfo | None = None
) -> _Decision:
    return _Decision("dead_letter", job, reason, detail, error)


def default_consumer_name() -> str:
    """A consumer name unique to this process: host, pid and a random suffix."""
    host = "".join(
        c if c.isascii() and (c.isalnum() or c in "-_.") else "-" for c in socket.gethostname()
    ).lstrip("-_.")
    return f"{host[:40] or 'host'}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Worker:
    """Serves one or more roles of an :class:`App` from their Redis streams.

    Args:
        app: The application whose handlers run.
        redis: An asyncio client (see :func:`streamflow.streams.connect`); its socket timeout
            must exceed ``block_ms``.
        roles: The roles to serve; all of the app's roles when None.
        namespace: The key namespace.
        concurrency: How many handlers run at once.
        consumer: This worker's consumer name; unique per live process (enforced).
        read_count: The most entries one read fetches.
        block_ms: How long an idle read waits before looking again (bounds shutdown time).
        max_message_bytes: Larger entries are dead-lettered as ``too_large`` before parsing.
        dead_letter_max_len: Dead-letter streams are capped near this many entries.
        shutdown_grace: Seconds in-flight handlers get to finish after :meth:`stop`; the rest
            are cancelled and released for immediate adoption by another worker.
        lease: Lease TTL, renewal and reclaim timing.
        on_outcome: Called with every :class:`Outcome` (after it is settled in Redis).
    """

    def __init__(
        self,
        app: App,
        redis: Redis,
        *,
        roles: Sequence[str] | None = None,
        namespace: str = "sf",
        concurrency: int = 32,
        consumer: str | None = None,
        read_count: int = 256,
        block_ms: int = 1000,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        dead_letter_max_len: int = 100_000,
        shutdown_grace: float = 30.0,
        lease: LeaseSettings | None = None,
        on_outcome: Callable[[Outcome], None] | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._app = app
        self._redis = redis
        self._keys = Keys(namespace)
        names = list(roles) if roles is not None else list(app.roles)
        self._roles = [app.get_role(name) for name in names]
        self.concurrency = concurrency
        self.consumer = validate_name(consumer or default_consumer_name(), "consumer name")
        self._read_count = read_count
        self._block_ms = block_ms
        self._max_bytes = max_message_bytes
        self._dead_max_len = dead_letter_max_len
        self._grace = shutdown_grace
        self._on_outcome = on_outcome
        self._scripts = streams.Scripts(redis)
        self._stats = WorkerStatistics()
        self._in_flight = 0
        self._held = InFlight()
        self._leases = LeaseKeeper(
            redis, self._scripts, self._keys, self.consumer, self._held, lease or LeaseSettings()
        )
        self._capacity = anyio.Event()
        self._stopping = anyio.Event()
        self._stopped = anyio.Event()
        self._threads = anyio.CapacityLimiter(concurrency)
        self._acker = _Acker(self)

    # -- public API -------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until :meth:`stop` is called, then finish or release in-flight work and return.

        Raises:
            ConfigError: Another live process uses this worker's consumer name.
        """
        try:
            await self._serve(burst=False, task_status=task_status)
        finally:
            self._stopped.set()

    async def drain(self) -> None:
        """Process everything queued on the served roles, then return (burst mode).

        Reads never block, so this also works on fakeredis, whose blocking reads return at once.
        Due retries are moved to the stream first; retries not yet due are left scheduled.
        """
        while True:
            before = self._stats.received
            await self._serve(burst=True, task_status=anyio.TASK_STATUS_IGNORED)
            if self._stats.received == before or self._stopping.is_set():
                return

    def stop(self) -> None:
        """Ask the worker to stop: reading stops at once, in-flight handlers get the grace."""
        self._stopping.set()
        self._capacity.set()

    async def wait_stopped(self) -> None:
        """Return once :meth:`run` has returned."""
        await self._stopped.wait()

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._stopping.is_set()

    def statistics(self) -> WorkerStatistics:
        """A snapshot of the worker's counters."""
        stats = self._stats
        return WorkerStatistics(
            received=stats.received,
            acked=stats.acked,
            retried=stats.retried,
            dead_lettered=stats.dead_lettered,
            released=stats.released,
            lost=stats.lost,
            adopted=self._leases.adopted,
            renewals=self._leases.renewals,
            in_flight=self._in_flight,
            by_reason=dict(stats.by_reason),
        )

    # -- the loops --------------------------------------------------------------------------

    async def _serve(self, *, burst: bool, task_status: TaskStatus[None]) -> None:
        for role in self._roles:
            await streams.ensure_group(self._redis, self._keys.role_stream(role.name))
        await self._leases.acquire_name()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._acker.run)
                tg.start_soon(self._leases.renew_forever)
                tg.start_soon(self._enforce_grace)
                task_status.started()
                await self._pipeline(burst)
                await self._acker.flush()
                tg.cancel_scope.cancel()
        finally:
            with (
                anyio.move_on_after(5, shield=True),
                contextlib.suppress(*streams.TRANSIENT_ERRORS),
            ):
                await self._leases.release_name()

    async def _pipeline(self, burst: bool) -> None:
        send, receive = anyio.create_memory_object_stream[Delivery](self.concurrency)
        async with anyio.create_task_group() as consumers:
            async with receive:
                for _ in range(self.concurrency):
                    consumers.start_soon(self._consume, receive.clone())
            async with send, anyio.create_task_group() as readers:
                for role in self._roles:
                    stream = self._keys.role_stream(role.name)
                    if burst:
                        await self._promote_due(role)
                    else:
                        readers.start_soon(self._promote_loop, role)
                        readers.start_soon(self._adopt_loop, role, stream, send.clone())
                    readers.start_soon(self._read_loop, role, stream, send.clone(), burst)

    async def _enforce_grace(self) -> None:
        await self._stopping.wait()
        await anyio.sleep(self._grace)
        running = [d for d in self._held if d.scope is not None and not d.scope.cancel_called]
        if running:
            logger.warning(
                "cancelling %d handlers still running after the %.0fs shutdown grace; "
                "their entries are released for another worker",
                len(running),
                self._grace,
            )
        for delivery in running:
            delivery.released = True
            if delivery.context is not None:
                delivery.context.cancel._set("worker shutting down")
            assert delivery.scope is not None
            delivery.scope.cancel()

    async def _read_loop(
        self, role: Role, stream: str, send: MemoryObjectSendStream[Delivery], burst: bool
    ) -> None:
        backoff = _Backoff(f"reading {stream}")
        # First the entries already pending under this consumer name (a restart with the same
        # --consumer-name resumes them at once), then new ones.
        history: bytes | None = b"0"
        async with send:
            while not self._stopping.is_set():
                free = await self._wait_capacity()
                if free <= 0:
                    continue
                block = None if burst or history else self._block_ms
                entries = await self._read(stream, free, block, history, backoff)
                if entries is None:
                    continue
                if entries:
                    self._dispatch(role, stream, entries, send)
                if history is not None:
                    if entries:
                        logger.info("resuming %d entries pending on %s", len(entries), stream)
                    history = entries[-1].id if entries else None
                elif burst and not entries:
                    if self._in_flight == 0:
                        return
                    await self._wait_progress()

    async def _read(
        self,
        stream: str,
        free: int,
        block_ms: int | None,
        history: bytes | None,
        backoff: _Backoff,
    ) -> list[streams.Entry] | None:
        """One read; None after an error that was handled (the caller just reads again)."""
        count = min(free, self._read_count)
        try:
            if history is not None:
                entries = await streams.read_own_pending(
                    self._redis, stream, self.consumer, after=history, count=count
                )
            else:
                entries = await streams.read_group(
                    self._redis, stream, self.consumer, count=count, block_ms=block_ms
                )
        except streams.TRANSIENT_ERRORS as exc:
            await backoff.failed(exc)
            return None
        except ResponseError as exc:
            if not streams.is_group_lost(exc):
                raise
            logger.warning("consumer group of %s is gone; recreating it", stream)
            await streams.ensure_group(self._redis, stream)
            return None
        backoff.succeeded()
        return entries

    async def _adopt_loop(
        self, role: Role, stream: str, send: MemoryObjectSendStream[Delivery]
    ) -> None:
        settings = self._leases.settings
        backoff = _Backoff(f"adopting idle entries of {stream}")
        async with send:
            while not await self._sleep_unless_stopping(settings.reclaim_interval):
                free = self.concurrency - self._in_flight
                if free <= 0:
                    continue
                try:
                    entries = await self._leases.adopt(stream, min(free, settings.reclaim_count))
                except streams.TRANSIENT_ERRORS as exc:
                    await backoff.failed(exc)
                    continue
                except ResponseError as exc:
                    if not streams.is_group_lost(exc):
                        raise
                    continue  # the reader recreates the group
                backoff.succeeded()
                if entries:
                    self._dispatch(role, stream, entries, send)

    async def _promote_loop(self, role: Role) -> None:
        while not self._stopping.is_set():
            next_due = await self._promote_due(role)
            wait = 1.0 if next_due is None else (next_due - now_ms()) / 1000
            if await self._sleep_unless_stopping(min(max(wait, 0.01), 1.0)):
                return

    async def _promote_due(self, role: Role) -> int | None:
        """Move due retries of ``role`` to its stream; returns the next due time (ms) if any."""
        try:
            moved, next_due = await streams.promote(
                self._scripts,
                self._redis,
                self._keys.role_stream(role.name),
                self._keys.delayed(role.name),
            )
        except streams.TRANSIENT_ERRORS:
            return None  # the reader's backoff reports the outage
        if moved:
            logger.debug("moved %d due retries of %s to its stream", moved, role.name)
        return next_due

    async def _sleep_unless_stopping(self, seconds: float) -> bool:
        """Sleep, returning True at once if the worker is stopping."""
        with anyio.move_on_after(seconds):
            await self._stopping.wait()
        return self._stopping.is_set()

    def _dispatch(
        self,
        role: Role,
        stream: str,
        entries: list[streams.Entry],
        send: MemoryObjectSendStream[Delivery],
    ) -> None:
        self._in_flight += len(entries)
        self._stats.received += len(entries)
        for entry in entries:
            delivery = Delivery(role, stream, entry)
            self._held.add(delivery)
            send.send_nowait(delivery)

    async def _wait_capacity(self) -> int:
        while self._in_flight >= self.concurrency and not self._stopping.is_set():
            await self._wait_progress()
        return self.concurrency - self._in_flight

    async def _wait_progress(self) -> None:
        if self._capacity.is_set():
            self._capacity = anyio.Event()
        await self._capacity.wait()

    async def _consume(self, receive: MemoryObjectReceiveStream[Delivery]) -> None:
        async with receive:
            while True:
                try:
                    delivery = receive.receive_nowait()
                except anyio.WouldBlock:
                    try:
                        delivery = await receive.receive()
                    except anyio.EndOfStream:
                        return
                except anyio.EndOfStream:
                    return
                try:
                    if self._stopping.is_set():
                        # Read but not started: hand it back now rather than start it.
                        await self._apply(delivery, _RELEASE)
                    else:
                        await self._apply(delivery, await self._process(delivery))
                finally:
                    self._in_flight -= 1
                    self._capacity.set()

    # -- one delivery: decode -> preflight -> execute -> apply ------------------------------

    async def _process(self, delivery: Delivery) -> _Decision:
        checked = self._preflight(delivery)
        if isinstance(checked, _Decision):
            return checked
        job, payload = checked
        role = delivery.role
        ctx = Context(
            message_id=job.id,
            entry_id=delivery.entry.id.decode(),
            role=role.name,
            attempt=job.attempt,
            consumer=self.consumer,
            created_at_ms=job.created_at_ms,
            deadline_ms=job.deadline_ms,
            task_id=job.task_id,
            node_id=job.node_id,
        )
        delivery.context = ctx
        with anyio.CancelScope() as scope:
            delivery.scope = scope
            if delivery.lost:  # lost while it waited in the buffer
                return _LOST
            try:
                await self._execute(role, ctx, payload)
            except Fatal as exc:
                return _dead("fatal", str(exc) or "fatal error", job, _error_info(exc))
            except Exception as exc:
                return self._failure(role, job, exc)
        if scope.cancelled_caught:
            return _LOST if delivery.lost else _RELEASE
        return _Decision("ack", job)

    def _preflight(self, delivery: Delivery) -> _Decision | tuple[Job, Any]:
        """Decode and check an entry before it starts; a decision when it must not start."""
        role, entry = delivery.role, delivery.entry
        try:
            job = decode_job(entry.fields, max_bytes=self._max_bytes)
        except ProtocolError as exc:
            return _dead(exc.reason, exc.detail)  # type: ignore[arg-type]
        if job.role != role.name:
            return _dead("wrong_role", f"message is for {job.role!r}, not {role.name!r}", job)
        if entry.deliveries > role.max_deliveries:
            detail = (
                f"delivered {entry.deliveries} times (limit {role.max_deliveries}) without "
                "finishing: its worker likely crashed or froze each time"
            )
            return _dead("max_deliveries", detail, job)
        if job.deadline_ms is not None and job.deadline_ms < now_ms():
            return _dead("expired", f"deadline passed {now_ms() - job.deadline_ms} ms ago", job)
        try:
            return job, role.validate_payload(job.payload)
        except PayloadError as exc:
            detail = f"payload does not match {_type_name(role.payload_type)}: {exc}"
            return _dead("invalid_payload", detail, job)

    async def _execute(self, role: Role, ctx: Context, payload: Any) -> None:
        with anyio.fail_after(role.timeout) if role.timeout else contextlib.nullcontext():
            if role.is_async:
                await role.handler(ctx, payload)
            else:
                await anyio.to_thread.run_sync(
                    partial(role.handler, ctx, payload), limiter=self._threads
                )

    def _failure(self, role: Role, job: Job, exc: Exception) -> _Decision:
        info = _error_info(exc)
        if isinstance(exc, TimeoutError) and role.timeout:
            info = info.model_copy(update={"message": f"timed out after {role.timeout}s"})
        policy = role.retry
        if job.attempt >= policy.max_attempts:
            detail = f"attempt {job.attempt} of {policy.max_attempts} failed: {info.message}"
            return _dead("failed", detail, job, info)
        delay = policy.delay(job.attempt)
        if isinstance(exc, Retry) and exc.delay is not None:
            delay = exc.delay
        return _Decision("retry", job, detail=info.message, error=info, delay=delay)

    async def _apply(self, delivery: Delivery, decision: _Decision) -> None:
        """Settle a delivery in Redis according to its decision (the one place that does)."""
        if decision.kind == "ack":
            assert decision.job is not None
            self._acker.add(delivery, decision.job.id)  # the acker forgets it once acked
            return
        # Settling writes finish even when the worker is being cancelled, within a time limit.
        with anyio.move_on_after(10, shield=True):
            try:
                status = await self._settle_one(delivery, decision)
            except streams.TRANSIENT_ERRORS as exc:
                # Still pending under this consumer: adopted after the lease TTL, or resumed by
                # a restart with the same consumer name.
                logger.warning(
                    "could not settle %s entry %s (%s): %s",
                    delivery.role.name,
                    delivery.entry.id.decode(),
                    decision.kind,
                    exc,
                )
                self._held.discard(delivery)
                return
            self._held.discard(delivery)
            job = decision.job
            self._report(delivery, job.id if job else None, status, decision.reason, decision.error)

    async def _settle_one(self, delivery: Delivery, decision: _Decision) -> OutcomeStatus:
        if decision.kind == "lost" or delivery.lost:
            return "lost"
        if decision.kind == "release":
            return "released" if await self._leases.release(delivery) else "lost"
        if decision.kind == "retry":
            return "retried" if await self._schedule_retry(delivery, decision) else "lost"
        return "dead_lettered" if await self._dead_letter(delivery, decision) else "lost"

    async def _schedule_retry(self, delivery: Delivery, decision: _Decision) -> bool:
        job = decision.job
        assert job is not None
        following = job.model_copy(update={"attempt": job.attempt + 1})
        due = 0 if decision.delay <= 0 else now_ms() + int(decision.delay * 1000)
        scheduled = await streams.schedule_retry(
            self._scripts,
            self._redis,
            stream=delivery.stream,
            schedule=self._keys.delayed(delivery.role.name),
            consumer=self.consumer,
            entry_id=delivery.entry.id,
            due_ms=due,
            message=encode(following),
        )
        if scheduled:
            logger.info(
                "retrying %s message %s (attempt %d of %d) in %.2fs: %s",
                delivery.role.name,
                job.id,
                job.attempt + 1,
                delivery.role.retry.max_attempts,
                decision.delay,
                decision.detail,
            )
        return scheduled

    async def _dead_letter(self, delivery: Delivery, decision: _Decision) -> bool:
        entry, job = delivery.entry, decision.job
        assert decision.reason is not None
        letter = DeadLetter(
            protocol=PROTOCOL_VERSION,
            kind="dead_letter",
            reason=decision.reason,
            detail=decision.detail,
            role=delivery.role.name,
            entry_id=entry.id.decode(),
            message_id=job.id if job else None,
            consumer=self.consumer,
            attempts=job.attempt if job and decision.error else 0,
            dead_at_ms=now_ms(),
            error=decision.error,
            job=job,
        )
        fields = [(DEAD_LETTER_FIELD, encode(letter))]
        # Raw fields are kept verbatim, but cut at the message size limit: a flood of oversized
        # messages must not fill Redis through the dead-letter stream.
        fields += [
            (RAW_FIELD_PREFIX + name, value[: self._max_bytes])
            for name, value in entry.fields.items()
        ]
        moved = await streams.dead_letter(
            self._scripts,
            self._redis,
            stream=delivery.stream,
            dead_stream=self._keys.dead_letters(delivery.role.name),
            consumer=self.consumer,
            entry_id=entry.id,
            fields=fields,
            max_len=self._dead_max_len,
        )
        if moved is not None:
            logger.warning(
                "dead-lettered %s entry %s (message %s): %s: %s",
                delivery.role.name,
                letter.entry_id,
                letter.message_id,
                decision.reason,
                decision.detail,
            )
        return moved is not None

    def _report(
        self,
        delivery: Delivery,
        message_id: str | None,
        status: OutcomeStatus,
        reason: str | None = None,
        error: ErrorInfo | None = None,
    ) -> None:
        stats = self._stats
        if status == "acked":
            stats.acked += 1
        elif status == "retried":
            stats.retried += 1
        elif status == "released":
            stats.released += 1
        elif status == "lost":
            stats.lost += 1
            logger.warning(
                "lease on %s entry %s was lost; its outcome was not applied",
                delivery.role.name,
                delivery.entry.id.decode(),
            )
        else:
            stats.dead_lettered += 1
            if reason is not None:
                stats.by_reason[reason] = stats.by_reason.get(reason, 0) + 1
        if self._on_outcome is not None:
            self._on_outcome(
                Outcome(
                    delivery.role.name,
                    delivery.entry.id.decode(),
                    message_id,
                    status,
                    reason if status == "dead_lettered" else None,
                    error,
                )
            )


class _Acker:
    """Batches acknowledgements: one owner-checked settle call per stream per flush."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        self._pending: dict[str, list[tuple[Delivery, str]]] = defaultdict(list)
        self._wakeup = anyio.Event()
        self._lock = anyio.Lock()
        self._backoff = _Backoff("acknowledging")

    def add(self, delivery: Delivery, message_id: str) -> None:
        self._pending[delivery.stream].append((delivery, message_id))
        self._wakeup.set()

    async def run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup = anyio.Event()
            await self.flush()

    async def flush(self) -> None:
        # Shielded: a flush that started must finish even when the worker is being cancelled,
        # or handlers that completed would be run again elsewhere.
        with anyio.move_on_after(30, shield=True):
            async with self._lock:
                while self._pending:
                    batch, self._pending = self._pending, defaultdict(list)
                    try:
                        await self._settle(batch)
                    except streams.TRANSIENT_ERRORS as exc:
                        for stream, items in batch.items():
                            self._pending[stream][:0] = items
                        await self._backoff.failed(exc)
                    else:
                        self._backoff.succeeded()

    async def _settle(self, batch: dict[str, list[tuple[Delivery, str]]]) -> None:
        worker = self._worker
        for stream, items in batch.items():
            ids = [delivery.entry.id for delivery, _ in items]
            refused = set(
                await streams.settle(worker._scripts, worker._redis, stream, worker.consumer, ids)
            )
            for delivery, message_id in items:
                worker._held.discard(delivery)
                status: OutcomeStatus = "lost" if delivery.entry.id in refused else "acked"
                worker._report(delivery, message_id, status)


class _Backoff:
    """Capped exponential backoff that logs once per outage, not once per failed call."""

    def __init__(self, what: str, *, first: float = 0.05, cap: float = 5.0) -> None:
        self._what = what
        self._first = first
        self._cap = cap
        self._delay = 0.0

    async def failed(self, exc: BaseException) -> None:
        if self._delay == 0.0:
            logger.warning("Redis unavailable while %s (%s); retrying", self._what, exc)
            self._delay = self._first
        else:
            self._delay = min(self._delay * 2, self._cap)
        await anyio.sleep(self._delay)

    def succeeded(self) -> None:
        if self._delay:
            logger.warning("Redis is back; %s resumed", self._what)
            self._delay = 0.0


def _error_info(exc: BaseException) -> ErrorInfo:
    tb = "".join(traceback.format_exception(exc, limit=-5))
    return ErrorInfo(type=type(exc).__name__, message=str(exc)[:2000], traceback=tb[-4000:])


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or repr(tp)
