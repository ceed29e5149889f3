"""The worker registry: each live worker process describes itself in Redis under a TTL.

A worker writes its :class:`WorkerInfo` next to its consumer name's liveness key, with the same
TTL, each time it renews its leases; a clean stop deletes it, and a dead worker's entry expires
with its liveness key. ``streamflow workers`` lists them.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from redis.asyncio import Redis

from streamflow import streams
from streamflow.keys import Keys


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
    workers = []
    for raw in await streams.get_many(redis, found):
        if raw is not None:  # expired between the scan and the read
            workers.append(WorkerInfo.model_validate_json(raw))
    return workers
