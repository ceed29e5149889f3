"""Stream I/O: the Lua scripts, and raw stream replies turned into typed objects.

Everything above this module sees :class:`Entry` objects and plain results; no other module
parses an XREADGROUP reply or calls a Lua script by hand. Reaching Redis (clients, URLs,
TLS, which errors are outages) is :mod:`streamflow.connect`'s job.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, OutOfMemoryError, ResponseError

from streamflow import connect
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


class Scripts:
    """The Lua scripts, registered on one client.

    Real Redis gets them with the ``#!lua`` shebang (Redis 7 function flags: no cross-slot
    keys, so Redis Cluster refuses a script that touches a key outside its slot); fakeredis does
    not parse the shebang and gets them without it. Every key a script touches is in KEYS.
    The owner check that fences a settle is written once, in ``fence.lua``, and put after the
    shebang of each script in ``FENCED``.
    """

    #: The scripts that settle or renew an entry only if this consumer still owns it.
    FENCED = frozenset(
        {
            "settle.lua",
            "renew.lua",
            "release.lua",
            "retry.lua",
            "dead_letter.lua",
            "emit.lua",
            "finish.lua",
            "result.lua",
        }
    )

    def __init__(self, redis: Redis) -> None:
        strip = type(redis).__module__.startswith("fakeredis")
        self.settle = redis.register_script(_load("settle.lua", strip))
        self.dead_letter = redis.register_script(_load("dead_letter.lua", strip))
        self.publish_dedup = redis.register_script(_load("publish_dedup.lua", strip))
        self.renew = redis.register_script(_load("renew.lua", strip))
        self.claim = redis.register_script(_load("claim.lua", strip))
        self.release = redis.register_script(_load("release.lua", strip))
        self.retry = redis.register_script(_load("retry.lua", strip))
        self.promote = redis.register_script(_load("promote.lua", strip))
        self.replay = redis.register_script(_load("replay.lua", strip))
        self.alive = redis.register_script(_load("alive.lua", strip))
        self.cancel = redis.register_script(_load("cancel.lua", strip))
        self.mark_cancel = redis.register_script(_load("mark_cancel.lua", strip))
        self.publish_many = redis.register_script(_load("publish_many.lua", strip))
        self.emit = redis.register_script(_load("emit.lua", strip))
        self.finish = redis.register_script(_load("finish.lua", strip))
        self.task_commit = redis.register_script(_load("task_commit.lua", strip))
        self.slot = redis.register_script(_load("slot.lua", strip))
        self.forget = redis.register_script(_load("forget.lua", strip))
        self.result = redis.register_script(_load("result.lua", strip))

    @classmethod
    def source(cls, name: str) -> str:
        """The text of the Lua script ``name`` as real Redis gets it (shebang, prelude, body)."""
        text = _read(name)
        if name not in cls.FENCED:
            return text
        # The shebang must stay the first line: Redis reads the flags only there.
        shebang, body = text.split("\n", 1) if text.startswith("#!") else ("", text)
        return f"{shebang}\n{_read('fence.lua')}{body}"


def _read(name: str) -> str:
    return resources.files("streamflow").joinpath("lua").joinpath(name).read_text()


def _load(name: str, strip_shebang: bool) -> str:
    text = Scripts.source(name)
    if strip_shebang and text.startswith("#!"):
        text = text.split("\n", 1)[1]
    return text


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
    """
    reply = await redis.xreadgroup(group, consumer, {stream: after}, count=count, block=block_ms)
    return _entries(reply)


async def read_groups(
    redis: Redis,
    names: Sequence[str],
    group: str,
    consumer: str,
    *,
    count: int,
    block_ms: int | None,
) -> list[tuple[str, Entry]]:
    """New entries of several streams (one slot on a cluster) in one XREADGROUP, by stream."""
    reply: Any = await redis.xreadgroup(
        group, consumer, dict.fromkeys(names, ">"), count=count, block=block_ms
    )
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
    if not reply:
        return []
    # RESP2 reply: [[stream, [(id, {field: value}), ...]]]; one stream per read.
    _, items = reply[0]
    return [Entry(entry_id, fields or {}) for entry_id, fields in items]


async def read_range(redis: Redis, stream: str, *, count: int | None = None) -> list[Entry]:
    """The entries of ``stream`` from the oldest (XRANGE - +), at most ``count``."""
    reply: Any = await redis.xrange(stream, count=count)
    return [Entry(entry_id, fields or {}) for entry_id, fields in reply or []]


#: Lua's unpack() has a stack limit; scripts get ids in chunks of this size.
_CHUNK = 1000


async def _owned_ids_script(
    script: Any,
    redis: Redis,
    stream: str,
    ids: Sequence[bytes],
    args_of: Callable[[Sequence[bytes]], list[Any]],
) -> list[bytes]:
    """Run an owner-checking script over ``ids`` in chunks; returns the ids it refused.

    A consumer group that is gone owns nothing, so every id is refused: ``NOGROUP`` after a
    Redis restart without persistence, when a publisher recreated the stream before a reader
    recreated the group (the entries' pending list went with the restart).
    """
    refused: list[bytes] = []
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        try:
            refused += await script(keys=[stream], args=args_of(chunk), client=redis)
        except ResponseError as exc:
            if not is_group_lost(exc):
                raise
            refused += chunk
    return refused


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


async def settle(
    scripts: Scripts, redis: Redis, stream: str, consumer: str, ids: Sequence[bytes]
) -> list[bytes]:
    """Acknowledge and delete entries ``consumer`` still owns; return the refused ids."""
    # One argument for the whole chunk, a JSON array (ids are digits and '-': nothing to
    # escape): redis-py packs each argument in Python, about 0.9 us each.
    return await _owned_ids_script(
        scripts.settle,
        redis,
        stream,
        ids,
        lambda chunk: [GROUP, consumer, b'["' + b'","'.join(chunk) + b'"]'],
    )


async def dead_letter(
    scripts: Scripts,
    redis: Redis,
    *,
    stream: str,
    dead_stream: str,
    consumer: str,
    entry_id: bytes,
    fields: Iterable[tuple[bytes, bytes]],
    max_len: int,
    events: str | None = None,
    event: bytes = b"",
) -> bytes | None:
    """Move an entry to the dead-letter stream; None if ``consumer`` no longer owns it.

    With ``events`` and ``event``, the same step reports a task node's failure.
    """
    flat: list[bytes | str | int] = [GROUP, consumer, entry_id, max_len, event]
    for name, value in fields:
        flat += (name, value)
    keys = [stream, dead_stream, events or stream]
    result = await scripts.dead_letter(keys=keys, args=flat, client=redis)
    return result if result else None


async def emit_batch(
    scripts: Scripts,
    redis: Redis,
    *,
    stream: str,
    consumer: str,
    entry_id: bytes,
    key: str,
    batch: bytes,
    ttl_ms: int,
    events: str,
    event: bytes,
) -> bool:
    """Store a task node's batch and report it, if ``consumer`` still owns the job's entry."""
    done = await scripts.emit(
        keys=[stream, key, events],
        args=[GROUP, consumer, entry_id, batch, ttl_ms, event],
        client=redis,
    )
    return bool(done)


async def finish(
    scripts: Scripts,
    redis: Redis,
    *,
    stream: str,
    consumer: str,
    entry_id: bytes,
    events: str,
    event: bytes,
) -> bool:
    """Acknowledge a task node's job and report how it ended, if ``consumer`` still owns it."""
    done = await scripts.finish(
        keys=[stream, events], args=[GROUP, consumer, entry_id, event], client=redis
    )
    return bool(done)


@dataclass(frozen=True, slots=True)
class Kept:
    """One job's outcome to keep with ``result.lua``: its entry, result key, JSON and TTL."""

    entry_id: bytes
    key: str
    record: bytes
    ttl_ms: int


async def keep_results(
    scripts: Scripts, redis: Redis, *, stream: str, consumer: str, kept: Sequence[Kept]
) -> set[bytes]:
    """Keep outcomes and settle their entries, those ``consumer`` still owns; the refused ids.

    One call per chunk of 1,000 (the keys of one call are all in the stream's slot).
    """
    refused: set[bytes] = set()
    for start in range(0, len(kept), _CHUNK):
        chunk = kept[start : start + _CHUNK]
        args: list[Any] = [GROUP, consumer]
        for k in chunk:
            args += [k.entry_id, k.record, k.ttl_ms]
        keys = [stream, *(k.key for k in chunk)]
        refused.update(await scripts.result(keys=keys, args=args, client=redis))
    return refused


def publish(redis: Any, stream: str, message: bytes) -> Steps[None]:
    """XADD one encoded job (asyncio or blocking client: see :mod:`streamflow.steps`)."""
    yield redis.xadd(stream, {b"message": message})


def publish_many(script: Any, redis: Any, stream: str, messages: Sequence[bytes]) -> Steps[None]:
    """XADD many encoded jobs to one stream in one call of ``publish_many.lua``.

    ``script`` is that script registered on ``redis`` (asyncio or blocking).
    """
    yield script(keys=[stream], args=list(messages), client=redis)


def publish_dedup(
    script: Any,
    redis: Any,
    *,
    stream: str,
    marker: str,
    schedule: str,
    message_id: str,
    message: bytes,
    window_ms: int,
    due_ms: int = 0,
) -> Steps[tuple[bool, str]]:
    """Publish (or schedule, with ``due_ms``) unless ``marker`` exists.

    ``script`` is ``publish_dedup.lua`` registered on ``redis`` (asyncio or blocking). Returns
    (published, entry id or ``"scheduled"``, or the first message's id).
    """
    flag, value = yield script(
        keys=[stream, marker, schedule],
        args=[message_id, window_ms, message, due_ms],
        client=redis,
    )
    # The first id is read back from the marker: whoever wrote it, it decodes.
    return bool(flag), value.decode(errors="replace") if isinstance(value, bytes) else str(value)


@dataclass(frozen=True, slots=True)
class DedupPublish:
    """One publish of ``publish_dedup.lua``, due now: ``message`` unless ``marker`` exists.

    Attributes:
        stream: The role stream.
        marker: The dedup marker's key.
        schedule: The role's delayed schedule (a key of the script, not written when due now).
        message_id: The message's id, kept in the marker.
        message: The encoded message.
        window_ms: How long the marker is kept.
    """

    stream: str
    marker: str
    schedule: str
    message_id: str
    message: bytes
    window_ms: int


async def publish_dedup_many(
    scripts: Scripts, redis: Redis, publishes: Sequence[DedupPublish]
) -> list[bool]:
    """Run ``publish_dedup.lua`` for each publish, in one pipeline; whether each published.

    On a cluster the calls go one at a time, in turn: redis-py refuses scripts in a cluster
    pipeline.
    """
    calls: list[tuple[list[str], list[str | int | bytes]]] = [
        ([p.stream, p.marker, p.schedule], [p.message_id, p.window_ms, p.message, 0])
        for p in publishes
    ]
    if not calls:
        return []
    if connect.is_cluster(redis):
        results = [await scripts.publish_dedup(keys=k, args=a, client=redis) for k, a in calls]
    else:
        results = await _evalsha_many(redis, scripts.publish_dedup, calls)
    return [int(flag) == 1 for flag, _ in results]


async def _evalsha_many(
    redis: Redis, script: AsyncScript, calls: Sequence[tuple[list[str], list[str | int | bytes]]]
) -> list[Any]:
    """Run ``script`` once per call, in one pipeline; the replies in order.

    Sent as EVALSHA: a pipeline of registered scripts costs a SCRIPT EXISTS round trip before
    every execute in redis-py. When Redis does not have the script (restarted, flushed), it is
    loaded and only the calls it refused are sent again.

    Raises:
        ResponseError: A call failed (the first such reply).
    """
    replies: list[Any] = [None] * len(calls)
    todo = list(range(len(calls)))
    for _ in range(2):
        pipe = redis.pipeline(transaction=False)
        for i in todo:
            keys, args = calls[i]
            pipe.evalsha(script.sha, len(keys), *keys, *args)
        refused = []
        for i, reply in zip(todo, await pipe.execute(raise_on_error=False), strict=True):
            if isinstance(reply, NoScriptError):
                refused.append(i)
                continue
            if isinstance(reply, Exception):
                raise reply
            replies[i] = reply
        if not refused:
            return replies
        script.sha = await redis.script_load(script.script)
        todo = refused
    raise NoScriptError("the script is still missing after it was loaded")


async def take_slot(scripts: Scripts, redis: Redis, slots: str, member: str, limit: int) -> bool:
    """Hold one of the ``limit`` slots of the set ``slots`` for ``member`` (``slot.lua``).

    Returns:
        True when ``member`` holds a slot (taken now or before), False when all are taken.
    """
    taken = await scripts.slot(keys=[slots], args=[member, limit], client=redis)
    return bool(int(taken))


async def commit_task(
    scripts: Scripts,
    redis: Redis,
    *,
    state: str,
    outbox: str,
    version: int | bytes | str,
    fields: Mapping[str, bytes],
    items: Mapping[str, bytes],
    appends: Sequence[tuple[str, str]] = (),
    partials: Sequence[tuple[str, str, bytes]] = (),
    expire_ms: int = 0,
    expire: Sequence[str] = (),
) -> int | None:
    """Write a task step with ``task_commit.lua`` if the state's version is still ``version``.

    Args:
        scripts: The registered scripts.
        redis: The client.
        state: The task's state hash.
        outbox: The task's outbox hash.
        version: The version the step was computed from (-1: a new task).
        fields: State fields to set.
        items: Outbox items to set.
        appends: (list key, value) pairs to RPUSH.
        partials: (hash key, field, value) triples to HSET.
        expire_ms: With a value above 0, the retention every key of the call gets.
        expire: More keys to give the retention (the task's other keys).

    Returns:
        The new version, or None when another commit came first.
    """
    keys = [state, outbox, *expire]

    def index(key: str) -> int:
        if key not in keys:
            keys.append(key)
        return keys.index(key) + 1

    args: list[Any] = [version, expire_ms, len(fields)]
    for name, value in fields.items():
        args += [name, value]
    args.append(len(items))
    for name, value in items.items():
        args += [name, value]
    args.append(len(appends))
    for key, ref in appends:
        args += [index(key), ref]
    args.append(len(partials))
    for key, name, value in partials:
        args += [index(key), name, value]
    result = await scripts.task_commit(keys=keys, args=args, client=redis)
    return None if result is None else int(result)


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


async def hash_items(redis: Redis, key: str) -> dict[str, bytes]:
    """HGETALL with field names decoded."""
    reply: Any = await redis.hgetall(key)
    return {bytes(k).decode(): bytes(v) for k, v in reply.items()}


#: Idle time given to released entries: past any lease TTL, so the next reclaim adopts them.
RELEASE_IDLE_MS = 10 * 24 * 3600 * 1000


async def renew(
    scripts: Scripts, redis: Redis, stream: str, consumer: str, ids: Sequence[bytes]
) -> list[bytes]:
    """Renew the leases of ``ids`` still owned by ``consumer``; return the ids whose lease is lost.

    One round trip for up to 1,000 entries. Released entries are not renewed.
    """
    return await _owned_ids_script(
        scripts.renew, redis, stream, ids, lambda chunk: [GROUP, consumer, RELEASE_IDLE_MS, *chunk]
    )


async def claim(
    scripts: Scripts,
    redis: Redis,
    stream: str,
    consumer: str,
    *,
    min_idle_ms: int,
    cursor: bytes,
    count: int,
    group: str = GROUP,
) -> tuple[bytes, list[Entry], list[bytes]]:
    """One bounded XAUTOCLAIM step: (next cursor, adopted entries with counts, deleted ids)."""
    next_cursor, adopted, deleted = await scripts.claim(
        keys=[stream], args=[group, consumer, min_idle_ms, cursor, count], client=redis
    )
    entries = [
        Entry(entry_id, _pairs(fields), int(deliveries)) for entry_id, fields, deliveries in adopted
    ]
    return next_cursor, entries, list(deleted)


def _pairs(flat: Sequence[bytes] | None) -> dict[bytes, bytes]:
    if not flat:
        return {}
    return dict(zip(flat[::2], flat[1::2], strict=True))


async def release(
    scripts: Scripts,
    redis: Redis,
    stream: str,
    consumer: str,
    ids: Sequence[bytes],
    *,
    idle_ms: int,
) -> int:
    """Hand entries back for immediate adoption without counting a delivery; returns how many."""
    released = 0
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        released += int(
            await scripts.release(
                keys=[stream], args=[GROUP, consumer, idle_ms, *chunk], client=redis
            )
        )
    return released


async def schedule_retry(
    scripts: Scripts,
    redis: Redis,
    *,
    stream: str,
    schedule: str,
    consumer: str,
    entry_id: bytes,
    due_ms: int,
    message: bytes,
) -> bool:
    """Settle the entry and schedule its next attempt (due 0: at once); False if not ours."""
    result = await scripts.retry(
        keys=[stream, schedule], args=[GROUP, consumer, entry_id, due_ms, message], client=redis
    )
    return bool(result)


async def promote(
    scripts: Scripts,
    redis: Redis,
    stream: str,
    schedule: str,
    *,
    limit: int = 500,
    horizon: str | None = None,
) -> tuple[int, int | None]:
    """Move due scheduled messages to the stream: (how many, next due ms or None).

    ``horizon`` (a score such as ``"+inf"``) moves everything scheduled up to it instead of up
    to now; the test harness uses it to fast-forward retries.
    """
    args: list[str | int] = [limit] if horizon is None else [limit, horizon]
    moved, next_due = await scripts.promote(keys=[stream, schedule], args=args, client=redis)
    due = int(float(next_due)) if next_due not in (-1, b"-1", None) else None
    return int(moved), due


def schedule(redis: Any, schedule_key: str, due_ms: int, message: bytes) -> Steps[None]:
    """Add a message to a delayed schedule (publishing with a delay; asyncio or blocking)."""
    yield redis.zadd(schedule_key, {message: due_ms})


async def replay(
    scripts: Scripts, redis: Redis, *, stream: str, dead_stream: str, dead_id: bytes, message: bytes
) -> bytes | None:
    """Move one dead letter back as ``message``, exactly once; None if it was already gone."""
    result = await scripts.replay(keys=[stream, dead_stream], args=[dead_id, message], client=redis)
    return result if result else None


async def liveness(
    scripts: Scripts, redis: Redis, key: str, action: str, token: str, ttl_ms: int
) -> bool:
    """Acquire, refresh or release a consumer name's liveness key."""
    return bool(await scripts.alive(keys=[key], args=[action, token, ttl_ms], client=redis))


async def forget_consumers(
    scripts: Scripts,
    redis: Redis,
    stream: str,
    group: str,
    candidates: Sequence[tuple[bytes, str]],
) -> list[bytes]:
    """Delete the consumers among ``candidates`` that hold nothing and whose mark is gone.

    Args:
        scripts: The registered scripts.
        redis: The client.
        stream: The stream.
        group: Its consumer group.
        candidates: (consumer name as read, its mark key) pairs.

    Returns:
        The names deleted.
    """
    if not candidates:
        return []
    names = [name for name, _ in candidates]
    deleted = await scripts.forget(
        keys=[stream, *(mark for _, mark in candidates)], args=[group, *names], client=redis
    )
    return [bytes(name) for name in deleted]


def is_group_lost(exc: BaseException) -> bool:
    """Whether ``exc`` says the consumer group or its stream is gone (``NOGROUP``).

    It comes after a Redis restart without persistence, or when the stream was deleted. A
    blocked read released with ``UNBLOCKED`` (the stream moved to another cluster node, or was
    deleted) is an outage instead: the read is retried where the key now lives, and finds the
    group there, or ``NOGROUP``.
    """
    return isinstance(exc, ResponseError) and connect.error_code(exc) == "NOGROUP"
