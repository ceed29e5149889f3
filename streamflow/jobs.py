"""Where a job is: its status, derived from what Redis already holds.

Nothing is written per job for this (roles that keep no results pay nothing; a run that reports
progress keeps its latest report, see below): the status is read from the job's kept outcome if
any (:mod:`streamflow.results`), the role streams and their pending lists (queued, running), the
delayed schedules (delayed, retrying), the parked lists of per-key limits (parked), the
dead-letter streams (failed, expired) and the cancel
markers (cancelled). A job is found in a stream or a schedule by reading them, at most
:data:`LOOKUP_LIMIT` entries in all, in pages.

What cannot be known: an acknowledged job whose outcome was not kept leaves nothing behind
(entries are deleted when settled), so it is ``unknown``, like an id never published or one
whose traces expired. When a running job started is not held either: the pending list gives the
lease's age (time since the worker last renewed it), and the attempt. A running job's latest
progress is read from the key its run keeps while it reports progress
(:meth:`Keys.job_progress`, see :mod:`streamflow.events`); a run that reports none has none.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import orjson
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from streamflow import partitions, results, steps, streams
from streamflow.errors import InvalidNameError, ProtocolError
from streamflow.keys import GROUP, Keys, validate_message_id
from streamflow.logs import shown
from streamflow.protocol import MESSAGE_FIELD, Job, decode_job
from streamflow.records import (
    LIFECYCLE_FIELD,
    JobResult,
    LifecycleEvent,
    decode_dead_letter,
    decode_lifecycle,
    decode_parked_item,
)

#: Every state a job can be found in.
JobState = Literal[
    "queued",
    "delayed",
    "running",
    "retrying",
    "parked",
    "succeeded",
    "failed",
    "expired",
    "cancelled",
    "unknown",
]
#: The states a job does not leave.
ENDED: frozenset[str] = frozenset({"succeeded", "failed", "expired", "cancelled"})

#: The most stream, schedule and dead-letter entries one lookup reads.
LOOKUP_LIMIT = 200_000
_PAGE = 1000


@dataclass(frozen=True, slots=True)
class JobStatus:
    """Where a job is, as far as Redis tells.

    Attributes:
        message_id: The job's id.
        state: ``queued``, ``delayed`` (until ``due_at_ms``), ``running`` (on ``consumer``),
            ``retrying`` (its next attempt due at ``due_at_ms``, or queued when due at once;
            ``running`` again once a worker takes it), ``parked`` (held back by its limit key:
            waiting in its key's parked list, ``detail`` names the key; it is queued again
            when woken), ``succeeded``, ``failed``
            (dead-lettered: ``reason``, ``detail``), ``expired``, ``cancelled`` or ``unknown``.
        role: Its role, once found.
        partition: The role partition (shard) it is in.
        entry_id: Its stream or dead-letter entry id.
        attempt: Its attempt (1 for the first).
        created_at_ms: When it was first published.
        due_at_ms: ``delayed`` and ``retrying``: when it is due.
        consumer: ``running``: the worker holding it; ended: the worker that settled it.
        worker_alive: ``running``: whether that worker is alive (if not, another worker adopts
            the job once its lease expires).
        lease_age_ms: ``running``: ms since its lease was last taken or renewed.
        deliveries: ``running``: the pending list's delivery count (rises on adoptions).
        kept: Whether its outcome was kept (``result`` is then its handler's return value).
        result: ``succeeded`` and kept: the result.
        reason: ``failed``, ``expired``: the dead-letter reason; ``cancelled``: ``cancelled``.
        detail: Why, in words.
        finished_at_ms: When it ended, if known.
        headers: The job's headers, when its entry was found (queued, delayed, retrying,
            running, or dead-lettered with a readable job) and it has any.
        progress: ``running``: the latest value its run reported with ``ctx.progress()``, if
            it reported any (and the role's lifecycle events are on).
        progress_message: The message of that report, if any.
        progress_at_ms: When it was reported.
        priority: The priority level it waits or runs at, when above 0 (queued, running,
            delayed, retrying or parked).
    """

    message_id: str
    state: JobState
    role: str | None = None
    partition: str | None = None
    entry_id: str | None = None
    attempt: int | None = None
    created_at_ms: int | None = None
    due_at_ms: int | None = None
    consumer: str | None = None
    worker_alive: bool | None = None
    lease_age_ms: int | None = None
    deliveries: int | None = None
    kept: bool = False
    result: Any = None
    reason: str | None = None
    detail: str | None = None
    finished_at_ms: int | None = None
    headers: dict[str, str] | None = None
    progress: Any = None
    progress_message: str | None = None
    progress_at_ms: int | None = None
    priority: int | None = None

    @property
    def ended(self) -> bool:
        """Whether the job has ended (succeeded, failed, expired or cancelled)."""
        return self.state in ENDED

    def to_json(self) -> dict[str, Any]:
        """The status as a JSON object (fields without a value left out)."""
        return {k: v for k, v in asdict(self).items() if v is not None or k == "result"}


def from_record(record: JobResult, partition: str | None = None) -> JobStatus:
    """The status a kept outcome gives."""
    state: JobState = "cancelled"
    if record.status == "succeeded":
        state = "succeeded"
    elif record.status == "dead_lettered":
        state = "expired" if record.reason == "expired" else "failed"
    detail = record.detail
    if record.error is not None:
        detail = f"{detail or ''} ({record.error.type}: {record.error.message})".strip()
    return JobStatus(
        record.message_id,
        state,
        role=record.role,
        partition=partition,
        attempt=record.attempt,
        consumer=record.consumer,
        kept=True,
        result=record.result,
        reason=record.reason or ("cancelled" if state == "cancelled" else None),
        detail=detail,
        finished_at_ms=record.finished_at_ms,
    )


async def status(
    redis: Redis,
    keys: Keys,
    layouts: partitions.Layouts,
    message_id: str,
    *,
    role: str | None = None,
) -> JobStatus:
    """Where ``message_id`` is: the lookup of the module docstring, cheapest source first.

    Raises:
        InvalidNameError: ``message_id`` is not one the protocol allows (nothing can name it).
    """
    validate_message_id(message_id)
    shards = await _shards(redis, keys, layouts, role)
    candidates = [keys.result(shard, message_id) for shard, _ in shards]
    record = await steps.run(results.read_kept(redis, candidates))
    if record is not None:
        return from_record(record)
    budget = _Budget()
    # Each priority level of a partition is a stream and a schedule of its own, top first.
    places = [(shard, level) for shard, levels in shards for level in range(levels - 1, -1, -1)]
    for find in (_in_stream, _in_schedule):
        for shard, level in places:
            found = await find(redis, keys, shard, message_id, budget, level)
            if found is not None:
                return found
    for find_in in (_in_parked, _in_dead_letters):
        for shard, _ in shards:
            found = await find_in(redis, keys, shard, message_id, budget)
            if found is not None:
                return found
    # Gone from everywhere: it may have ended meanwhile, with its outcome kept.
    record = await steps.run(results.read_kept(redis, candidates))
    if record is not None:
        return from_record(record)
    if await _cancelled(redis, keys, message_id):
        return JobStatus(message_id, "cancelled", reason="cancelled", detail="a cancel names it")
    return JobStatus(message_id, "unknown", detail=_UNKNOWN)


_UNKNOWN = (
    "not queued, delayed, running, parked or dead-lettered, and no outcome kept: it ended "
    "without its outcome kept (keep_result), was never published, or its traces expired"
)


@dataclass(slots=True)
class _Budget:
    """Entries read so far by one lookup (it stops at :data:`LOOKUP_LIMIT`)."""

    read: int = 0

    def page(self) -> int:
        return max(0, min(_PAGE, LOOKUP_LIMIT - self.read))


async def _shards(
    redis: Redis, keys: Keys, layouts: partitions.Layouts, role: str | None
) -> list[tuple[str, int]]:
    """The partitions to look in, with their priority levels: ``role``'s, or every role's.

    Every role's: those workers registered, and every role stream or schedule found by a
    ``SCAN`` (a role published to but never served: its jobs are still queued).
    """
    if role is not None:
        layout = await layouts.get(role)
        return [(shard, layout.levels) for shard in layout.shards]
    roles = await steps.run(results.registered_roles(redis, keys))
    shards: list[tuple[str, int]] = []
    for name in roles:
        layout = await layouts.get(name)
        shards += [(shard, layout.levels) for shard in layout.shards]
    seen = {shard for shard, _ in shards}
    for pattern in (keys.role_pattern(), keys.delayed_pattern()):
        for key in sorted(await streams.scan_keys(redis, pattern)):
            shard = _shard_of(keys, key)
            if shard is not None and shard not in seen:
                seen.add(shard)
                shards.append((shard, 1))
    return shards


def _shard_of(keys: Keys, key: str) -> str | None:
    """The shard of a role stream or delayed schedule key, or None."""
    stream = key.removesuffix(":delayed") + ":stream" if key.endswith(":delayed") else key
    return keys.role_of_stream(stream)


def _matching(bodies: Iterable[tuple[Any, bytes]], message_id: str) -> tuple[Any, Job] | None:
    """The first (position, job) whose body is a job with this id (untrusted bytes)."""
    needle = orjson.dumps(message_id)
    for where, body in bodies:
        if needle not in body:
            continue
        try:
            job = decode_job({MESSAGE_FIELD: body})
        except ProtocolError:
            continue
        if job.id == message_id:
            return where, job
    return None


async def _in_stream(
    redis: Redis, keys: Keys, shard: str, message_id: str, budget: _Budget, level: int = 0
) -> JobStatus | None:
    """Queued or running: the job's entry in the role stream (of a level), its pending row."""
    stream, start = keys.role_stream(shard, level), "-"
    while count := budget.page():
        try:
            reply: Any = await redis.xrange(stream, start, "+", count)
        except ResponseError:  # another type at the stream's name: nothing there
            return None
        budget.read += len(reply)
        rows = ((entry_id, fields.get(MESSAGE_FIELD, b"")) for entry_id, fields in reply)
        hit = _matching(rows, message_id)
        if hit is not None:
            return await _queued_or_running(redis, keys, shard, bytes(hit[0]), hit[1], level)
        if len(reply) < count:
            return None
        start = "(" + streams.text(reply[-1][0])
    return None


async def _queued_or_running(
    redis: Redis, keys: Keys, shard: str, entry_id: bytes, job: Job, level: int = 0
) -> JobStatus:
    stream = keys.role_stream(shard, level)
    try:
        rows: Any = await redis.xpending_range(stream, GROUP, entry_id, entry_id, 1)
    except ResponseError:  # NOGROUP: no worker read it yet
        rows = []
    queued = JobStatus(
        job.id,
        "retrying" if job.attempt > 1 else "queued",  # a retry due at once waits in the stream
        role=job.role,
        partition=shard,
        entry_id=entry_id.decode(),
        attempt=job.attempt,
        created_at_ms=job.created_at_ms,
        headers=job.headers or None,
        priority=level or None,
    )
    if not rows:
        return queued
    row = rows[0]
    consumer = streams.text_lenient(row["consumer"])
    try:
        alive = bool(await redis.exists(keys.consumer_alive(consumer)))
    except InvalidNameError:  # not a name a worker could have: nobody holds it
        alive = False
    running = replace(
        queued,
        state="running",
        consumer=consumer,
        worker_alive=alive,
        lease_age_ms=int(row["time_since_delivered"]),
        deliveries=int(row["times_delivered"]),
    )
    event = await latest_progress(redis, keys, job.id)
    if event is None or (event.attempt, event.consumer) != (job.attempt, consumer):
        return running  # none, or an earlier run's (its worker died: adopted since)
    return replace(
        running, progress=event.progress, progress_message=event.message, progress_at_ms=event.at_ms
    )


async def latest_progress(redis: Redis, keys: Keys, message_id: str) -> LifecycleEvent | None:
    """The latest ``progress`` event a run of the job keeps (:meth:`Keys.job_progress`), if any."""
    try:
        raw: Any = await redis.get(keys.job_progress(message_id))
    except ResponseError:  # another type at the key's name: nothing kept
        return None
    return _progress_event(raw, message_id)


async def latest_progresses(
    redis: Redis, keys: Keys, message_ids: list[str]
) -> dict[str, LifecycleEvent]:
    """The latest ``progress`` events kept for these jobs, by id (one ``MGET``: one slot)."""
    if not message_ids:
        return {}
    try:
        replies: list[Any] = await redis.mget([keys.job_progress(m) for m in message_ids])
    except ResponseError:
        return {}
    found = {m: _progress_event(raw, m) for m, raw in zip(message_ids, replies, strict=True)}
    return {m: event for m, event in found.items() if event is not None}


def _progress_event(raw: Any, message_id: str) -> LifecycleEvent | None:
    """The progress event a job's progress key holds, or None (for anything else there)."""
    # Untrusted bytes: anyone who may write the namespace may have written them.
    if not isinstance(raw, bytes):
        return None
    try:
        events, _ = decode_lifecycle({LIFECYCLE_FIELD: b"[" + raw + b"]"})
    except ProtocolError:
        return None
    if len(events) != 1 or events[0].type != "progress" or events[0].message_id != message_id:
        return None
    return events[0]


async def _in_schedule(
    redis: Redis, keys: Keys, shard: str, message_id: str, budget: _Budget, level: int = 0
) -> JobStatus | None:
    """Delayed (published with a delay) or retrying (a later attempt): the delayed schedule."""
    schedule, start = keys.delayed(shard, level), 0
    while count := budget.page():
        try:
            reply: Any = await redis.zrange(schedule, start, start + count - 1, withscores=True)
        except ResponseError:
            return None
        budget.read += len(reply)
        hit = _matching(((int(score), bytes(body)) for body, score in reply), message_id)
        if hit is not None:
            due, job = hit
            state: JobState = "retrying" if job.attempt > 1 else "delayed"
            return JobStatus(
                job.id,
                state,
                role=job.role,
                partition=shard,
                attempt=job.attempt,
                created_at_ms=job.created_at_ms,
                due_at_ms=due,
                headers=job.headers or None,
                priority=level or None,
            )
        if len(reply) < count:
            return None
        start += count
    return None


async def _in_parked(
    redis: Redis, keys: Keys, shard: str, message_id: str, budget: _Budget
) -> JobStatus | None:
    """Parked: held back by its limit key, in that key's parked list (see ``keylimits``)."""
    try:
        limit_keys: Any = await redis.zrange(keys.parked(shard), 0, budget.page() - 1)
    except ResponseError:  # another type at the index's name: nothing parked there
        return None
    for raw in limit_keys:
        limit_key = streams.text_lenient(raw)
        try:
            found = await _in_park_list(redis, keys.park(shard, limit_key), message_id, budget)
        except (InvalidNameError, ResponseError):  # not a key a worker parked under
            continue
        if found is not None:
            level, job = found
            return JobStatus(
                job.id,
                "parked",
                role=job.role,
                partition=shard,
                attempt=job.attempt,
                created_at_ms=job.created_at_ms,
                detail=f"parked: waiting for its limit key {shown(limit_key)}",
                headers=job.headers or None,
                priority=level or None,
            )
    return None


async def _in_park_list(
    redis: Redis, park: str, message_id: str, budget: _Budget
) -> tuple[int, Job] | None:
    """The (level, job) of ``message_id`` in one key's parked list, if there."""
    start = 0
    while count := budget.page():
        items: Any = await redis.lrange(park, start, start + count - 1)
        budget.read += len(items)
        bodies = []
        for item in items:
            decoded = decode_parked_item(bytes(item))
            if decoded is not None:
                bodies.append((decoded[0], decoded[1].get(MESSAGE_FIELD, b"")))
        hit = _matching(bodies, message_id)
        if hit is not None:
            return hit
        if len(items) < count:
            return None
        start += count
    return None


async def _in_dead_letters(
    redis: Redis, keys: Keys, shard: str, message_id: str, budget: _Budget
) -> JobStatus | None:
    """Failed or expired: the newest dead letter of the job in the role's dead-letter stream."""
    dead, end = keys.dead_letters(shard), "+"
    needle = orjson.dumps(message_id)
    while count := budget.page():
        try:
            reply: Any = await redis.xrevrange(dead, end, "-", count)
        except ResponseError:
            return None
        budget.read += len(reply)
        for entry_id, fields in reply:
            if needle in fields.get(b"dead_letter", b""):
                found = _dead_status(streams.text(entry_id), shard, fields, message_id)
                if found is not None:
                    return found
        if len(reply) < count:
            return None
        end = "(" + streams.text(reply[-1][0])
    return None


def _dead_status(
    entry_id: str, shard: str, fields: dict[bytes, bytes], message_id: str
) -> JobStatus | None:
    try:
        letter, _ = decode_dead_letter(fields)
    except ProtocolError:
        return None
    if letter.message_id != message_id:
        return None
    detail = letter.detail
    if letter.error is not None and letter.error.message not in detail:
        detail = f"{detail} ({letter.error.type}: {letter.error.message})"
    return JobStatus(
        message_id,
        "expired" if letter.reason == "expired" else "failed",
        role=letter.role,
        partition=shard,
        entry_id=entry_id,
        attempt=letter.attempts,
        created_at_ms=letter.job.created_at_ms if letter.job else None,
        consumer=letter.consumer,
        reason=letter.reason,
        detail=detail,
        finished_at_ms=letter.dead_at_ms,
        headers=(letter.job.headers or None) if letter.job else None,
    )


async def _cancelled(redis: Redis, keys: Keys, message_id: str) -> bool:
    """Whether a cancel marker names the id (a message cancel, or one of ``any`` id)."""
    pipe = redis.pipeline(transaction=False)  # both markers share the {signals} slot
    for target in ("message", "any"):
        pipe.exists(keys.cancel_marker(target, message_id))
    return any(await pipe.execute())
