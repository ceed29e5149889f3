"""Intake: how entries come in, for workers and coordinators alike.

* :func:`guarded` and :func:`run_guarded`: how every loop runs a step (an outage is logged once
  and backed off, a lost consumer group recreated, anything else raised).
* :class:`GroupReader`: a stream consumed through a consumer group, XREADGROUP for new entries
  (or the consumer's own pending ones) and one bounded XAUTOCLAIM step per tick for entries
  idle past the lease TTL.
* :class:`ReadAhead`: how much a worker reads (free handler slots plus the prefetch), and when.
* :class:`Promoter`: due retries from a partition's delayed schedule back to its stream.
* :class:`Intake`: a worker's reader, adopter and promoter per partition, handing what they
  take to the worker. Nothing here decides an entry's end: it imports neither the worker nor
  the DAG side.

A paused role (:mod:`streamflow.flow`) is neither read nor adopted from: its readers wait for
the resume before their next read. A read that was already blocked when the pause was seen
hands what it returns back at once (``release.lua``: adopted at once after the resume, the
delivery count unchanged), so nothing read after the pause was seen starts. Entries read
before it and queued for a handler slot (the prefetch, a handful) still run: they are held and
their leases renewed, and releasing them would race their start. Entries pending under a dead
worker stay pending until the resume; due retries still move to the stream (to wait there).

A limited role's reader asks the :class:`~streamflow.flow.Limiter` for permits before each read
and reads no more entries than it was granted (see :mod:`streamflow.flow`); its adopter does the
same before each adoption step, and adopts no more entries than it was granted (none: it tries
again at its next tick, the entries staying pending, idle, where they are). Under a rate, a
reader whose stream flows reads every start due without blocking; once it is drained it asks
for one start and blocks, and takes that start again when an entry arrives after a wait (its
grant aged while it blocked: see :meth:`Intake._after_limited_read`). Per-key limits are
applied later, once an entry is decoded (:mod:`streamflow.keylimits`), to read and adopted
entries alike.

Over 600 lines on purpose: reading, adoption, read-ahead, promotion and the flow-control
gate are the one path by which entries come in; each class is small, and splitting them would
spread one invariant (never read what cannot be held) over modules.
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Literal

import anyio
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import ResponseError

from streamflow import connect, flow, pipelines, scripts, streams
from streamflow.app import Role
from streamflow.delivery import InFlight
from streamflow.flow import Limiter, PauseWatch
from streamflow.keylimits import KeyLimiter
from streamflow.keys import Keys, role_of_shard
from streamflow.leases import LeaseKeeper
from streamflow.logs import BadKeys
from streamflow.priorities import LevelOrder
from streamflow.protocol import MESSAGE_FIELD, now_ms
from streamflow.scripts import Scripts

logger = logging.getLogger(__name__)

#: Seconds between looks at a role's delayed schedule when nothing is due sooner.
PROMOTE_POLL = 0.5
#: ``prefetch="auto"`` reads ahead about as many entries as the worker starts in this many
#: seconds at its recent pace, so that an entry waits about this long for a handler slot.
AUTO_PREFETCH_WAIT = 0.05
#: The shortest period over which the pace is measured (reads closer together reuse it).
PACE_WINDOW = 0.01
#: ``prefetch="auto"`` holds at most about this many bytes of messages read ahead (at the size of
#: recent messages), so that a burst of large messages does not fill the worker's memory.
AUTO_PREFETCH_BYTES = 16 * 1024 * 1024

Step = Callable[[], Awaitable[object]]
#: Called with (role, shard, stream, entries, confirmed at): hold and queue them.
Deliver = Callable[[Role, str, str, list[streams.Entry], float], None]


async def guarded(step: Step, backoff: connect.Backoff, *, regroup: Step | None = None) -> bool:
    """Run one step of a loop; True if it succeeded.

    An outage is logged (once per outage, by ``backoff``) and waited out; a lost consumer group
    (``NOGROUP``) is recreated with ``regroup`` when given; anything else is raised.
    """
    try:
        return await backoff.attempt(step)
    except Exception as exc:  # NOGROUP is not an outage: attempt raises it
        if regroup is None or not streams.is_group_lost(exc):
            raise
        await guarded(regroup, backoff)  # can meet TRYAGAIN while its slot migrates
        return False


async def run_guarded(
    step: Step,
    what: str,
    stopping: anyio.Event,
    *,
    regroup: Step | None = None,
    every: float | None = None,
) -> None:
    """Run ``step`` until ``stopping`` is set, each run :func:`guarded`.

    Args:
        step: One step of the loop.
        what: What the loop does, for the outage log (``"reading task events"``).
        stopping: Ends the loop (checked before every step).
        regroup: Recreates a lost consumer group.
        every: Seconds to wait before each step (a tick); None runs the next step at once.
    """
    backoff = connect.Backoff(what)
    while not stopping.is_set():
        if every is not None and await sleep_unless(stopping, every):
            return
        await guarded(step, backoff, regroup=regroup)


async def sleep_unless(stopping: anyio.Event, seconds: float) -> bool:
    """Sleep ``seconds``, returning True at once if ``stopping`` is (or becomes) set."""
    with anyio.move_on_after(seconds):
        await stopping.wait()
    return stopping.is_set()


class GroupReader:
    """Consumes streams through one consumer group, adopting entries idle past the lease.

    Args:
        redis: The client; its socket timeout must exceed any ``block_ms`` given.
        scripts: The registered Lua scripts (adoption runs ``claim.lua``).
        group: The consumer group.
        consumer: This process's consumer name.
        lease_ms: Entries pending longer than this are adopted.
        what: What the entries are, for logs (``"entries"``, ``"task events"``).
    """

    def __init__(
        self,
        redis: Redis,
        scripts: Scripts,
        group: str,
        consumer: str,
        *,
        lease_ms: int,
        what: str = "entries",
    ) -> None:
        self._redis = redis
        self._scripts = scripts
        self.group = group
        self.consumer = consumer
        self.lease_ms = lease_ms
        self._what = what
        self._cursors: dict[str, bytes] = {}
        #: Pending entries found deleted from the stream before they were settled, by stream.
        self.trimmed: dict[str, int] = {}
        # Each stream's reads go on a connection held for them (see pipelines.Held), except on
        # a cluster: its client sends each command to the node that owns the slot, follows
        # MOVED and ASK and reloads the slot map after a failover, which a connection held to
        # one node would bypass; there the reads keep redis-py's command path.
        self._held: dict[str, pipelines.Held] | None = None if connect.is_cluster(redis) else {}

    async def read(self, stream: str, *, count: int, block_ms: int | None) -> list[streams.Entry]:
        """New entries of one stream (XREADGROUP ``>``), on the stream's held connection."""
        held = None
        if self._held is not None:
            held = self._held.get(stream)
            if held is None:
                held = self._held[stream] = pipelines.Held(self._redis.connection_pool)
        return await streams.read_group(
            self._redis,
            stream,
            self.consumer,
            count=count,
            block_ms=block_ms,
            group=self.group,
            held=held,
        )

    async def aclose(self) -> None:
        """Give the held connections back to the pool (closed first if a read was cut short)."""
        held, self._held = self._held, None if self._held is None else {}
        for connection in (held or {}).values():
            await connection.aclose()

    async def read_many(
        self,
        names: Sequence[str],
        *,
        count: int,
        block_ms: int | None,
        ahead: Callable[[Pipeline], object] | None = None,
    ) -> list[tuple[str, streams.Entry]]:
        """New entries of several streams in one XREADGROUP (one slot on a cluster).

        ``ahead`` adds commands sent before the read in its round trip (a single Redis only).
        """
        return await streams.read_groups(
            self._redis,
            names,
            self.group,
            self.consumer,
            count=count,
            block_ms=block_ms,
            ahead=ahead,
        )

    async def read_levels(
        self, names: Sequence[str], *, count: int
    ) -> list[tuple[str, list[streams.Entry]]]:
        """New entries of one partition's levels in the order of ``names``, at most ``count``.

        One ``read_levels.lua`` call: an ``XREADGROUP`` per level without ``BLOCK``, the next
        level only for what the previous left of ``count``.
        """
        return await scripts.read_levels(
            self._scripts, self._redis, names, self.consumer, count=count, group=self.group
        )

    async def read_own(self, stream: str, *, after: bytes, count: int) -> list[streams.Entry]:
        """Entries already pending under this consumer after id ``after``, with their counts."""
        return await streams.read_own_pending(
            self._redis, stream, self.consumer, after=after, count=count, group=self.group
        )

    async def release(self, stream: str, entries: list[streams.Entry]) -> int:
        """Hand entries just read back, for immediate adoption, their delivery count unchanged.

        Only for the workers' group (``release.lua`` names it); returns how many were ours.
        """
        ids = [entry.id for entry in entries]
        return await scripts.release(
            self._scripts, self._redis, stream, self.consumer, ids, idle_ms=scripts.RELEASE_IDLE_MS
        )

    async def regroup(self, stream: str) -> None:
        """Recreate a lost group (at ``0``: nothing already in the stream is skipped)."""
        logger.warning("consumer group %s of %s is gone; recreating it", self.group, stream)
        await streams.ensure_group(self._redis, stream, self.group)

    async def adopt(self, stream: str, count: int) -> list[streams.Entry]:
        """One bounded adoption step on ``stream`` (XAUTOCLAIM, at most ``count`` entries).

        Follows the scan's cursor, one step per call, so that a long pending list is covered in
        turns instead of rescanned from the start (which starves entries behind live ones).
        Adoption counts as a delivery, so a poison message reaches its delivery limit.
        """
        cursor, entries, deleted = await scripts.claim(
            self._scripts,
            self._redis,
            stream,
            self.consumer,
            min_idle_ms=self.lease_ms,
            cursor=self._cursors.get(stream, b"0-0"),
            count=count,
            group=self.group,
        )
        self._cursors[stream] = cursor
        if deleted:
            self.trimmed[stream] = self.trimmed.get(stream, 0) + len(deleted)
            logger.error(
                "%d pending %s of %s were deleted from the stream before they were "
                "acknowledged (trimmed or deleted by hand): that work is lost: %s",
                len(deleted),
                self._what,
                stream,
                ", ".join(streams.text(d) for d in deleted[:10]),
            )
        return entries


class ReadAhead:
    """How much a worker reads: its free handler slots plus the prefetch, and when.

    Args:
        concurrency: Handler slots.
        read_count: The most entries one read fetches (and the most ``"auto"`` reads ahead).
        prefetch: Entries read ahead of free slots, or ``"auto"`` (see :class:`Worker`).
        stopping: Set when the worker stops: a reader waiting for room returns.
    """

    def __init__(
        self,
        concurrency: int,
        read_count: int,
        prefetch: int | Literal["auto"],
        stopping: anyio.Event,
    ) -> None:
        self.concurrency = concurrency
        self.read_count = read_count
        self.auto = prefetch == "auto"
        self._stopping = stopping
        #: Entries held: queued or running, not yet settled.
        self.in_flight = 0
        #: Entries taken since start (read or adopted).
        self.received = 0
        self.set_prefetch(0 if isinstance(prefetch, str) else prefetch)
        # The pace (entries finished per second) that "auto" sizes the prefetch by.
        self._pace = 0.0
        self._paced_at = time.monotonic()
        self._paced_done = 0
        self._message_bytes = 0.0  # the size of recent messages, sampled once per read
        self._capacity = anyio.Event()
        self._reader_waiting = False
        #: A reader was woken and has not run yet; a consumer lets it in once this many
        #: entries can be read, so that the read overlaps handling what is still queued.
        self.reader_woken = False

    def set_prefetch(self, prefetch: int) -> None:
        """Read ``prefetch`` entries ahead of the free handler slots."""
        self.prefetch = prefetch
        self.held_limit = self.concurrency + prefetch
        self.read_ahead_at = max(1, self.held_limit // 2)

    def took(self, entries: list[streams.Entry]) -> None:
        """``entries`` were read or adopted: they hold slots until :meth:`finished`."""
        if self.auto:
            sample = len(entries[0].fields.get(MESSAGE_FIELD, b""))
            recent = self._message_bytes
            self._message_bytes = (recent + sample) / 2 if recent else float(sample)
        self.in_flight += len(entries)
        self.received += len(entries)

    def finished(self) -> None:
        """One entry's handling ended: free its slot (and wake the reader if it now reads)."""
        self.in_flight -= 1
        if self._reader_waiting:
            self.wake_reader()

    def free(self) -> int:
        """Slots free for entries (negative: more held than the limit)."""
        return self.held_limit - self.in_flight

    def room_to_read_ahead(self) -> bool:
        """Whether a woken reader would read enough now to overlap handling the queue."""
        return self.held_limit - self.in_flight >= self.read_ahead_at

    def adapt(self) -> None:
        """With ``prefetch="auto"``: read ahead what the worker starts in a short wait.

        Measured once per read, from the entries finished since the last measurement, so the
        hot path pays nothing for it. An idle worker's pace falls towards 0, and so does its
        prefetch; slow jobs (1 s each on 64 slots: 64 per second) get about 3.
        """
        now = time.monotonic()
        elapsed = now - self._paced_at
        if elapsed < PACE_WINDOW:
            return
        done = self.received - self.in_flight
        pace = (done - self._paced_done) / elapsed
        self._paced_at, self._paced_done = now, done
        # Smoothed over a few reads, so that one slow handler does not empty the buffer.
        self._pace = (self._pace + pace) / 2
        fit = int(AUTO_PREFETCH_BYTES / max(self._message_bytes, 1.0))
        self.set_prefetch(min(self.read_count, fit, int(self._pace * AUTO_PREFETCH_WAIT)))

    def budget(self) -> int:
        """How many entries to read now: 0 while the prefetch buffer is still well stocked."""
        free = self.held_limit - self.in_flight
        if free <= 0:
            return 0
        if self.in_flight < self.concurrency or free >= max(1, self.prefetch // 2):
            return free  # a handler slot is idle, or the buffer is half drained
        return 0

    async def wait_budget(self) -> int:
        """Wait until there is room to read (or the worker stops); how many to read."""
        if self.auto:
            self.adapt()
        while (budget := self.budget()) == 0 and not self._stopping.is_set():
            await self.wait_progress()
        return budget

    async def wait_progress(self) -> None:
        """Wait until a held entry finishes (or :meth:`wake_reader` is forced by a stop)."""
        if self._capacity.is_set():
            self._capacity = anyio.Event()
        self._reader_waiting = True
        await self._capacity.wait()
        self.reader_woken = False

    def stop(self) -> None:
        """The worker stops: wake the reader, whatever it waits for."""
        self._capacity.set()

    def wake_reader(self) -> None:
        """Wake a waiting reader, if it would act on it.

        Only then: waking it per finished entry costs a task switch per message.
        """
        if self._reader_waiting and (self.budget() or self.in_flight == 0):
            self._reader_waiting = False
            self.reader_woken = True
            self._capacity.set()


class Promoter:
    """Moves due retries from role partitions' delayed schedules back to their streams."""

    def __init__(self, redis: Redis, scripts: Scripts, keys: Keys) -> None:
        self._redis = redis
        self._scripts = scripts
        self._keys = keys
        self._wakeups: dict[str, anyio.Event] = {}
        #: Delayed schedules found holding another type, by kind (``delayed``).
        self._bad_keys = BadKeys(logger)  # schedules that hold another type
        self.bad_records = self._bad_keys.counts

    def wake_all(self) -> None:
        """Wake every promoter (the worker stops)."""
        for wakeup in self._wakeups.values():
            wakeup.set()

    def wake(self, shard: str) -> None:
        """A retry was scheduled on ``shard``: look at its schedule now."""
        wakeup = self._wakeups.get(shard)
        if wakeup is not None:
            wakeup.set()

    async def run(self, shard: str, stopping: anyio.Event, levels: int = 1) -> None:
        """Promote ``shard``'s due retries as they fall due, until ``stopping``."""
        while not stopping.is_set():
            wakeup = self._wakeups[shard] = anyio.Event()
            next_due = await self.promote_due(shard, levels)
            # Sleep until the next due retry; a retry scheduled here wakes us at once, and the
            # poll picks up delayed messages other processes schedule.
            wait = PROMOTE_POLL if next_due is None else (next_due - now_ms()) / 1000
            with anyio.move_on_after(min(max(wait, 0.002), PROMOTE_POLL)):
                await wakeup.wait()

    async def promote_due(self, shard: str, levels: int = 1) -> int | None:
        """Move due retries of a role partition to its streams; returns the next due time (ms).

        Each priority level has its own schedule, and its due jobs go back to its own stream.
        """
        soonest: int | None = None
        for level in range(levels - 1, -1, -1):
            schedule = self._keys.delayed(shard, level)
            try:
                moved, next_due = await scripts.promote(
                    self._scripts, self._redis, self._keys.role_stream(shard, level), schedule
                )
            except connect.TRANSIENT_ERRORS:
                return None  # the reader's backoff reports the outage
            except ResponseError as exc:
                if connect.is_outage(exc):
                    return None
                self._unreadable(schedule, exc)  # polled again: it may be fixed
                continue
            self._bad_keys.ok(schedule)
            if moved:
                logger.debug("moved %d due retries of %s (level %d)", moved, shard, level)
            if next_due is not None and (soonest is None or next_due < soonest):
                soonest = next_due
        return soonest

    def _unreadable(self, schedule: str, exc: ResponseError) -> None:
        """Warn once (until it works again) that a delayed schedule is unusable.

        Anyone with a publisher's rights may write another type of key at its name.
        """
        self._bad_keys.bad(
            "delayed",
            schedule,
            "cannot promote the due retries and delayed jobs of %s (%s): they wait until it is "
            "a sorted set again; the role's new jobs are served meanwhile",
            schedule,
            exc,
        )


class Intake:
    """A worker's reading side: per role partition a reader, an adopter and a promoter.

    Args:
        reader: The worker's group reader (the role streams' group, its consumer name).
        leases: Confirms reads that took longer than a lease is safe for.
        held: The entries this process holds (adoption does not return them twice).
        read_ahead: Sizes the reads and parks the readers until there is room.
        promoter: Moves due retries back to the streams.
        keys: Key names.
        deliver: Takes the entries read or adopted: hold and queue them.
        flow: Which roles are paused (their readers and adopters wait).
        limiter: Grants limited roles' starts and holds their running slots.
        stopping: Set when the worker stops: every loop returns.
        block_ms: How long an idle read waits before looking again.
    """

    def __init__(
        self,
        reader: GroupReader,
        leases: LeaseKeeper,
        held: InFlight,
        read_ahead: ReadAhead,
        promoter: Promoter,
        keys: Keys,
        deliver: Deliver,
        flow: PauseWatch,
        limiter: Limiter,
        stopping: anyio.Event,
        *,
        block_ms: int,
    ) -> None:
        self.reader = reader
        self._leases = leases
        self._held = held
        self._read_ahead = read_ahead
        self._promoter = promoter
        self._keys = keys
        self._deliver = deliver
        self.flow = flow
        self.limiter = limiter
        self._stopping = stopping
        self._block_ms = block_ms
        #: Entries adopted (not already held here), in all and by role.
        self.adopted = 0
        self.reclaims: dict[str, int] = {}
        #: Frees and renews per-key slots and wakes parked jobs (None: no per-key limits).
        self.key_limiter: KeyLimiter | None = None
        # Partitions of limited roles whose adopter found no grant: their reader adopts next.
        self._adoption_wanted: set[str] = set()
        # Streams of limited roles whose last read came back full: the next read takes every
        # start due at once; any other (drained, or not read yet) blocks with a single grant.
        self._flowing: set[str] = set()

    def stop(self) -> None:
        """The worker stops (``stopping`` is set): wake every loop that waits."""
        self._read_ahead.stop()
        self._promoter.wake_all()
        self.flow.stop()

    def trimmed_by_role(self) -> dict[str, int]:
        """Pending entries found deleted from the streams before they were settled, by role."""
        trimmed: dict[str, int] = {}
        for stream, count in list(self.reader.trimmed.items()):
            role = role_of_shard(self._keys.role_of_stream(stream) or stream)
            trimmed[role] = trimmed.get(role, 0) + count
        return trimmed

    async def run(
        self, roles: Sequence[Role], shards: Mapping[str, Sequence[str]], *, burst: bool
    ) -> None:
        """Read every partition of ``roles`` until the worker stops (``burst``: until idle).

        In burst mode due retries are moved to the streams first and nothing is adopted.
        """
        try:
            await self._run_readers(roles, shards, burst)
        finally:
            # Shielded: a cancelled worker gives the readers' connections back too.
            with anyio.move_on_after(5, shield=True):
                await self.reader.aclose()
        # Free the running slots of what ended; the rest expire after the lease TTL.
        with anyio.move_on_after(5, shield=True):
            await guarded(self.limiter.sweep, connect.Backoff("freeing running slots"))
            if self.key_limiter is not None:
                await guarded(self.key_limiter.sweep, connect.Backoff("freeing per-key slots"))

    async def _run_readers(
        self, roles: Sequence[Role], shards: Mapping[str, Sequence[str]], burst: bool
    ) -> None:
        async with anyio.create_task_group() as readers:
            if not burst:
                readers.start_soon(self.flow.run)
                readers.start_soon(self.limiter.run, self._stopping)
                if self.key_limiter is not None:
                    readers.start_soon(self.key_limiter.run, self._stopping)
            # Every partition gets its own reader: a blocking read cannot span the slots of
            # several partitions on a cluster, and separate readers share the free capacity
            # fairly between partitions.
            for role in roles:
                for shard in shards[role.name]:
                    if burst:
                        await self._promoter.promote_due(shard, role.priorities)
                    else:
                        readers.start_soon(
                            self._promoter.run, shard, self._stopping, role.priorities
                        )
                        readers.start_soon(self.adopt_loop, role, shard)
                    if role.priorities > 1:
                        readers.start_soon(self.read_levels_loop, role, shard, burst)
                    else:
                        readers.start_soon(self.read_loop, role, shard, burst)

    async def read_loop(self, role: Role, shard: str, burst: bool) -> None:
        """Read a partition's new entries as there is room for them (``burst``: until idle)."""
        stream = self._keys.role_stream(shard)
        backoff = connect.Backoff(f"reading {stream}")
        # First the entries already pending under this consumer name (a restart with the same
        # --consumer-name resumes them at once), then new ones.
        history: bytes | None = b"0"
        while not self._stopping.is_set():
            free = await self._read_ahead.wait_budget()
            # No budget means the worker stops; a paused role waits here, after the wait for
            # room, so that the read that room allows is not one made after the pause was seen.
            if free <= 0 or not await self._wait_unpaused(role.name, burst):
                return
            block = None if burst or history else self._block_ms
            # Readers of several roles (and the adopter) may count the same free slots while a
            # blocking read waits; the queue is unbounded, so that overshoots the limit by at
            # most one read per role instead of starving a role behind another's blocked read.
            entries = await self._take(role, shard, stream, free, block, history, backoff)
            if entries is None:
                continue
            if history is not None:
                if entries:
                    logger.info("resuming %d entries pending on %s", len(entries), stream)
                history = entries[-1].id if entries else None
            elif burst and not entries:
                if self._read_ahead.in_flight == 0:
                    return
                await self._read_ahead.wait_progress()

    async def read_levels_loop(self, role: Role, shard: str, burst: bool) -> None:
        """:meth:`read_loop` for a role with priorities: the levels in :class:`LevelOrder`.

        Each read serves the levels in the order the guard gives, without blocking, in one
        round trip (``read_levels.lua``: one ``XREADGROUP`` per level until the budget is
        filled); only when every level is empty does it block, on all levels at once (one
        ``XREADGROUP`` over the partition's level streams, which share its slot).
        """
        streams_ = self._keys.level_streams(shard, role.priorities)
        backoff = connect.Backoff(f"reading {streams_[0]}")
        for stream in reversed(streams_):  # first what is pending under this name, per level
            if not await self._resume(role, shard, stream, burst, backoff):
                return
        order = LevelOrder(len(streams_))
        while not self._stopping.is_set():
            free = await self._read_ahead.wait_budget()
            if free <= 0 or not await self._wait_unpaused(role.name, burst):
                return
            ordered = [streams_[level] for level in order.next()]
            taken = await self._take_levels(role, shard, ordered, free, backoff, block=False)
            if taken is None or taken:  # no grant (a limited role waited): read again
                continue
            if not burst:
                await self._take_levels(role, shard, streams_, free, backoff, block=True)
            elif self._read_ahead.in_flight == 0:
                return
            else:
                await self._read_ahead.wait_progress()

    async def _resume(
        self, role: Role, shard: str, stream: str, burst: bool, backoff: connect.Backoff
    ) -> bool:
        """Take the entries already pending under this name on ``stream``; False on a stop."""
        history: bytes | None = b"0"
        while history is not None:
            free = await self._read_ahead.wait_budget()
            if free <= 0 or not await self._wait_unpaused(role.name, burst):
                return False
            entries = await self._take(role, shard, stream, free, None, history, backoff)
            if entries is None:
                continue
            if entries:
                logger.info("resuming %d entries pending on %s", len(entries), stream)
            history = entries[-1].id if entries else None
        return True

    async def _take_levels(
        self,
        role: Role,
        shard: str,
        names: Sequence[str],
        free: int,
        backoff: connect.Backoff,
        *,
        block: bool,
    ) -> int | None:
        """One read of several levels within the role's limits, handed over; how many.

        ``block``: wait for an entry on any level (one blocking read of them all, at most one
        entry each, see :meth:`_block_levels`); else read them in the order of ``names``
        until ``free`` are taken. None: a limited role got no grant (it waited as told).
        """
        tokens: list[str] | None = None
        if self._limited(role.name):
            tokens = await self._permits(
                role.name, min(free, len(names)) if block else free, backoff
            )
            if not tokens:
                return None
            free = len(tokens)
        issued = time.monotonic()
        if block:
            found = await self._block_levels(names, backoff)
        else:
            count = min(free, self._read_ahead.read_count)
            levels = await self._read_levels(names, count, backoff)
            found = [(stream, entry) for stream, entries in levels for entry in entries]
        if tokens is None:
            return await self._start_levels(role, shard, found, issued, None, backoff)
        taken = await self._start_levels(role, shard, found[: len(tokens)], issued, tokens, backoff)
        if len(found) > len(tokens):
            taken += await self._start_beyond(role, shard, found[len(tokens) :], issued, backoff)
        return taken

    async def _start_levels(
        self,
        role: Role,
        shard: str,
        found: list[tuple[str, streams.Entry]],
        issued: float,
        tokens: list[str] | None,
        backoff: connect.Backoff,
    ) -> int:
        """Hand over entries read on the levels (each stream's in a run), bind ``tokens``."""
        taken: list[tuple[str, streams.Entry]] = []
        for stream, group in itertools.groupby(found, key=lambda pair: pair[0]):
            entries, confirmed = [entry for _, entry in group], issued
            if time.monotonic() - issued > self._leases.settings.unsafe_after:
                confirmed = time.monotonic()
                entries = await self._leases.confirm(stream, entries)  # see _take
            if entries:
                await self._hand_over(role, shard, stream, entries, confirmed)
                taken += [(stream, entry) for entry in entries]
        if tokens is not None:
            await self._bind_levels(role.name, taken, tokens, backoff)
        return len(taken)

    async def _start_beyond(
        self,
        role: Role,
        shard: str,
        beyond: list[tuple[str, streams.Entry]],
        issued: float,
        backoff: connect.Backoff,
    ) -> int:
        """Start the entries a blocked read returned beyond its grants, as grants come.

        Asked for only once the granted entries are handed over and their tokens bound: the
        reader's grants may be every free slot of the role, and a slot frees only when its
        entry settles (waiting first waited for the reader's own tokens to expire). An entry
        handed back would go to adoption, which a levels reader does not make with its grants;
        only a stop hands back what is still without a grant (``release.lua``: its delivery
        count unchanged).
        """
        more = await self._grants(role.name, len(beyond), backoff)
        for stream, entry in beyond[len(more) :]:  # only after a stop
            await guarded(functools.partial(self.reader.release, stream, [entry]), backoff)
        return await self._start_levels(role, shard, beyond[: len(more)], issued, more, backoff)

    async def _read_levels(
        self, names: Sequence[str], count: int, backoff: connect.Backoff
    ) -> list[tuple[str, list[streams.Entry]]]:
        """Up to ``count`` new entries of the levels, in the order of ``names``; [] on error."""
        found: list[tuple[str, list[streams.Entry]]] = []

        async def read() -> None:
            nonlocal found
            found = await self.reader.read_levels(names, count=count)

        async def regroup() -> None:
            for name in names:
                await self.reader.regroup(name)

        return found if await guarded(read, backoff, regroup=regroup) else []

    async def _block_levels(
        self, names: Sequence[str], backoff: connect.Backoff
    ) -> list[tuple[str, streams.Entry]]:
        """Wait for entries on any level: one blocking read of them all, one entry each.

        It may return one entry per level (jobs published on several levels at once): like a
        plain reader's blocked read, that may overshoot the budget, by at most levels - 1, and
        a limited role's grants (see :meth:`_start_beyond`). Highest level first.
        """
        found: list[tuple[str, streams.Entry]] = []

        async def read() -> None:
            nonlocal found
            found = await self.reader.read_many(names, count=1, block_ms=self._block_ms)

        async def regroup() -> None:
            for name in names:
                await self.reader.regroup(name)

        if not await guarded(read, backoff, regroup=regroup):
            return []
        found.sort(key=lambda pair: -self._keys.level_of_stream(pair[0]))  # highest first
        return found

    async def _grants(self, role: str, wanted: int, backoff: connect.Backoff) -> list[str]:
        """Grants for ``wanted`` more starts, waiting for them as the limiter says (or a stop)."""
        granted: list[str] = []
        while len(granted) < wanted and not self._stopping.is_set():
            granted += await self._permits(role, wanted - len(granted), backoff)
        return granted

    async def _bind_levels(
        self,
        role: str,
        ties: list[tuple[str, streams.Entry]],
        tokens: list[str],
        backoff: connect.Backoff,
    ) -> None:
        """Tie a limited role's grants to entries read on several streams; return the rest."""
        bind = self.limiter.bind
        for index, (stream, entry) in enumerate(ties):
            token = tokens[index : index + 1]
            await guarded(functools.partial(bind, role, stream, [entry], token), backoff)
        rest = tokens[len(ties) :]
        if rest:
            await guarded(functools.partial(bind, role, "", [], rest), backoff)

    async def _take(
        self,
        role: Role,
        shard: str,
        stream: str,
        free: int,
        block: int | None,
        history: bytes | None,
        backoff: connect.Backoff,
    ) -> list[streams.Entry] | None:
        """One read within the role's limits, handed over; None if nothing was read.

        A limited role reads only as many entries as the limiter grants (it waits for a grant
        first: until the next start is due, or a running slot frees); each entry read holds one
        of the grants until it is settled, and grants the read did not use are given back.
        """
        tokens: list[str] | None = None
        if self._limited(role.name):
            tokens = await self._permits(role.name, self._wanted(role, stream, free), backoff)
            if not tokens:
                return None
            if shard in self._adoption_wanted and history is None:
                await self._adopt_with(role, shard, stream, free, tokens, backoff)
                return None
            free = len(tokens)
            block = self._rated_block(role, stream, block)
        issued = time.monotonic()
        entries = await self._read(stream, free, block, history, backoff)
        if tokens is not None and entries is not None:
            await self._after_limited_read(role.name, stream, free, entries, block, issued)
        if entries and time.monotonic() - issued > self._leases.settings.unsafe_after:
            # Redis may have delivered these long ago (this process was frozen in the read):
            # another worker may own them by now. Start only what is still ours.
            issued = time.monotonic()
            entries = await self._leases.confirm(stream, entries)
        if entries:
            await self._hand_over(role, shard, stream, entries, issued)
            if len(entries) < free and block is not None:
                # A short blocking read drained the stream, so the next read would only
                # block: let the woken consumers start these handlers before it is sent
                # (an idle worker's enqueue-to-start latency), not after.
                await anyio.lowlevel.checkpoint()
        if tokens is not None:
            await guarded(
                lambda: self.limiter.bind(role.name, stream, entries or [], tokens), backoff
            )
        return entries

    async def _adopt_with(
        self,
        role: Role,
        shard: str,
        stream: str,
        free: int,
        tokens: list[str],
        backoff: connect.Backoff,
    ) -> None:
        """An adoption step the adopter could not get a grant for, with the reader's grant."""
        self._adoption_wanted.discard(shard)
        count = min(free, self._leases.settings.reclaim_count)

        async def regroup() -> None:
            await self.reader.regroup(stream)

        await guarded(
            lambda: self.adopt(role, shard, stream, count, tokens), backoff, regroup=regroup
        )

    def _wanted(self, role: Role, stream: str, free: int) -> int:
        """How many starts a limited role's reader asks for: one while its stream is drained.

        A grant under a rate limit counts when it is given; a read blocked on an empty stream
        holds its grants until entries arrive, so such a read holds one grant only (and takes
        it again when its entry arrives: :meth:`_after_limited_read`). With entries waiting, a
        read takes every start that is due, without blocking. A role not known to be rated yet
        (its first grant) counts as rated.
        """
        if self.limiter.rated(role.name) is not False and stream not in self._flowing:
            return 1
        return free

    def _rated_block(self, role: Role, stream: str, block: int | None) -> int | None:
        """A rate-limited read blocks only while its stream is drained (see :meth:`_wanted`)."""
        if stream in self._flowing and self.limiter.rated(role.name):
            return None
        return block

    async def _after_limited_read(
        self,
        role: str,
        stream: str,
        granted: int,
        entries: list[streams.Entry],
        block: int | None,
        issued: float,
    ) -> None:
        """Note whether the stream flows; confirm the starts of a read that blocked a while.

        The grant such a read held was counted when it was given, before the wait: its start
        is taken again at the rate (waiting for it, the entry held but not started), so that a
        start counts when it happens and idle readers cannot add their old grants on top of
        the rate when work arrives. The first grant is thereby spent twice, once per wait.
        """
        if len(entries) >= granted:
            self._flowing.add(stream)
        else:
            self._flowing.discard(stream)
        aged = block is not None and time.monotonic() - issued > flow.CONFIRM_AFTER
        if not entries or not aged or not self.limiter.rated(role):
            return
        confirmed = 0
        backoff = connect.Backoff(f"confirming starts of {role}")
        while confirmed < len(entries) and not self._stopping.is_set():
            wait = 0.0

            async def confirm() -> None:
                nonlocal confirmed, wait
                granted_now, wait = await self.limiter.confirm(role, len(entries) - confirmed)
                confirmed += granted_now

            if await guarded(confirm, backoff) and confirmed < len(entries):
                await sleep_unless(self._stopping, wait)

    def _limited(self, role: str) -> bool:
        return self.limiter.declares(role) or role in self.flow.limited_at_run_time

    async def _permits(self, role: str, free: int, backoff: connect.Backoff) -> list[str]:
        """Ask the limiter for up to ``free`` starts; without a grant, wait as it says first."""
        tokens: list[str] = []
        wait = 0.0

        async def ask() -> None:
            nonlocal tokens, wait
            tokens, wait = await self.limiter.acquire(role, min(free, self._read_ahead.read_count))

        if await guarded(ask, backoff) and not tokens:
            await sleep_unless(self._stopping, wait)
        return tokens

    async def _hand_over(
        self, role: Role, shard: str, stream: str, entries: list[streams.Entry], issued: float
    ) -> None:
        """Deliver what a read returned, or hand it back if the role was paused meanwhile.

        A read that was blocked when the pause was seen may return entries published since:
        they are released (adopted at once after the resume, their delivery count unchanged),
        so that nothing read after the pause was seen starts.
        """
        if not self.flow.is_paused(role.name):
            self._deliver(role, shard, stream, entries, issued)
            return
        try:
            released = await self.reader.release(stream, entries)
        except connect.TRANSIENT_ERRORS as exc:
            logger.warning(
                "role %s is paused: could not hand back %d entries just read (%s); they are "
                "adopted after the lease TTL once it is resumed",
                role.name,
                len(entries),
                connect.describe(exc),
            )
            return
        logger.info("role %s is paused: handed back %d entries just read", role.name, released)

    async def _wait_unpaused(self, role: str, burst: bool) -> bool:
        """Wait while ``role`` is paused; False if its reader ends instead (burst, or a stop)."""
        if not self.flow.is_paused(role):
            return True
        if burst:
            return False  # nothing of a paused role is to be drained
        await self.flow.wait_resumed(role)
        return not self._stopping.is_set()

    async def _read(
        self,
        stream: str,
        free: int,
        block_ms: int | None,
        history: bytes | None,
        backoff: connect.Backoff,
    ) -> list[streams.Entry] | None:
        """One read; None after an error that was handled (the caller just reads again)."""
        count = min(free, self._read_ahead.read_count)
        entries: list[streams.Entry] = []

        async def read() -> None:
            nonlocal entries
            if history is not None:
                entries = await self.reader.read_own(stream, after=history, count=count)
            else:
                entries = await self.reader.read(stream, count=count, block_ms=block_ms)

        async def regroup() -> None:
            await self.reader.regroup(stream)

        return entries if await guarded(read, backoff, regroup=regroup) else None

    async def adopt_loop(self, role: Role, shard: str) -> None:
        """Adopt a partition's entries idle past the lease TTL, one bounded step per tick.

        A role with priorities adopts on each level's stream in turn, the highest first.
        """
        levels = self._keys.level_streams(shard, role.priorities)[::-1]
        settings = self._leases.settings

        async def step() -> None:
            for stream in levels:
                free = min(self._read_ahead.free(), settings.reclaim_count)
                if free > 0 and not self.flow.is_paused(role.name):
                    await self.adopt(role, shard, stream, free)

        async def regroup() -> None:
            pass  # the reader recreates the group

        await run_guarded(
            step,
            f"adopting idle entries of {levels[0]}",
            self._stopping,
            regroup=regroup,
            every=settings.reclaim_interval,
        )

    async def adopt(
        self, role: Role, shard: str, stream: str, count: int, tokens: list[str] | None = None
    ) -> None:
        """One adoption step: deliver the entries adopted that this process does not hold.

        One it holds is its own again (its handler goes on), not a new delivery. A limited
        role's adopter asks for permits first (or is given ``tokens``, a reader's) and adopts
        no more than it was granted, like its reader: an adopted entry starts within the role's
        rate and concurrency. Without a grant, the partition's reader makes the next adoption
        step with its own next grant instead of a read: a reader blocked in a read holds its
        grants, so the adopter alone would rarely find a running slot free.
        """
        if tokens is None and self._limited(role.name):
            tokens, _ = await self.limiter.acquire(role.name, count)
            if not tokens:
                self._adoption_wanted.add(shard)
                return  # the entries stay pending, idle: the reader adopts with its grant
        if tokens is not None:
            count = min(count, len(tokens))
        issued = time.monotonic()
        fresh: list[streams.Entry] = []
        try:
            entries = await self.reader.adopt(stream, count)
            fresh = [e for e in entries if not self._held.holds(stream, e.id)]
            if fresh:
                logger.info("adopted %d entries idle past the lease TTL on %s", len(fresh), stream)
                self.adopted += len(fresh)
                self.reclaims[role.name] = self.reclaims.get(role.name, 0) + len(fresh)
                self._deliver(role, shard, stream, fresh, issued)
        finally:
            if tokens is not None:
                await self.limiter.bind(role.name, stream, fresh, tokens)
