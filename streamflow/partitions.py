"""Partitioned roles: one hot role split into P streams spread over a cluster's masters.

A role declared with ``partitions=P`` has P *shards*: the role's own key family
(``{role:orders}``) and P-1 more (``{role:orders#1.7}``, ...), each a full set of stream, group,
dead letters, delayed schedule, dedup markers and events in its own hash slot. The names are
chosen once, when the role is created, so that the shards' slots fall on different masters of
the cluster (on a single Redis, evenly over the slot space), and recorded in the role's config
hash (``HSETNX``, so the first creator wins and everyone else reads the same list):

    HGET <ns>:{role:orders}:config shards  ->  "orders orders#1.7 orders#2.40"

Workers check at start-up that the recorded count is the one their app declares (and refuse to
start otherwise); publishers read the list, so they always agree with it. A publisher picks a
shard by the message's key (CRC-32 of its UTF-8 bytes modulo P: the same key always lands on
the same partition, so its messages stay in order) or, without a key, round-robin. The first
shard is the role's own key family, so a role that has not been created yet (nothing recorded)
is published to as if it had one partition and nothing published early is stranded.
"""

from __future__ import annotations

import itertools
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import ResponseError

from streamflow import connect, steps
from streamflow.errors import ConfigError, InvalidNameError
from streamflow.keys import (
    MAX_PARTITIONS,
    MAX_PRIORITIES,
    Keys,
    role_of_shard,
    shard_tag,
    validate_name,
    validate_shard,
)
from streamflow.logs import shown
from streamflow.steps import Steps

#: The config hash field listing a role's shards, space-separated, in partition order.
SHARDS_FIELD = "shards"
#: The config hash field with a role's number of priority levels (absent: 1, no priorities).
LEVELS_FIELD = "levels"

#: What a role's config records: its ``shards`` field and its ``levels`` field.
Record = tuple[bytes | str | None, bytes | str | None]


class PartitionMismatch(ConfigError):
    """The partitions an app declares for a role differ from those recorded in Redis."""


class PriorityMismatch(ConfigError):
    """The priority levels an app declares for a role differ from those recorded in Redis."""


@dataclass(frozen=True, slots=True)
class Layout:
    """A role's partitions, as recorded in Redis.

    Attributes:
        role: The role.
        shards: Its partitions' key names in partition order; the first is the role itself.
        levels: Its priority levels (1: no priorities); every partition has them all.
    """

    role: str
    shards: tuple[str, ...]
    levels: int = 1
    _next: itertools.count[int] = field(default_factory=itertools.count, compare=False)

    @property
    def count(self) -> int:
        """How many partitions the role has."""
        return len(self.shards)

    def for_key(self, key: str) -> str:
        """The shard of messages with this key (stable: CRC-32 of the key modulo the count)."""
        return self.shards[partition_of(key, self.count)]

    def next(self) -> str:
        """The next shard in round-robin order."""
        return self.shards[next(self._next) % self.count]

    def pick(self, key: str | None, dedup_key: str | None = None) -> str:
        """The shard for one message: by its key, else by its dedup key, else round-robin.

        A dedup key without a message key picks by the dedup key, so a repeated publish finds
        the marker of the first one (markers live in their partition's slot).
        """
        if self.count == 1:
            return self.shards[0]
        if key is not None:
            return self.for_key(key)
        if dedup_key is not None:
            return self.for_key(dedup_key)
        return self.next()


def partition_of(key: str, count: int) -> int:
    """The partition index of a message key: CRC-32 (zlib's, unsigned) of its UTF-8 bytes."""
    return zlib.crc32(key.encode()) % count


def single(role: str) -> Layout:
    """The layout of an unpartitioned (or not yet created) role."""
    return Layout(role, (validate_name(role, "role"),))


def plan(role: str, count: int, owner: Callable[[int], str] | None = None) -> tuple[str, ...]:
    """Choose the shard names of a new role with ``count`` partitions.

    Args:
        role: The role.
        count: How many partitions.
        owner: For a cluster, the master serving a slot; the shards then go to the masters in
            turn, starting after the first shard's. Without it they are spread evenly over the
            slot space, which spreads them over the masters of any evenly sliced cluster.

    Raises:
        ConfigError: ``count`` is out of range.
    """
    validate_name(role, "role")
    if not 1 <= count <= MAX_PARTITIONS:
        raise ConfigError(f"partitions of role {role!r} must be 1 to {MAX_PARTITIONS}")
    first = _slot(role)
    shards = [role]
    if owner is not None:
        masters = _masters_in_order(owner, first)
        for index in range(1, count):
            want = masters[index % len(masters)]

            def on_master(slot: int, want: str = want) -> bool:
                return owner(slot) == want

            shards.append(_search(role, index, on_master))
    else:
        width = REDIS_CLUSTER_HASH_SLOTS // count
        window = max(width // 4, 1)
        for index in range(1, count):
            start = (first + index * width) % REDIS_CLUSTER_HASH_SLOTS

            def near(slot: int, start: int = start) -> bool:
                return (slot - start) % REDIS_CLUSTER_HASH_SLOTS < window

            shards.append(_search(role, index, near))
    return tuple(shards)


def _slot(shard: str) -> int:
    return key_slot(shard_tag(shard).encode())


def _search(role: str, index: int, accept: Callable[[int], bool]) -> str:
    """The first name ``role#index[.salt]`` whose slot is accepted."""
    for salt in range(1_000_000):
        name = f"{role}#{index}" if salt == 0 else f"{role}#{index}.{salt}"
        if accept(_slot(name)):
            return name
    raise ConfigError(f"no slot found for partition {index} of role {role!r}")  # pragma: no cover


def _masters_in_order(owner: Callable[[int], str], first_slot: int) -> list[str]:
    """Every master, by the lowest slot it serves, rotated to start at ``first_slot``'s."""
    seen: dict[str, int] = {}
    for slot in range(REDIS_CLUSTER_HASH_SLOTS):
        seen.setdefault(owner(slot), slot)
    masters = sorted(seen, key=seen.__getitem__)
    start = masters.index(owner(first_slot))
    return masters[start:] + masters[:start]


def parse(role: str, recorded: bytes | str, levels: bytes | str | None = None) -> Layout:
    """The layout from a recorded ``shards`` field; checks every name belongs to ``role``.

    Raises:
        ConfigError: The record is not a list of ``role``'s shards starting with ``role``, or
            its ``levels`` is not a number of priority levels.
    """
    # Read back from Redis: anyone with write access to the namespace may have written it.
    text = recorded.decode(errors="replace") if isinstance(recorded, bytes) else recorded
    shards = tuple(text.split())
    try:
        ok = bool(shards) and shards[0] == role and len(set(shards)) == len(shards)
        ok = ok and all(role_of_shard(validate_shard(s)) == role for s in shards)
    except InvalidNameError:
        ok = False
    if not ok or len(shards) > MAX_PARTITIONS:
        raise ConfigError(f"the recorded partitions of role {role!r} are invalid: {text[:200]!r}")
    return Layout(role, shards, parse_levels(role, levels))


def parse_levels(role: str, recorded: bytes | str | None) -> int:
    """A role's recorded number of priority levels (1 when none is recorded).

    Raises:
        ConfigError: The record is not a number from 1 to ``MAX_PRIORITIES``.
    """
    if recorded is None:
        return 1
    text = recorded.decode(errors="replace") if isinstance(recorded, bytes) else recorded
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= MAX_PRIORITIES):
        raise ConfigError(
            f"the recorded priority levels of role {role!r} are invalid: {text[:50]!r}"
        )
    return int(text)


def _owner_of(redis: Redis) -> Callable[[int], str] | None:
    """On a cluster, a function from slot to the name of the master serving it."""
    if not connect.is_cluster(redis):
        return None
    manager = redis.nodes_manager  # type: ignore[attr-defined]
    return lambda slot: str(manager.get_node_from_slot(slot).name)


async def load(redis: Redis, keys: Keys, role: str) -> Layout | None:
    """The role's recorded layout, or None when the role was not created yet."""
    shards, levels = await steps.run(read_record(redis, keys, role))
    return None if shards is None else parse(role, shards, levels)


def read_record(redis: Any, keys: Keys, role: str) -> Steps[Record]:
    """The role's recorded ``shards`` and ``levels`` fields (asyncio or blocking client).

    One ``HMGET``: a role without priorities costs its publishers nothing more.

    Raises:
        ConfigError: Another type of key is at the config hash's name.
    """
    key = keys.role_config(role)
    try:
        reply = yield redis.hmget(key, [SHARDS_FIELD, LEVELS_FIELD])
    except ResponseError as exc:
        raise ConfigError(f"the config of role {role!r} ({key}) is not a hash: {exc}") from None
    shards, levels = list(reply or [None, None])[:2]
    return shards, levels


async def ensure(redis: Redis, keys: Keys, role: str, count: int, levels: int = 1) -> Layout:
    """Create the role with ``count`` partitions, or check it was created with that many.

    A role with priorities also records its ``levels`` (``HSETNX``: a role created before it
    had priorities gets them from its first worker that declares some).

    Raises:
        PartitionMismatch: The role exists with another number of partitions.
        PriorityMismatch: The role has another number of priority levels recorded.
    """
    layout = await load(redis, keys, role)
    if layout is None:
        if connect.is_cluster(redis):
            await redis.initialize()  # load the slot map
        shards = plan(role, count, _owner_of(redis))
        await redis.hsetnx(keys.role_config(role), SHARDS_FIELD, " ".join(shards))
        layout = await load(redis, keys, role)  # ours, or another worker's written first
        assert layout is not None
    if layout.count != count:
        raise PartitionMismatch(
            f"role {role!r} was created with {layout.count} partition(s) but the app declares "
            f"{count}; the number is fixed at creation (drain the role and delete "
            f"{keys.role_config(role)} to change it)"
        )
    if levels > 1 and layout.levels == 1:
        await redis.hsetnx(keys.role_config(role), LEVELS_FIELD, str(levels))
        layout = await load(redis, keys, role)
        assert layout is not None
    if layout.levels != levels:
        raise PriorityMismatch(
            f"role {role!r} has {layout.levels} priority level(s) recorded but the app declares "
            f"{levels}; the number is fixed once recorded (drain the role and delete "
            f"{keys.role_config(role)} to change it)"
        )
    return layout


class LayoutCache:
    """Layouts of roles as a publisher sees them, read from Redis once per role.

    A role not created yet is published to as one partition (its first shard, which every
    layout has) and looked up again a second later, so a publisher started before the workers
    soon spreads its messages over the partitions they create. The cache does no I/O: the
    async :class:`Layouts` and the sync client read the record themselves.
    """

    #: Seconds before a role found not created is looked up again.
    RECHECK = 1.0

    def __init__(self) -> None:
        self._known: dict[str, Layout] = {}
        #: Roles found not created: when to look again, and the one-partition layout meanwhile.
        self._missing: dict[str, tuple[float, Layout]] = {}

    def cached(self, role: str) -> Layout | None:
        """The layout to use without reading Redis, or None when the record must be read.

        Only a checked role name is ever cached: a layout found means a valid name.
        """
        layout = self._known.get(role)
        if layout is None:
            recheck, layout = self._missing.get(role, (0.0, None))
            if layout is not None and time.monotonic() >= recheck:
                return None
        return layout

    def missing(self, role: str) -> bool:
        """Whether ``role`` was found not created (no worker serving it ever started)."""
        return role in self._missing and role not in self._known

    def record(self, role: str, recorded: Record) -> Layout:
        """Remember what Redis holds for ``role`` (no shards: not created yet); its layout."""
        shards, levels = recorded
        if shards is None:
            layout = single(role)
            self._missing[role] = (time.monotonic() + self.RECHECK, layout)
            return layout
        layout = self._known[role] = parse(role, shards, levels)
        return layout


class Layouts(LayoutCache):
    """A :class:`LayoutCache` that reads the records through an async client."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        super().__init__()
        self._redis = redis
        self._keys = keys

    async def get(self, role: str) -> Layout:
        """The layout of ``role``."""
        layout = self.cached(role)
        if layout is None:
            layout = self.record(role, await steps.run(read_record(self._redis, self._keys, role)))
        return layout


def unknown_role_text(namespace: str, role: str, known: list[str]) -> str:
    """Why a publish to ``role`` is suspect: no worker serving it ever started.

    ``known`` (the names workers registered, read back from Redis) is untrusted: shown
    escaped, at most 20 of them.
    """
    names = ", ".join(shown(name, 100) for name in known[:20]) or "none"
    if len(known) > 20:
        names += f", ... ({len(known)} in all)"
    return (
        f"role {role!r} has never been served in namespace {namespace!r}: its jobs wait until "
        f"a worker serving it starts (known roles: {names})"
    )
