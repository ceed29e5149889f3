"""Kept job outcomes: the record a worker writes, and how clients read and wait for it.

A job's outcome is kept only when its role (``@app.role(..., keep_result=...)``) or its
publisher (``keep_result=`` on publish, or :meth:`streamflow.Client.call`) asks, so roles that
do not use results pay nothing. The worker writes one :class:`~streamflow.records.JobResult`
JSON string under :meth:`streamflow.keys.Keys.result` (the job's partition's slot) with a TTL:
``succeeded`` (the handler's return value) and ``cancelled`` in the same owner-checked step that
acknowledges the job (``result.lua``, sent by the worker's batched acker with the other
acknowledgements: see :mod:`streamflow.settle`), ``dead_lettered`` in the step that moves the
entry to the dead-letter stream (``dead_letter.lua``): never a dead letter without its record.
Readers ``GET`` it: any language can (docs/protocol.md).

The readers below are written once for the asyncio and the blocking client (see
:mod:`streamflow.steps`). Waiting for an outcome is written once too, :func:`wait_for_end`: a
few quick reads first (most jobs end within milliseconds, sooner than workers write their
buffered events), then a wait on the job's final lifecycle event with a periodic re-check
(events are best effort; a role can turn them off).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, TypeVar
from weakref import WeakKeyDictionary

import anyio
import anyio.lowlevel
import orjson
from pydantic import BaseModel, ValidationError
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from streamflow import connect, events, streams
from streamflow.errors import (
    JobCancelledError,
    JobDeadLetteredError,
    JobExpiredError,
    JobFailedError,
    ResultTimeoutError,
)
from streamflow.keys import Keys
from streamflow.partitions import LayoutCache, read_record
from streamflow.protocol import PROTOCOL_VERSION, DeadLetterReason, Job, now_ms
from streamflow.records import FINAL_JOB_TYPES, ErrorInfo, JobOutcome, JobResult
from streamflow.steps import Steps

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


class UnkeepableResult(Exception):
    """A handler's return value that cannot be kept (the job is dead-lettered with ``reason``)."""

    def __init__(self, reason: DeadLetterReason, detail: str) -> None:
        super().__init__(detail)
        self.reason: DeadLetterReason = reason


def keep_ms(role_keep_ms: int, job: Job | None) -> int:
    """How long ``job``'s outcome is kept (ms; 0: not kept): its publisher's ask, else its role's.

    A task node's jobs report to their task instead: never kept here.
    """
    if job is None or job.invocation is not None:  # a node job (see nodes.is_node_job)
        return 0
    return job.keep_result_ms or role_keep_ms


def _json_default(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    raise TypeError(f"{type(value).__name__} is not JSON-serializable")


def encode_record(
    job: Job,
    status: JobOutcome,
    consumer: str,
    *,
    max_bytes: int,
    result: Any = None,
    reason: str | None = None,
    detail: str | None = None,
    error: ErrorInfo | None = None,
) -> bytes:
    """The JSON of a job's :class:`JobResult`, built without the model (it is on the hot path).

    Raises:
        UnkeepableResult: The result is not JSON (``invalid_result``), or the record is larger
            than ``max_bytes`` (``result_too_large``): never cut.
    """
    doc: dict[str, Any] = {
        "protocol": PROTOCOL_VERSION,
        "kind": "result",
        "message_id": job.id,
        "role": job.role,
        "status": status,
        "attempt": job.attempt,
        "consumer": consumer,
        "finished_at_ms": now_ms(),
    }
    if status == "succeeded":
        doc["result"] = result
    else:
        if reason is not None:
            doc["reason"] = reason
        doc["detail"] = detail or ""
        if error is not None:
            doc["error"] = error.model_dump(mode="json", exclude_none=True)
    try:
        # Integers beyond 64 bits, non-string keys and unknown types are refused, not mangled.
        raw = orjson.dumps(doc, default=_json_default)
    except TypeError as exc:
        detail = f"the handler's result is not JSON: {exc}"
        raise UnkeepableResult("invalid_result", detail) from None
    if len(raw) > max_bytes:
        raise UnkeepableResult(
            "result_too_large",
            f"the handler's result is {len(raw)} bytes as JSON, over the limit of {max_bytes} "
            "(the worker's max message size): return a reference to the data instead",
        )
    return raw


def decode_record(raw: bytes | str) -> JobResult | None:
    """A kept record read back from Redis, or None when it is not one (anyone may write it)."""
    try:
        return JobResult.model_validate_json(raw)
    except ValidationError:
        return None


def outcome(record: JobResult) -> Any:
    """The result a record holds, or its failure raised as a typed error.

    Raises:
        JobExpiredError: It was dead-lettered as ``expired``.
        JobDeadLetteredError: It was dead-lettered for another reason.
        JobCancelledError: It was cancelled.
    """
    if record.status == "succeeded":
        return record.result
    detail = record.detail or ""
    if record.error is not None and record.error.message not in detail:
        detail = f"{detail} ({record.error.type}: {record.error.message})"
    error: type[JobFailedError] = JobCancelledError
    if record.status == "dead_lettered":
        error = JobExpiredError if record.reason == "expired" else JobDeadLetteredError
    reason = record.reason or record.status
    raise error(record.message_id, record.role, reason, detail)


def result_keys(
    redis: Any, keys: Keys, layouts: LayoutCache, message_id: str, role: str | None
) -> Steps[list[str]]:
    """Where ``message_id``'s outcome may be kept: a key per partition of its role.

    The result key is in the job's partition; without ``role``, every partition of every role
    workers registered is a candidate.
    """
    roles = [role] if role is not None else (yield from registered_roles(redis, keys))
    names: list[str] = []
    for name in roles:
        layout = layouts.cached(name)
        if layout is None:
            layout = layouts.record(name, (yield from read_record(redis, keys, name)))
        names += [keys.result(shard, message_id) for shard in layout.shards]
    return names


def registered_roles(redis: Any, keys: Keys) -> Steps[list[str]]:
    """Every role workers registered (the known roles set), sorted.

    Anyone with a publisher's rights may write another type of key at the set's name: then no
    role is read, with a warning, rather than the caller failing.
    """
    try:
        found = yield redis.smembers(keys.known_roles())
    except ResponseError as exc:
        if connect.is_outage(exc):
            raise
        logger.warning(
            "%s holds another type of key: no registered role is read (DEL it)", keys.known_roles()
        )
        return []
    return sorted(streams.text_lenient(name) for name in found)


def read_kept(redis: Any, candidates: list[str]) -> Steps[JobResult | None]:
    """The first valid record among ``candidates`` (one pipelined round trip), or None."""
    if len(candidates) == 1:
        values = [(yield redis.get(candidates[0]))]
    else:
        pipe = redis.pipeline(transaction=False)
        for key in candidates:
            pipe.get(key)
        values = yield pipe.execute()
    for raw in values:
        record = decode_record(raw) if raw is not None else None
        if record is not None:
            return record
    return None


#: The waits between two reads of a result key: from 0.5 ms, growing by half, to 100 ms.
FIRST_POLL, POLL_GROWTH, LAST_POLL = 0.0005, 1.5, 0.1
#: Once the wait between two reads would reach this (about 0.13 s of polling), the waiter
#: waits for the job's final lifecycle event instead: workers buffer events for
#: :data:`streamflow.events.LINGER` (0.05 s), so before that polling finds the end sooner.
WATCH_FROM = 0.04
#: While waiting for the event, the outcome is read again at least this often (s): an event
#: may be missing (best effort, or turned off for the role).
RECHECK = 0.5
#: Waiters of one Redis client that wait on events at most; others poll (each holds one of
#: the pool's connections in a blocking read).
MAX_WATCHERS = 8

#: Per Redis client, how many of its waiters wait on events now.
_watchers: WeakKeyDictionary[Any, int] = WeakKeyDictionary()


@dataclass(frozen=True, slots=True)
class EndEvents:
    """Where a waiter hears of a job's end: its final lifecycle event (see :func:`wait_for_end`).

    Attributes:
        redis: The client (its socket timeout exceeds the 1 s blocking read).
        keys: Key names.
        message_id: The job's id.
    """

    redis: Redis
    keys: Keys
    message_id: str

    def watching(self) -> AbstractAsyncContextManager[events.Waker]:
        """A waker fed by the job's final events from now on."""
        return events.watching(
            self.redis, self.keys, message_id=self.message_id, types=FINAL_JOB_TYPES
        )


def _timed_out(message_id: str, timeout: float | None) -> ResultTimeoutError:
    return ResultTimeoutError(
        message_id,
        f"no outcome of job {message_id} within {timeout} s: it still waits or runs, or neither "
        "its role nor its publisher asked to keep it (keep_result), or the kept outcome expired",
    )


async def wait_for_end(
    check: Callable[[], Awaitable[_T | None]],
    timeout: float | None,  # noqa: ASYNC109 - the caller's limit, applied here
    news: EndEvents | None = None,
) -> _T | None:
    """Call ``check`` until it returns something (a job ended); None once ``timeout`` passed.

    The one place that waits for a job to end (:meth:`streamflow.Client.result`, ``call``,
    ``streamflow job --wait``). It polls with a growing wait (0.5 ms on) for about 0.13 s;
    then, given ``news``, it waits for the job's final lifecycle event and checks again when
    one comes, and every :data:`RECHECK` seconds; without (or past :data:`MAX_WATCHERS`
    waiters), it polls on, every 0.1 s at most.
    """
    found = await check()  # at least once, whatever the timeout
    pause = FIRST_POLL
    with anyio.move_on_after(timeout):
        while found is None and (news is None or pause < WATCH_FROM):
            await anyio.sleep(pause)  # the outcome lands in Redis: poll it (see above)
            pause = min(pause * POLL_GROWTH, LAST_POLL)
            found = await check()
        if found is None and news is not None:
            found = await _watch(check, news)
    return found


async def _watch(check: Callable[[], Awaitable[_T | None]], news: EndEvents) -> _T | None:
    """Check again on each final event of the job, and every :data:`RECHECK` s (forever)."""
    redis = news.redis
    if _watchers.get(redis, 0) >= MAX_WATCHERS:
        return await _poll(check, LAST_POLL)
    _watchers[redis] = _watchers.get(redis, 0) + 1
    try:
        async with news.watching() as waker:
            found = await check()  # the end may have come before the subscription
            while found is None:
                await waker.wait(RECHECK)
                found = await check()
            return found
    finally:
        _watchers[redis] -= 1


async def _poll(check: Callable[[], Awaitable[_T | None]], pause: float) -> _T:
    while True:
        await anyio.sleep(pause)
        found = await check()
        if found is not None:
            return found


async def wait_kept(
    read: Callable[[], Awaitable[JobResult | None]],
    message_id: str,
    timeout: float | None,  # noqa: ASYNC109 - the caller's limit, applied here
    news: EndEvents | None = None,
) -> JobResult:
    """Read until an outcome is kept (see :func:`wait_for_end`).

    Raises:
        ResultTimeoutError: Nothing kept within ``timeout`` seconds (None: wait for ever).
    """
    record = await wait_for_end(read, timeout, news)
    if record is None:
        raise _timed_out(message_id, timeout)
    return record


def wait_kept_blocking(
    read: Callable[[], JobResult | None], message_id: str, timeout: float | None
) -> JobResult:
    """The blocking twin of :func:`wait_kept` (for :class:`streamflow.SyncClient`)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    pause = FIRST_POLL
    while True:
        record = read()
        if record is not None:
            return record
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _timed_out(message_id, timeout)
            pause = min(pause, left)
        time.sleep(pause)
        pause = min(pause * POLL_GROWTH, LAST_POLL)
