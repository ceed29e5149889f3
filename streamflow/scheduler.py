"""The scheduler: fires every schedule's ticks exactly once, however many processes run it.

The schedules live in Redis (:meth:`~streamflow.keys.Keys.schedules`): added at run time with
``streamflow schedule add`` or :func:`add`, or declared in code and written there when a
:class:`Scheduler` that was given them starts. Every scheduler process reads them all, so any
number can run side by side (for availability), and each tick still fires once:

1. the ticks due after the schedule's last tick (:func:`streamflow.schedules.due_ticks`, the
   missed-ticks policy) are published oldest first, each with a dedup key and a message id
   derived from (schedule, tick): a second process publishing the same tick, or the same one
   again after a crash, publishes nothing (``publish_dedup.lua``);
2. then the last tick is raised with ``ZADD GT``, which never lowers it.

A scheduler killed between 1 and 2 leaves the tick to the next one, whose publish is dropped as
a duplicate. Ticks older than the dedup window are never fired, so the window bounds the promise.

With ``overlap="skip"`` a tick is skipped (and counted as done) while the previous tick's job is
still queued, delayed, running or retrying (:meth:`Client.job`), or its task queued or running.

A schedule with a ``graph`` submits a DAG task instead, with the tick's run id as task id:
creating a task whose id exists fails atomically, so that plays the dedup key's part.

Each running scheduler registers in :data:`streamflow.registry.SCHEDULERS` (every 5 s, like a
coordinator): its host and pid, how many schedules its last pass read, when that pass ended and
how late it fired, so ``streamflow workers`` and the dashboard show its health.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import timedelta

import anyio
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from streamflow import connect, intake, registry
from streamflow.client import Client
from streamflow.consumers import default_consumer_name
from streamflow.errors import MissingExtraError
from streamflow.keys import Keys
from streamflow.logs import shown
from streamflow.protocol import now_ms
from streamflow.schedules import (
    MAX_DEFINITION_BYTES,
    SCHEDULE_HEADER,
    SCHEDULED_AT_HEADER,
    Schedule,
    dedup_key,
    due_ticks,
    iso,
    next_tick,
    render,
    run_id,
    skipped_count,
)

logger = logging.getLogger(__name__)

#: Seconds between two passes over the schedules.
POLL = 0.25
#: Ticks older than this are never fired: below the client's default dedup window (24 h), so
#: that the dedup marker of any tick that may fire is still there.
HORIZON = timedelta(hours=23)
#: Problems remembered (so as to log each once) before the memory is cleared.
MAX_WARNED = 10_000
#: Job states in which a run is still going (for ``overlap="skip"``).
GOING = frozenset({"queued", "delayed", "running", "retrying", "parked"})


@dataclass(frozen=True, slots=True)
class Stored:
    """What Redis holds about the schedules: valid definitions, paused ids, last ticks.

    Attributes:
        schedules: The valid definitions by id.
        invalid: The ids whose definition could not be read, with why.
        paused: The paused ids.
        last: Each schedule's last tick fired or skipped (epoch ms).
        runs: Each schedule's last tick that published a job (epoch ms).
    """

    schedules: dict[str, Schedule]
    invalid: dict[str, str]
    paused: set[str]
    last: dict[str, int]
    runs: dict[str, int]


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


async def load(redis: Redis, keys: Keys) -> Stored:
    """Read every schedule, the paused set and the last ticks in one round trip.

    Everything read back is untrusted: an invalid definition lands in ``invalid``, never raises.
    """
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.schedules())
        pipe.smembers(keys.schedules_paused())
        pipe.zrange(keys.schedule_ticks(), 0, -1, withscores=True)
        pipe.zrange(keys.schedule_runs(), 0, -1, withscores=True)
        raw, paused, ticks, runs = await pipe.execute()
    schedules: dict[str, Schedule] = {}
    invalid: dict[str, str] = {}
    for name, definition in raw.items():
        sid = _text(name)
        parsed = _parse(definition)
        if isinstance(parsed, str):
            invalid[sid] = parsed
        elif parsed.id != sid:
            invalid[sid] = f"stored under {sid!r} but names itself {parsed.id!r}"
        else:
            schedules[sid] = parsed
    return Stored(schedules, invalid, {_text(m) for m in paused}, _scores(ticks), _scores(runs))


def _parse(definition: bytes) -> Schedule | str:
    """A stored definition, or why it is invalid."""
    if len(definition) > MAX_DEFINITION_BYTES:  # not worth caching
        return f"definition of {len(definition)} bytes (at most {MAX_DEFINITION_BYTES})"
    return _parse_cached(definition)


@functools.lru_cache(maxsize=4096)
def _parse_cached(definition: bytes) -> Schedule | str:
    # Cached: every pass reads every definition again, and most never change.
    try:
        return Schedule.from_json(definition)
    except (ValueError, MissingExtraError) as exc:  # a cron schedule, cronsim not installed
        return str(exc).splitlines()[0]


def _scores(pairs: list[tuple[bytes, float]]) -> dict[str, int]:
    # Scores are untrusted too: a float beyond any real epoch ms is ignored.
    return {_text(m): int(s) for m, s in pairs if 0 <= s < 2**53}


async def add(redis: Redis, keys: Keys, schedule: Schedule) -> None:
    """Store ``schedule`` (replacing one of the same id); its ticks start after now."""
    await redis.hset(keys.schedules(), schedule.id, schedule.to_json())


async def remove(redis: Redis, keys: Keys, schedule_id: str) -> bool:
    """Delete a schedule, its pause and its last tick; False if there was no such schedule."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hdel(keys.schedules(), schedule_id)
        pipe.srem(keys.schedules_paused(), schedule_id)
        pipe.zrem(keys.schedule_ticks(), schedule_id)
        pipe.zrem(keys.schedule_runs(), schedule_id)
        removed, *_ = await pipe.execute()
    return bool(removed)


async def pause(redis: Redis, keys: Keys, schedule_id: str, *, paused: bool = True) -> None:
    """Pause (or resume) a schedule: its ticks pass without firing while paused.

    Resuming counts every tick until now as done, so the schedule goes on from its next tick
    instead of catching up the pause.
    """
    if paused:
        await redis.sadd(keys.schedules_paused(), schedule_id)
        return
    async with redis.pipeline(transaction=True) as pipe:
        pipe.srem(keys.schedules_paused(), schedule_id)
        pipe.zadd(keys.schedule_ticks(), {schedule_id: now_ms()}, gt=True)
        await pipe.execute()


def _headers(schedule: Schedule, tick_ms: int) -> dict[str, str]:
    return {**schedule.headers, SCHEDULE_HEADER: schedule.id, SCHEDULED_AT_HEADER: iso(tick_ms)}


async def fire(client: Client, schedule: Schedule, tick_ms: int) -> str:
    """Publish (or submit) the run of ``schedule`` at ``tick_ms``, at most once; returns its id."""
    if schedule.role is None:
        return await _submit(client, schedule, tick_ms)
    return await client.publish(
        schedule.role,
        render(schedule.payload, tick_ms),
        message_id=run_id(schedule.id, tick_ms),
        dedup_key=dedup_key(schedule.id, tick_ms),
        headers=_headers(schedule, tick_ms),
    )


async def _submit(
    client: Client, schedule: Schedule, tick_ms: int, task_id: str | None = None
) -> str:
    """Submit the schedule's graph as the task ``task_id`` (the tick's run id by default).

    Creating a task with an id that exists fails atomically (``task_commit.lua``), so a second
    scheduler submitting the same tick creates nothing: the task is there, and that is enough.
    """
    assert schedule.graph is not None
    wanted = task_id or run_id(schedule.id, tick_ms)
    try:
        return await client.submit(
            schedule.graph,
            params=render(schedule.payload, tick_ms),
            task_id=wanted,
            registration_wait=0,
            headers=_headers(schedule, tick_ms),
        )
    except ValueError:
        # HGET: the publisher's user may read a task's state field, not the whole task.
        exists = await client.redis.hget(client.keys.task_state(wanted), "task") is not None
        if task_id is not None or not exists:
            raise
        return wanted


async def run_now(client: Client, schedule: Schedule) -> str:
    """Publish one run of ``schedule`` now, outside its ticks (``schedule run-now``).

    A plain publish with a fresh message id: no dedup key (each call is one more run), so the
    operator's user may send it; ``overlap="skip"`` does not wait for it.
    """
    tick = now_ms()
    if schedule.role is None:
        return await _submit(client, schedule, tick, f"run.{schedule.id}.{tick}")
    headers = _headers(schedule, tick)
    return await client.publish(schedule.role, render(schedule.payload, tick), headers=headers)


async def still_going(client: Client, schedule: Schedule, last_ms: int) -> bool:
    """Whether the run of the tick ``last_ms`` is still queued or running."""
    if schedule.role is None:
        task = await client.task(run_id(schedule.id, last_ms))
        return task is not None and task.state in GOING
    status = await client.job(run_id(schedule.id, last_ms), role=schedule.role)
    return status.state in GOING


@dataclass(frozen=True, slots=True)
class SchedulerStatistics:
    """What a scheduler did, as :meth:`Scheduler.statistics` reports it.

    Attributes:
        sent: Runs it sent, including those Redis dropped as duplicates.
        passes: Passes over the schedules it completed.
        last_pass_ms: When its last complete pass ended (epoch ms); None before the first.
        late_ms: The longest wait in that pass between a due tick and its run being sent (or
            the tick skipped); 0 when no tick was due.
        schedules: The valid schedules that pass read.
        paused: How many of them were paused.
    """

    sent: int = 0
    passes: int = 0
    last_pass_ms: int | None = None
    late_ms: int = 0
    schedules: int = 0
    paused: int = 0


@dataclass
class Scheduler:
    """Fires the namespace's schedules; run as many as you like (see the module docstring).

    The promise of one run per tick holds for ticks within the client's dedup window (24 hours
    by default): give it a client whose window is at least :data:`HORIZON` plus an hour.

    Args:
        client: The client it publishes with (its namespace is the scheduler's).
        schedules: Schedules declared in code: written to Redis when :meth:`run` starts.
        poll: Seconds between passes.
        name: Its name in the schedulers' registry (unique per process; random by default).
    """

    client: Client
    schedules: Iterable[Schedule] = ()
    poll: float = POLL
    name: str = field(default_factory=default_consumer_name)
    _stopping: anyio.Event = field(default_factory=anyio.Event, init=False)
    _warned: set[tuple[str, str]] = field(default_factory=set, init=False)
    #: Per schedule: (its definition, its last tick) -> the tick after it, so that a pass
    #: computes ticks only for schedules that have one due.
    _upcoming: dict[str, tuple[Schedule, int, int]] = field(default_factory=dict, init=False)
    _fired: int = field(default=0, init=False)
    _last: SchedulerStatistics = field(default_factory=SchedulerStatistics, init=False)
    _late: int = field(default=0, init=False)  # the pass in progress's, so far
    _first_pass: anyio.Event = field(default_factory=anyio.Event, init=False)

    def stop(self) -> None:
        """End :meth:`run` after the pass in progress."""
        self._stopping.set()

    def statistics(self) -> SchedulerStatistics:
        """Runs sent, and what its last complete pass read and how late it fired."""
        return replace(self._last, sent=self._fired)

    def describe(self, started_at_ms: int) -> registry.SchedulerInfo:
        """Its registry entry now (``streamflow workers``, the dashboard)."""
        stats = self.statistics()
        return registry.SchedulerInfo(
            consumer=self.name,
            host=socket.gethostname(),
            pid=os.getpid(),
            version=registry.VERSION,
            started_at_ms=started_at_ms,
            updated_at_ms=now_ms(),
            schedules=stats.schedules,
            paused=stats.paused,
            sent=stats.sent,
            last_pass_ms=stats.last_pass_ms,
            late_ms=stats.late_ms,
        )

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Write the code's schedules, then pass over all of them every ``poll`` seconds."""
        declared = list(self.schedules)
        backoff = connect.Backoff("writing the schedules")
        while declared and not self._stopping.is_set():
            if await intake.guarded(lambda: self._declare(declared), backoff):
                break
        task_status.started()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._beat, now_ms())
                await intake.run_guarded(
                    self.step, "running the schedules", self._stopping, every=self.poll
                )
                tg.cancel_scope.cancel()
        finally:
            await self._withdraw()

    async def _beat(self, started_at_ms: int) -> None:
        """Keep its registry entry fresh, first written once a pass ended (or a beat passed)."""
        with anyio.move_on_after(registry.BEAT_MS / 1000):
            await self._first_pass.wait()  # not listed with nothing to say, unless stuck
        describe = functools.partial(self.describe, started_at_ms)
        client = self.client
        await registry.SCHEDULERS.keep_announced(client.redis, client.keys, describe)

    async def _withdraw(self) -> None:
        """On a stop: remove its registry entry (best effort: it would go stale anyway)."""
        with anyio.move_on_after(5, shield=True):
            try:
                await registry.SCHEDULERS.withdraw(self.client.redis, self.client.keys, self.name)
            except Exception as exc:  # cleanup: never over what ended the scheduler
                logger.warning("could not delete the registry entry of %s (%r)", self.name, exc)

    async def _declare(self, declared: list[Schedule]) -> None:
        try:
            for schedule in declared:
                await add(self.client.redis, self.client.keys, schedule)
        except ResponseError as exc:
            if connect.is_outage(exc):
                raise
            # Another type of key at the definitions' name (a publisher may write one): the
            # passes go on and warn of it; the code's schedules are written at the next start.
            self._warn({"*": f"the code's schedules cannot be written: {exc}"}, "not written")

    async def step(self) -> None:
        """One pass: fire every due tick of every schedule that is not paused."""
        try:
            stored = await load(self.client.redis, self.client.keys)
        except ResponseError as exc:  # e.g. WRONGTYPE: a key overwritten by someone else
            if connect.is_outage(exc):
                raise
            self._warn({"*": f"the schedule keys cannot be read: {exc}"})
            return
        self._warn(stored.invalid)
        now = now_ms()
        self._late = 0
        for sid, schedule in stored.schedules.items():
            if sid in stored.paused or self._not_yet(schedule, stored.last.get(sid), now):
                continue
            try:
                await self._due(schedule, stored, now)
            except Exception as exc:
                # One schedule's failure (its role's keys overwritten, a refused publish) must
                # not stop the others; an outage stops the pass and is backed off.
                if connect.is_outage(exc):
                    raise
                self._warn({sid: f"firing failed: {type(exc).__name__}: {exc}"}, "skipped")
        self._passed(stored)

    def _passed(self, stored: Stored) -> None:
        """Record a complete pass, for :meth:`statistics` and the registry."""
        self._last = SchedulerStatistics(
            passes=self._last.passes + 1,
            last_pass_ms=now_ms(),
            late_ms=self._late,
            schedules=len(stored.schedules),
            paused=len(stored.paused & stored.schedules.keys()),
        )
        self._first_pass.set()

    def _not_yet(self, schedule: Schedule, last: int | None, now: int) -> bool:
        if last is None:
            return False
        known = self._upcoming.get(schedule.id)
        if known is None or known[:2] != (schedule, last):
            known = (schedule, last, next_tick(schedule, last))
            self._upcoming[schedule.id] = known
        return now < known[2]

    async def _due(self, schedule: Schedule, stored: Stored, now: int) -> None:
        last = stored.last.get(schedule.id)
        if last is None:  # a new schedule: its ticks start after now
            await self.client.redis.zadd(
                self.client.keys.schedule_ticks(), {schedule.id: now}, nx=True
            )
            return
        await self._tick(schedule, last, stored.runs.get(schedule.id), now)

    async def _tick(self, schedule: Schedule, last: int, previous: int | None, now: int) -> None:
        oldest = now - int(HORIZON.total_seconds() * 1000)
        ticks = due_ticks(schedule, last, now, oldest_ms=oldest)
        if not ticks:
            return
        skipped = skipped_count(schedule, last, ticks[0], limit=1000)
        if skipped:
            logger.warning(
                "schedule %s: %s%d missed tick(s) skipped (catch_up=%d)",
                shown(schedule.id),
                "at least " if skipped == 1000 else "",
                skipped,
                schedule.catch_up,
            )
        for tick in ticks:
            if await self._overlaps(schedule, previous):
                logger.info(
                    "schedule %s: tick %s skipped: the previous run is still going",
                    shown(schedule.id),
                    iso(tick),
                )
            else:
                await fire(self.client, schedule, tick)
                self._fired += 1
                previous = tick
            self._late = max(self._late, now_ms() - tick)
            await self._advance(schedule.id, tick, fired=previous == tick)

    async def _overlaps(self, schedule: Schedule, previous: int | None) -> bool:
        if schedule.overlap != "skip" or previous is None:
            return False
        return await still_going(self.client, schedule, previous)

    async def _advance(self, schedule_id: str, tick: int, *, fired: bool) -> None:
        """Raise the last tick (and the last run): ZADD GT never lowers another's."""
        keys = self.client.keys
        async with self.client.redis.pipeline(transaction=False) as pipe:
            if fired:
                pipe.zadd(keys.schedule_runs(), {schedule_id: tick}, gt=True)
            pipe.zadd(keys.schedule_ticks(), {schedule_id: tick}, gt=True)
            await pipe.execute()

    def _warn(self, problems: dict[str, str], what: str = "ignored") -> None:
        """Log each problem once per scheduler (each pass meets them again)."""
        if len(self._warned) > MAX_WARNED:  # texts from Redis vary: keep the memory bounded
            self._warned.clear()
        for sid, why in problems.items():
            if (sid, why) not in self._warned:
                self._warned.add((sid, why))
                logger.warning(
                    "schedule %s %s: %s",
                    shown(repr(sid)),
                    what,
                    shown(why if what != "ignored" else f"invalid definition in Redis: {why}"),
                )


def next_run(schedule: Schedule, last_ms: int | None, now: int) -> int:
    """When the schedule fires next (epoch ms), for ``schedule list``."""
    return next_tick(schedule, max(now, last_ms or now))
