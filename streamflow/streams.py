"""Stream commands, and raw stream replies turned into typed objects.

Everything above this module sees :class:`Entry` objects and plain results; no other module
parses an XREADGROUP reply by hand. The Lua scripts and their typed calls are
:mod:`streamflow.scripts`; reaching Redis (clients, URLs, TLS, which errors are outages) is
:mod:`streamflow.connect`'s job.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import OutOfMemoryError, ResponseError

from streamflow import connect, pipelines
from streamflow.errors import ConfigError, InputError
from streamflow.keys import GROUP
from streamflow.steps import Steps


@dataclass(slots=True)
class Entry:
    """One stream entry as Redis returned it (read-only by convention).

    Not a frozen dataclass: a worker makes one per entry it reads, and a frozen one costs three
    times as much to build (0.41 us against 0.14).

    Attributes:
        id: The stream entry id, e.g. ``b"1718000000000-0"``.
        fields: The entry's field/value pairs.
        deliveries: The pending list's delivery counter: 1 for a first read, higher after
            adoptions and re-reads.
    """

    id: bytes
    fields: dict[bytes, bytes]
    deliveries: int = 1


async def ensure_group(redis: Redis, stream: str, group: str = GROUP) -> None:
    """Create the role's consumer group (and the stream) if missing.

    The group starts at ``0``, not ``$``: a group lost with a Redis restart must not skip the
    entries already in the stream.

    Raises:
        ConfigError: Another type of key is at the stream's name.
    """
    try:
        await redis.xgroup_create(stream, group, id="0", mkstream=True)
    except OutOfMemoryError:
        # Redis refuses XGROUP CREATE when full, even for a group that exists: a worker
        # started to drain a full Redis must not wait for memory it is there to free.
        if not await _has_group(redis, stream, group):
            raise
    except ResponseError as exc:
        if str(exc).startswith("WRONGTYPE"):
            # Anyone with write access to the namespace may have put another type there.
            raise ConfigError(
                f"{stream} is not a stream (another type of key is at its name): delete it"
            ) from None
        if "BUSYGROUP" not in str(exc):
            raise


async def _has_group(redis: Redis, stream: str, group: str) -> bool:
    try:
        groups: Any = await redis.xinfo_groups(stream)
    except ResponseError:  # no such key
        return False
    return any(text(info.get("name", b"")) == group for info in groups)


async def read_group(
    redis: Redis,
    stream: str,
    consumer: str,
    *,
    count: int,
    block_ms: int | None,
    after: bytes | str = ">",
    group: str = GROUP,
    held: pipelines.Held | None = None,
) -> list[Entry]:
    """Read up to ``count`` entries for ``consumer`` with XREADGROUP.

    Args:
        redis: The client; its socket timeout must exceed ``block_ms``.
        stream: The role stream.
        consumer: This worker's consumer name.
        count: The most entries to return.
        block_ms: How long to wait when there is nothing; None returns at once.
        after: ``">"`` for new entries; an id (``"0"`` first) to re-read the entries already
            pending under ``consumer`` after that id. Re-reading counts as a delivery.
        group: The consumer group.
        held: A connection of ``redis``'s pool held for these reads (single Redis or
            Sentinel); used unless it is busy with another read.
    """
    if held is not None and not held.busy:
        # The pool's checkout and release and redis-py's command path cost about 0.1 ms of an
        # idle worker's enqueue-to-start latency. The raw reply is read with the connection's
        # own socket timeout, as redis-py reads it (above BLOCK: see connect.connect), and
        # built into entries by its shape on the wire (a RESP2 fallback included).
        pieces: list[Any] = ["XREADGROUP", "GROUP", group, consumer, "COUNT", count]
        if block_ms is not None:
            pieces += ["BLOCK", block_ms]
        return _entries_of_reply(await held.execute((*pieces, "STREAMS", stream, after)))
    # redis-py's own reply parsing, not a callback of ours on the caller's client: a callback
    # installed there would also serve the caller's own XREADGROUPs, and on a connection that
    # fell back to RESP2 redis-py hands an installed callback the RESP2 reply.
    reply = await redis.xreadgroup(group, consumer, {stream: after}, count=count, block=block_ms)
    return _entries(reply)


def _entries_of_reply(reply: Any) -> list[Entry]:
    """A raw XREADGROUP reply of one stream as entries.

    RESP3 gives ``{stream: [[id, [field, value, ...]], ...]}``, RESP2 ``[[stream, [...]]]``;
    nothing read is null or empty. An entry deleted since it was delivered (a re-read of the
    pending ones) has null fields. Almost every entry has one field (``message``): its dict is
    built directly.
    """
    if not reply:
        return []
    rows = next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1]
    return [
        Entry(entry_id, {flat[0]: flat[1]} if flat and len(flat) == 2 else _pairs(flat))
        for entry_id, flat in rows
    ]


def _pairs(flat: Any) -> dict[Any, Any]:
    """A flat ``[field, value, ...]`` list as a dict (None: no fields)."""
    if not flat:
        return {}
    it = iter(flat)
    return dict(zip(it, it, strict=False))


async def read_groups(
    redis: Redis,
    names: Sequence[str],
    group: str,
    consumer: str,
    *,
    count: int,
    block_ms: int | None,
    ahead: Callable[[Pipeline], object] | None = None,
) -> list[tuple[str, Entry]]:
    """New entries of several streams (one slot on a cluster) in one XREADGROUP, by stream.

    ``ahead`` adds commands to send before the read in the same round trip (a single Redis
    only: a cluster pipeline would split them by slot); an error in any of them is raised.
    """
    streams: Any = dict.fromkeys(names, ">")
    reply: Any
    if ahead is None:
        reply = await redis.xreadgroup(group, consumer, streams, count=count, block=block_ms)
    else:
        pipe = redis.pipeline(transaction=False)
        ahead(pipe)
        pipe.xreadgroup(group, consumer, streams, count=count, block=block_ms)
        reply = (await pipe.execute())[-1]
    return [
        (text(stream), Entry(entry_id, fields or {}))
        for stream, rows in reply or []
        for entry_id, fields in rows
    ]


async def read_own_pending(
    redis: Redis, stream: str, consumer: str, *, after: bytes, count: int, group: str = GROUP
) -> list[Entry]:
    """Re-read entries already pending under ``consumer`` after id ``after``, with counts.

    Used at start-up: a worker restarted under the same consumer name resumes its entries at
    once instead of waiting a lease TTL for them to be adopted.
    """
    entries = await read_group(
        redis, stream, consumer, count=count, block_ms=None, after=after, group=group
    )
    if not entries:
        return []
    rows = await redis.xpending_range(
        stream,
        group,
        min=entries[0].id,
        max=entries[-1].id,
        count=len(entries),
        consumername=consumer,
    )
    counts = {row["message_id"]: int(row["times_delivered"]) for row in rows}
    return [Entry(e.id, e.fields, counts.get(e.id, 1)) for e in entries]


def text(value: Any) -> str:
    """A Redis reply item (bytes, or str with decoding on) as str."""
    return value.decode() if isinstance(value, bytes) else str(value)


def text_lenient(value: Any) -> str:
    """A reply item as str, whatever bytes it holds (values written by anyone: escaped)."""
    return value.decode(errors="backslashreplace") if isinstance(value, bytes) else str(value)


def _entries(reply: Any) -> list[Entry]:
    """redis-py's parsed reply of a one-stream read as entries.

    ``[[stream, [(id, {field: value}), ...]]]`` (RESP2, and RESP3 by default), or
    ``{stream: [[(id, {...}), ...]]}`` from a client made with ``protocol=3``.
    """
    if not reply:
        return []
    if isinstance(reply, dict):
        (items,) = next(iter(reply.values()))
    else:
        _, items = reply[0]
    return [Entry(entry_id, fields or {}) for entry_id, fields in items]


async def read_range(redis: Redis, stream: str, *, count: int | None = None) -> list[Entry]:
    """The entries of ``stream`` from the oldest (XRANGE - +), at most ``count``."""
    reply: Any = await redis.xrange(stream, count=count)
    return [Entry(entry_id, fields or {}) for entry_id, fields in reply or []]


async def pending_owners(redis: Redis, stream: str, ids: Sequence[bytes]) -> dict[bytes, bytes]:
    """The consumer each of ``ids`` is pending under; ids that are not pending are left out.

    One round trip (one XPENDING range per id, pipelined); for the rare checks after a reply
    was lost, not for the hot path.
    """
    pipe = one_slot_pipeline(redis)
    for entry_id in ids:
        pipe.xpending_range(stream, GROUP, min=entry_id, max=entry_id, count=1)
    replies: list[Any] = await pipe.execute()
    return {
        bytes(row["message_id"]): bytes(row["consumer"]) for rows in replies for row in rows[:1]
    }


def publish(redis: Any, stream: str, message: bytes) -> Steps[None]:
    """XADD one encoded job (asyncio or blocking client: see :mod:`streamflow.steps`)."""
    yield redis.xadd(stream, {b"message": message})


def schedule(redis: Any, schedule_key: str, due_ms: int, message: bytes) -> Steps[None]:
    """Add a message to a delayed schedule (publishing with a delay; asyncio or blocking)."""
    yield redis.zadd(schedule_key, {message: due_ms})


def one_slot_pipeline(redis: Redis) -> Pipeline:
    """A MULTI/EXEC pipeline for commands on one slot; a plain pipeline on a cluster.

    redis-py 8.1's asyncio cluster client runs a transaction pipeline's commands in a helper
    thread with an event loop of its own: the connection it opens there belongs to that loop,
    and closing the client later fails with "Event loop is closed". So on a cluster the
    commands go in one round trip but without MULTI; callers say what that costs them.
    """
    return redis.pipeline(transaction=not connect.is_cluster(redis))


#: How long an entry's start count is kept: far longer than any sane redelivery loop.
START_COUNT_TTL_MS = 7 * 24 * 3600 * 1000


async def count_start(redis: Redis, key: str) -> int:
    """Count one more start of a redelivered entry; returns the starts counted before it.

    On a cluster the INCR and PEXPIRE are sent together but not in MULTI (see
    :func:`one_slot_pipeline`): INCR alone is atomic, and a connection lost between the two
    only leaves the counter without its week-long TTL until the entry's next start sets it.
    """
    pipe = one_slot_pipeline(redis)
    pipe.incr(key)
    pipe.pexpire(key, START_COUNT_TTL_MS)
    count, _ = await pipe.execute()
    return int(count) - 1


async def get_count(redis: Redis, key: str) -> int:
    """An integer counter's value (0 when missing)."""
    value = await redis.get(key)
    return int(value) if value is not None else 0


async def last_id(redis: Redis, stream: str) -> bytes:
    """The id of the newest entry of ``stream``, or ``0-0`` if it is empty or missing."""
    reply: Any = await redis.xrevrange(stream, count=1)
    return bytes(reply[0][0]) if reply else b"0-0"


async def read_broadcast(
    redis: Redis, stream: str, *, after: bytes, count: int, block_ms: int | None
) -> list[Entry]:
    """Plain XREAD of entries after ``after``: each reader keeps its own position."""
    reply: Any = await redis.xread({stream: after}, count=count, block=block_ms)
    return _entries(reply)


async def scan_keys(redis: Redis, pattern: str) -> list[str]:
    """Every key matching ``pattern`` (SCAN, never KEYS)."""
    found: list[str] = []
    async for key in redis.scan_iter(match=pattern, count=1000):
        found.append(key.decode() if isinstance(key, bytes) else str(key))
    return found


async def get_many(redis: Redis, keys: Sequence[str], *, raise_on_error: bool = True) -> list[Any]:
    """GET of each key, pipelined (keys may be in different cluster slots).

    Returns:
        Each key's value, or None when it is missing; with ``raise_on_error=False``, the
        ``ResponseError`` of a key that holds another type, in its place, instead of raising
        the first one.
    """
    if not keys:
        return []
    pipe = redis.pipeline(transaction=False)
    for key in keys:
        pipe.get(key)
    values: list[Any] = await pipe.execute(raise_on_error=raise_on_error)
    return values


async def batch_refs(redis: Redis, key: str, start: int = 0, stop: int = -1) -> list[str]:
    """The batch keys a task's output list holds, ``start .. stop``, as listed (unchecked).

    Raises:
        InputError: Another type of key is at the list's name (a data problem, not an outage).
    """
    try:
        refs: list[Any] = await redis.lrange(key, start, stop)
    except ResponseError as exc:
        if not str(exc).startswith("WRONGTYPE"):
            raise
        raise InputError(f"the batch list {key} cannot be read: {exc}") from None
    return [text_lenient(r) for r in refs]


async def set_members(redis: Redis, key: str) -> set[str] | None:
    """A registry set's members, as text; None when ``key`` holds another type.

    The known roles and functions are sets anyone with a publisher's rights may write another
    type of key at: a reader goes on without them rather than stopping.
    """
    try:
        found = await redis.smembers(key)
    except ResponseError as exc:
        if connect.is_outage(exc):
            raise
        return None
    return {text_lenient(member) for member in found}


async def hash_items(redis: Redis, key: str) -> dict[str, bytes]:
    """HGETALL with field names decoded."""
    reply: Any = await redis.hgetall(key)
    return {bytes(k).decode(): bytes(v) for k, v in reply.items()}


def is_group_lost(exc: BaseException) -> bool:
    """Whether ``exc`` says the consumer group or its stream is gone (``NOGROUP``).

    It comes after a Redis restart without persistence, or when the stream was deleted. A
    blocked read released with ``UNBLOCKED`` (the stream moved to another cluster node, or was
    deleted) is an outage instead: the read is retried where the key now lives, and finds the
    group there, or ``NOGROUP``.
    """
    return isinstance(exc, ResponseError) and connect.error_code(exc) == "NOGROUP"
