"""The worker registry: each live worker process describes itself in Redis under a TTL.

A worker writes its :class:`WorkerInfo` next to its consumer name's liveness key, with the same
TTL, each time it renews its leases; a clean stop deletes it, and a dead worker's entry expires
with its liveness key. ``streamflow workers`` lists them.
"""

from __future__ import annotations

import logging

from pydantic import BaseModel, ConfigDict, ValidationError
from redis.asyncio import Redis

from streamflow import streams
from streamflow.keys import Keys
from streamflow.logs import shown

logger = logging.getLogger(__name__)


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
