"""What the lifecycle events stream tells the dashboard: a task's timeline, roles' recent rates.

Both read the stream with plain, bounded ``XRANGE`` calls (never a blocking read, never an
unbounded scan). Events are best effort (:mod:`streamflow.events`): a timeline may miss one,
and the rates count what workers reported, not what Redis settled.

- :class:`Timeline`: a task's events from its creation on, on its page: read once when the page
  loads, then followed by the shared poller from a kept cursor while the page is open.
- :class:`Rates`: per role, the jobs that succeeded and failed in each of the last
  :data:`BUCKETS` buckets of :data:`BUCKET_MS`; fed incrementally by the shared poller with the
  overview (a cursor kept between reads), so it costs one ``XRANGE`` per interval whoever looks.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import cast

import anyio
import orjson
from redis.asyncio import Redis

from streamflow.errors import ProtocolError
from streamflow.keys import Keys
from streamflow.records import LifecycleEvent, decode_lifecycle

logger = logging.getLogger(__name__)

#: Stream entries one read takes (each holds up to 100 events).
PAGE = 50
#: Entries a timeline scans at most (from the task's creation on).
TIMELINE_ENTRIES = 500
#: Events a timeline shows at most.
TIMELINE_EVENTS = 200
#: A rate bucket's width and how many are kept: five minutes in ten-second steps.
BUCKET_MS = 10_000
BUCKETS = 30
#: Entries the poller reads per interval at most; behind by more, it skips to the window.
RATE_ENTRIES = 200
#: Event types counted as a job's success or failure.
SUCCEEDED = frozenset({"succeeded"})
FAILED = frozenset({"failed", "dead_lettered"})


def _events(fields: dict[bytes, bytes]) -> list[LifecycleEvent]:
    # Anyone who may write the namespace may write garbage here: skip it.
    try:
        return decode_lifecycle(fields)[0]
    except ProtocolError as exc:
        logger.debug("dashboard: skipped a lifecycle entry: %s", exc)
        return []


async def _range(redis: Redis, keys: Keys, start: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """One page of lifecycle entries from ``start`` (an id, or ``(id`` for after it)."""
    found = await redis.xrange(keys.lifecycle(), min=start, max="+", count=PAGE)
    return cast(list[tuple[bytes, dict[bytes, bytes]]], found or [])


def _exclusive(entry_id: bytes) -> str:
    return "(" + entry_id.decode()


class Timeline:
    """A task's events from its creation on, by time: read once, then followed from a cursor.

    A task page reads it once when it loads; the shared poller keeps one per watched task and
    reads only the entries written since its last read, so a live timeline costs one bounded
    ``XRANGE`` per interval however many pages show it.

    Args:
        redis: The client.
        keys: Key names.
        task_id: The task.
        since_ms: Where to start in the stream (the task's creation, less clock skew).
    """

    def __init__(self, redis: Redis, keys: Keys, task_id: str, since_ms: int) -> None:
        self._redis = redis
        self._keys = keys
        self._task_id = task_id
        self._needle = orjson.dumps(task_id)  # entries that do not name the task are not decoded
        self._cursor = f"{max(since_ms, 0)}-0"
        self.events: list[LifecycleEvent] = []
        #: The list reached :data:`TIMELINE_EVENTS` (later events are not shown), or the last
        #: read stopped at its bound with entries left (they are read next time).
        self.cut = False

    async def update(self, entries: int = TIMELINE_ENTRIES) -> None:
        """Read at most ``entries`` entries written since the last update."""
        if len(self.events) >= TIMELINE_EVENTS:
            return  # full: the first events are what the page shows
        scanned, found = 0, []
        while scanned < entries:
            page = await _range(self._redis, self._keys, self._cursor)
            for entry_id, fields in page:
                if self._needle in fields.get(b"events", b""):
                    found += [e for e in _events(fields) if e.task_id == self._task_id]
                self._cursor = _exclusive(entry_id)
            scanned += len(page)
            if len(self.events) + len(found) >= TIMELINE_EVENTS or len(page) < PAGE:
                break
        # Workers and coordinators buffer their events: the stream's order is not the order of
        # what happened across processes, their times are (on clocks in step).
        merged = sorted(self.events + found, key=lambda event: event.at_ms)
        self.events = merged[:TIMELINE_EVENTS]
        self.cut = len(merged) >= TIMELINE_EVENTS or scanned >= entries


@dataclass(frozen=True, slots=True)
class Spark:
    """One role's recent rates, drawn as an inline SVG line.

    Attributes:
        succeeded: Jobs that succeeded per bucket, oldest first.
        failed: Jobs that failed or were dead-lettered per bucket, oldest first.
    """

    succeeded: list[int]
    failed: list[int]

    @property
    def per_second(self) -> float:
        """Successes per second over the last full bucket."""
        return self.succeeded[-2] / (BUCKET_MS / 1000) if len(self.succeeded) > 1 else 0.0

    @property
    def failure_rate(self) -> float | None:
        """Failed / all settled over the window, or None when nothing settled."""
        done = sum(self.succeeded) + sum(self.failed)
        return sum(self.failed) / done if done else None

    def points(self, series: str, width: int = 120, height: int = 24) -> str:
        """The polyline of ``series`` (``succeeded`` or ``failed``) scaled to the box."""
        values = self.succeeded if series == "succeeded" else self.failed
        top = max(max(self.succeeded), max(self.failed), 1)
        step = width / max(len(values) - 1, 1)
        return " ".join(
            f"{i * step:.1f},{height - 1 - (height - 2) * v / top:.1f}"
            for i, v in enumerate(values)
        )


class Rates:
    """Jobs that succeeded and failed per role per bucket, fed from the lifecycle stream.

    Args:
        redis: The client.
        keys: Key names.
    """

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys
        self._cursor: str | None = None
        self._lock = anyio.Lock()  # the poller and a page load may update at once
        self._counts: dict[tuple[str, str], dict[int, int]] = defaultdict(dict)

    async def update(self, now_ms: int) -> None:
        """Read the events written since the last update (a bounded number of entries)."""
        async with self._lock:
            await self._update(now_ms)

    async def _update(self, now_ms: int) -> None:
        oldest = now_ms - BUCKETS * BUCKET_MS
        if self._cursor is None or int(self._cursor.strip("(").split("-")[0]) < oldest:
            self._cursor = f"{oldest}-0"  # the first read, or too far behind: the window only
        read = 0
        while read < RATE_ENTRIES:
            entries = await _range(self._redis, self._keys, self._cursor)
            for entry_id, fields in entries:
                self._cursor = _exclusive(entry_id)
                for event in _events(fields):
                    self._count(event)
            read += len(entries)
            if len(entries) < PAGE:
                break
        self._forget(oldest)

    def _count(self, event: LifecycleEvent) -> None:
        kind = "ok" if event.type in SUCCEEDED else "bad" if event.type in FAILED else None
        if kind is None or event.role is None:
            return
        bucket = event.at_ms // BUCKET_MS
        counts = self._counts[(event.role, kind)]
        counts[bucket] = counts.get(bucket, 0) + 1

    def _forget(self, oldest: int) -> None:
        first = oldest // BUCKET_MS
        for key, counts in list(self._counts.items()):
            for bucket in [b for b in counts if b < first]:
                del counts[bucket]
            if not counts:  # a role gone quiet (or a made-up one) is not kept
                del self._counts[key]

    def sparks(self, roles: list[str], now_ms: int) -> dict[str, Spark]:
        """Each role's sparkline over the window ending now."""
        last = now_ms // BUCKET_MS
        buckets = range(last - BUCKETS + 1, last + 1)
        return {
            role: Spark(
                [self._counts.get((role, "ok"), {}).get(b, 0) for b in buckets],
                [self._counts.get((role, "bad"), {}).get(b, 0) for b in buckets],
            )
            for role in roles
        }
