"""The worker: reads role streams, runs handlers concurrently and settles every delivery.

One anyio task group owns all of a worker's loops:

* a **reader** per role fetches only as many entries as there are free handler slots
  (XREADGROUP COUNT = free capacity, BLOCK when idle) into a bounded memory stream;
* ``concurrency`` **consumer** tasks take entries from it and run the pipeline
  decode -> preflight -> execute -> settle, one entry at a time each;
* the **acker** batches acknowledgements: all entries finished while the previous batch was in
  flight go in one owner-checked script call (XPENDING owner check, XACK, XDEL).

A consumer drains the memory stream with ``receive_nowait`` and awaits only when it is empty, so
a burst of fast handlers costs no event-loop round trip per message.
"""

from __future__ import annotations

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
from streamflow.context import Context
from streamflow.errors import PayloadError, ProtocolError
from streamflow.keys import Keys, validate_name
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

OutcomeStatus = Literal["acked", "dead_lettered", "refused"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one delivery ended, as reported to ``on_outcome`` listeners.

    Attributes:
        role: The role stream it came from.
        entry_id: The stream entry id.
        message_id: The job's id, if the entry decoded far enough.
        status: ``acked``, ``dead_lettered``, or ``refused`` (another consumer owns it now).
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
    dead_lettered: int = 0
    refused: int = 0
    in_flight: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Delivery:
    role: Role
    stream: str
    entry: streams.Entry


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
        consumer: This worker's consumer name; unique per live process.
        read_count: The most entries one read fetches.
        block_ms: How long an idle read waits before looking again (bounds shutdown time).
        max_message_bytes: Larger entries are dead-lettered as ``too_large`` before parsing.
        dead_letter_max_len: Dead-letter streams are capped near this many entries.
        shutdown_grace: Seconds in-flight handlers get to finish after :meth:`stop`.
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
        self._capacity = anyio.Event()
        self._stopping = anyio.Event()
        self._stopped = anyio.Event()
        self._threads = anyio.CapacityLimiter(concurrency)
        self._acker = _Acker(self)

    # -- public API -------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until :meth:`stop` is called, then finish in-flight work and return."""
        try:
            await self._serve(burst=False, task_status=task_status)
        finally:
            self._stopped.set()

    async def drain(self) -> None:
        """Process everything queued on the served roles, then return (burst mode).

        Reads never block, so this also works on fakeredis, whose blocking reads return at once.
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
        """Return once :meth:`run` has returned (or was never started and stop() was called)."""
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
            dead_lettered=stats.dead_lettered,
            refused=stats.refused,
            in_flight=self._in_flight,
            by_reason=dict(stats.by_reason),
        )

    # -- the loops --------------------------------------------------------------------------

    async def _serve(self, *, burst: bool, task_status: TaskStatus[None]) -> None:
        for role in self._roles:
            await streams.ensure_group(self._redis, self._keys.role_stream(role.name))
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._acker.run)
            tg.start_soon(self._enforce_grace, tg.cancel_scope)
            task_status.started()
            await self._pipeline(burst)
            await self._acker.flush()
            tg.cancel_scope.cancel()

    async def _pipeline(self, burst: bool) -> None:
        send, receive = anyio.create_memory_object_stream[_Delivery](self.concurrency)
        async with anyio.create_task_group() as consumers:
            async with receive:
                for _ in range(self.concurrency):
                    consumers.start_soon(self._consume, receive.clone())
            async with send, anyio.create_task_group() as readers:
                for role in self._roles:
                    readers.start_soon(self._read_loop, role, send.clone(), burst)

    async def _enforce_grace(self, scope: anyio.CancelScope) -> None:
        await self._stopping.wait()
        await anyio.sleep(self._grace)
        if self._in_flight:
            logger.warning(
                "cancelling %d handlers still running after the %.0fs shutdown grace",
                self._in_flight,
                self._grace,
            )
        scope.cancel()

    async def _read_loop(
        self, role: Role, send: MemoryObjectSendStream[_Delivery], burst: bool
    ) -> None:
        stream = self._keys.role_stream(role.name)
        backoff = _Backoff(f"reading {stream}")
        # First the entries already pending under this consumer name (a restart with the same
        # --consumer-name resumes them), then new ones.
        history: bytes | None = b"0"
        async with send:
            while not self._stopping.is_set():
                free = await self._wait_capacity()
                if free <= 0:
                    continue
                block = None if burst or history else self._block_ms
                entries = await self._read(stream, free, block, history or b">", backoff)
                if entries is None:
                    continue
                if entries:
                    self._dispatch(role, stream, entries, send)
                if history is not None:
                    # Re-reading our own pending entries: go on after the last one, until none.
                    if entries:
                        logger.info("resuming %d entries pending on %s", len(entries), stream)
                    history = entries[-1].id if entries else None
                elif burst and not entries:
                    if self._in_flight == 0:
                        return
                    await self._wait_progress()

    async def _read(
        self, stream: str, free: int, block_ms: int | None, after: bytes, backoff: _Backoff
    ) -> list[streams.Entry] | None:
        """One XREADGROUP; None after an error that was handled (the caller just reads again)."""
        try:
            entries = await streams.read_group(
                self._redis,
                stream,
                self.consumer,
                count=min(free, self._read_count),
                block_ms=block_ms,
                after=after,
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

    def _dispatch(
        self,
        role: Role,
        stream: str,
        entries: list[streams.Entry],
        send: MemoryObjectSendStream[_Delivery],
    ) -> None:
        self._in_flight += len(entries)
        self._stats.received += len(entries)
        for entry in entries:
            send.send_nowait(_Delivery(role, stream, entry))

    async def _wait_capacity(self) -> int:
        while self._in_flight >= self.concurrency and not self._stopping.is_set():
            await self._wait_progress()
        return self.concurrency - self._in_flight

    async def _wait_progress(self) -> None:
        if self._capacity.is_set():
            self._capacity = anyio.Event()
        await self._capacity.wait()

    async def _consume(self, receive: MemoryObjectReceiveStream[_Delivery]) -> None:
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
                    await self._handle(delivery)
                finally:
                    self._in_flight -= 1
                    self._capacity.set()

    # -- one delivery: decode -> preflight -> execute -> settle -----------------------------

    async def _handle(self, delivery: _Delivery) -> None:
        role = delivery.role
        try:
            job = decode_job(delivery.entry.fields, max_bytes=self._max_bytes)
        except ProtocolError as exc:
            await self._dead_letter(delivery, None, exc.reason, exc.detail)  # type: ignore[arg-type]
            return
        if job.role != role.name:
            detail = f"message is for role {job.role!r} but arrived on role {role.name!r}"
            await self._dead_letter(delivery, job, "wrong_role", detail)
            return
        try:
            payload = role.validate_payload(job.payload)
        except PayloadError as exc:
            detail = f"payload does not match {_type_name(role.payload_type)}: {exc}"
            await self._dead_letter(delivery, job, "invalid_payload", detail)
            return
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
        try:
            await self._execute(role, ctx, payload)
        except Exception as exc:
            # Retries with backoff replace this with the retry policy (guarantees issue).
            info = _error_info(exc)
            await self._dead_letter(delivery, job, "failed", info.message, info)
            return
        self._acker.add(delivery, job.id)

    async def _execute(self, role: Role, ctx: Context, payload: Any) -> None:
        if role.is_async:
            await role.handler(ctx, payload)
        else:
            await anyio.to_thread.run_sync(
                partial(role.handler, ctx, payload), limiter=self._threads
            )

    async def _dead_letter(
        self,
        delivery: _Delivery,
        job: Job | None,
        reason: DeadLetterReason,
        detail: str,
        error: ErrorInfo | None = None,
    ) -> None:
        entry = delivery.entry
        letter = DeadLetter(
            protocol=PROTOCOL_VERSION,
            kind="dead_letter",
            reason=reason,
            detail=detail,
            role=delivery.role.name,
            entry_id=entry.id.decode(),
            message_id=job.id if job else None,
            consumer=self.consumer,
            attempts=job.attempt if job and reason == "failed" else 0,
            dead_at_ms=now_ms(),
            error=error,
            job=job,
        )
        fields = [(DEAD_LETTER_FIELD, encode(letter))]
        # Raw fields are kept verbatim, but cut at the message size limit: a flood of oversized
        # messages must not fill Redis through the dead-letter stream.
        fields += [
            (RAW_FIELD_PREFIX + name, value[: self._max_bytes])
            for name, value in entry.fields.items()
        ]
        with anyio.move_on_after(10, shield=True):
            try:
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
            except streams.TRANSIENT_ERRORS as exc:
                # The entry stays pending under this consumer: a restart with the same consumer
                # name resumes it (and lease reclaim will adopt it once leases land).
                logger.warning("could not dead-letter %s: %s", letter.entry_id, exc)
                return
        if moved is None:
            self._report(delivery.role.name, entry.id, letter.message_id, "refused")
            return
        logger.warning(
            "dead-lettered %s entry %s (message %s): %s: %s",
            delivery.role.name,
            letter.entry_id,
            letter.message_id,
            reason,
            detail,
        )
        self._stats.by_reason[reason] = self._stats.by_reason.get(reason, 0) + 1
        self._report(
            delivery.role.name, entry.id, letter.message_id, "dead_lettered", reason, error
        )

    def _report(
        self,
        role: str,
        entry_id: bytes,
        message_id: str | None,
        status: OutcomeStatus,
        reason: str | None = None,
        error: ErrorInfo | None = None,
    ) -> None:
        if status == "acked":
            self._stats.acked += 1
        elif status == "dead_lettered":
            self._stats.dead_lettered += 1
        else:
            self._stats.refused += 1
            logger.warning("lost ownership of %s entry %s; outcome not applied", role, entry_id)
        if self._on_outcome is not None:
            self._on_outcome(Outcome(role, entry_id.decode(), message_id, status, reason, error))


class _Acker:
    """Batches acknowledgements: one owner-checked settle call per role per flush."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        self._pending: dict[str, list[tuple[_Delivery, str]]] = defaultdict(list)
        self._wakeup = anyio.Event()
        self._lock = anyio.Lock()
        self._backoff = _Backoff("acknowledging")

    def add(self, delivery: _Delivery, message_id: str) -> None:
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

    async def _settle(self, batch: dict[str, list[tuple[_Delivery, str]]]) -> None:
        worker = self._worker
        for stream, items in batch.items():
            ids = [delivery.entry.id for delivery, _ in items]
            refused = set(
                await streams.settle(worker._scripts, worker._redis, stream, worker.consumer, ids)
            )
            for delivery, message_id in items:
                status: OutcomeStatus = "refused" if delivery.entry.id in refused else "acked"
                worker._report(delivery.role.name, delivery.entry.id, message_id, status)


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
