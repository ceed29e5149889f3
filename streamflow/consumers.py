"""Consumer names of dead workers: marked while their process lives, deleted once they hold nothing.

Redis keeps every consumer a group ever saw until it is deleted, so each crashed or stopped
worker left its name behind (a crash loop under ``--processes`` left 39 names for 3 live
workers). A live worker marks every role partition it serves with a key in that partition's
slot, ``<ns>:{role:<shard>}:alive:<consumer>``, whose TTL is that of its consumer name and which
it refreshes every lease renewal period; on a clean stop it deletes its marks. In the same loop
it looks at one partition per tick (in turn) and deletes at most :data:`MAX_FORGET` consumers
of the group that

* are not itself, and that Redis reports idle for longer than the lease TTL with no pending
  entry (``XINFO CONSUMERS``), and
* inside the deleting script (``forget.lua``), still hold no pending entry and have no mark.

``XGROUP DELCONSUMER`` drops a consumer's pending entries for good, so a consumer holding any is
never deleted: it waits until another worker adopts them. A live worker is never deleted either
(its mark exists). Deleting a consumer that holds nothing loses nothing: should its process
still read (one frozen past its TTL), its next read creates the consumer again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import anyio
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from streamflow import streams
from streamflow.keys import GROUP, NAME_PATTERN, Keys

logger = logging.getLogger(__name__)

#: The most consumers one cleanup step deletes (one script call, one partition).
MAX_FORGET = 32


class ConsumerNames:
    """Marks one worker's consumer name in the partitions it serves, and deletes dead names.

    Args:
        redis: The client.
        scripts: The registered Lua scripts.
        keys: Key names.
        consumer: This worker's consumer name.
        ttl_ms: The lease TTL (ms): a mark lives this long (at least 1 s) unless refreshed, and
            only consumers idle longer than this are looked at.
        every: Seconds between refreshes (and cleanup steps); at most a third of ``ttl_ms``.
    """

    def __init__(
        self,
        redis: Redis,
        scripts: streams.Scripts,
        keys: Keys,
        consumer: str,
        *,
        ttl_ms: int,
        every: float,
    ) -> None:
        self._redis = redis
        self._scripts = scripts
        self._keys = keys
        self._consumer = consumer
        self._ttl_ms = max(ttl_ms, 1000)
        self._idle_ms = ttl_ms
        self._every = every
        self._shards: list[str] = []
        self._turn = 0
        #: Dead consumer names this worker deleted.
        self.forgotten = 0

    def serve(self, shards: Sequence[str]) -> None:
        """Set the role partitions this worker serves (before :meth:`mark`)."""
        self._shards = list(shards)

    async def mark(self) -> None:
        """Set or refresh this worker's mark in every partition it serves (one round trip)."""
        if not self._shards:
            return
        pipe = self._redis.pipeline(transaction=False)
        for shard in self._shards:
            pipe.set(self._keys.consumer_mark(shard, self._consumer), b"1", px=self._ttl_ms)
        await pipe.execute()

    async def unmark(self) -> None:
        """Delete this worker's marks (a clean stop), so its name can go once it holds nothing."""
        if self._shards:
            await self._redis.delete(
                *[self._keys.consumer_mark(shard, self._consumer) for shard in self._shards]
            )

    async def run(self) -> None:
        """Refresh the marks and take one cleanup step, every ``every`` seconds, forever."""
        backoff = streams.Backoff("marking consumer names and deleting dead ones")
        while True:
            await anyio.sleep(self._every)
            try:
                await self.mark()
                if self._shards:
                    shard = self._shards[self._turn % len(self._shards)]
                    self._turn += 1
                    await self.forget_dead(shard)
            except streams.TRANSIENT_ERRORS as exc:
                await backoff.failed(exc)
                continue
            except ResponseError as exc:
                if not streams.is_group_lost(exc):  # the reader recreates a lost group
                    await backoff.failed(exc)  # refused (a full Redis, ...): next tick
                continue
            backoff.succeeded()

    async def forget_dead(self, shard: str) -> list[str]:
        """One cleanup step on a role partition; returns the consumer names deleted."""
        stream = self._keys.role_stream(shard)
        found: list[dict[str, Any]] = await self._redis.xinfo_consumers(stream, GROUP)
        candidates = []
        for consumer in found:
            name = self._candidate(consumer)
            if name is not None:
                candidates.append((consumer["name"], self._keys.consumer_mark(shard, name)))
            if len(candidates) == MAX_FORGET:
                break
        deleted = await streams.forget_consumers(self._scripts, self._redis, stream, candidates)
        names = [name.decode() for name in deleted]
        if names:
            self.forgotten += len(names)
            logger.info(
                "deleted %d consumer names of stopped workers from %s: %s",
                len(names),
                stream,
                ", ".join(names[:10]),
            )
        return names

    def _candidate(self, consumer: dict[str, Any]) -> str | None:
        """The name of a consumer that looks dead and empty, if it is one of ours to delete.

        Names that no streamflow worker could hold (written by something else) are left alone.
        """
        raw = consumer.get("name")
        try:
            name = raw.decode() if isinstance(raw, bytes) else str(raw)
            idle, pending = int(consumer.get("idle", 0)), int(consumer.get("pending", 1))
        except (UnicodeDecodeError, TypeError, ValueError):
            return None
        if name == self._consumer or NAME_PATTERN.fullmatch(name) is None:
            return None
        return name if pending == 0 and idle >= self._idle_ms else None
