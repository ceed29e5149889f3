"""Read-only views of a namespace's roles for operators and scripts (``streamflow inspect``).

Everything here only reads. A role is listed when its stream exists (found by ``SCAN``, never
``KEYS``) or when it is in the set of roles that workers serve and tasks use. For each role the
view gives its stream's length, its consumer groups with their consumers, pending counts, lag
and the age of the oldest pending entry, the size of its delayed schedule and of its
dead-letter stream. Ages come from entry ids and are measured against the Redis server's clock
(``TIME``), so a CLI on another host with a skewed clock still reports them right.

The replies of ``XINFO GROUPS``, ``XINFO CONSUMERS`` and ``XPENDING`` are parsed here, not in
:mod:`streamflow.streams`: nothing on the worker's path needs them.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any

from pydantic import BaseModel, ConfigDict
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from streamflow import connect, flow, partitions, steps, streams
from streamflow.errors import ConfigError, ProtocolError
from streamflow.keys import NAME_PATTERN, Keys, validate_name
from streamflow.protocol import MESSAGE_FIELD, decode_job

#: The error prefixes of a key or group that vanished between two reads; they read as empty.
#: Replies that make a figure empty: its key or group vanished since it was listed, or a key of
#: another type is at its name (anyone with a publisher's or worker's rights may write one).
_GONE = ("no such key", "NOGROUP", "WRONGTYPE")


class ConsumerInfo(BaseModel):
    """One consumer of a consumer group.

    Attributes:
        name: The consumer name (for a worker, its ``--consumer-name``).
        pending: Entries delivered to it and not yet settled.
        idle_ms: Milliseconds since it last interacted with the group (``XINFO CONSUMERS``).
        alive: Whether a live process holds the name (its liveness key exists). Redis keeps a
            group's consumers until they are deleted, so the names of stopped workers stay
            listed; their pending entries are adopted after the lease TTL.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    pending: int
    idle_ms: int
    alive: bool


class GroupInfo(BaseModel):
    """One consumer group of a role stream (workers share the group ``workers``).

    Attributes:
        name: The group name.
        consumers: Its consumers, by name.
        pending: Entries delivered and not yet settled, over all its consumers.
        lag: Entries in the stream not yet delivered to the group; None when Redis cannot tell
            (entries were deleted after the group's position).
        last_delivered_id: The id of the newest entry delivered to the group.
        oldest_pending_id: The id of its oldest pending entry, or None.
        oldest_pending_age_ms: Milliseconds since that entry was added to the stream, or None.
        oldest_pending_idle_ms: The longest idle time of its pending entries: milliseconds
            since the entry left alone the longest was delivered, renewed or adopted (see
            :func:`longest_idle`), or None when nothing is pending. Live workers renew every
            lease TTL / 3, so above the lease TTL its holder stopped renewing; an entry released
            by a worker's shutdown shows about 10 days until it is adopted.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    consumers: list[ConsumerInfo]
    pending: int
    lag: int | None
    last_delivered_id: str
    oldest_pending_id: str | None
    oldest_pending_age_ms: int | None
    oldest_pending_idle_ms: int | None = None


class LevelInfo(BaseModel):
    """One priority level of a role with priorities (its partitions' totals).

    Attributes:
        level: The level (0, the default, is the lowest).
        length: Entries in its streams (not yet delivered, or pending).
        pending: Entries delivered and not yet settled, over all groups.
        delayed: Jobs waiting in its delayed schedules.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    level: int
    length: int
    pending: int
    delayed: int


class RoleInfo(BaseModel):
    """One role's stream, groups, delayed schedule and dead letters.

    Attributes:
        role: The role name.
        length: Entries in the role stream (not yet delivered, or pending).
        groups: The stream's consumer groups, by name (none before a worker served the role).
        delayed: Jobs waiting in the delayed schedule (delayed publishes and retries).
        dead_letters: Entries in the role's dead-letter stream.
        partitions: How many partitions the role has; the figures above are their totals
            (groups of the same name merged: pending and lag summed, consumers merged by name,
            the oldest pending entry of any partition).
        paused: Whether the role is paused (``streamflow pause``): no new jobs of it start.
        paused_at_ms: When it was paused (ms since the epoch), while it is.
        rate_limit: Its start rate set at run time (``"10/s"``, ``"off"``), or None: the one
            its app declares applies (``streamflow limit``).
        concurrency_limit: Its limit on jobs held at once set at run time (0: none), or None.
        running_slots: Running slots of its concurrency limit taken now.
        levels: For a role with priorities, each level's figures (lowest first; the figures
            above are their totals); None for a role without.
        key_rate_limit: Its per-key start rate set at run time, or None (see
            :mod:`streamflow.keylimits`).
        key_concurrency: Its per-key limit on jobs running at once set at run time (0: none),
            or None.
        busy_keys: Limit keys holding running slots now.
        parked_keys: Limit keys with parked jobs (waiting for their key), summed over its
            partitions (a key's parked list holds every level's jobs).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    role: str
    length: int
    groups: list[GroupInfo]
    delayed: int
    dead_letters: int
    partitions: int = 1
    paused: bool = False
    paused_at_ms: int | None = None
    rate_limit: str | None = None
    concurrency_limit: int | None = None
    running_slots: int = 0
    levels: list[LevelInfo] | None = None
    key_rate_limit: str | None = None
    key_concurrency: int | None = None
    busy_keys: int = 0
    parked_keys: int = 0


class PendingEntry(BaseModel):
    """One pending entry: delivered to a consumer and not yet settled.

    Attributes:
        id: The stream entry id.
        group: The consumer group it is pending in.
        consumer: The consumer that holds it.
        idle_ms: Milliseconds since it was last delivered or its lease renewed.
        deliveries: How many times it was delivered (1, plus one per adoption).
        age_ms: Milliseconds since it was added to the stream.
        partition: The role partition whose stream holds it (0 for an unpartitioned role).
        level: The priority level whose stream holds it (0 for a role without priorities).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    group: str
    consumer: str
    idle_ms: int
    deliveries: int
    age_ms: int
    partition: int = 0
    level: int = 0


class DelayedJob(BaseModel):
    """One job waiting in a role's delayed schedule: published with a delay, or a retry.

    Attributes:
        message_id: The job's message id.
        attempt: The attempt it will run as (above 1 for a retry).
        due_at_ms: When it is due (ms since the epoch).
        partition: The role partition whose schedule holds it (0 for an unpartitioned role).
        level: The priority level whose schedule holds it (0 for a role without priorities).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    message_id: str
    attempt: int
    due_at_ms: int
    partition: int = 0
    level: int = 0


class RoleDetail(RoleInfo):
    """A role's :class:`RoleInfo` with its oldest pending entries.

    Attributes:
        oldest_pending: The oldest pending entries over all groups, oldest first.
    """

    oldest_pending: list[PendingEntry]


async def role_names(redis: Redis, keys: Keys) -> list[str]:
    """The roles of the namespace, sorted: role streams found by ``SCAN``, and known roles.

    Names that do not match :data:`~streamflow.keys.NAME_PATTERN` (keys written by something
    else) are left out.
    """
    found = {
        keys.role_of_stream(key) for key in await streams.scan_keys(redis, keys.role_pattern())
    }
    known = await streams.set_members(redis, keys.known_roles()) or set()
    return sorted(r for r in found | known if r and NAME_PATTERN.fullmatch(r))


async def inspect_roles(redis: Redis, keys: Keys) -> list[RoleInfo]:
    """Every role of the namespace (see :func:`role_names`), sorted by name.

    The listing (a ``SCAN`` and ``SMEMBERS``) and then three pipelined round trips whatever
    the number of roles: ``XLEN``, ``ZCARD``, ``XLEN`` and ``XINFO GROUPS`` per role; ``XINFO
    CONSUMERS`` and ``XPENDING`` per group, and ``TIME``; ``EXISTS`` of each consumer's
    liveness key.
    """
    return await _role_infos(redis, keys, await role_names(redis, keys))


async def inspect_role(
    redis: Redis, keys: Keys, role: str, *, count: int = 10
) -> RoleDetail | None:
    """One role in detail, with its ``count`` oldest pending entries; None if it is unknown.

    A role is unknown when it has no stream, no delayed schedule, no dead letters and is not in
    the set of known roles.

    Raises:
        InvalidNameError: ``role`` is not a valid role name.
    """
    validate_name(role, "role")
    if not await _role_exists(redis, keys, role):
        return None
    shards, levels = (await _shards(redis, keys, [role]))[role]
    places = _places(shards, levels)
    parts = await _shard_infos(redis, keys, places)
    pending: list[PendingEntry] = []
    if count > 0:
        for (shard, level), part in zip(places, parts, strict=True):
            found = await _oldest_pending(redis, keys, part, count, level)
            where = {"partition": shards.index(shard), "level": level}
            pending += [entry.model_copy(update=where) for entry in found]
        pending.sort(key=lambda entry: (-entry.age_ms, entry.partition, -entry.level))
    (merged,) = await _with_pauses(redis, keys, [_merge(role, parts, levels)])
    return RoleDetail(**dict(merged), oldest_pending=pending[:count])


async def delayed_jobs(redis: Redis, keys: Keys, role: str, *, count: int = 50) -> list[DelayedJob]:
    """The ``count`` soonest due jobs of a role's delayed schedules, soonest first.

    One pipelined ``ZRANGE`` per partition and level. A member that is not a job (written by
    something else) is left out.

    Raises:
        InvalidNameError: ``role`` is not a valid role name.
    """
    validate_name(role, "role")
    shards, levels = (await _shards(redis, keys, [role]))[role]
    places = _places(shards, levels)
    pipe = redis.pipeline(transaction=False)
    for shard, level in places:
        pipe.zrange(keys.delayed(shard, level), 0, count - 1, withscores=True)
    replies = await pipe.execute(raise_on_error=False)
    found = [
        _delayed_job(body, score, shards.index(shard), level)
        for (shard, level), reply in zip(places, replies, strict=True)
        for body, score in _present(reply, [])
    ]
    jobs = [job for job in found if job is not None]
    jobs.sort(key=lambda job: (job.due_at_ms, job.partition, -job.level))
    return jobs[:count]


#: The last millisecond of year 9999: a due time past it (or not a number) is not one.
_LAST_MS = 253_402_300_799_999


def _delayed_job(body: Any, score: Any, partition: int, level: int) -> DelayedJob | None:
    """A delayed schedule's member as a :class:`DelayedJob`, or None if it is not a job."""
    # Untrusted bytes and score: anyone who may write the namespace may have written them.
    if not (isinstance(score, float | int) and 0 <= score <= _LAST_MS):
        return None
    try:
        job = decode_job({MESSAGE_FIELD: bytes(body)})
    except (ProtocolError, TypeError):
        return None
    return DelayedJob(
        message_id=job.id,
        attempt=job.attempt,
        due_at_ms=int(score),
        partition=partition,
        level=level,
    )


async def _role_exists(redis: Redis, keys: Keys, role: str) -> bool:
    return await steps.run(flow.role_known(redis, keys, role))


async def _with_pauses(redis: Redis, keys: Keys, infos: list[RoleInfo]) -> list[RoleInfo]:
    """``infos`` with their roles' pauses (one round trip for all)."""
    roles = [info.role for info in infos]
    paused = await steps.run(flow.paused_since(redis, keys, roles))
    limits = await steps.run(flow.read_limits(redis, keys, roles)) if roles else {}
    return [
        info.model_copy(
            update={
                "paused": info.role in paused,
                "paused_at_ms": paused.get(info.role),
                "rate_limit": limits[info.role].rate,
                "concurrency_limit": limits[info.role].concurrency,
                "running_slots": limits[info.role].running,
                "key_rate_limit": limits[info.role].key_rate,
                "key_concurrency": limits[info.role].key_concurrency,
                "busy_keys": limits[info.role].busy_keys,
                "parked_keys": limits[info.role].parked_keys,
            }
        )
        for info in infos
    ]


async def _shards(
    redis: Redis, keys: Keys, roles: list[str]
) -> dict[str, tuple[tuple[str, ...], int]]:
    """Each role's partitions and priority levels as recorded (else the role alone, 1 level)."""
    if not roles:
        return {}
    pipe = redis.pipeline(transaction=False)
    for role in roles:
        pipe.hmget(keys.role_config(role), [partitions.SHARDS_FIELD, partitions.LEVELS_FIELD])
    out: dict[str, tuple[tuple[str, ...], int]] = {}
    # Errors as values: another type of key at a config's name is the role alone, like a
    # garbled record.
    for role, recorded in zip(roles, await pipe.execute(raise_on_error=False), strict=True):
        out[role] = ((role,), 1)
        if not isinstance(recorded, Exception) and recorded and recorded[0] is not None:
            with contextlib.suppress(ConfigError):
                layout = partitions.parse(role, recorded[0], recorded[1])
                out[role] = (layout.shards, layout.levels)
    return out


def _places(shards: tuple[str, ...], levels: int) -> list[tuple[str, int]]:
    """Each (partition, level) of a role, partition by partition, lowest level first."""
    return [(shard, level) for shard in shards for level in range(levels)]


async def _role_infos(redis: Redis, keys: Keys, roles: list[str]) -> list[RoleInfo]:
    """Each role's info, its partitions' (and levels') figures merged."""
    layouts = await _shards(redis, keys, roles)
    places = {role: _places(*layouts[role]) for role in roles}
    parts = await _shard_infos(redis, keys, [p for role in roles for p in places[role]])
    out, start = [], 0
    for role in roles:
        count = len(places[role])
        out.append(_merge(role, parts[start : start + count], layouts[role][1]))
        start += count
    return await _with_pauses(redis, keys, out)


def _merge(role: str, parts: list[RoleInfo], levels: int = 1) -> RoleInfo:
    """One role's info from its partitions' levels' (partition by partition, levels inside)."""
    by_name: dict[str, list[GroupInfo]] = {}
    for part in parts:
        for group in part.groups:
            by_name.setdefault(group.name, []).append(group)
    return RoleInfo(
        role=role,
        length=sum(part.length for part in parts),
        groups=[_merge_groups(groups) for _, groups in sorted(by_name.items())],
        delayed=sum(part.delayed for part in parts),
        dead_letters=sum(part.dead_letters for part in parts),
        partitions=len(parts) // levels,
        levels=None if levels == 1 else _levels(parts, levels),
    )


def _levels(parts: list[RoleInfo], levels: int) -> list[LevelInfo]:
    """Each level's totals over the partitions (``parts`` in :func:`_places` order)."""
    return [
        LevelInfo(
            level=level,
            length=sum(part.length for part in parts[level::levels]),
            pending=sum(g.pending for part in parts[level::levels] for g in part.groups),
            delayed=sum(part.delayed for part in parts[level::levels]),
        )
        for level in range(levels)
    ]


def _merge_groups(groups: list[GroupInfo]) -> GroupInfo:
    if len(groups) == 1:
        return groups[0]
    consumers: dict[str, ConsumerInfo] = {}
    for group in groups:
        for c in group.consumers:
            seen = consumers.get(c.name)
            consumers[c.name] = (
                c
                if seen is None
                else ConsumerInfo(
                    name=c.name,
                    pending=seen.pending + c.pending,
                    idle_ms=min(seen.idle_ms, c.idle_ms),
                    alive=seen.alive or c.alive,
                )
            )
    pending = [g for g in groups if g.oldest_pending_age_ms is not None]
    oldest = max(pending, key=lambda g: g.oldest_pending_age_ms or 0) if pending else None
    idle = [g.oldest_pending_idle_ms for g in groups if g.oldest_pending_idle_ms is not None]
    lags = [g.lag for g in groups]
    return GroupInfo(
        name=groups[0].name,
        consumers=sorted(consumers.values(), key=lambda c: c.name),
        pending=sum(g.pending for g in groups),
        lag=None if None in lags else sum(lag or 0 for lag in lags),
        last_delivered_id=max((g.last_delivered_id for g in groups), key=_id_key),
        oldest_pending_id=oldest.oldest_pending_id if oldest else None,
        oldest_pending_age_ms=oldest.oldest_pending_age_ms if oldest else None,
        oldest_pending_idle_ms=max(idle) if idle else None,
    )


async def _shard_infos(redis: Redis, keys: Keys, places: list[tuple[str, int]]) -> list[RoleInfo]:
    """Infos of role partitions' levels ((shard, level) pairs), three round trips for all.

    Dead letters are one stream per partition: counted with its level 0.
    """
    if not places:
        return []
    pipe = redis.pipeline(transaction=False)
    for shard, level in places:
        pipe.xlen(keys.role_stream(shard, level))
        pipe.zcard(keys.delayed(shard, level))
        pipe.xlen(keys.dead_letters(shard))  # counted once, with level 0 (one index apart)
        pipe.xinfo_groups(keys.role_stream(shard, level))
    replies = await pipe.execute(raise_on_error=False)
    streams_ = [keys.role_stream(shard, level) for shard, level in places]
    groups_by_stream = [_present(replies[i * 4 + 3], []) for i in range(len(places))]
    groups = await _groups(redis, keys, streams_, groups_by_stream)
    return [
        RoleInfo(
            role=shard,
            length=_present(replies[i * 4], 0),
            groups=groups[streams_[i]],
            delayed=_present(replies[i * 4 + 1], 0),
            dead_letters=0 if level else _present(replies[i * 4 + 2], 0),
        )
        for i, (shard, level) in enumerate(places)
    ]


async def _groups(
    redis: Redis, keys: Keys, names: list[str], raw_groups: list[list[dict[str, Any]]]
) -> dict[str, list[GroupInfo]]:
    """Each stream's groups, with consumers and oldest pending entry: one pipeline for all."""
    wanted = [(name, raw) for name, raws in zip(names, raw_groups, strict=True) for raw in raws]
    out: dict[str, list[GroupInfo]] = {name: [] for name in names}
    if not wanted:
        return out
    pipe = redis.pipeline(transaction=False)
    for role, raw in wanted:
        pipe.xinfo_consumers(role, raw["name"])
        pipe.xpending(role, raw["name"])
    replies, now = await _execute_with_time(redis, pipe)
    consumers = [_present(replies[i * 2], []) for i in range(len(wanted))]
    alive = await _alive(redis, keys, {_text(c["name"]) for group in consumers for c in group})
    summaries = [_present(replies[i * 2 + 1], {}) for i in range(len(wanted))]
    idle = await longest_idle(
        redis,
        [
            (role, raw["name"]) if summary.get("pending") else None
            for (role, raw), summary in zip(wanted, summaries, strict=True)
        ],
    )
    for i, (role, raw) in enumerate(wanted):
        group = _group(raw, consumers[i], summaries[i], now, alive)
        out[role].append(group.model_copy(update={"oldest_pending_idle_ms": idle[i]}))
    for infos in out.values():
        infos.sort(key=lambda group: group.name)
    return out


def _group(
    raw: dict[str, Any],
    consumers: list[dict[str, Any]],
    summary: dict[str, Any],
    now_ms: int,
    alive: set[str],
) -> GroupInfo:
    oldest = summary.get("min")
    lag = raw.get("lag")
    return GroupInfo(
        name=_text(raw["name"]),
        consumers=sorted(
            (_consumer(consumer, alive) for consumer in consumers),
            key=lambda consumer: consumer.name,
        ),
        pending=int(summary.get("pending") or 0),
        lag=int(lag) if lag is not None else None,
        last_delivered_id=_text(raw["last-delivered-id"]),
        oldest_pending_id=_text(oldest) if oldest else None,
        oldest_pending_age_ms=_age_ms(oldest, now_ms) if oldest else None,
    )


def _consumer(raw: dict[str, Any], alive: set[str]) -> ConsumerInfo:
    name = _text(raw["name"])
    return ConsumerInfo(
        name=name, pending=int(raw["pending"]), idle_ms=int(raw["idle"]), alive=name in alive
    )


async def _alive(redis: Redis, keys: Keys, names: set[str]) -> set[str]:
    """The consumer names among ``names`` that a live process holds."""
    valid = sorted(name for name in names if NAME_PATTERN.fullmatch(name))
    if not valid:
        return set()
    pipe = redis.pipeline(transaction=False)
    for name in valid:
        pipe.exists(keys.consumer_alive(name))
    found = await pipe.execute()
    return {name for name, exists in zip(valid, found, strict=True) if exists}


#: Steps of :func:`longest_idle` that find the exact longest idle time; later ones double it.
EXACT_IDLE_STEPS = 16
#: The most steps (round trips) of :func:`longest_idle`.
MAX_IDLE_STEPS = 64


async def longest_idle(redis: Redis, groups: list[tuple[str, Any] | None]) -> list[int | None]:
    """For each (stream, group): the longest idle time (ms) of its pending entries.

    ``XPENDING <stream> <group> IDLE <t> <start> + 1`` returns the first pending entry from
    ``start`` (in id order) idle at least ``t`` ms, with its idle time. Every entry before the
    one found is less idle than it, so the next step asks only after it (an exclusive start) for
    one idler by more than 1% (and by the time since the last step: idle times grow while the
    steps run, and entries renewed together share one), until none is. That takes one step per
    entry clearly idler than every older one (a handful: the pending list is scanned by Redis,
    once over all steps, and never sent), all groups in lockstep, one pipelined round trip per
    step; the figure is within 1% of the true one. After :data:`EXACT_IDLE_STEPS` the threshold
    doubles instead, so that a list ordered against the search costs at most
    :data:`MAX_IDLE_STEPS` steps; the figure may then be up to half the true one.

    Args:
        redis: The client.
        groups: (stream, group name) pairs; None for a group known to have nothing pending.

    Returns:
        Per pair, the longest idle time, or None (nothing pending).
    """
    best: list[int | None] = [None] * len(groups)
    above = [0] * len(groups)
    start = ["-"] * len(groups)
    searching = [(i, group) for i, group in enumerate(groups) if group is not None]
    sent = time.monotonic()
    for step in range(MAX_IDLE_STEPS):
        if not searching:
            break
        grown = math.ceil((time.monotonic() - sent) * 1000)
        sent = time.monotonic()
        pipe = redis.pipeline(transaction=False)
        for i, (stream, group) in searching:
            idle = above[i] + grown if step else 0
            pipe.xpending_range(stream, group, min=start[i], max="+", count=1, idle=idle)
        replies = await pipe.execute(raise_on_error=False)
        found = []
        for (i, target), rows in zip(searching, replies, strict=True):
            first = _present(rows, [])
            if first:
                idle = best[i] = int(first[0]["time_since_delivered"])
                exact = step < EXACT_IDLE_STEPS
                above[i] = idle + max(1, idle // 100) if exact else max(idle + 1, 2 * idle)
                start[i] = "(" + _text(first[0]["message_id"])
                found.append((i, target))
        searching = found
    return best


async def _oldest_pending(
    redis: Redis, keys: Keys, info: RoleInfo, count: int, level: int = 0
) -> list[PendingEntry]:
    """The ``count`` oldest pending entries of a partition's level over all its groups."""
    groups = [group.name for group in info.groups if group.pending]
    if not groups:
        return []
    stream = keys.role_stream(info.role, level)
    pipe = redis.pipeline(transaction=False)
    for group in groups:
        pipe.xpending_range(stream, group, min="-", max="+", count=count)
    replies, now = await _execute_with_time(redis, pipe)
    entries = [
        PendingEntry(
            id=_text(row["message_id"]),
            group=group,
            consumer=_text(row["consumer"]),
            idle_ms=int(row["time_since_delivered"]),
            deliveries=int(row["times_delivered"]),
            age_ms=_age_ms(row["message_id"], now),
        )
        for group, rows in zip(groups, replies, strict=True)
        for row in _present(rows, [])
    ]
    entries.sort(key=lambda entry: (_id_key(entry.id), entry.group))
    return entries[:count]


async def _execute_with_time(redis: Redis, pipe: Any) -> tuple[list[Any], int]:
    """The pipeline's replies and the server's clock (ms), read in the same round trip.

    On a cluster redis-py refuses TIME in a pipeline: it is asked on its own (of one node;
    the masters' clocks agree closely enough for ages in milliseconds).
    """
    if connect.is_cluster(redis):
        replies = await pipe.execute(raise_on_error=False)
        return list(replies), _time_ms(await redis.time())
    pipe.time()
    replies = await pipe.execute(raise_on_error=False)
    return list(replies[:-1]), _time_ms(replies[-1])


def _present(reply: Any, empty: Any) -> Any:
    """A pipelined reply, or ``empty`` if its key or group is gone or of another type."""
    if isinstance(reply, ResponseError):
        if str(reply).startswith(_GONE):
            return empty
        raise reply
    return reply


#: A name from a reply; undecodable bytes (a name written by something else) escaped.
_text = streams.text_lenient


def _time_ms(reply: Any) -> int:
    if isinstance(reply, BaseException):
        raise reply
    seconds, micros = reply
    return int(seconds) * 1000 + int(micros) // 1000


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _age_ms(entry_id: Any, now_ms: int) -> int:
    """Milliseconds since the entry was added: its id starts with the server's time in ms."""
    return max(0, now_ms - _id_key(_text(entry_id))[0])
