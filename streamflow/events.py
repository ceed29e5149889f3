"""Lifecycle events: what workers and coordinators tell subscribers, and how to follow them.

Workers write a job's ``started``, ``progress``, ``retrying`` and final events (``succeeded``,
``failed``, ``dead_lettered``, ``cancelled``); coordinators write a task's and its nodes' state
changes. All go to one stream per namespace (:meth:`Keys.lifecycle`), capped with
``MAXLEN ~`` (:data:`DEFAULT_MAX_LEN` entries of at most :data:`ENTRY_EVENTS` events and
:data:`ENTRY_BYTES`: a bound on its memory, not only on its entries). The models are in
:mod:`streamflow.records` (:class:`~streamflow.records.LifecycleEvent`, and
:class:`~streamflow.records.LifecycleJobs` for many plain jobs' ``started`` or ``succeeded``
events as one item, which readers expand).

Events are best-effort observability, never the truth: a final event is written only after the
owner-checked settle that it reports was applied (so a refused settle reports nothing), but
buffered, so a worker that dies in between never writes it, and an outage drops what was
buffered. The :class:`EventLog` buffers events and writes them every :data:`LINGER` seconds
in one script call (``events.lua``, not a pipeline of ``XADD`` commands), up to
:data:`ENTRY_EVENTS` of them per stream entry (not an entry, nor a round trip, per job), so
that writing them costs a worker little: a plain job's ``started`` joins its millisecond's
group and its ``succeeded`` its acknowledged batch's, a list append or nothing per job, encoded
together when written (one pass, no object per event). A role can turn them off
(``@app.role(..., events=False)``).

A run that reports progress also keeps its latest ``progress`` event in a key of its own
(:meth:`Keys.job_progress`, ``SET PX`` :data:`PROGRESS_TTL_MS`), written in the same round trip
as the events and deleted when the run ends, so that ``streamflow job`` shows it while the
job runs however busy the capped stream is. Runs that report none write nothing more.

:func:`follow` reads the stream (``XREAD``, one cursor per subscriber, as many subscribers as
you like) with filters and a bounded replay of the recent past.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from operator import attrgetter
from typing import TYPE_CHECKING, Any

import anyio
import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from streamflow import connect, scripts, streams
from streamflow.context import NEVER, check_progress
from streamflow.errors import InvalidNameError, ProtocolError
from streamflow.keys import Keys
from streamflow.protocol import PROTOCOL_VERSION, Job, now_ms
from streamflow.records import LIFECYCLE_FIELD, LifecycleEvent, decode_lifecycle

if TYPE_CHECKING:
    from streamflow.context import Context

logger = logging.getLogger(__name__)

#: The stream is capped near this many entries (``XADD MAXLEN ~``), each of at most
#: :data:`ENTRY_EVENTS` events and :data:`ENTRY_BYTES` bytes: a late subscriber can replay at
#: most this much of the past, and the stream holds at most about ``DEFAULT_MAX_LEN *
#: ENTRY_BYTES`` (8 MiB), about 2 MB when busy with plain jobs (50,000 events, their ``started``
#: and ``succeeded`` in :class:`~streamflow.records.LifecycleJobs` items of ~37 bytes a job).
DEFAULT_MAX_LEN = 500
#: Seconds an event waits in the buffer so that events of many jobs share one round trip.
LINGER = 0.05
#: The least time between two ``progress`` events of one run; the last value within it is
#: written when it ends (or before the job's final event), the others are dropped.
PROGRESS_INTERVAL = 0.5
#: How long a run's latest progress is kept (ms) after its last report. It is deleted when the
#: run ends: this only clears the key of a worker that died, and is long so that a handler that
#: reports seldom keeps showing its last report.
PROGRESS_TTL_MS = 3_600_000
#: Events in one stream entry at most (a :class:`~streamflow.records.LifecycleJobs` item counts
#: its jobs).
ENTRY_EVENTS = 100
#: Bytes of one stream entry at most (more only for a single larger event, which none is: the
#: largest, a ``progress`` with its object and text, or a hundred jobs' ids, are under 16 KiB).
ENTRY_BYTES = 16 * 1024
#: Events buffered at most (e.g. while Redis is unreachable); more are dropped and counted.
MAX_BUFFERED = 10_000

_ID, _ATTEMPT, _TASK_ID = attrgetter("id"), attrgetter("attempt"), attrgetter("task_id")
_time_ns = time.time_ns


class _Jobs:
    """Buffered ``started`` or ``succeeded`` events of plain jobs of one role, at one time.

    Written as :class:`~streamflow.records.LifecycleJobs` items: only the jobs' ids and
    attempts are kept (not the jobs, which are freed when settled), encoded together when the
    buffer is written, so that a job costs its event two list appends rather than an object of
    its own and a JSON encoding.
    """

    __slots__ = ("at_ms", "attempts", "ids", "role", "type")

    def __init__(
        self, type_: str, role: str, at_ms: int, ids: list[str], attempts: list[int]
    ) -> None:
        self.type = type_
        self.role = role
        self.at_ms = at_ms
        self.ids = ids
        self.attempts = attempts

    def pieces(self, consumer: str, room: int) -> list[tuple[bytes, int]]:
        """The items, JSON, with how many events each holds: the first at most ``room``."""
        ids, found, start = self.ids, [], 0
        size = room if room > 0 else ENTRY_EVENTS
        while start < len(ids):
            end = start + size
            chunk = ids[start:end]
            doc = {
                "protocol": PROTOCOL_VERSION,
                "kind": "lifecycle_jobs",
                "type": self.type,
                "at_ms": self.at_ms,
                "role": self.role,
                "consumer": consumer,
                "message_ids": chunk,
                "attempts": self.attempts[start:end],
            }
            found.append((orjson.dumps(doc), len(chunk)))
            start, size = end, ENTRY_EVENTS
        return found


class _Entries:
    """Builds stream entries of at most :data:`ENTRY_EVENTS` events and :data:`ENTRY_BYTES`."""

    def __init__(self) -> None:
        self.done: list[bytes] = []
        self._items: list[bytes] = []
        self.count = 0
        self._size = 2

    def add(self, raw: bytes, events: int) -> None:
        """Add an item of ``events`` events, in a new entry if it does not fit this one."""
        if self._items and (
            self.count + events > ENTRY_EVENTS or self._size + len(raw) > ENTRY_BYTES
        ):
            self.close()
        self._items.append(raw)
        self.count += events
        self._size += len(raw) + 1

    def close(self) -> None:
        """End the entry being built (if any)."""
        if self._items:
            self.done.append(b"[" + b",".join(self._items) + b"]")
        self._items, self.count, self._size = [], 0, 2


class EventLog:
    """Buffers lifecycle events of one process and writes them in batches.

    Args:
        redis: The client.
        keys: Key names.
        consumer: The worker's or coordinator's name, written in each event.
        max_len: The stream is capped near this many entries.
        linger: Seconds an event waits to share a round trip with others.
        progress_interval: See :data:`PROGRESS_INTERVAL`.

    Attributes:
        written: Events written.
        dropped: Events dropped (buffer full, or a write failed).
    """

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        consumer: str,
        *,
        max_len: int = DEFAULT_MAX_LEN,
        linger: float = LINGER,
        progress_interval: float = PROGRESS_INTERVAL,
    ) -> None:
        self._redis = redis
        self._script = scripts.register(redis, "events.lua")
        self._keys = keys
        self._stream = keys.lifecycle()
        self.consumer = consumer
        self._max_len = max_len
        self._linger = linger
        self._interval = progress_interval
        # Events in order: each JSON, or a group of plain jobs' (see _Jobs).
        self._buffer: list[bytes | _Jobs] = []
        self._buffered = 0  # events in the buffer
        # The last item of the buffer, if it is a group that a job's ``started`` may join.
        self._open: _Jobs | None = None
        self._wakeup = anyio.Event()
        # Runs whose latest progress waits for its interval to pass.
        self._trailing: list[Context] = []
        # The latest progress of runs, by key, to SET with the next write (None: to DEL).
        self._latest: dict[str, bytes | None] = {}
        self.written = 0
        self.dropped = 0
        self._failing = False

    # -- writing --------------------------------------------------------------------------------

    def add(self, type_: str, **fields: Any) -> None:
        """Buffer one event of ``type_`` with ``fields`` (None values are left out)."""
        self._push(_encode(type_, fields), 1)

    def job(self, type_: str, job: Job | None, role: str, **fields: Any) -> None:
        """Buffer an event about a job (``job`` None: an entry that never decoded)."""
        if job is None:
            self.add(type_, role=role, consumer=self.consumer, **fields)
            return
        self.add(
            type_,
            role=role,
            message_id=job.id,
            task_id=job.task_id,
            node_id=job.node_id,
            attempt=job.attempt,
            consumer=self.consumer,
            **fields,
        )

    def started(self, ctx: Context) -> None:
        """Buffer the ``started`` event of the run ``ctx`` is of: the hot path, once per run.

        Its ids are read from the context (slots), not from the job: a pydantic model's
        attribute costs three times as much to read, and this runs once per job.
        """
        if ctx.task_id is not None:  # a task's job: its ids go with it
            self.add(
                "started",
                role=ctx.role,
                message_id=ctx.message_id,
                task_id=ctx.task_id,
                node_id=ctx.node_id,
                attempt=ctx.attempt,
                consumer=self.consumer,
            )
            return
        # now_ms() inline: a call more per job costs as much as the rest of this test.
        at_ms, group, role = _time_ns() // 1_000_000, self._open, ctx.role
        if group is not None and group.at_ms == at_ms and group.role == role:
            if self._buffered < MAX_BUFFERED:
                group.ids.append(ctx.message_id)  # the same millisecond: one more in its group
                group.attempts.append(ctx.attempt)
                self._buffered += 1
            else:
                self.dropped += 1
            return
        group = _Jobs("started", role, at_ms, [ctx.message_id], [ctx.attempt])
        if self._push(group, 1):
            self._open = group

    def succeeded(self, jobs: list[Job], role: str) -> None:
        """Buffer the ``succeeded`` events of jobs of ``role`` acknowledged together, now."""
        if any(map(_TASK_ID, jobs)):  # of a task, not a node's run: rare; their ids go with them
            for job in jobs:
                if job.task_id is not None:
                    self.job("succeeded", job, role)
            jobs = [job for job in jobs if job.task_id is None]
        if jobs:
            ids, attempts = list(map(_ID, jobs)), list(map(_ATTEMPT, jobs))
            self._push(_Jobs("succeeded", role, now_ms(), ids, attempts), len(ids))

    def _push(self, item: bytes | _Jobs, events: int) -> bool:
        """Buffer ``item`` of ``events`` events, unless the buffer is full; whether it was."""
        if self._buffered + events > MAX_BUFFERED:
            self.dropped += events
            return False
        if not self._buffer:
            self._wakeup.set()
        self._buffer.append(item)
        self._buffered += events
        self._open = None
        return True

    def progress(self, ctx: Context, value: Any, message: str | None) -> None:
        """Buffer a run's progress, at most one event per interval (see :meth:`Context.progress`).

        Raises:
            ValueError: ``value`` is not a number or a JSON object within
                :data:`streamflow.context.MAX_PROGRESS_BYTES`, or ``message`` is longer than
                1000 characters.
        """
        check_progress(value, message)
        fields = {
            "role": ctx.role,
            "message_id": ctx.message_id,
            "task_id": ctx.task_id,
            "node_id": ctx.node_id,
            "attempt": ctx.attempt,
            "consumer": self.consumer,
            "progress": value,
            "message": message,
        }
        now = time.monotonic()
        if now - ctx._progress_at >= self._interval:
            ctx._progress_at = now
            ctx._progress_next = None
            self._add_progress(fields)
            return
        if ctx._progress_next is None:
            self._trailing.append(ctx)
            self._wakeup.set()
        ctx._progress_next = fields

    def last_progress(self, ctx: Context | None) -> None:
        """The run ended: write its held-back progress (before its final event), if any.

        And delete its latest progress (:meth:`Keys.job_progress`), if it reported any.
        """
        if ctx is None or ctx._progress_at == NEVER:
            return  # reported none: nothing to write or delete
        self._held_progress(ctx)
        key = _progress_key(self._keys, ctx.message_id)
        if key is not None:
            self._latest[key] = None
            self._wakeup.set()

    def _held_progress(self, ctx: Context) -> None:
        """Write a run's held-back progress now, if any."""
        if ctx._progress_next is not None:
            fields, ctx._progress_next = ctx._progress_next, None
            self._add_progress(fields)

    def _add_progress(self, fields: dict[str, Any]) -> None:
        """Buffer a ``progress`` event, and keep it as its job's latest progress."""
        raw = _encode("progress", fields)
        self._push(raw, 1)
        key = _progress_key(self._keys, fields["message_id"])
        if key is not None:
            self._latest[key] = raw

    def _due_progress(self) -> float:
        """Buffer the held-back progress that is due; seconds until the next one is."""
        now, wait, waiting = time.monotonic(), math.inf, []
        for ctx in self._trailing:
            if ctx._progress_next is None:
                continue  # written with its run's final event
            due = ctx._progress_at + self._interval
            if due <= now:
                ctx._progress_at = now
                self._held_progress(ctx)
            else:
                wait = min(wait, due - now)
                waiting.append(ctx)
        self._trailing = waiting
        return wait

    async def run(self) -> None:
        """Write buffered events every :data:`LINGER` seconds while there are any (forever)."""
        while True:
            wait = self._due_progress()
            if not self._buffer and not self._latest:
                with anyio.move_on_after(wait):
                    await self._wakeup.wait()
                self._wakeup = anyio.Event()
                if self._trailing and not self._buffer and not self._latest:
                    continue
            await anyio.sleep(self._linger)
            await self.flush()

    async def flush(self) -> None:
        """Write what is buffered (one round trip); drop it if that fails."""
        with anyio.move_on_after(5, shield=True):
            while self._buffer or self._latest:
                batch, count = self._buffer, self._buffered
                self._buffer, self._buffered, self._open = [], 0, None
                latest, self._latest = self._latest, {}
                try:
                    await self._write(batch, latest)
                except (RedisError, *connect.TRANSIENT_ERRORS) as exc:
                    # Best effort: the state in Redis is the truth, these are only news of it.
                    # An outage, a full Redis or a key of another type never stops the worker.
                    self.dropped += count
                    if not self._failing:
                        logger.warning("dropping lifecycle events until Redis takes them: %s", exc)
                    self._failing = True
                    return
                if self._failing:
                    logger.info("writing lifecycle events again (%d dropped so far)", self.dropped)
                self._failing = False
                self.written += count

    async def _write(self, batch: list[bytes | _Jobs], latest: dict[str, bytes | None]) -> None:
        # Many events per entry: one XADD per job and event cost Redis half again the work of
        # settling the job (and a draining worker as much of its rate); one per
        # ENTRY_EVENTS events costs next to nothing. And one script call for all of them, not a
        # pipeline of XADDs: redis-py packs and parses each pipelined command in Python, which
        # cost a draining worker ~0.6 us per message (tens of XADDs per flush).
        await scripts.write_events(
            self._script,
            self._redis,
            stream=self._stream,
            max_len=self._max_len,
            field=LIFECYCLE_FIELD,
            entries=self._entries(batch),
            latest=latest,
            ttl_ms=PROGRESS_TTL_MS,
        )

    def _entries(self, batch: list[bytes | _Jobs]) -> list[bytes]:
        """The stream entries (JSON arrays) that hold ``batch``, in order."""
        entries = _Entries()
        for item in batch:
            if isinstance(item, bytes):
                entries.add(item, 1)
                continue
            for raw, events in item.pieces(self.consumer, ENTRY_EVENTS - entries.count):
                entries.add(raw, events)
        entries.close()
        return entries.done


def _encode(type_: str, fields: dict[str, Any]) -> bytes:
    """An event of ``type_`` with ``fields`` (None values are left out), as JSON."""
    doc = {"protocol": PROTOCOL_VERSION, "kind": "lifecycle", "type": type_}
    doc["at_ms"] = now_ms()
    doc.update((name, value) for name, value in fields.items() if value is not None)
    return orjson.dumps(doc)


def _progress_key(keys: Keys, message_id: Any) -> str | None:
    """Where a job's latest progress is kept; None for an id no key can hold."""
    try:
        return keys.job_progress(message_id)
    except InvalidNameError:
        return None


# -- reading --------------------------------------------------------------------------------------


def matches(
    event: LifecycleEvent,
    roles: Collection[str] | None,
    message_id: str | None,
    task_id: str | None,
    types: Collection[str] | None = None,
) -> bool:
    """Whether ``event`` passes the filters (None: any)."""
    return (
        (roles is None or event.role in roles)
        and (message_id is None or event.message_id == message_id)
        and (task_id is None or event.task_id == task_id)
        and (types is None or event.type in types)
    )


async def start_id(redis: Redis, keys: Keys, since_ms: int | None) -> str:
    """Where a subscriber starts: after the newest event, or at ``since_ms`` (a replay).

    Not ``$``: a loop of ``XREAD ... $`` loses the events written between two reads.
    """
    if since_ms is not None:
        return f"{max(since_ms, 0)}-0"
    return (await streams.last_id(redis, keys.lifecycle())).decode()


async def follow(
    redis: Redis,
    keys: Keys,
    *,
    roles: Collection[str] | None = None,
    message_id: str | None = None,
    task_id: str | None = None,
    types: Collection[str] | None = None,
    since_ms: int | None = None,
    after: str | None = None,
    block_ms: int = 1000,
) -> AsyncIterator[LifecycleEvent]:
    """Every lifecycle event that passes the filters, from now (or ``since_ms``) on, for ever.

    Args:
        redis: A client whose socket timeout exceeds ``block_ms``.
        keys: Key names.
        roles: Only events of these roles (task events have none: leave it out for them).
        message_id: Only events of this job.
        task_id: Only events of this task (its own, its nodes' and its nodes' jobs').
        types: Only events of these types.
        since_ms: Replay the events written since this time (ms since the epoch) first, as far
            as the capped stream still holds them; None: only new events.
        after: Start after this entry id instead (see :func:`start_id`).
        block_ms: How long one read waits.
    """
    stream = keys.lifecycle()
    cursor = after if after is not None else await start_id(redis, keys, since_ms)
    # One job's events: entries that do not name it are skipped before decoding (a busy
    # namespace writes thousands of events a second, of which one waiter wants one or two).
    needle = orjson.dumps(message_id) if message_id is not None else b""
    while True:
        entries = await streams.read_broadcast(
            redis, stream, after=cursor.encode(), count=500, block_ms=block_ms
        )
        for entry in entries:
            cursor = entry.id.decode()
            if needle and needle not in entry.fields.get(LIFECYCLE_FIELD, b""):
                continue
            for event in _decode(cursor, entry.fields):
                if matches(event, roles, message_id, task_id, types):
                    yield event


def _decode(entry_id: str, fields: dict[bytes, bytes]) -> list[LifecycleEvent]:
    """The events of an entry; what cannot be read is logged and skipped."""
    # Anyone who may write the namespace may write garbage here: skip it, say so.
    try:
        events, problems = decode_lifecycle(fields)
    except ProtocolError as exc:
        logger.warning("skipped lifecycle entry %s: %s", entry_id, exc.detail)
        return []
    for problem in problems:
        logger.warning("skipped an event of lifecycle entry %s: %s", entry_id, problem)
    return events


@asynccontextmanager
async def watching(
    redis: Redis,
    keys: Keys,
    *,
    message_id: str | None = None,
    task_id: str | None = None,
    types: Collection[str] | None = None,
) -> AsyncIterator[Waker]:
    """A :class:`Waker` fed by the matching events written from now on, for the block."""
    waker = Waker()
    after = await start_id(redis, keys, None)  # before the caller's first read of the state
    events = follow(redis, keys, message_id=message_id, task_id=task_id, types=types, after=after)
    async with anyio.create_task_group() as tg:
        tg.start_soon(waker.feed, events)
        try:
            yield waker
        finally:
            tg.cancel_scope.cancel()


class Waker:
    """Wakes a waiter when a matching event arrives: a poll loop that sleeps until news.

    Used by ``submit --wait`` and ``cancel --wait``: they read the state (the truth) again when
    an event says it changed, and at the latest every ``fallback`` seconds (events are best
    effort: one may be missing).
    """

    def __init__(self) -> None:
        self._news = anyio.Event()
        #: The latest ``progress`` event of each task node seen, by node id.
        self.progress: dict[str, LifecycleEvent] = {}

    def _wake(self) -> None:
        self._news.set()

    async def wait(self, fallback: float) -> bool:
        """Wait for an event since the last call, at most ``fallback`` seconds; whether one came."""
        with anyio.move_on_after(fallback):
            await self._news.wait()
        came = self._news.is_set()
        self._news = anyio.Event()
        return came

    async def feed(self, events: AsyncIterator[LifecycleEvent]) -> None:
        """Wake on each event of ``events`` (run in a task group; cancelled when done).

        An outage ends the feed quietly: the waiter falls back to reading every ``fallback``.
        """
        try:
            async for event in events:
                if event.type == "progress" and event.node_id is not None:
                    self.progress[event.node_id] = event
                self._wake()
        except connect.TRANSIENT_ERRORS as exc:
            logger.debug("lifecycle events unavailable, waiting by polling: %s", exc)
