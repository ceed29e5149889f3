"""Dead-letter administration: list, show, count, replay and purge a role's dead letters.

:class:`streamflow.Client` exposes these as its public methods (``dead_letters``,
``dead_letter``, ``dead_letter_count``, ``replay``, ``purge_dead_letters``) and turns Redis
failures into documented errors; this module does the work. A partitioned role's dead letters
are shown with ids ``<partition>:<entry id>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from streamflow import connect, partitions, scripts, streams
from streamflow.errors import ProtocolError
from streamflow.keys import Keys, validate_name
from streamflow.protocol import encode
from streamflow.records import DeadLetter, decode_dead_letter
from streamflow.scripts import Scripts


@dataclass(frozen=True, slots=True)
class DeadLetterEntry:
    """One entry of a dead-letter stream.

    Attributes:
        id: Its id in the dead-letter stream (what ``dlq show``/``replay`` take).
        letter: The decoded dead letter; None when the entry cannot be read (see ``problem``).
        raw: The original entry's fields, verbatim (cut at the worker's size limit).
        problem: Why the entry could not be read, when it could not.
    """

    id: str
    letter: DeadLetter | None
    raw: dict[str, bytes]
    problem: str | None = None


@dataclass(slots=True)
class ReplayResult:
    """What a replay did.

    Attributes:
        replayed: (dead-letter id, new role-stream entry id) for each entry sent back.
        skipped: (dead-letter id, why) for each entry not sent back.
    """

    replayed: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


class DeadLetters:
    """The dead letters of one namespace, through the client's connection and layouts.

    Args:
        redis: The client's asyncio Redis client.
        keys: The namespace's keys.
        scripts: The client's registered scripts (replay).
        layouts: The client's cache of role layouts (partitions).
    """

    def __init__(
        self, redis: Redis, keys: Keys, scripts: Scripts, layouts: partitions.Layouts
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._scripts = scripts
        self._layouts = layouts

    async def page(self, role: str, *, count: int = 100, after: str = "-") -> list[DeadLetterEntry]:
        """The oldest ``count`` dead letters of ``role`` after id ``after`` (exclusive)."""
        layout = await self._layouts.get(validate_name(role, "role"))
        first, start = (0, "-") if after == "-" else _split_dead_id(layout, after)
        out: list[DeadLetterEntry] = []
        for index in range(first, layout.count):
            if index > first:
                start = "-"
            key = self._keys.dead_letters(layout.shards[index])
            reply: Any = await self._redis.xrange(
                key, start if start == "-" else f"({start}", "+", count - len(out)
            )
            out += [_dead_letter_entry(i, f, _prefix(layout, index)) for i, f in reply]
            if len(out) >= count:
                break
        return out

    async def get(self, role: str, dead_id: str) -> DeadLetterEntry | None:
        """One dead letter by its id, or None (also for a partition the role does not have)."""
        layout = await self._layouts.get(validate_name(role, "role"))
        try:
            index, entry_id = _split_dead_id(layout, dead_id)
        except ValueError:
            return None
        key = self._keys.dead_letters(layout.shards[index])
        reply: Any = await self._redis.xrange(key, entry_id, entry_id)
        if not reply:
            return None
        found_id, fields = reply[0]
        return _dead_letter_entry(found_id, fields, _prefix(layout, index))

    async def count(self, role: str) -> int:
        """How many dead letters ``role`` has (in all its partitions)."""
        layout = await self._layouts.get(validate_name(role, "role"))
        total = 0
        for shard in layout.shards:
            total += int(await self._redis.xlen(self._keys.dead_letters(shard)))
        return total

    async def replay(self, role: str, dead_ids: Sequence[str] | None = None) -> ReplayResult:
        """Send dead letters back to the role's stream with their attempts reset, each once.

        The replay that deletes a dead letter from its stream is the one that publishes it.
        """
        result = ReplayResult()
        # Lookups fail with the errors (and texts) of Client.dead_letter and .dead_letters.
        if dead_ids is not None:
            for dead_id in dead_ids:
                with connect.public_errors("reading a dead letter"):
                    entry = await self.get(role, dead_id)
                if entry is None:
                    result.skipped.append((dead_id, "no such dead letter"))
                else:
                    await self._replay_one(role, entry, result)
            return result
        after = "-"
        while page := await self._listed(role, after):
            for entry in page:
                await self._replay_one(role, entry, result)
            after = page[-1].id
        return result

    async def _listed(self, role: str, after: str) -> list[DeadLetterEntry]:
        with connect.public_errors("listing dead letters"):
            return await self.page(role, count=100, after=after)

    async def _replay_one(self, role: str, entry: DeadLetterEntry, result: ReplayResult) -> None:
        if entry.letter is None:
            result.skipped.append((entry.id, f"unreadable dead letter: {entry.problem}"))
            return
        job = entry.letter.job
        if job is None:
            why = f"not a valid job ({entry.letter.reason}): nothing to replay"
            result.skipped.append((entry.id, why))
            return
        layout = await self._layouts.get(role)
        index, entry_id = _split_dead_id(layout, entry.id)
        shard = layout.shards[index]  # back to the partition it came from
        # ... and to its priority level, one the role has (a raw entry's may not be: clamped).
        level = min(job.priority or 0, layout.levels - 1)
        new_id = await scripts.replay(
            self._scripts,
            self._redis,
            stream=self._keys.role_stream(shard, level),
            dead_stream=self._keys.dead_letters(shard),
            dead_id=entry_id.encode(),
            message=encode(job.model_copy(update={"attempt": 1})),
        )
        if new_id is None:
            result.skipped.append((entry.id, "already replayed or purged"))
        else:
            result.replayed.append((entry.id, new_id.decode()))

    async def purge(self, role: str) -> int:
        """Delete every dead letter of ``role``; returns how many there were."""
        layout = await self._layouts.get(validate_name(role, "role"))
        total = 0
        for shard in layout.shards:
            key = self._keys.dead_letters(shard)
            # In MULTI on a single node; on a cluster a dead letter added between XLEN and DEL
            # is deleted without being counted (see streams.one_slot_pipeline).
            pipe = streams.one_slot_pipeline(self._redis)
            pipe.xlen(key)
            pipe.delete(key)
            count, _ = await pipe.execute()
            total += int(count)
        return total


def _dead_letter_entry(
    entry_id: bytes, fields: dict[bytes, bytes], prefix: str = ""
) -> DeadLetterEntry:
    shown = prefix + entry_id.decode()
    try:
        letter, raw = decode_dead_letter(fields)
    except ProtocolError as exc:
        # One corrupt entry must not hide the others: it is listed with its problem.
        raw = {k.decode(errors="replace"): v for k, v in fields.items()}
        return DeadLetterEntry(shown, None, raw, f"{exc.reason}: {exc.detail}")
    return DeadLetterEntry(shown, letter, raw)


def _prefix(layout: partitions.Layout, index: int) -> str:
    """How a dead letter's id starts: its partition, for a partitioned role."""
    return f"{index}:" if layout.count > 1 else ""


def _split_dead_id(layout: partitions.Layout, dead_id: str) -> tuple[int, str]:
    """(partition index, entry id) of a dead letter id as :meth:`DeadLetters.page` shows it.

    Raises:
        ValueError: It names a partition the role does not have.
    """
    index, colon, entry_id = dead_id.partition(":")
    if not colon:
        return 0, dead_id
    if not index.isdigit() or int(index) >= layout.count:
        raise ValueError(f"no partition {index!r} in role {layout.role!r}: {dead_id!r}")
    return int(index), entry_id
