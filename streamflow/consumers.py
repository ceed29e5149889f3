"""Consumer names of dead processes: marked while their process lives, deleted once empty.

Redis keeps every consumer a group ever saw until it is deleted, so each crashed or stopped
worker (or coordinator) left its name behind (a crash loop under ``--processes`` left 39 names
for 3 live workers). A live process marks every stream it reads with a key in that stream's
slot, ``<ns>:{<tag>}:alive:<consumer>`` (:meth:`Keys.consumer_mark`), whose TTL is the lease TTL
and which it refreshes every third of it; on a clean stop it deletes its marks. In the same
loop it looks at one of those streams per tick (in turn) and deletes at most
:data:`MAX_FORGET` consumers of its group that

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
import os
import socket
import uuid
from collections.abc import Sequence
from typing import Any

import anyio
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from streamflow import connect, scripts, streams
from streamflow.keys import NAME_PATTERN, Keys
from streamflow.scripts import Scripts

logger = logging.getLogger(__name__)

#: The most consumers one cleanup step deletes (one script call, one stream).
MAX_FORGET = 32
#: Error prefixes of a stream or group that does not exist.
_GONE = ("no such key", "NOGROUP")


class ConsumerNames:
    """Marks one process's consumer name next to the streams it reads, and deletes dead names.

    Args:
        redis: The client.
        scripts: The registered Lua scripts.
        keys: Key names.
        consumer: This process's consumer name.
        ttl_ms: The lease TTL (ms): a mark lives this long (at least 1 s) unless refreshed, and
            only consumers idle longer than this are looked at.
        every: Seconds between refreshes (and cleanup steps); at most a third of ``ttl_ms``.
    """

    def __init__(
        self,
        redis: Redis,
        scripts: Scripts,
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
        self._streams: list[tuple[str, str]] = []
        self._turn = 0
        #: Dead consumer names this process deleted.
        self.forgotten = 0

    def serve(self, groups: Sequence[tuple[str, str]]) -> None:
        """Set the (stream, group) pairs this process reads (then :meth:`mark` them)."""
        self._streams = list(groups)

    def _marks(self) -> list[str]:
        return [self._keys.consumer_mark(stream, self._consumer) for stream, _ in self._streams]

    async def mark(self) -> None:
        """Set or refresh this process's marks next to every stream it reads (one round trip)."""
        if not self._streams:
            return
        pipe = self._redis.pipeline(transaction=False)
        for mark in self._marks():
            pipe.set(mark, b"1", px=self._ttl_ms)
        await pipe.execute()

    async def unmark(self) -> None:
        """Delete this process's marks (a clean stop): its names go once they hold nothing."""
        if self._streams:
            await self._redis.delete(*self._marks())

    async def run(self) -> None:
        """Refresh the marks and take one cleanup step, every ``every`` seconds, forever."""
        backoff = connect.Backoff("marking consumer names and deleting dead ones")
        while True:
            await anyio.sleep(self._every)
            try:
                await self.mark()
                if self._streams:
                    stream, group = self._streams[self._turn % len(self._streams)]
                    self._turn += 1
                    await self.forget_dead(stream, group)
            except connect.TRANSIENT_ERRORS as exc:
                await backoff.failed(exc)
                continue
            except ResponseError as exc:
                if not streams.is_group_lost(exc):  # its reader recreates a lost group
                    await backoff.failed(exc)  # refused (a full Redis, ...): next tick
                continue
            backoff.succeeded()

    async def forget_dead(self, stream: str, group: str) -> list[str]:
        """One cleanup step on a stream's group; returns the consumer names deleted."""
        try:
            found: list[dict[str, Any]] = await self._redis.xinfo_consumers(stream, group)
        except ResponseError as exc:
            if str(exc).startswith(_GONE):
                return []  # no stream or group yet (or any more): no names to delete
            raise
        candidates = []
        for consumer in found:
            name = self._candidate(consumer)
            if name is not None:
                candidates.append((consumer["name"], self._keys.consumer_mark(stream, name)))
            if len(candidates) == MAX_FORGET:
                break
        deleted = await scripts.forget_consumers(
            self._scripts, self._redis, stream, group, candidates
        )
        names = [name.decode() for name in deleted]
        if names:
            self.forgotten += len(names)
            logger.info(
                "deleted %d consumer names of stopped processes from %s: %s",
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


def default_consumer_name() -> str:
    """A consumer name unique to this process: host, pid and a random suffix."""
    host = "".join(
        c if c.isascii() and (c.isalnum() or c in "-_.") else "-" for c in socket.gethostname()
    ).lstrip("-_.")
    return f"{host[:40] or 'host'}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
