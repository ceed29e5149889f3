"""The coordinator process: turns the events workers report into task state, and fans out work.

Any number of coordinators run at once. They share every role's events stream (and the tasks
control stream) as the consumer group ``coordinators`` and adopt each other's events left
pending past the lease TTL, as workers adopt jobs. They also take the task submissions of other
languages (:mod:`streamflow.dag.submissions`). For each task with new events a coordinator:

1. loads the task's state (one HMGET; none when every commit since its last read was this
   coordinator's: the commit's version check confirms it) and applies the events with the
   pure state machine of :mod:`streamflow.dag.tasks` (duplicates, stale runs and any order
   are harmless);
2. commits the new state and the dispatches it justifies into the task's outbox, in one
   version-checked script (a concurrent commit by another coordinator makes it load again);
3. carries out the outbox: publishes each job with a dedup marker named after its
   ``(task, node, invocation)`` (on a single Redis in the commit's round trip, if it
   committed), runs coordinator functions, sends cancels, frees role slots; then removes the
   items (those of the jobs with step 4);
4. acknowledges and deletes the events (on a single Redis, in the round trip of its next
   read).

The tasks of one read are stepped up to ``STEPS_AT_ONCE`` at a time, fewest events first. A
task whose events in a read are only ``accepted`` (a run started) is not stepped at once: its
events stay pending up to ``ACCEPTED_HOLD`` and are applied with its next ones (usually the
run's ``done`` or first batch), one commit instead of two for a short run.

Steps 1 to 3 are :mod:`streamflow.dag.stepper`'s, the outbox items and carrying them out
:mod:`streamflow.dag.outbox`'s; this module is the process: start-up, its loops (reading,
adopting, sweeping, ticks, its registry entry) and step 4.

A coordinator killed anywhere in between leaves its events pending: another adopts them, finds
nothing new to record, and finishes the outbox; the dedup markers keep a dispatch from being
published twice. A sweep re-evaluates unfinished tasks every second (limits freed, outboxes
left behind by a crashed coordinator, submits cut short, cancels).

Slightly past the ~600 lines of the house rule on purpose: the step itself and the outbox are
already in their own modules, and what is left is one process, the :class:`Coordinator`, whose
loops (read, adopt, sweep, tick, announce) share its task group, stop flag, cancel book and
counters; moving some loops out would only pass that state around.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

import anyio
from anyio.abc import TaskStatus
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import ResponseError

from streamflow import connect, intake, partitions, registry, signals, streams
from streamflow.app import App
from streamflow.consumers import ConsumerNames, default_consumer_name
from streamflow.dag.outbox import Outbox
from streamflow.dag.stepper import Clears, Stepper
from streamflow.dag.store import DEFAULT_RETENTION_MS, TaskStore
from streamflow.dag.submissions import Submissions
from streamflow.dag.tasks import Event, Internal
from streamflow.dag.tracing import tracing_of
from streamflow.errors import ConfigError, InvalidNameError, ProtocolError
from streamflow.events import EventLog
from streamflow.functions import BUILTINS, Function
from streamflow.keys import COORDINATORS, Keys, validate_name
from streamflow.logs import BadKeys, shown
from streamflow.protocol import encode, now_ms
from streamflow.records import EVENT_FIELD, CancelSignal, TaskEvent, decode_event
from streamflow.scripts import Scripts

logger = logging.getLogger(__name__)

#: Seconds between looks at the set of known roles, for events streams to follow.
ROLES_REFRESH = 0.5
#: Seconds the app's shutdown hooks get in a coordinator (the worker's default grace).
HOOKS_GRACE = 30.0
#: Tasks one read's events are applied to at once (each task's steps stay one at a time).
STEPS_AT_ONCE = 16
#: Seconds a task's ``accepted`` events, alone in a read, wait for its next events. A run's
#: ``done`` (or first batch) usually follows at once: one commit instead of two.
ACCEPTED_HOLD = 0.05

#: The writes acknowledging a read's events: outbox items to clear, event ids per stream.
_Ack = tuple[Clears, dict[str, list[bytes]]]


class Coordinator:
    """Drives DAG tasks.

    Args:
        redis: An asyncio client; its socket timeout must exceed ``block_ms``.
        app: Provides user coordinator functions (the built-in ones are always there); its
            lifecycle hooks run around :meth:`run` (see :mod:`streamflow.lifecycle`).
        namespace: The key namespace.
        consumer: This coordinator's consumer name (unique per process; random by default).
        role_limits: Per role, the most nodes of that role that may run at once across all
            tasks. Give every coordinator the same limits.
        lease_ttl: Seconds an event may stay pending before another coordinator adopts it.
        block_ms: How long an idle read waits.
        read_count: The most events one read fetches.
        sweep_interval: Seconds between re-evaluations of every unfinished task.
        retention: Seconds a finished task's state and outputs are kept.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        app: App | None = None,
        namespace: str = "sf",
        consumer: str | None = None,
        role_limits: Mapping[str, int] | None = None,
        lease_ttl: float = 30.0,
        block_ms: int = 1000,
        read_count: int = 500,
        sweep_interval: float = 1.0,
        retention: float = DEFAULT_RETENTION_MS / 1000,
    ) -> None:
        self._redis = redis
        self._keys = Keys(namespace)
        self._scripts = Scripts(redis)
        self.store = TaskStore(
            redis,
            self._keys,
            self._scripts,
            retention_ms=int(retention * 1000),
            bad_key=self._store_bad_key,  # one warning and count with the reads of the key
        )
        self.functions: dict[str, Function] = dict(app.functions if app else BUILTINS)
        self._lifecycle = app.lifecycle() if app is not None and app.has_hooks else None
        self.consumer = validate_name(consumer or "coord-" + default_consumer_name(), "consumer")
        self.role_limits = {
            validate_name(r, "role"): int(n) for r, n in (role_limits or {}).items()
        }
        if read_count < 1 or any(n < 1 for n in self.role_limits.values()):
            raise ValueError("read_count and role limits must be at least 1")
        self._limited = frozenset(self.role_limits)
        self._lease_ms = int(lease_ttl * 1000)
        self._block_ms = block_ms
        self._read_count = read_count
        self._sweep_interval = sweep_interval
        self._book = signals.CancelBook()
        self._signals = signals.SignalListener(
            redis, self._keys, self._book, self._on_cancel, block_ms=block_ms
        )
        self._streams: list[str] = []
        self._unreadable: set[str] = set()
        self._bad_keys = BadKeys(logger)  # registry keys of another type met, by kind
        # Marks this coordinator's name next to the streams it reads; deletes dead coordinators'.
        self._names = ConsumerNames(
            redis,
            self._scripts,
            self._keys,
            self.consumer,
            ttl_ms=self._lease_ms,
            every=max(self._lease_ms / 3000, 0.05),
        )
        self._layouts = partitions.Layouts(redis, self._keys)
        self._outbox = Outbox(
            redis,
            self._keys,
            self._scripts,
            self.store,
            self._layouts,
            functions=self.functions,
            role_limits=self.role_limits,
            consumer=self.consumer,
        )
        self._submissions = Submissions(
            redis, self._keys, self.store, functions=set(self.functions), consumer=self.consumer
        )
        self._stepper = Stepper(
            redis, self._keys, self.store, self._outbox, self._book, limited=self._limited
        )
        self._events = EventLog(redis, self._keys, self.consumer)
        self._stepper.events = self._events
        # The app's tracing middleware, if any (never imported here: dag.tracing's seam).
        self._stepper.tracing = self._outbox.tracing = tracing_of(app.middleware if app else ())
        self._submissions.events = self._events
        self._reader = intake.GroupReader(
            redis,
            self._scripts,
            COORDINATORS,
            self.consumer,
            lease_ms=self._lease_ms,
            what="task events",
        )
        self._refreshed = float("-inf")
        self._ticks: set[str] = set()
        self._tick_wakeup = anyio.Event()
        self._stopping = anyio.Event()
        # Shared by every reader (one per events stream on a cluster): it also bounds the
        # connections that steps hold at once.
        self._steps = anyio.CapacityLimiter(STEPS_AT_ONCE)
        # Entries of tasks whose events so far are only ``accepted`` (pending, unacknowledged),
        # read again with the next read's; since when each task's have been held.
        self._held: list[tuple[str, streams.Entry]] = []
        self._held_since: dict[str, float] = {}
        # The last read's acknowledgement, sent with the next read (one round trip fewer).
        self._unsent: _Ack | None = None
        self.events_processed = 0
        self.observe_dispatch: Callable[[float], None] | None = None

    # -- public API -------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Coordinate until :meth:`stop` is called.

        Start-up retries outages (logged once, with backoff) until Redis answers or
        :meth:`stop` is called. The app's startup hooks run first, its shutdown hooks last.

        Raises:
            StartupError: A startup hook of the app raised (the shutdown hooks ran).
        """
        hooks = self._lifecycle
        async with hooks.running(lambda: HOOKS_GRACE) if hooks else contextlib.nullcontext():
            started = await connect.retry_outages(
                self._start_up,
                f"starting coordinator {self.consumer}",
                stopping=self._stopping.is_set,
            )
            if not started:
                task_status.started()
                return
            try:
                await self._serve(task_status)
            finally:
                await self._withdraw()

    async def _serve(self, task_status: TaskStatus[None]) -> None:
        started_at_ms = now_ms()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._signals.run)
            tg.start_soon(self._read_loop)
            tg.start_soon(self._adopt_loop)
            tg.start_soon(self._sweep_loop)
            tg.start_soon(self._tick_loop)
            tg.start_soon(self._names.run)
            tg.start_soon(self._events.run)
            # Announced once its functions are registered (at start-up): a submit that sees a
            # live coordinator also sees what it provides.
            describe = functools.partial(self._describe, started_at_ms)
            await tg.start(registry.COORDINATORS.keep_announced, self._redis, self._keys, describe)
            task_status.started()
            await self._stopping.wait()
            await self._finish_held()
            await self._events.flush()
            tg.cancel_scope.cancel()

    async def _withdraw(self) -> None:
        """On a stop: delete its consumer-name marks and its registry entry (best effort).

        Both expire by themselves: a mark after the lease TTL, an entry shows as gone.
        """
        for what, step in (
            ("consumer-name marks", self._names.unmark),
            ("coordinator registry entry", self._unannounce),
        ):
            with anyio.move_on_after(5, shield=True):
                try:
                    await step()
                except Exception as exc:  # cleanup: never over what ended the coordinator
                    logger.warning("could not delete the %s of %s (%r)", what, self.consumer, exc)

    async def _unannounce(self) -> None:
        await registry.COORDINATORS.withdraw(self._redis, self._keys, self.consumer)

    def enable_metrics(self) -> CollectorRegistry:
        """Returns the registry with this coordinator's metrics (and starts timing dispatch)."""
        from streamflow.metrics import coordinator_registry

        return coordinator_registry(self)

    def bad_records(self) -> dict[str, int]:
        """Malformed records read back from Redis and skipped so far, by kind."""
        return {**self._signals.statistics(), **self._bad_keys.counts}

    @property
    def commits(self) -> int:
        """Task steps committed."""
        return self._stepper.commits

    @property
    def conflicts(self) -> int:
        """Commits lost to another coordinator's (then loaded and tried again)."""
        return self._stepper.conflicts

    @property
    def finished(self) -> dict[str, int]:
        """Tasks ended, by state."""
        return self._stepper.finished

    @property
    def dispatches(self) -> int:
        """Node jobs published (each once, even when an outbox is carried out again)."""
        return self._outbox.dispatches

    @property
    def submissions(self) -> dict[str, int]:
        """Submissions from the submissions stream taken so far, by outcome."""
        return self._submissions.statistics()

    @property
    def trimmed_events(self) -> int:
        """Pending task events found deleted from their stream before they were applied."""
        return sum(self._reader.trimmed.values())

    @property
    def consumers_deleted(self) -> int:
        """Consumer names of stopped processes this coordinator deleted (they held nothing)."""
        return self._names.forgotten

    def stop(self) -> None:
        """Ask the coordinator to stop (it finishes the task it is processing)."""
        self._stopping.set()

    async def drain(self) -> int:
        """Process every pending event and re-evaluate every unfinished task, then return.

        Reads never block (burst mode, also on fakeredis). Returns how many events it
        processed and task steps it committed (0: nothing happened).
        """
        await self._prepare()
        await self._signals.load()
        before = self.events_processed + self.commits
        while True:
            entries = await self._read(block_ms=None)
            if not entries:
                break
            await self._handle(entries)
        await self._sweep()
        await self._run_ticks()
        await self._events.flush()
        return self.events_processed + self.commits - before

    # -- loops ------------------------------------------------------------------------------

    async def _start_up(self) -> bool:
        await self._prepare()
        await self._signals.load()
        return True

    def _describe(self, started_at_ms: int) -> registry.CoordinatorInfo:
        """Its registry entry now (``streamflow workers``, ``submit``, the dashboard)."""
        return registry.CoordinatorInfo(
            consumer=self.consumer,
            host=socket.gethostname(),
            pid=os.getpid(),
            version=registry.VERSION,
            functions=sorted(self.functions),
            started_at_ms=started_at_ms,
            events=self.events_processed,
            updated_at_ms=now_ms(),
        )

    async def _prepare(self) -> None:
        key = self._keys.known_functions()
        try:
            await self._redis.sadd(key, *self.functions)
        except ResponseError as exc:
            if connect.is_outage(exc):
                raise
            # Submitted graphs still get this coordinator's functions; Client.submit does not.
            what = f"functions not registered ({exc}); DEL it, then restart a coordinator"
            self._bad_key("known_functions", key, what)
        await self._refresh_streams()

    def _store_bad_key(self, kind: str, key: str, problem: str | None) -> None:
        """A registry key the task store could not write (the next read clears the streak)."""
        if problem is not None:
            self._bad_key(kind, key, problem)

    def _bad_key(self, kind: str, key: str, what: str) -> None:
        """Warn of a registry key of another type, and count it, once until it reads again."""
        self._bad_keys.bad(kind, key, "%s is not a set: %s", key, what)

    async def _refresh_streams(self) -> None:
        """Follow the events stream of every partition of every known role.

        New roles appear with new tasks and workers.
        """
        known = self._keys.known_roles()
        found = await streams.set_members(self._redis, known)
        if found is None:
            what = "no role's task events are followed; DEL it, then restart a worker of each role"
            self._bad_key("known_roles", known, what)
        else:
            self._bad_keys.ok(known)
        wanted = [self._keys.tasks_control(), self._keys.task_submissions()]
        for role in sorted(found or ()):
            with contextlib.suppress(ConfigError, InvalidNameError):
                layout = await self._layouts.get(role)
                wanted += [self._keys.events(shard) for shard in layout.shards]
        followed = []
        for stream in wanted:
            if stream not in self._streams:
                try:
                    await streams.ensure_group(self._redis, stream, COORDINATORS)
                except ConfigError as exc:  # another type of key there: it cannot be read
                    if stream not in self._unreadable:
                        self._unreadable.add(stream)
                        logger.warning("not following %s: %s", stream, exc)
                    continue
            followed.append(stream)
        if followed != self._streams:
            # Marked before the first read from them: a live name is never deleted.
            self._names.serve([(stream, COORDINATORS) for stream in followed])
            await self._names.mark()
        self._streams = followed
        self._refreshed = anyio.current_time()

    async def _read_loop(self) -> None:
        if connect.is_cluster(self._redis):
            await self._read_per_stream()
            return
        await intake.run_guarded(
            self._read_and_handle, "reading task events", self._stopping, regroup=self._regroup
        )

    async def _read_per_stream(self) -> None:
        """On a cluster: one blocking reader per events stream.

        The streams live in different slots (every role partition has its own), and one
        XREADGROUP cannot span slots. Roles are only ever added, so readers are only added.
        """
        backoff = connect.Backoff("following task event streams")
        following: set[str] = set()
        async with anyio.create_task_group() as tg:
            while not self._stopping.is_set():
                await intake.guarded(self._refresh_streams, backoff, regroup=self._regroup)
                for stream in self._streams:
                    if stream not in following:
                        following.add(stream)
                        tg.start_soon(self._stream_loop, stream)
                with anyio.move_on_after(ROLES_REFRESH):
                    await self._stopping.wait()

    async def _stream_loop(self, stream: str) -> None:
        async def step() -> None:
            entries = await self._reader.read(
                stream, count=self._read_count, block_ms=self._block_ms
            )
            await self._handle([(stream, entry) for entry in entries])

        async def regroup() -> None:
            await self._reader.regroup(stream)

        await intake.run_guarded(step, f"reading {stream}", self._stopping, regroup=regroup)

    async def _read_and_handle(self) -> None:
        """One cycle on a single Redis: read (sending the last acknowledgement), then handle.

        Held ``accepted`` events are handled again with what the read brings; the read waits
        no longer than the oldest of them may still wait.
        """
        if anyio.current_time() - self._refreshed > ROLES_REFRESH:
            await self._refresh_streams()
        block_ms = self._block_ms
        if self._held_since:
            left = min(self._held_since.values()) + ACCEPTED_HOLD - anyio.current_time()
            block_ms = min(block_ms, max(int(left * 1000) + 1, 1))
        unsent, self._unsent = self._unsent, None
        entries = await self._reader.read_many(
            self._streams,
            count=self._read_count,
            block_ms=block_ms,
            ahead=None if unsent is None else lambda pipe: self._ack_into(pipe, *unsent),
        )
        held, self._held = self._held, []
        await self._handle(held + entries, hold=True)

    async def _finish_held(self) -> None:
        """On a stop: step the held events, send the acknowledgement waiting for a read.

        The read loop (cancelled next) takes held events only when its read returns: taken
        here first, they are stepped once. Best effort: what is left stays pending, and is
        adopted and applied after the lease TTL like any event read at a stop.
        """
        held, self._held = self._held, []
        unsent, self._unsent = self._unsent, None
        with anyio.move_on_after(5, shield=True):
            try:
                if unsent is not None:
                    pipe = self._redis.pipeline(transaction=False)
                    self._ack_into(pipe, *unsent)
                    await pipe.execute()
                if held:
                    await self._handle(held)
            except Exception as exc:  # cleanup: never over what ended the coordinator
                logger.warning("could not finish the held task events on stopping (%r)", exc)

    async def _regroup(self) -> None:
        """A consumer group is gone: recreate every group before the next read."""
        self._streams, self._refreshed = [], float("-inf")

    async def _read(self, *, block_ms: int | None) -> list[tuple[str, streams.Entry]]:
        if not connect.is_cluster(self._redis):
            return await self._reader.read_many(
                self._streams, count=self._read_count, block_ms=block_ms
            )
        assert block_ms is None, "blocking reads on a cluster go per stream"
        entries: list[tuple[str, streams.Entry]] = []
        for stream in self._streams:
            read = await self._reader.read(stream, count=self._read_count, block_ms=None)
            entries += [(stream, entry) for entry in read]
        return entries

    async def _adopt_loop(self) -> None:
        await intake.run_guarded(
            self._adopt,
            "adopting task events",
            self._stopping,
            regroup=self._regroup,
            every=min(max(self._lease_ms / 3000, 0.05), 2.0),
        )

    async def _adopt(self) -> None:
        """Take over events another coordinator left pending past the lease TTL.

        One bounded step per stream per tick (see :meth:`streamflow.intake.GroupReader.adopt`).
        """
        for stream in list(self._streams):
            adopted = await self._reader.adopt(stream, self._read_count)
            if adopted:
                logger.info("adopted %d task events of %s", len(adopted), stream)
                await self._handle([(stream, entry) for entry in adopted])

    async def _sweep_loop(self) -> None:
        backoff = connect.Backoff("sweeping unfinished tasks")
        refused = ""
        while not self._stopping.is_set():
            with anyio.move_on_after(self._sweep_interval):
                await self._stopping.wait()
            try:
                await intake.guarded(self._sweep, backoff, regroup=self._regroup)
            except ResponseError as exc:
                # A key of the wrong type (written by hand): say so once, and keep sweeping.
                if str(exc) != refused:
                    logger.warning("sweeping tasks: Redis refused: %s", shown(str(exc)))
                refused = str(exc)
                continue
            refused = ""

    async def _sweep(self) -> None:
        """Queue a re-evaluation of every unfinished task; free leaked role slots."""
        active = await self._redis.smembers(self._keys.tasks_active())
        for raw in active:
            task_id = streams.text(raw)
            try:
                self._ticks.add(validate_name(task_id, "task id"))
            except InvalidNameError:
                # Not one of ours (written by hand): it names no task this could run.
                logger.warning("not a task id in the active tasks set: %r", task_id[:200])
                await self._redis.srem(self._keys.tasks_active(), raw)
        self._tick_wakeup.set()
        await self._outbox.free_leaked_slots()

    async def _tick_loop(self) -> None:
        tick_backoff = connect.Backoff("re-evaluating tasks")
        while not self._stopping.is_set():
            await self._tick_wakeup.wait()
            self._tick_wakeup = anyio.Event()
            await intake.guarded(self._run_ticks, tick_backoff, regroup=self._regroup)

    async def _run_ticks(self) -> None:
        while self._ticks:
            task_id = self._ticks.pop()
            await self._process_guarded(task_id, [Internal("tick")])

    async def _process_guarded(
        self, task_id: str, events: list[Event], clears: Clears | None = None
    ) -> bool:
        """:meth:`process`; False when it failed for a reason other than an outage."""
        try:
            await self._step(task_id, events, None, clears)
        except Exception as exc:
            if connect.is_outage(exc) or streams.is_group_lost(exc):
                raise  # the loop backs off, or recreates the groups, and reads again
            # A bug or bad data in one task must not stop every other task, nor the loop.
            logger.exception("task %s: processing events failed", task_id)
            return False
        return True

    def _on_cancel(self, signal: CancelSignal) -> None:
        if signal.target in ("task", "any"):
            self._ticks.add(signal.target_id)
            self._tick_wakeup.set()

    # -- events -----------------------------------------------------------------------------

    async def _handle(
        self, entries: list[tuple[str, streams.Entry]], *, hold: bool = False
    ) -> None:
        """Apply a read's events task by task, then acknowledge and delete them.

        With ``hold`` (the read loop on a single Redis), the events of a task that are only
        ``accepted`` are kept pending in :attr:`_held` for up to ``ACCEPTED_HOLD`` (its next
        events are applied with them, in one step), and the acknowledgement waits in
        :attr:`_unsent` for the next read.
        """
        by_task: dict[str, list[Event]] = defaultdict(list)
        owners: list[str | None] = []
        for stream, entry in entries:
            owners.append(await self._decode(stream, entry, by_task))
        held = self._hold_accepted(by_task) if hold else set()
        clears: Clears = []
        failed = await self._process_tasks(by_task, clears)
        if held:
            self._held = [e for e, owner in zip(entries, owners, strict=True) if owner in held]
        ack = self._ack_of(entries, owners, failed | held, clears)
        if hold:
            self._unsent = ack
            return
        pipe = self._redis.pipeline(transaction=False)
        self._ack_into(pipe, *ack)
        await pipe.execute()

    async def _decode(
        self, stream: str, entry: streams.Entry, by_task: dict[str, list[Event]]
    ) -> str | None:
        """Add an entry's event to its task's in ``by_task``; returns the task (if an event)."""
        if stream == self._keys.task_submissions():
            # Creates the task, whose control entry then starts it like any other.
            await self._submissions.take(entry)
            return None
        if stream == self._keys.tasks_control():
            task_id = entry.fields.get(b"task", b"").decode(errors="replace")
            with contextlib.suppress(ValueError):
                by_task[validate_name(task_id, "task id")].append(Internal("tick"))
                return task_id
            return None
        try:
            event = decode_event(entry.fields)
        except ProtocolError as exc:
            await self._reject(stream, entry, exc)
            return None
        by_task[event.task_id].append(event)
        return event.task_id

    def _hold_accepted(self, by_task: dict[str, list[Event]]) -> set[str]:
        """Take out of ``by_task`` the tasks whose events are only ``accepted``, held not long.

        An ``accepted`` event changes what a task shows (the node ``running``), never what it
        decides, so it may wait a little for the run's next event; it stays pending meanwhile
        (a crash leaves it to be adopted like any other).
        """
        now = anyio.current_time()
        held: set[str] = set()
        for task_id, events in by_task.items():
            only_accepted = all(isinstance(e, TaskEvent) and e.type == "accepted" for e in events)
            if only_accepted and now - self._held_since.setdefault(task_id, now) < ACCEPTED_HOLD:
                held.add(task_id)
        for task_id in held:
            del by_task[task_id]
        self._held_since = {t: since for t, since in self._held_since.items() if t in held}
        return held

    async def _process_tasks(self, by_task: dict[str, list[Event]], clears: Clears) -> set[str]:
        """Step each task with its events, ``STEPS_AT_ONCE`` at most at once; returns those failed.

        Tasks are independent (one task's steps are serialized by the stepper), and a step is
        mostly round trips: stepping several at once keeps Redis and this process busy instead
        of waiting, so that a read of many tasks' events ends sooner.
        """
        failed: set[str] = set()

        async def step(task_id: str, events: list[Event]) -> None:
            async with self._steps:
                if not await self._process_guarded(task_id, events, clears):
                    # Its events stay pending, to be adopted and tried again after the lease TTL.
                    failed.add(task_id)
                    return
                self.events_processed += sum(1 for e in events if isinstance(e, TaskEvent))

        if len(by_task) == 1:
            await step(*next(iter(by_task.items())))
            return failed
        try:
            async with anyio.create_task_group() as tg:
                # Fewest events first: a task with a batch or two (a short step) is not held
                # behind one with hundreds; every task of the read is stepped before the next.
                for task_id, events in sorted(by_task.items(), key=lambda item: len(item[1])):
                    tg.start_soon(step, task_id, events)
        except BaseExceptionGroup as group:
            # An outage (or a lost group) in one step: raised as itself, for the loop to handle.
            raise _first(group) from None
        return failed

    @staticmethod
    def _ack_of(
        entries: list[tuple[str, streams.Entry]],
        owners: list[str | None],
        skip: set[str],
        clears: Clears,
    ) -> _Ack:
        """The acknowledgement of the entries whose task (``owners``) is not in ``skip``."""
        by_stream: dict[str, list[bytes]] = defaultdict(list)
        for (stream, entry), owner in zip(entries, owners, strict=True):
            if skip and owner in skip:
                continue
            by_stream[stream].append(entry.id)
        return clears, by_stream

    def _ack_into(self, pipe: Pipeline, clears: Clears, by_stream: dict[str, list[bytes]]) -> None:
        """Queue an acknowledgement: delete the events, remove the published jobs' items."""
        for task_id, names in clears:  # the jobs published: no longer in the outbox
            if names:
                pipe.hdel(self._keys.task_outbox(task_id), *names)
        for stream, ids in by_stream.items():
            pipe.xack(stream, COORDINATORS, *ids)
            pipe.xdel(stream, *ids)

    async def _reject(self, stream: str, entry: streams.Entry, exc: ProtocolError) -> None:
        """A malformed event is kept in the role's dead-letter stream, not dropped."""
        role = stream.split("{role:", 1)[-1].split("}", 1)[0]
        logger.warning(
            "malformed task event %s on %s: %s", entry.id.decode(), stream, shown(exc, 4000)
        )
        fields: dict[Any, Any] = {b"invalid_event": f"{exc.reason}: {exc.detail}".encode()}
        fields.update({b"raw:" + k: v for k, v in entry.fields.items()})
        with contextlib.suppress(ValueError):
            await self._redis.xadd(
                self._keys.dead_letters(role), fields, maxlen=100_000, approximate=True
            )

    async def process(
        self, task_id: str, events: list[Event], partials: dict[tuple[str, int], Any] | None = None
    ) -> None:
        """Apply events to one task, commit, and carry out its outbox."""
        await self._step(task_id, events, partials, None)

    async def _step(
        self,
        task_id: str,
        events: list[Event],
        partials: dict[tuple[str, int], Any] | None,
        clears: Clears | None,
    ) -> None:
        await self._stepper.process(task_id, events, partials, clears=clears)
        if self.observe_dispatch is not None:
            now = now_ms()
            for event in events:
                if isinstance(event, TaskEvent) and event.type == "batch":
                    self.observe_dispatch(max(now - event.at_ms, 0) / 1000)


def _first(group: BaseExceptionGroup[Any]) -> BaseException:
    """The first exception in ``group``, out of any nested groups."""
    first = group.exceptions[0]
    return _first(first) if isinstance(first, BaseExceptionGroup) else first


def event_fields(event: TaskEvent) -> dict[bytes, bytes]:
    """The stream fields of an event (for tests and tools that write events by hand)."""
    return {EVENT_FIELD: encode(event)}
