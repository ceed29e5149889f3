"""The registry: each live worker and coordinator process describes itself in Redis.

A worker writes its :class:`WorkerInfo` next to its consumer name's liveness key, with the same
TTL, each time it renews its leases; a clean stop deletes it, and a dead worker's entry expires
with its liveness key. A coordinator writes its :class:`CoordinatorInfo` into one hash every
:data:`COORDINATOR_BEAT_MS` (a field is one coordinator); a clean stop removes it, and a dead
one's entry goes stale (kept a day, shown as such). ``streamflow workers`` lists both, and
``submit`` warns when no coordinator is live.
"""

from __future__ import annotations

import importlib.metadata
import logging
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from streamflow import streams
from streamflow.keys import Keys
from streamflow.logs import shown

logger = logging.getLogger(__name__)

#: This installation's streamflow version, as workers and coordinators report it.
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


#: How often a running coordinator refreshes its registry entry.
COORDINATOR_BEAT_MS = 5_000
#: An entry not refreshed for this long is a coordinator that stopped or died.
COORDINATOR_TTL_MS = 3 * COORDINATOR_BEAT_MS
#: Stale entries older than this are removed by the next live coordinator's refresh.
COORDINATOR_FORGET_MS = 24 * 3600 * 1000


class CoordinatorInfo(BaseModel):
    """What a coordinator process says about itself.

    Attributes:
        consumer: Its consumer name.
        host: The host name.
        pid: The process id.
        version: The streamflow version it runs.
        functions: The coordinator functions it provides.
        started_at_ms: When it started, ms since the epoch.
        events: Task events it has processed since it started.
        updated_at_ms: When it wrote this (by its clock).
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    consumer: str
    host: str
    pid: int
    version: str
    functions: list[str]
    started_at_ms: int
    events: int
    updated_at_ms: int

    def live(self, now_ms: int | None = None) -> bool:
        """Whether it refreshed its entry within :data:`COORDINATOR_TTL_MS`."""
        now = int(time.time() * 1000) if now_ms is None else now_ms
        return now - self.updated_at_ms <= COORDINATOR_TTL_MS


async def coordinators(redis: Redis, keys: Keys, *, quiet: bool = False) -> list[CoordinatorInfo]:
    """Every coordinator entry of the namespace (live or stale), by consumer name.

    Malformed entries are skipped, each with a warning unless ``quiet``.
    """
    key = keys.coordinators()
    try:
        raw: Any = await redis.hgetall(key)
    except ResponseError as exc:  # another type at the hash's name: nothing to list
        if not quiet:
            logger.warning("cannot read the coordinator registry %s: %s", key, shown(exc))
        return []
    # Field names are untrusted too (any bytes): decoded leniently, never a crash.
    named = sorted((streams.text_lenient(name), bytes(value)) for name, value in raw.items())
    return [info for name, value in named if (info := _coordinator(name, value, quiet))]


def _coordinator(name: str, raw: bytes, quiet: bool) -> CoordinatorInfo | None:
    try:
        return CoordinatorInfo.model_validate_json(raw)
    except ValidationError as exc:  # anyone with write access to the namespace may write here
        if not quiet:
            logger.warning(
                "skipping the malformed coordinator entry %s: %s", shown(name), shown(exc)
            )
        return None


async def live_coordinator(redis: Redis, keys: Keys) -> bool:
    """Whether any coordinator refreshed its entry within :data:`COORDINATOR_TTL_MS`."""
    return any(info.live() for info in await coordinators(redis, keys))


async def announce_coordinator(redis: Redis, keys: Keys, info: CoordinatorInfo) -> None:
    """Write (refresh) a coordinator's entry, and forget entries stale for a day."""
    key = keys.coordinators()
    await redis.hset(key, info.consumer, info.model_dump_json())
    stale = [
        other.consumer
        for other in await coordinators(redis, keys, quiet=True)  # every few seconds: no log spam
        if info.updated_at_ms - other.updated_at_ms > COORDINATOR_FORGET_MS
    ]
    if stale:
        await redis.hdel(key, *stale)


async def withdraw_coordinator(redis: Redis, keys: Keys, consumer: str) -> None:
    """Remove a coordinator's entry (a clean stop)."""
    await redis.hdel(keys.coordinators(), consumer)
