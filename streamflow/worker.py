"""The worker: reads role streams, runs handlers concurrently and settles every delivery.

One anyio task group owns all of a worker's loops:

* per role, a **reader** fetches entries (XREADGROUP COUNT = free handler slots plus the
  optional prefetch, BLOCK when idle); an **adopter** takes over entries idle past the lease
  TTL; a **promoter** moves due retries from the delayed schedule back to the stream;
* ``concurrency`` **consumer** tasks take entries from a shared queue (one wakes the next only
  while more are queued, so a burst of fast handlers costs no task switch per entry) and run
  decode -> preflight -> execute, each handler inside its consumer's cancel scope;
* the **acker** batches acknowledgements into one owner-checked script call per stream;
* the **lease keeper** renews every held entry each tick and cancels handlers whose lease is
  lost; the **signal listener** follows the signals stream and stops cancelled handlers; the
  **grace enforcer** cancels what still runs after the shutdown grace.

Every delivery ends in exactly one decision, applied in one place, :mod:`streamflow.settle`.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.metadata
import logging
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from functools import partial
from types import FrameType
from typing import Any, Literal

import anyio
from anyio.abc import TaskStatus
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from redis.exceptions import OutOfMemoryError, ResponseError

from streamflow import connect, decisions, nodes, partitions, streams
from streamflow.app import App, Role
from streamflow.config import WorkerSettings
from streamflow.consumers import ConsumerNames
from streamflow.context import Context
from streamflow.decisions import ACK, RELEASE, dead
from streamflow.delivery import Decision, Delivery, InFlight, Outcome, WorkerStatistics
from streamflow.errors import InputError
from streamflow.intake import GroupReader, Intake, Promoter, ReadAhead
from streamflow.keys import GROUP, Keys, role_of_shard, validate_name
from streamflow.leases import LeaseKeeper, LeaseSettings
from streamflow.logs import shown
from streamflow.protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    Job,
    now_ms,
)
from streamflow.registry import WorkerInfo
from streamflow.settle import Settler
from streamflow.signals import CancelBook, SignalListener, StopReporter
from streamflow.stalls import LoopWatchdog

logger = logging.getLogger(__name__)

VERSION = importlib.metadata.version("streamflow")


#: The garbage collector's first threshold in a process dedicated to a worker (CPython: 700).
GC_THRESHOLD = 10_000


def tune_garbage_collector() -> None:
    """Set the garbage collector up for a process dedicated to a worker.

    For such a process, called once after start-up (``streamflow worker`` does):

    * Every object alive now is left out of the collector's future passes (``gc.freeze()``,
      after a collection, so that nothing is frozen that could be freed). A draining worker
      keeps a few objects per entry alive until its batch is acknowledged, so they reach the
      oldest generation and trigger full passes, each of which walked every object made at
      start-up too (modules, models, the app: tens of thousands): with ``prefetch=1000`` full
      passes took 0.6 s of a 100,000-entry drain unfrozen and 0.1 s frozen.
    * The first generation is collected after :data:`GC_THRESHOLD` new objects instead of 700.
      A worker holding a few hundred entries made a young collection every ~100 entries, each
      walking the held entries' objects again, then promoted them into older generations to be
      walked once more: 0.6 us of every entry at ``prefetch=256`` (0.13 s of a 200,000-entry
      drain, 2,000 collections; 2 after). Handlers' reference cycles are still collected, a
      little later; 10,000 young objects are about a megabyte.
    """
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD, middle, oldest)


def fencing_token(attempt: int, deliveries: int) -> int:
    """A delivery's fencing token: the attempt in the high 32 bits, the delivery count below.

    Both only rise while a message changes hands (see :attr:`Context.fencing_token`); the
    coordinator orders a task node's runs by the same pair.
    """
    return (attempt << 32) | (deliveries & 0xFFFFFFFF)


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
        redis: An asyncio client (see :func:`streamflow.connect.connect`); its socket timeout
            must exceed ``block_ms``.
        roles: The roles to serve; all of the app's roles when None.
        namespace: The key namespace.
        concurrency: How many handlers run at once.
        consumer: This worker's consumer name; unique per live process (enforced).
        read_count: The most entries one read fetches.
        prefetch: Entries read ahead of free handler slots, so that reading overlaps handling.
            They wait leased to this worker, where no other worker can take them. ``"auto"``
            (the default) reads ahead what this worker starts in about
            :data:`AUTO_PREFETCH_WAIT` seconds at its recent pace, at most ``read_count`` and
            about :data:`AUTO_PREFETCH_BYTES` of messages: many for short jobs, none for slow
            ones. 0 never holds more entries than handler slots.
        block_ms: How long an idle read waits before looking again (bounds shutdown time).
        max_message_bytes: Larger entries are dead-lettered as ``too_large`` before parsing.
        dead_letter_max_len: Dead-letter streams are capped near this many entries.
        shutdown_grace: Seconds in-flight handlers get to finish after :meth:`stop`; the rest
            are cancelled and released for immediate adoption by another worker.
        lease: Lease TTL, renewal and reclaim timing.
        on_outcome: Called with every :class:`Outcome` (after it is settled in Redis).
        stall_warning: Seconds the event loop may go without running before a warning names
            the handler blocking it (see :mod:`streamflow.stalls`); by default the lease
            renewal period, at most 5 s.
    """

    def __init__(
        self,
        app: App,
        redis: Redis,
        *,
        roles: Sequence[str] | None = None,
        namespace: str = "sf",
        concurrency: int = 64,
        consumer: str | None = None,
        read_count: int = 1000,
        prefetch: int | Literal["auto"] = "auto",
        block_ms: int = 1000,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        dead_letter_max_len: int = 100_000,
        shutdown_grace: float = 30.0,
        lease: LeaseSettings | None = None,
        on_outcome: Callable[[Outcome], None] | None = None,
        stall_warning: float | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if prefetch != "auto" and not (isinstance(prefetch, int) and prefetch >= 0):
            raise ValueError(f"prefetch must be 'auto' or a whole number >= 0, not {prefetch!r}")
        self._app = app
        self._redis = redis
        self._keys = Keys(namespace)
        names = list(roles) if roles is not None else list(app.roles)
        self._roles = [app.get_role(name) for name in names]
        self.concurrency = concurrency
        self.consumer = validate_name(consumer or default_consumer_name(), "consumer name")
        self._max_bytes = max_message_bytes
        self._grace = shutdown_grace
        self._scripts = streams.Scripts(redis)
        self._held = InFlight()
        self._leases = LeaseKeeper(
            redis,
            self._scripts,
            self._keys,
            self.consumer,
            self._held,
            lease or LeaseSettings(),
            on_name_lost=self.stop,
            describe=self._describe,
        )
        self._names = ConsumerNames(
            redis,
            self._scripts,
            self._keys,
            self.consumer,
            ttl_ms=self._leases.settings.ttl_ms,
            every=self._leases.settings.renew_every,
        )
        self._promoter = Promoter(redis, self._scripts, self._keys)
        self._settler = Settler(
            redis,
            self._scripts,
            self._keys,
            self.consumer,
            self._held,
            self._leases,
            max_message_bytes=max_message_bytes,
            dead_letter_max_len=dead_letter_max_len,
            on_outcome=on_outcome,
            on_scheduled=self._promoter.wake,
        )
        self._cancels = StopReporter(redis, self._keys, self.consumer, self._held, CancelBook())
        self._signals = SignalListener(
            redis, self._keys, self._cancels.book, self._cancels.on_signal, block_ms=block_ms
        )
        self._stopping = anyio.Event()
        self._read_ahead = ReadAhead(concurrency, read_count, prefetch, self._stopping)
        self._intake = Intake(
            GroupReader(
                redis, self._scripts, GROUP, self.consumer, lease_ms=self._leases.settings.ttl_ms
            ),
            self._leases,
            self._held,
            self._read_ahead,
            self._promoter,
            self._keys,
            self._dispatch,
            self._stopping,
            block_ms=block_ms,
        )
        self._queue: deque[Delivery] = deque()
        self._idle: deque[anyio.Event] = deque()
        self._waking = 0
        self._queue_closed = False
        # Each role's partitions (shards), as recorded in Redis; set when serving starts.
        self._shards: dict[str, tuple[str, ...]] = {}
        self._stopped = anyio.Event()
        self._threads = anyio.CapacityLimiter(concurrency)
        self._started_at_ms = now_ms()
        # Metrics: counts kept here, read at scrape time (see streamflow.metrics).
        self._redeliveries: dict[str, int] = {}
        self._observe: Callable[[str, float], None] | None = None
        self._signals_latency: Callable[[float], None] | None = None
        self._suspects = anyio.Lock()
        self._confirming = anyio.Lock()
        self._confirm_backoff = connect.Backoff("confirming held leases")
        self._unsafe_after = self._leases.settings.unsafe_after
        settings = self._leases.settings
        self._watchdog = LoopWatchdog(
            stall_warning or min(settings.renew_every, 5.0),
            self._describe_stall,
            lease_ttl=settings.ttl,
        )

    @classmethod
    def from_settings(
        cls,
        app: App,
        settings: WorkerSettings,
        redis: Redis,
        *,
        on_outcome: Callable[[Outcome], None] | None = None,
        stall_warning: float | None = None,
    ) -> Worker:
        """A worker serving ``app`` as ``settings`` say (what ``streamflow worker`` runs).

        The settings of the process around it (connection, ``processes``, the metrics server,
        the start-up checks, the supervising parent) are the caller's.

        Args:
            app: The application whose handlers run.
            settings: Validated settings (see :class:`streamflow.config.WorkerSettings`).
            redis: A client built from ``settings`` (socket timeout above ``block_ms``).
            on_outcome: See :class:`Worker`.
            stall_warning: See :class:`Worker`.
        """
        return cls(
            app,
            redis,
            roles=settings.roles or None,
            namespace=settings.namespace,
            concurrency=settings.concurrency,
            consumer=settings.consumer_name,
            read_count=settings.read_count,
            prefetch=settings.prefetch,
            block_ms=settings.block_ms,
            max_message_bytes=settings.max_message_bytes,
            shutdown_grace=settings.shutdown_grace,
            dead_letter_max_len=settings.dead_letter_max_len,
            lease=settings.lease_settings(),
            on_outcome=on_outcome,
            stall_warning=stall_warning,
        )

    # -- public API -------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until :meth:`stop` is called, then finish or release in-flight work and return.

        A Redis outage (:func:`streamflow.connect.is_outage`) never ends it: start-up steps and
        every loop log it once, back off and retry, until Redis serves again or :meth:`stop`
        is called.

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
            before = self._settler.stats.received
            await self._serve(burst=True, task_status=anyio.TASK_STATUS_IGNORED)
            if self._settler.stats.received == before or self._stopping.is_set():
                return

    def stop(self) -> None:
        """Ask the worker to stop: reading stops at once, in-flight handlers get the grace.

        Running handlers see ``ctx.shutting_down`` (not ``ctx.cancel``, which is for user
        cancels: a handler stopping on its cancel token would abort on every deploy). One that
        finishes within the grace is acknowledged as usual; one that stops early (it raises,
        e.g. after saving a checkpoint) has its entry released for another worker, not counted
        as a failed attempt. The rest are cancelled hard after the grace and released; a plain
        ``def`` handler cannot be interrupted in its thread, so it is waited for and settled by
        how it ends (see docs/operations.md, "Shutdown").
        """
        if not self._stopping.is_set():
            for delivery in self._held:
                if delivery.scope is not None and delivery.context is not None:
                    delivery.stop("shutdown", "shutting down", hard=False)
        self._stopping.set()
        self._intake.stop()

    async def wait_stopped(self) -> None:
        """Return once :meth:`run` has returned."""
        await self._stopped.wait()

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._stopping.is_set()

    def enable_metrics(self) -> CollectorRegistry:
        """Start timing handlers; returns the registry with this worker's metrics."""
        from streamflow.metrics import worker_registry

        registry, self._observe = worker_registry(self)
        return registry

    def statistics(self) -> WorkerStatistics:
        """A snapshot of the worker's counters."""
        stats = self._settler.stats
        return WorkerStatistics(
            received=stats.received,
            acked=stats.acked,
            retried=stats.retried,
            dead_lettered=stats.dead_lettered,
            released=stats.released,
            lost=stats.lost,
            cancelled=stats.cancelled,
            ack_replies_lost=stats.ack_replies_lost,
            adopted=self._intake.adopted,
            renewals=self._leases.renewals,
            in_flight=self._read_ahead.in_flight,
            by_reason=dict(stats.by_reason),
            lease_losses=dict(self._leases.losses),
            loop_stalls=self._watchdog.stalls(),
            by_role=dict(stats.by_role),
            dead_by_role=dict(stats.dead_by_role),
            bad_records=self._signals.statistics(),
            redeliveries=dict(self._redeliveries),
            reclaims=dict(self._intake.reclaims),
            trimmed=self._trimmed_by_role(),
            cancel_signals=self._signals.signals_seen,
            consumers_deleted=self._names.forgotten,
        )

    def _trimmed_by_role(self) -> dict[str, int]:
        trimmed: dict[str, int] = {}
        for stream, count in list(self._intake.reader.trimmed.items()):
            role = role_of_shard(self._keys.role_of_stream(stream) or stream)
            trimmed[role] = trimmed.get(role, 0) + count
        return trimmed

    def observe_renewals(self, callback: Callable[[float], None] | None) -> None:
        """Call ``callback`` with the seconds each lease renewal round takes (None: stop)."""
        self._leases.on_renewal = callback

    def observe_cancel_latency(self, callback: Callable[[float], None] | None) -> None:
        """Call ``callback`` with the seconds from a cancel's creation to its handler stopping.

        Args:
            callback: Called once per handler a cancel stopped; None stops the calls.
        """
        self._signals_latency = callback

    def _describe_stall(self, frame: FrameType | None) -> str:
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

    def _describe(self) -> bytes:
        """This worker's registry entry (see :mod:`streamflow.registry`)."""
        stats = self._settler.stats
        info = WorkerInfo(
            consumer=self.consumer,
            host=socket.gethostname(),
            pid=os.getpid(),
            roles=[role.name for role in self._roles],
            version=VERSION,
            concurrency=self.concurrency,
            started_at_ms=self._started_at_ms,
            in_flight=self._read_ahead.in_flight,
            processed=stats.received - self._read_ahead.in_flight,
            updated_at_ms=now_ms(),
        )
        return info.model_dump_json().encode()

    # -- the loops --------------------------------------------------------------------------

    async def _serve(self, *, burst: bool, task_status: TaskStatus[None]) -> None:
        started = await connect.retry_outages(
            self._start_up, f"starting worker {self.consumer}", stopping=self._stopping.is_set
        )
        if not started:  # stopped while Redis was unavailable: nothing was taken
            task_status.started()
            return
        try:
            with self._watchdog.watching():
                await self._serve_loops(burst, task_status)
        finally:
            await self._give_up_name()

    async def _start_up(self) -> bool:
        """Every start-up step. Each can run again: after an outage they all do, in order."""
        for role in self._roles:
            # Creates the role with the app's partitions, or refuses if it has other ones.
            layout = await partitions.ensure(self._redis, self._keys, role.name, role.partitions)
            self._shards[role.name] = layout.shards
            for shard in layout.shards:
                await streams.ensure_group(self._redis, self._keys.role_stream(shard))
        # Task graphs are checked against the roles that workers serve.
        names = [r.name for r in self._roles]
        # Read first: a full Redis refuses SADD even of members it has (see ensure_group).
        if names and not all(await self._redis.smismember(self._keys.known_roles(), names)):
            try:
                await self._redis.sadd(self._keys.known_roles(), *names)
            except OutOfMemoryError:  # only task submission needs it: drain first
                logger.warning(
                    "Redis is full (OOM): roles %s not registered for task graphs", names
                )
        await self._leases.acquire_name()  # ours already after a retry: same token
        await self._mark_name()
        await self._signals.load()
        return True

    async def _mark_name(self) -> None:
        """Mark this consumer name next to every partition it reads, before the first read.

        A live name is never deleted by another worker's cleanup (streamflow.consumers). A full
        Redis refuses the marks' SET: the worker starts anyway (it is there to drain) and the
        marks follow at the first refresh Redis accepts; until then its reads keep it active.
        """
        shards = [shard for layout in self._shards.values() for shard in layout]
        self._names.serve([(self._keys.role_stream(shard), GROUP) for shard in shards])
        try:
            await self._names.mark()
        except OutOfMemoryError:
            logger.warning("Redis is full (OOM): consumer name %s not marked yet", self.consumer)

    async def _give_up_name(self) -> None:
        """Release the consumer name and its marks, never raising over what ended serving."""
        for release in (self._leases.release_name, self._names.unmark):
            with anyio.move_on_after(5, shield=True):
                try:
                    await release()
                except Exception as exc:  # cleanup: whatever ended the worker is what to report
                    logger.warning(
                        "could not give up consumer name %s (%s); its keys expire by themselves",
                        self.consumer,
                        connect.describe(exc) if connect.is_outage(exc) else repr(exc),
                    )

    async def _serve_loops(self, burst: bool, task_status: TaskStatus[None]) -> None:
        async with anyio.create_task_group() as tg:
            self._cancels.task_group = tg
            if not burst:
                tg.start_soon(self._signals.run)
                tg.start_soon(self._names.run)
            tg.start_soon(self._settler.acker.run)
            tg.start_soon(self._leases.renew_forever)
            tg.start_soon(self._enforce_grace)
            tg.start_soon(self._watchdog.beat_forever)
            task_status.started()
            await self._pipeline(burst)
            await self._settler.acker.flush()
            tg.cancel_scope.cancel()

    async def _pipeline(self, burst: bool) -> None:
        self._queue_closed = False
        async with anyio.create_task_group() as consumers:
            for _ in range(self.concurrency):
                consumers.start_soon(self._consume)
            try:
                await self._intake.run(self._roles, self._shards, burst=burst)
            finally:
                # No more entries: consumers finish what is queued, then return.
                self._queue_closed = True
                while self._idle:
                    self._waking += 1
                    self._idle.popleft().set()

    async def _enforce_grace(self) -> None:
        await self._stopping.wait()
        await anyio.sleep(self._grace)
        running = [d for d in self._held if d.scope is not None]
        # A plain-function handler runs in a thread and cannot be cancelled: releasing its
        # entry would let another worker run it again while it still runs here. It finishes.
        stuck = [d for d in running if not d.role.is_async]
        running = [d for d in running if d.role.is_async]
        if stuck:
            logger.warning(
                "%d thread handlers still running after the %.1fs shutdown grace; waiting for "
                "them (thread handlers can only stop cooperatively, via ctx.shutting_down)",
                len(stuck),
                self._grace,
            )
        if running:
            logger.warning(
                "cancelling %d handlers still running after the %.1fs shutdown grace; "
                "their entries are released for another worker",
                len(running),
                self._grace,
            )
        for delivery in running:
            delivery.stop("shutdown", "shutting down", hard=True)

    def _dispatch(
        self,
        role: Role,
        shard: str,
        stream: str,
        entries: list[streams.Entry],
        confirmed_at: float,
    ) -> None:
        """Hold and queue entries whose leases were confirmed at ``confirmed_at`` (monotonic)."""
        self._read_ahead.took(entries)
        self._settler.stats.received += len(entries)
        deliveries = [Delivery(role, shard, stream, entry, confirmed_at) for entry in entries]
        self._held.add_many(stream, deliveries)
        self._queue.extend(deliveries)
        self._wake_consumer()

    def _wake_consumer(self) -> None:
        """Wake one idle consumer, unless one is already on its way.

        A woken consumer that finds more queued wakes the next one, so slow handlers fan out
        over every consumer while a burst of fast ones is drained by one or two consumers
        without a task switch per entry.
        """
        if self._waking == 0 and self._idle:
            self._waking += 1
            self._idle.popleft().set()

    async def _consume(self) -> None:
        # Handlers run inside one cancel scope per consumer, not one per message (a scope costs
        # about 5 us). Stopping one handler (hard cancel, lost lease, shutdown) cancels its
        # consumer's scope; the consumer then settles that delivery from its flags and opens a
        # new scope.
        while True:
            stopped: list[Delivery] = []
            with anyio.CancelScope() as scope:
                if await self._consume_in(scope, stopped):
                    return
            for delivery in stopped:
                await self._finish(delivery, decisions.stopped(delivery))

    async def _consume_in(self, scope: anyio.CancelScope, stopped: list[Delivery]) -> bool:
        """Handle queued deliveries until the queue closes (True) or ``scope`` is cancelled."""
        queue = self._queue
        while True:
            if not queue:
                if self._queue_closed:
                    return True
                woken = anyio.Event()
                self._idle.append(woken)
                await woken.wait()
                self._waking -= 1
                continue
            delivery = queue.popleft()
            if queue:
                self._wake_consumer()
            if (
                self._stopping.is_set()
                or time.monotonic() - delivery.confirmed_at > self._unsafe_after
            ):
                ending = await self._before_start(delivery)
                if ending is not None:
                    await self._finish(delivery, ending)
                    continue
            stopped.append(delivery)
            step = self._process(delivery, scope)
            decision = step if isinstance(step, Decision) else await step
            stopped.clear()
            if scope.cancel_called:
                # Stopped after the handler's last checkpoint: settle it outside this scope.
                stopped.append(delivery)
                return False
            if decision is ACK and delivery.node is None:
                # The hot path, without a coroutine: queue the ack for the acker's next batch.
                self._settler.ack_nowait(delivery, decision)
                self._finished(delivery)
            else:
                await self._finish(delivery, decision)
            if self._read_ahead.reader_woken and queue and self._read_ahead.room_to_read_ahead():
                # Fast handlers never yield: let the woken reader (and the acker) send their
                # requests now, so that the replies come back while this consumer handles what
                # is still queued, instead of after the queue ran dry.
                await anyio.lowlevel.cancel_shielded_checkpoint()

    async def _before_start(self, delivery: Delivery) -> Decision | None:
        """Check a delivery held long or read while stopping; the decision if it must not start.

        Held so long (this process froze, or its event loop was blocked) that its lease may
        have expired and another worker adopted it: its lease is confirmed first, so that two
        workers never start it. Read but not started when the worker stops: handed back.
        """
        if not await self._still_ours(delivery):
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

    async def _finish(self, delivery: Delivery, decision: Decision) -> None:
        try:
            await self._settler.apply(delivery, decision)
            if decision.signal_id is not None:
                if self._signals_latency is not None and delivery.cancel is not None:
                    waited = now_ms() - delivery.cancel.created_at_ms
                    self._signals_latency(max(waited, 0) / 1000)
                await self._cancels.stopped(decision.signal_id, delivery)
        finally:
            self._finished(delivery)

    def _finished(self, delivery: Delivery) -> None:
        """A delivery's handling ended (its outcome is applied or queued): free its slot."""
        # Nothing reads the context of a finished handler: let it go now rather than when the
        # batch is acknowledged (fewer objects live on into the garbage collector's old
        # generations).
        delivery.context = None
        self._read_ahead.finished()
        if delivery.finished is not None:
            delivery.finished.set()

    # -- one delivery: decode -> preflight -> execute -> apply ------------------------------

    def _process(
        self, delivery: Delivery, scope: anyio.CancelScope
    ) -> Decision | Coroutine[Any, Any, Decision]:
        """Decode and check a delivery: its decision, or the coroutine that runs its handler.

        Not a coroutine itself: the hot path awaits the handler's runner directly, one coroutine
        fewer per message.
        """
        checked = decisions.preflight(delivery, self._cancels.book, self._max_bytes)
        if isinstance(checked, Decision):
            return checked
        job, payload = checked
        delivery.job = job
        ctx = Context(
            job.id,
            delivery.entry.id.decode(),
            delivery.role.name,
            job.attempt,
            self.consumer,
            job.created_at_ms,
            job.deadline_ms,
            job.task_id,
            job.node_id,
            # fencing_token(), inline: a function call per message costs more than this.
            (job.attempt << 32) | (delivery.entry.deliveries & 0xFFFFFFFF),
        )
        delivery.context = ctx
        if job.task_id is None and delivery.entry.deliveries == 1:
            return self._run(delivery, scope, job, payload, ctx)  # the hot path
        return self._process_special(delivery, scope, job, payload, ctx)

    async def _process_special(
        self, delivery: Delivery, scope: anyio.CancelScope, job: Job, payload: Any, ctx: Context
    ) -> Decision:
        """Run a task node's job or a redelivered entry."""
        if job.task_id is not None and nodes.is_node_job(job):
            failed = await self._start_node(delivery, job, ctx)
            if failed is not None:
                return failed
        if delivery.entry.deliveries > 1:
            # A suspect: delivered before, so its last worker may have died running it.
            role = delivery.role
            self._redeliveries[role.name] = self._redeliveries.get(role.name, 0) + 1
            return await self._run_suspect(delivery, scope, job, payload, ctx)
        if not await self._still_ours(delivery):  # it may have waited for its input batch
            return decisions.stopped(delivery)
        return await self._run(delivery, scope, job, payload, ctx)

    async def _still_ours(self, delivery: Delivery) -> bool:
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
            consumer=self.consumer,
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
            await self._settler.acker.flush()
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
        if not await self._still_ours(delivery):
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
        timeout = job.timeout or role.timeout
        started = time.perf_counter() if self._observe is not None else 0.0
        try:
            if role.is_async and not timeout:
                await role.handler(ctx, payload)  # the hot path, without a wrapper coroutine
            else:
                await self._execute(role, ctx, payload, timeout)
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
            if self._observe is not None:
                self._observe(role.name, time.perf_counter() - started)
        if delivery.lost or delivery.cancel is not None:
            return decisions.stopped(delivery)
        return ACK

    async def _execute(
        self,
        role: Role,
        ctx: Context,
        payload: Any,
        timeout: float | None,  # noqa: ASYNC109 - the node's or the role's limit, applied here
    ) -> None:
        with anyio.fail_after(timeout) if timeout else contextlib.nullcontext():
            if role.is_async:
                await role.handler(ctx, payload)
            else:
                await anyio.to_thread.run_sync(
                    partial(role.handler, ctx, payload), limiter=self._threads
                )


#: The code of the coroutine that runs a handler: the stall watchdog finds it on the stack.
_RUN_CODE = Worker._run.__code__


def _uncountable(key: str, exc: Exception, job: Job) -> Decision:
    """The decision for a redelivered entry whose start count holds garbage (not a counter).

    Anyone with write access to the namespace may have written it. Running the entry uncounted
    would let a poison message loop for ever, so it is dead-lettered, visibly and replayable.
    """
    detail = f"its start count {key} is not a counter ({shown(exc)}): delete it, then replay"
    return dead("max_deliveries", detail, job)
