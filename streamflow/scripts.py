"""The Lua scripts: loading and registering them, and a typed call for each.

No other module calls a Lua script by hand. The owner check that fences a settle is written
once, in ``fence.lua``; the scripts in :attr:`Scripts.FENCED` get it as a prelude. Plain stream
commands and reply parsing are :mod:`streamflow.streams`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, ResponseError

from streamflow import connect
from streamflow.keys import GROUP
from streamflow.steps import Steps
from streamflow.streams import Entry, is_group_lost


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
            "park.lua",
        }
    )

    #: Scripts made of their own guard followed by the body of another script.
    GUARDED = {"publish_committed.lua": "publish_dedup.lua"}

    def __init__(self, redis: Redis) -> None:
        strip = type(redis).__module__.startswith("fakeredis")
        self.settle = redis.register_script(_load("settle.lua", strip))
        self.dead_letter = redis.register_script(_load("dead_letter.lua", strip))
        self.publish_dedup = redis.register_script(_load("publish_dedup.lua", strip))
        self.publish_committed = redis.register_script(_load("publish_committed.lua", strip))
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
        self.limit = redis.register_script(_load("limit.lua", strip))
        self.read_levels = redis.register_script(_load("read_levels.lua", strip))
        self.key_limit = redis.register_script(_load("key_limit.lua", strip))
        self.park = redis.register_script(_load("park.lua", strip))
        self.unpark = redis.register_script(_load("unpark.lua", strip))
        self.events = redis.register_script(_load("events.lua", strip))

    @classmethod
    def source(cls, name: str) -> str:
        """The text of the Lua script ``name`` as real Redis gets it (shebang, prelude, body)."""
        text = _read(name)
        if name in cls.GUARDED:
            body = _read(cls.GUARDED[name])
            return text + (body.split("\n", 1)[1] if body.startswith("#!") else body)
        if name not in cls.FENCED:
            return text
        # The shebang must stay the first line: Redis reads the flags only there.
        shebang, body = text.split("\n", 1) if text.startswith("#!") else ("", text)
        return f"{shebang}\n{_read('fence.lua')}{body}"


def register(redis: Redis, name: str) -> AsyncScript:
    """Register one Lua script on ``redis`` (for a module that needs only that one)."""
    return redis.register_script(_load(name, type(redis).__module__.startswith("fakeredis")))


def _read(name: str) -> str:
    return resources.files("streamflow").joinpath("lua").joinpath(name).read_text()


def _load(name: str, strip_shebang: bool) -> str:
    text = Scripts.source(name)
    if strip_shebang and text.startswith("#!"):
        text = text.split("\n", 1)[1]
    return text


#: Lua's unpack() has a stack limit; scripts get ids in chunks of this size.
_CHUNK = 1000
#: Lifecycle stream entries written by one ``events.lua`` call at most (about a millisecond of
#: Redis's time for entries of plain jobs; a draining worker writes ~100 per flush).
EVENT_ENTRIES = 100


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


async def write_events(
    script: AsyncScript,
    redis: Redis,
    *,
    stream: str,
    max_len: int,
    field: bytes,
    entries: Sequence[bytes],
    latest: Mapping[str, bytes | None],
    ttl_ms: int,
) -> None:
    """Add lifecycle ``entries`` to ``stream`` (capped) and set or delete (None) ``latest``.

    ``script`` is ``events.lua``; every key is in the lifecycle stream's slot. At most
    :data:`EVENT_ENTRIES` entries per call: a script holds Redis for its whole run, and a full
    buffer of large progress events is thousands of entries.
    """
    keys = [stream, *latest]
    head: list[bytes | str | int] = [max_len, field, ttl_ms]
    head += [b"" if raw is None else raw for raw in latest.values()]
    for start in range(0, max(len(entries), 1), EVENT_ENTRIES):
        args = head + list(entries[start : start + EVENT_ENTRIES])
        await script(keys=keys, args=args, client=redis)
        keys, head = [stream], [max_len, field, ttl_ms]  # the progress keys go once


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
    kept: Kept | None = None,
) -> bytes | None:
    """Move an entry to the dead-letter stream; None if ``consumer`` no longer owns it.

    With ``events`` and ``event``, the same step reports a task node's failure; with ``kept``,
    it keeps the job's failure record (its ``entry_id`` is not used).
    """
    flat: list[bytes | str | int] = [GROUP, consumer, entry_id, max_len, event]
    for name, value in fields:
        flat += (name, value)
    keys = [stream, dead_stream, events or stream]
    if kept is not None:
        keys.append(kept.key)
        flat += (kept.record, kept.ttl_ms)
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
    before: Sequence[bytes] = (),
) -> bool:
    """Acknowledge a task node's job and report how it ended, if ``consumer`` still owns it.

    ``before``: events of the run to write first (its ``accepted``, if not written yet).
    """
    done = await scripts.finish(
        keys=[stream, events], args=[GROUP, consumer, entry_id, *before, event], client=redis
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

    One call per chunk of 1,000 (the keys of one call are all in the stream's slot). A group
    that is gone owns nothing: every id is refused (see :func:`settle`).
    """
    refused: set[bytes] = set()
    for start in range(0, len(kept), _CHUNK):
        chunk = kept[start : start + _CHUNK]
        args: list[Any] = [GROUP, consumer]
        for k in chunk:
            args += [k.entry_id, k.record, k.ttl_ms]
        keys = [stream, *(k.key for k in chunk)]
        try:
            refused.update(await scripts.result(keys=keys, args=args, client=redis))
        except ResponseError as exc:
            if not is_group_lost(exc):
                raise
            refused.update(k.entry_id for k in chunk)
    return refused


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
        results = await _evalsha_many(redis, [(scripts.publish_dedup, k, a) for k, a in calls])
    return [int(flag) == 1 for flag, _ in results]


@dataclass(frozen=True, slots=True)
class CommittedPublish:
    """A job of a task's outbox, published by ``publish_committed.lua`` after its commit.

    Attributes:
        publish: The publish.
        outbox: The task's outbox hash.
        name: The item's name in it.
        item: The encoded item, as the commit writes it.
    """

    publish: DedupPublish
    outbox: str
    name: str
    item: bytes


#: A script call: the script, its keys, its arguments.
_Call = tuple[AsyncScript, list[str], list[Any]]


async def _evalsha_many(redis: Redis, calls: Sequence[_Call]) -> list[Any]:
    """Run the script calls in one pipeline, in order; the replies in order.

    Sent as EVALSHA: a pipeline of registered scripts costs a SCRIPT EXISTS round trip before
    every execute in redis-py. When Redis does not have a script (restarted, flushed), it is
    loaded and only the calls it refused are sent again.

    Raises:
        ResponseError: A call failed (the first such reply).
    """
    replies: list[Any] = [None] * len(calls)
    todo = list(range(len(calls)))
    for _ in range(2):
        pipe = redis.pipeline(transaction=False)
        for i in todo:
            script, keys, args = calls[i]
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
        for script in {id(calls[i][0]): calls[i][0] for i in refused}.values():
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
    keys, args = _commit_call(state, outbox, version, fields, items, appends, partials, expire_ms)
    keys += [key for key in expire if key not in keys]
    result = await scripts.task_commit(keys=keys, args=args, client=redis)
    return None if result is None else int(result)


async def commit_and_publish(
    scripts: Scripts,
    redis: Redis,
    publishes: Sequence[CommittedPublish],
    *,
    state: str,
    outbox: str,
    version: int | bytes | str,
    fields: Mapping[str, bytes],
    items: Mapping[str, bytes],
    appends: Sequence[tuple[str, str]] = (),
    partials: Sequence[tuple[str, str, bytes]] = (),
) -> tuple[int | None, list[bool | None]]:
    """:func:`commit_task` (no retention), then ``publishes`` if it committed, in one round trip.

    A single Redis only (the task's and the roles' keys are in different slots). Returns the
    new version (None: another commit came first) and per publish whether it published (False:
    its dedup marker was there) or None: its item was not committed as given, carry it out as
    usual (a script Redis had lost is loaded and its calls sent again, after the others).
    """
    keys, args = _commit_call(state, outbox, version, fields, items, appends, partials, 0)
    calls: list[_Call] = [(scripts.task_commit, keys, args)]
    for c in publishes:
        p = c.publish
        publish_keys = [p.stream, p.marker, p.schedule, c.outbox]
        publish_args = [p.message_id, p.window_ms, p.message, 0, c.name, c.item]
        calls.append((scripts.publish_committed, publish_keys, publish_args))
    result, *flags = await _evalsha_many(redis, calls)
    published = [None if int(flag) < 0 else int(flag) == 1 for flag, _ in flags]
    return (None if result is None else int(result)), published


def _commit_call(
    state: str,
    outbox: str,
    version: int | bytes | str,
    fields: Mapping[str, bytes],
    items: Mapping[str, bytes],
    appends: Sequence[tuple[str, str]],
    partials: Sequence[tuple[str, str, bytes]],
    expire_ms: int,
) -> tuple[list[str], list[Any]]:
    """The keys and arguments of a ``task_commit.lua`` call (more keys may follow)."""
    keys = [state, outbox]

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
    return keys, args


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


async def read_levels(
    scripts: Scripts,
    redis: Redis,
    streams: Sequence[str],
    consumer: str,
    *,
    count: int,
    group: str = GROUP,
) -> list[tuple[str, list[Entry]]]:
    """New entries of a partition's levels in the order of ``streams``, ``count`` at most.

    Returns (stream, entries) for each level read from.
    """
    reply = await scripts.read_levels(
        keys=list(streams), args=[group, consumer, count], client=redis
    )
    return [
        (streams[int(index) - 1], [Entry(entry_id, _pairs(fields)) for entry_id, fields in rows])
        for index, rows in reply or ()
    ]


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
