"""The worker: reads role streams, runs handlers concurrently and settles every delivery.

One anyio task group owns all of a worker's loops:

* per role partition, a **reader** fetches entries (XREADGROUP COUNT = free handler slots plus
  the optional prefetch, BLOCK when idle); an **adopter** takes over entries idle past the lease
  TTL; a **promoter** moves due retries from the delayed schedule back to the stream (all three
  in :mod:`streamflow.intake`);
* ``concurrency`` **consumer** tasks (:mod:`streamflow.pool`) take entries from a shared queue
  (one wakes the next only while more are queued, so a burst of fast handlers costs no task
  switch per entry) and run decode -> preflight -> execute (:mod:`streamflow.runner`), each
  handler inside its consumer's cancel scope;
* the **acker** batches acknowledgements into one owner-checked script call per stream;
* the **lease keeper** renews every held entry each tick and cancels handlers whose lease is
  lost; the **signal listener** follows the signals stream and stops cancelled handlers; the
  **grace enforcer** cancels what still runs after the shutdown grace.

Every delivery ends in exactly one decision, applied in one place, :mod:`streamflow.settle`.

Around all of it, the app's lifecycle hooks (:mod:`streamflow.lifecycle`): startup hooks before
the first Redis call, shutdown hooks after the last settle, shielded, within what remains of the
shutdown grace.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from typing import Literal

import anyio
from anyio.abc import TaskStatus
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from redis.exceptions import OutOfMemoryError, ResponseError

from streamflow import connect, partitions, streams
from streamflow.app import App
from streamflow.config import WorkerSettings
from streamflow.consumers import ConsumerNames, default_consumer_name
from streamflow.delivery import InFlight, Outcome, WorkerStatistics
from streamflow.events import EventLog
from streamflow.flow import Limiter, PauseWatch
from streamflow.intake import GroupReader, Intake, Promoter, ReadAhead
from streamflow.keylimits import KeyLimiter
from streamflow.keys import GROUP, Keys, validate_name
from streamflow.leases import LeaseKeeper, LeaseSettings
from streamflow.lifecycle import NO_RESOURCES, Resources
from streamflow.middleware import Middleware, OutcomeHooks
from streamflow.pool import ConsumerPool
from streamflow.protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    now_ms,
)
from streamflow.registry import VERSION, WorkerInfo
from streamflow.runner import Runner
from streamflow.runner import fencing_token as fencing_token  # re-exported: its old home
from streamflow.scripts import Scripts
from streamflow.settle import Settler
from streamflow.signals import CancelBook, SignalListener, StopReporter
from streamflow.stalls import LoopWatchdog

logger = logging.getLogger(__name__)


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
            :data:`~streamflow.intake.AUTO_PREFETCH_WAIT` seconds at its recent pace, at most
            ``read_count`` and about :data:`~streamflow.intake.AUTO_PREFETCH_BYTES` of
            messages: many for short jobs, none for slow ones. 0 never holds more entries than
            handler slots.
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
        resources: Resources filled by the caller, who runs the app's lifecycle hooks (the
            test harness does, once for many workers); by default the worker runs them itself
            in :meth:`run` and :meth:`drain`.
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
        resources: Resources | None = None,
    ) -> None:
        if concurrency < 1 or read_count < 1:
            raise ValueError("concurrency and read_count must be at least 1")
        if prefetch != "auto" and not (isinstance(prefetch, int) and prefetch >= 0):
            raise ValueError(f"prefetch must be 'auto' or a whole number >= 0, not {prefetch!r}")
        self._app = app
        self._redis = redis
        self._keys = Keys(namespace)
        names = list(roles) if roles is not None else list(app.roles)
        self._roles = [app.get_role(name) for name in names]
        self.concurrency = concurrency
        self.consumer = validate_name(consumer or default_consumer_name(), "consumer name")
        self._grace = shutdown_grace
        # Resources given: their owner runs the hooks. Else this worker does, around serving.
        self._lifecycle = app.lifecycle() if resources is None else None
        shared = self._lifecycle.resources if self._lifecycle is not None else resources
        self._stop_requested_at: float | None = None
        self._scripts = Scripts(redis)
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
        self._runner = Runner(
            redis,
            self._scripts,
            self._keys,
            self.consumer,
            self._leases,
            self._cancels.book,
            self._stopping,
            self._settler.acker.flush,
            concurrency=concurrency,
            max_message_bytes=max_message_bytes,
            resources=shared or NO_RESOURCES,
        )
        self._use(app.middleware)
        # Lifecycle events: nothing is buffered or written while no served role wants them.
        self._events = EventLog(redis, self._keys, self.consumer)
        if any(role.events for role in self._roles):
            self._runner.events = self._settler.events = self._events
        self._pool = ConsumerPool(
            self._runner,
            self._settler,
            self._cancels,
            self._held,
            self._read_ahead,
            self._stopping,
            concurrency=concurrency,
            unsafe_after=self._leases.settings.unsafe_after,
        )
        self._intake = Intake(
            GroupReader(
                redis, self._scripts, GROUP, self.consumer, lease_ms=self._leases.settings.ttl_ms
            ),
            self._leases,
            self._held,
            self._read_ahead,
            self._promoter,
            self._keys,
            self._pool.dispatch,
            PauseWatch(redis, self._keys, names, self._stopping),
            Limiter(
                redis,
                self._scripts,
                self._keys,
                self.consumer,
                self._held,
                {r.name: (r.rate_limit, r.concurrency_limit) for r in self._roles},
                ttl_ms=self._leases.settings.ttl_ms,
            ),
            self._stopping,
            block_ms=block_ms,
        )
        # Each role's partitions (shards), as recorded in Redis; set when serving starts.
        self._shards: dict[str, tuple[str, ...]] = {}
        # Keys of another type met at start-up, by kind (the known roles).
        self._bad_records: dict[str, int] = {}
        # Per-key limits: any role may get them at run time, so the gate is always there (a
        # job without a limit key header never reaches it).
        self._key_limiter = KeyLimiter(
            redis,
            self._scripts,
            self._keys,
            self.consumer,
            self._held,
            self._intake.flow,
            {r.name: (r.key_rate_limit, r.key_concurrency) for r in self._roles},
            ttl_ms=self._leases.settings.ttl_ms,
        )
        self._key_limiter.shards = self._shards  # filled in when serving starts
        self._key_limiter.levels = {r.name: r.priorities for r in self._roles}
        self._runner.key_gate = self._intake.key_limiter = self._key_limiter
        self._settler.parker = self._key_limiter.park
        self._stopped = anyio.Event()
        self._started_at_ms = now_ms()
        settings = self._leases.settings
        self._watchdog = LoopWatchdog(
            stall_warning or min(settings.renew_every, 5.0),
            self._runner.describe_stall,
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

        The app's startup hooks run first and its shutdown hooks last (see
        :mod:`streamflow.lifecycle`), unless the worker was given its ``resources``.

        Raises:
            ConfigError: Another live process uses this worker's consumer name.
            StartupError: A startup hook raised (the shutdown hooks ran).
        """
        try:
            async with self._hooks():
                await self._serve(burst=False, task_status=task_status)
        finally:
            self._stopped.set()

    async def drain(self) -> None:
        """Process everything queued on the served roles, then return (burst mode).

        Reads never block, so this also works on fakeredis, whose blocking reads return at once.
        Due retries are moved to the stream first; retries not yet due are left scheduled.
        Jobs of the served roles parked by a per-key limit are not left behind: once nothing
        is queued, the drain waits for their keys (a slot freed, the rate's next start, or a
        dead worker's slot expiring), wakes them and runs them, and returns only when none
        is parked (so a key busy on another worker for long keeps it waiting that long).
        Lifecycle hooks run around it as around :meth:`run`.
        """
        parked = connect.Backoff("waking parked jobs")
        async with self._hooks():
            while not self._stopping.is_set():
                before = self._settler.stats.received
                await self._serve(burst=True, task_status=anyio.TASK_STATUS_IGNORED)
                if self._settler.stats.received != before or self._stopping.is_set():
                    continue
                if not await self._parked_left(parked):
                    return

    async def _parked_left(self, backoff: connect.Backoff) -> bool:
        """Whether jobs of the served roles are still parked (those due woken meanwhile)."""
        while not self._stopping.is_set():
            try:
                left = await self._key_limiter.wake_for_drain()
            except Exception as exc:
                if not connect.is_outage(exc):
                    raise
                await backoff.failed(exc)  # an outage: waited out, like a serving worker's
                continue
            backoff.succeeded()
            return left
        return False

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
            self._stop_requested_at = time.monotonic()
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
        """Start timing handlers; returns the registry with this worker's metrics.

        The handler-duration histogram is a middleware, placed innermost (after the app's), so
        that it times the handler alone. Call it before :meth:`run`.
        """
        from streamflow.metrics import worker_registry

        registry, timing = worker_registry(self)
        self._use((*self._app.middleware, timing))
        return registry

    def _use(self, middleware: Sequence[Middleware]) -> None:
        """Compose the middleware chains once: around handlers, and the outcome hooks."""
        self._runner.use(middleware, self._roles)
        hooks = OutcomeHooks(middleware)
        self._settler.on_settled = hooks.settled if hooks else None

    def statistics(self) -> WorkerStatistics:
        """A snapshot of the worker's counters (``.to_dict()`` for JSON-ready data)."""
        stats = self._settler.stats
        return WorkerStatistics(
            received=stats.received,
            acked=stats.acked,
            retried=stats.retried,
            dead_lettered=stats.dead_lettered,
            released=stats.released,
            parked=stats.parked,
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
            bad_records={
                **self._signals.statistics(),
                **self._intake.flow.bad_records,
                **self._intake.limiter.bad_records,
                **self._promoter.bad_records,
                **self._bad_records,
            },
            redeliveries=dict(self._runner.redeliveries),
            reclaims=dict(self._intake.reclaims),
            trimmed=self._intake.trimmed_by_role(),
            cancel_signals=self._signals.signals_seen,
            consumers_deleted=self._names.forgotten,
            paused=self._intake.flow.states(),
            limit_waits=dict(self._intake.limiter.waits),
            limit_slots=self._intake.limiter.slots(),
            key_parks=dict(self._key_limiter.parks),
            key_wakes=dict(self._key_limiter.wakes),
            key_slots=self._key_limiter.slots(),
        )

    def observe_renewals(self, callback: Callable[[float], None] | None) -> None:
        """Call ``callback`` with the seconds each lease renewal round takes (None: stop)."""
        self._leases.on_renewal = callback

    def observe_cancel_latency(self, callback: Callable[[float], None] | None) -> None:
        """Call ``callback`` with the seconds from a cancel's creation to its handler stopping.

        Args:
            callback: Called once per handler a cancel stopped; None stops the calls.
        """
        self._pool.on_cancel_latency = callback

    def _hooks(self) -> AbstractAsyncContextManager[Resources | None]:
        """The app's lifecycle around serving, or nothing when the caller runs it."""
        if self._lifecycle is None:
            return nullcontext()
        return self._lifecycle.running(self._hooks_grace)

    def _hooks_grace(self) -> float:
        """Seconds the shutdown hooks get: what remains of the grace since stop, at least 1."""
        if self._stop_requested_at is None:  # ended without a stop (burst, or a failure)
            return max(self._grace, 1.0)
        return max(self._grace - (time.monotonic() - self._stop_requested_at), 1.0)

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
            paused=sorted(self._intake.flow.paused()),
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
            layout = await partitions.ensure(
                self._redis, self._keys, role.name, role.partitions, role.priorities
            )
            self._shards[role.name] = layout.shards
            for shard in layout.shards:
                for stream in self._keys.level_streams(shard, role.priorities):
                    await streams.ensure_group(self._redis, stream)
        await self._register_roles()
        await self._leases.acquire_name()  # ours already after a retry: same token
        await self._mark_name()
        await self._signals.load()
        await self._intake.flow.refresh()  # a paused role reads nothing, from the first read
        return True

    async def _register_roles(self) -> None:
        """Add the roles served to the known roles, which task graphs are checked against.

        Only task submission needs them, so neither a full Redis nor a key of another type at
        their name (anyone with a publisher's or worker's rights may write one) stops the start.
        """
        names = [r.name for r in self._roles]
        key = self._keys.known_roles()
        try:
            # Read first: a full Redis refuses SADD even of members it has (see ensure_group).
            if names and not all(await self._redis.smismember(key, names)):
                await self._redis.sadd(key, *names)
        except OutOfMemoryError:  # drain first
            logger.warning("Redis is full (OOM): roles %s not registered for task graphs", names)
        except ResponseError as exc:
            if connect.is_outage(exc):
                raise
            self._bad_records["known_roles"] = self._bad_records.get("known_roles", 0) + 1
            logger.warning(
                "roles %s not registered for task graphs: %s is not a set (%s); DEL it, then "
                "restart a worker of each role",
                names,
                key,
                exc,
            )

    async def _mark_name(self) -> None:
        """Mark this consumer name next to every partition it reads, before the first read.

        A live name is never deleted by another worker's cleanup (streamflow.consumers). A full
        Redis refuses the marks' SET: the worker starts anyway (it is there to drain) and the
        marks follow at the first refresh Redis accepts; until then its reads keep it active.
        """
        self._names.serve(
            [
                (stream, GROUP)
                for role in self._roles
                for shard in self._shards[role.name]
                for stream in self._keys.level_streams(shard, role.priorities)
            ]
        )
        try:
            await self._names.mark()
        except OutOfMemoryError:
            logger.warning("Redis is full (OOM): consumer name %s not marked yet", self.consumer)

    async def _give_up_name(self) -> None:
        """Release the consumer name and its marks, never raising over what ended serving."""
        for release in (self._leases.release_name, self._names.unmark, self._key_limiter.aclose):
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
            tg.start_soon(self._events.run)
            task_status.started()
            await self._pool.run(lambda: self._intake.run(self._roles, self._shards, burst=burst))
            await self._settler.acker.flush()
            await self._events.flush()
            tg.cancel_scope.cancel()

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
