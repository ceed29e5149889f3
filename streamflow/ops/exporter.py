"""Queue-level gauges for a whole namespace, served once (``streamflow exporter``).

A worker's own metrics are per process and add up across processes. Queue figures (stream
length, lag, pending entries, the oldest pending entry's age, delayed retries, dead letters)
belong to a role, not to a process: served by every worker they would be counted once per
worker. One exporter process per namespace reads them from Redis every ``interval`` seconds
(with the same reads as ``streamflow inspect``) and serves the last snapshot, so a scrape never
waits for Redis and many scrapers cost Redis nothing more.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import ValidationError
from redis.asyncio import Redis

from streamflow import connect, partitions, streams
from streamflow.dag.tasks import TaskState
from streamflow.errors import ConfigError
from streamflow.keys import NAME_PATTERN, Keys
from streamflow.ops.inspect import RoleInfo, inspect_roles
from streamflow.registry import live_workers

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Snapshot:
    """What one refresh read."""

    roles: list[RoleInfo] = field(default_factory=list)
    events_backlog: dict[str, int] = field(default_factory=dict)
    workers: int = 0
    tasks: dict[str, int] = field(default_factory=dict)
    taken_at: float = 0.0


class Exporter(Collector):
    """Reads the namespace's queues periodically and serves them as gauges.

    Args:
        redis: The client.
        namespace: The namespace to watch.
        interval: Seconds between refreshes.
    """

    def __init__(self, redis: Redis, *, namespace: str = "sf", interval: float = 5.0) -> None:
        self._redis = redis
        self._keys = Keys(namespace)
        self.interval = interval
        self.snapshot: Snapshot | None = None
        self.failures = 0

    def registry(self) -> CollectorRegistry:
        """A registry serving this exporter's gauges."""
        registry = CollectorRegistry(auto_describe=True)
        registry.register(self)
        return registry

    async def run(self) -> None:
        """Refresh forever."""
        backoff = connect.Backoff("reading queue figures")
        while True:
            try:
                await self.refresh()
            except connect.TRANSIENT_ERRORS as exc:
                self.failures += 1
                await backoff.failed(exc)
                continue
            except Exception:
                # Bad data (a corrupt task state, a key of the wrong type) must not stop the
                # exporter: the last snapshot stays served and ages.
                self.failures += 1
                logger.exception("reading queue figures failed; trying again")
            else:
                backoff.succeeded()
            await anyio.sleep(self.interval)

    async def refresh(self) -> Snapshot:
        """Read every figure once and keep it as the served snapshot."""
        redis, keys = self._redis, self._keys
        roles = await inspect_roles(redis, keys)
        backlog = {}
        for info in roles:
            try:
                layout = await partitions.load(redis, keys, info.role)
            except ConfigError:  # a corrupt record: inspect shows the role as one partition
                layout = None
            layout = layout or partitions.single(info.role)
            backlog[info.role] = 0
            for shard in layout.shards:
                backlog[info.role] += int(await redis.xlen(keys.events(shard)))
        tasks = await _task_states(redis, keys)
        workers = len(await live_workers(redis, keys))
        self.snapshot = Snapshot(roles, backlog, workers, tasks, time.monotonic())
        return self.snapshot

    def collect(self) -> Iterator[Metric]:
        """Yield the last snapshot as gauges (nothing before the first refresh)."""
        snap = self.snapshot
        if snap is None:
            return
        by_role = ["role"]
        by_group = ["role", "group"]
        length = GaugeMetricFamily(
            "streamflow_stream_length",
            "Entries in the role stream (all its partitions).",
            labels=by_role,
        )
        split = GaugeMetricFamily(
            "streamflow_role_partitions", "Partition streams of the role.", labels=by_role
        )
        delayed = GaugeMetricFamily(
            "streamflow_delayed_jobs",
            "Jobs waiting in the delayed schedule (retries, delayed publishes).",
            labels=by_role,
        )
        dead = GaugeMetricFamily(
            "streamflow_dead_letter_depth", "Entries in the dead-letter stream.", labels=by_role
        )
        backlog = GaugeMetricFamily(
            "streamflow_task_events_backlog",
            "Task events not yet processed by a coordinator.",
            labels=by_role,
        )
        pending = GaugeMetricFamily(
            "streamflow_pending_entries",
            "Entries delivered and not yet settled (held under a lease).",
            labels=by_group,
        )
        lag = GaugeMetricFamily(
            "streamflow_group_lag", "Entries not yet delivered to the group.", labels=by_group
        )
        oldest = GaugeMetricFamily(
            "streamflow_oldest_pending_age_seconds",
            "Age of the oldest pending entry (since it was added to the stream).",
            labels=by_group,
        )
        consumers = GaugeMetricFamily(
            "streamflow_consumers", "Consumers the group knows (live or not).", labels=by_group
        )
        idle = GaugeMetricFamily(
            "streamflow_oldest_pending_idle_seconds",
            "The longest a pending entry has gone without being delivered, renewed or adopted.",
            labels=by_group,
        )
        groups = GaugeMetricFamily(
            "streamflow_role_consumer_groups",
            "Consumer groups of the role stream: 0 when no worker ever read it (a role nobody "
            "serves, e.g. a misspelt one: its jobs wait for ever).",
            labels=by_role,
        )
        levels = GaugeMetricFamily(
            "streamflow_priority_level_length",
            "Entries in the streams of one priority level of a role with priorities (all its "
            "partitions); the role's streamflow_stream_length is their total.",
            labels=["role", "level"],
        )
        for info in snap.roles:
            for level in info.levels or ():
                levels.add_metric([info.role, str(level.level)], level.length)
            length.add_metric([info.role], info.length)
            groups.add_metric([info.role], len(info.groups))
            split.add_metric([info.role], info.partitions)
            delayed.add_metric([info.role], info.delayed)
            dead.add_metric([info.role], info.dead_letters)
            backlog.add_metric([info.role], snap.events_backlog.get(info.role, 0))
            for group in info.groups:
                labels = [info.role, group.name]
                pending.add_metric(labels, group.pending)
                consumers.add_metric(labels, len(group.consumers))
                if group.lag is not None:
                    lag.add_metric(labels, group.lag)
                oldest.add_metric(labels, (group.oldest_pending_age_ms or 0) / 1000)
                idle.add_metric(labels, (group.oldest_pending_idle_ms or 0) / 1000)
        yield from (length, split, delayed, dead, backlog, pending, lag, oldest, consumers, idle)
        yield groups
        yield levels
        yield GaugeMetricFamily(
            "streamflow_live_workers", "Worker processes in the registry.", value=snap.workers
        )
        tasks = GaugeMetricFamily(
            "streamflow_tasks", "Unfinished tasks by state.", labels=["state"]
        )
        for state in ("queued", "running"):
            tasks.add_metric([state], snap.tasks.get(state, 0))
        yield tasks
        yield CounterMetricFamily(
            "streamflow_exporter_refresh_failures",
            "Reads of the queue figures that failed.",
            value=self.failures,
        )
        yield GaugeMetricFamily(
            "streamflow_exporter_snapshot_age_seconds",
            "Seconds since the figures were read from Redis.",
            value=time.monotonic() - snap.taken_at,
        )


async def _task_states(redis: Redis, keys: Keys) -> dict[str, int]:
    """How many active tasks are in each state.

    The active set and the states are read back from Redis, where a publisher may write: a
    name that is not a task id, a state of another type or shape is left out, not an error
    that would leave every figure stale.
    """
    listed: Any = await redis.smembers(keys.tasks_active())
    active = [t for raw in listed if NAME_PATTERN.fullmatch(t := streams.text_lenient(raw))]
    if not active:
        return {}
    pipe = redis.pipeline(transaction=False)
    for task_id in active:
        pipe.hget(keys.task_state(task_id), "task")
    tasks: dict[str, int] = {}
    for state in await pipe.execute(raise_on_error=False):
        if state is None or isinstance(state, Exception):
            continue
        with contextlib.suppress(ValidationError):
            name = TaskState.model_validate_json(state).state
            tasks[name] = tasks.get(name, 0) + 1
    return tasks
