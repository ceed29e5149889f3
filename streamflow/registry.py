"""The registry: each live worker, coordinator and scheduler process describes itself in Redis.

A worker writes its :class:`WorkerInfo` next to its consumer name's liveness key, with the same
TTL, each time it renews its leases; a clean stop deletes it, and a dead worker's entry expires
with its liveness key.

Coordinators and schedulers beat instead: each kind has one hash (a :class:`Registry`: a field
is one process), and each process writes its entry (a :class:`ProcessInfo`) there every
:data:`BEAT_MS` with :meth:`Registry.keep_announced`; a clean stop removes it, and a dead one's
entry goes stale (kept a day, shown as such). :data:`COORDINATORS` holds
:class:`CoordinatorInfo`, :data:`SCHEDULERS` :class:`SchedulerInfo`. ``streamflow workers`` and
the dashboard list them all, and ``submit`` warns when no coordinator is live.

Every entry is read back as untrusted (anyone who may write the namespace may write one): a
field name that is not UTF-8, a value that is not an entry of the kind, a number out of range
or another type of key at the hash's name is skipped with a warning, never an error.
"""

from __future__ import annotations

import importlib.metadata
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Generic, TypeVar

import anyio
from anyio.abc import TaskStatus
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from streamflow import connect, streams
from streamflow.keys import Keys
from streamflow.logs import shown

logger = logging.getLogger(__name__)

#: This installation's streamflow version, as workers, coordinators and schedulers report it.
VERSION = importlib.metadata.version("streamflow")


class WorkerInfo(BaseModel):
    """What a live worker process says about itself.

    Attributes:
        consumer: Its consumer name (unique among live workers).
        host: The host name.
        pid: The process id.
        roles: The roles it serves.
        version: The streamflow version it runs.
        concurrency: How many handlers it runs at once.
        started_at_ms: When it started, ms since the epoch.
        in_flight: Entries it holds now (running or waiting for a handler slot).
        processed: Deliveries it has settled since it started.
        updated_at_ms: When it wrote this.
        paused: The roles it serves that it sees paused (it starts no new jobs of them).
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    consumer: str
    host: str
    pid: int
    roles: list[str]
    version: str
    concurrency: int
    started_at_ms: int
    in_flight: int
    processed: int
    updated_at_ms: int
    paused: list[str] = []


async def live_workers(redis: Redis, keys: Keys) -> list[WorkerInfo]:
    """Every live worker of the namespace, by consumer name."""
    found = sorted(await streams.scan_keys(redis, keys.consumer_info_pattern()))
    values = await streams.get_many(redis, found, raise_on_error=False)
    return [info for key, raw in zip(found, values, strict=True) if (info := _entry(key, raw))]


def _entry(key: str, raw: bytes | Exception | None) -> WorkerInfo | None:
    """One registry entry; None when it expired or is malformed (skipped, with a warning).

    Anyone with write access to the namespace may have written it: another type of key, or a
    value that is not an entry, must not fail the whole listing.
    """
    if raw is None:  # expired between the scan and the read
        return None
    if not isinstance(raw, Exception):
        try:
            return WorkerInfo.model_validate_json(raw)
        except ValidationError as exc:
            raw = exc
    logger.warning("skipping the malformed registry entry %s: %s", shown(key), shown(raw))
    return None


#: How often a running coordinator or scheduler refreshes its registry entry.
BEAT_MS = 5_000
#: An entry not refreshed for this long is a process that stopped or died.
TTL_MS = 3 * BEAT_MS
#: Stale entries older than this are removed by the next refresh of a live one of their kind.
FORGET_MS = 24 * 3600 * 1000

#: A count: beyond 2**53 is no real value.
Count = Annotated[int, Field(ge=0, lt=2**53)]
#: Epoch milliseconds before the year 10000 (a later one would overflow a date).
Millis = Annotated[int, Field(ge=0, lt=253_402_300_800_000)]
#: A name, host or version as a process reports it: bounded, so a forged one stays small.
Text = Annotated[str, Field(max_length=256)]
#: Names a process lists (coordinator functions): bounded too.
Names = Annotated[list[Text], Field(max_length=1000)]


class ProcessInfo(BaseModel):
    """What a coordinator or scheduler process says about itself (its registry entry).

    Attributes:
        consumer: Its name, unique per process (a coordinator's consumer name).
        host: The host name.
        pid: The process id.
        version: The streamflow version it runs.
        started_at_ms: When it started, ms since the epoch.
        updated_at_ms: When it wrote this (by its clock).
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    consumer: Text
    host: Text
    pid: Count
    version: Text
    started_at_ms: Millis
    updated_at_ms: Millis

    def live(self, now_ms: int | None = None) -> bool:
        """Whether it refreshed its entry within :data:`TTL_MS`."""
        now = int(time.time() * 1000) if now_ms is None else now_ms
        return now - self.updated_at_ms <= TTL_MS


class CoordinatorInfo(ProcessInfo):
    """A coordinator's entry.

    Attributes:
        functions: The coordinator functions it provides.
        events: Task events it has processed since it started.
    """

    functions: Names
    events: Count


class SchedulerInfo(ProcessInfo):
    """A scheduler's entry (see :mod:`streamflow.scheduler`).

    Attributes:
        schedules: The valid schedules its last pass read.
        paused: How many of them are paused.
        sent: Runs it sent since it started (duplicates Redis dropped included).
        last_pass_ms: When its last complete pass ended; None before the first.
        late_ms: How late its last pass fired: the longest wait, in that pass, between a due
            tick and its run being sent (0 when no tick was due).
    """

    schedules: Count
    paused: Count
    sent: Count
    last_pass_ms: Millis | None
    late_ms: Count


_Info = TypeVar("_Info", bound=ProcessInfo)
#: How a reader reports a skipped entry: ``logger.warning``'s signature.
Warn = Callable[..., object]


def silent(message: str, *args: object) -> None:
    """A :data:`Warn` that says nothing (a process re-reading its own registry every beat)."""


class WarnOnce:
    """A :data:`Warn` that logs each distinct warning once: for readers that poll (a page).

    Args:
        limit: Distinct warnings remembered before the memory is cleared (texts come from
            Redis: the memory stays bounded).
    """

    def __init__(self, limit: int = 1000) -> None:
        self._seen: set[str] = set()
        self._limit = limit

    def __call__(self, message: str, *args: object) -> None:
        """Log ``message % args`` unless it was logged already."""
        text = message % args
        if text in self._seen:
            return
        if len(self._seen) >= self._limit:
            self._seen.clear()
        self._seen.add(text)
        logger.warning("%s", text)


@dataclass(frozen=True, slots=True)
class Registry(Generic[_Info]):
    """One hash of processes of one kind that beat: consumer name -> JSON entry.

    Attributes:
        kind: What the processes are, for logs (``coordinator``).
        model: Their entry's model.
        key: Builds the hash's key from the namespace's keys.
    """

    kind: str
    model: type[_Info]
    key: Callable[[Keys], str]

    async def read(self, redis: Redis, keys: Keys, *, warn: Warn = logger.warning) -> list[_Info]:
        """Every entry (live or stale), by name; malformed ones skipped, each told to ``warn``."""
        key = self.key(keys)
        try:
            raw: Any = await redis.hgetall(key)
        except ResponseError as exc:  # another type at the hash's name: nothing to list
            if connect.is_outage(exc):
                raise
            warn("cannot read the %s registry %s: %s", self.kind, key, shown(exc))
            return []
        # Field names are untrusted too (any bytes): decoded leniently, never a crash.
        named = sorted((streams.text_lenient(name), bytes(value)) for name, value in raw.items())
        return [info for name, value in named if (info := self._entry(name, value, warn))]

    def _entry(self, name: str, raw: bytes, warn: Warn) -> _Info | None:
        try:
            return self.model.model_validate_json(raw)
        except ValidationError as exc:  # anyone with write access to the namespace may write
            warn("skipping the malformed %s entry %s: %s", self.kind, shown(name), shown(exc))
            return None

    async def announce(self, redis: Redis, keys: Keys, info: _Info) -> None:
        """Write (refresh) one entry, and forget entries of the kind stale for a day."""
        key = self.key(keys)
        await redis.hset(key, info.consumer, info.model_dump_json())
        stale = [
            other.consumer
            for other in await self.read(redis, keys, warn=silent)  # every beat: no log spam
            if info.updated_at_ms - other.updated_at_ms > FORGET_MS
        ]
        if stale:
            await redis.hdel(key, *stale)

    async def withdraw(self, redis: Redis, keys: Keys, consumer: str) -> None:
        """Remove one entry (a clean stop)."""
        await redis.hdel(self.key(keys), consumer)

    async def keep_announced(
        self,
        redis: Redis,
        keys: Keys,
        describe: Callable[[], _Info],
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Write ``describe()`` now and every :data:`BEAT_MS`, until cancelled.

        Started once the first write is done (or refused). An outage is backed off; another
        type of key at the hash's name (or a user without the right) is warned of once and
        the process goes on unlisted, since its work does not depend on being listed.
        """
        backoff = connect.Backoff(f"refreshing the {self.kind} registry")
        first = True
        while True:
            info = describe()
            try:
                await self.announce(redis, keys, info)
                backoff.succeeded()
            except connect.TRANSIENT_ERRORS as exc:
                await backoff.failed(exc)
                continue
            except ResponseError as exc:
                if connect.is_outage(exc):
                    await backoff.failed(exc)
                    continue
                if first:
                    logger.warning(
                        "cannot write the %s registry %s (%s): `streamflow workers`, the "
                        "dashboard (and submit, for a coordinator) do not see this %s until "
                        "it is fixed",
                        self.kind,
                        self.key(keys),
                        shown(exc),
                        self.kind,
                    )
            if first:
                first = False
                task_status.started()
            await anyio.sleep(BEAT_MS / 1000)


#: The coordinators' registry (``<ns>:{tasks}:coordinators``).
COORDINATORS = Registry("coordinator", CoordinatorInfo, Keys.coordinators)
#: The schedulers' registry (``<ns>:{schedules}:schedulers``).
SCHEDULERS = Registry("scheduler", SchedulerInfo, Keys.schedulers)


async def coordinators(
    redis: Redis, keys: Keys, *, warn: Warn = logger.warning
) -> list[CoordinatorInfo]:
    """Every coordinator entry of the namespace (live or stale), by consumer name."""
    return await COORDINATORS.read(redis, keys, warn=warn)


async def schedulers(
    redis: Redis, keys: Keys, *, warn: Warn = logger.warning
) -> list[SchedulerInfo]:
    """Every scheduler entry of the namespace (live or stale), by name."""
    return await SCHEDULERS.read(redis, keys, warn=warn)


async def live_coordinator(redis: Redis, keys: Keys) -> bool:
    """Whether any coordinator refreshed its entry within :data:`TTL_MS`."""
    return any(info.live() for info in await coordinators(redis, keys))
