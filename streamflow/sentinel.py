"""Following the master of a Sentinel-monitored group: redis-py's Sentinel classes, made safe.

:func:`streamflow.connect.connect` builds a ``redis+sentinel://`` client from these classes
(the URL is parsed by :mod:`streamflow.urls`). The client asks the sentinels for the master's
address whenever it opens a connection, and its pool checks every
:data:`MASTER_CHECK_INTERVAL` whether the master moved, so after a failover streamflow's loops
reconnect to the promoted replica by themselves; a server that stopped being a writable master
is an outage (:class:`MasterConnection`), like any other.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio
from redis.asyncio import BlockingConnectionPool
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from streamflow.outage import SafeWrites

logger = logging.getLogger(__name__)

#: Seconds to wait for a sentinel (connect or reply) before asking the next one. Sentinels
#: answer in microseconds; a longer wait only delays finding the new master after a failover.
SENTINEL_TIMEOUT = 2.0

#: How often a pool in use asks the sentinels whether the master moved. Connections stay open
#: to whatever server they were opened to: without this check they would keep writing to a
#: master that a planned failover (``SENTINEL FAILOVER``) or a partition left behind, until
#: the sentinels reconfigure it (about 10 s later), and those writes are then lost.
MASTER_CHECK_INTERVAL = 1.0


def _master_gone(exc: ResponseError) -> bool:
    """Whether a server's error says it is no longer a master we may write to.

    ``NOREPLICAS``: a master with ``min-replicas-to-write`` lost its replicas (e.g. the one
    promoted in its place) and refuses writes before running them. ``UNBLOCKED ... instance
    state changed``: a master turned replica released a blocked read. (``READONLY``, a write
    sent to a demoted master, redis-py's Sentinel connection handles itself.)
    """
    text = str(exc)
    return text.startswith("NOREPLICAS") or (
        text.startswith("UNBLOCKED") and "instance state changed" in text
    )


def _address(address: Any) -> str:
    host, port = address
    return f"{host}:{port}"


class MasterConnection(SafeWrites, SentinelManagedConnection):
    """A master connection that turns "this is not the master any more" into an outage.

    The connection is closed and a connection error raised: streamflow's loops treat it like
    any outage (back off, reconnect), and the next connection asks the sentinels again.
    """

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        """Read a reply; "not a writable master any more" closes and raises ConnectionError."""
        try:
            return await super().read_response(*args, **kwargs)
        except ResponseError as exc:
            if not _master_gone(exc):
                raise
            await self.disconnect()
            raise RedisConnectionError(
                f"{self.host}:{self.port} is no longer a writable master ({exc}); "
                "reconnecting through the sentinels"
            ) from exc


class SentinelManager(Sentinel):
    """redis-py's sentinel manager, asking the sentinels one call at a time.

    Its ``discover_master`` moves the sentinel that answered to the front of its list with a
    swap computed before an ``await``; two concurrent calls (connections opening at once
    while the first sentinel says the master is down) can then duplicate one sentinel in the
    list and drop another, whose connection is never closed. One lock per client avoids it;
    a sentinel answers in microseconds, so callers barely wait.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Untyped before redis-py 8.2, typed since: the ignore must fit both.
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call,unused-ignore]
        self._asking = anyio.Lock()

    async def discover_master(self, service_name: str) -> Any:
        """The master's address, asking the sentinels one call at a time."""
        async with self._asking:
            return await super().discover_master(service_name)


class MasterPool(SentinelConnectionPool, BlockingConnectionPool):
    """A Sentinel-managed pool that waits for a free connection and follows the master.

    redis-py's own Sentinel pool fails at once when all connections are busy; the blocking one
    lets a burst of settling writes wait its turn. While the pool is used, it asks the
    sentinels every :data:`MASTER_CHECK_INTERVAL` whether the master moved, and if so closes
    its idle connections at once and busy ones when they are released. Closing the pool also
    closes the connections to the sentinels, which the client owns (nothing else refers to
    them).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self._next_check = 0.0
        self._checking = False

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        """A connection to the master, after checking (at most once an interval) it moved."""
        await self._follow_master()
        return await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]

    async def _follow_master(self) -> None:
        known = self.master_address
        now = time.monotonic()
        if known is None or self._checking or now < self._next_check:
            return  # a first connection asks the sentinels anyway
        self._checking = True
        self._next_check = now + MASTER_CHECK_INTERVAL
        try:
            # Closes the idle connections if the master moved.
            await self.get_master_address()  # type: ignore[no-untyped-call]
        except (RedisConnectionError, RedisTimeoutError, OSError):
            return  # no sentinel answers, or none names a healthy master: keep the known one
        finally:
            self._checking = False
        if self.master_address != known:
            logger.warning(
                "Redis Sentinel: the master of %r moved from %s to %s; reconnecting",
                self.service_name,
                _address(known),
                _address(self.master_address),
            )

    async def release(self, connection: Any) -> None:
        """Take a connection back, closing it if it was opened to a former master."""
        # A connection opened to a former master goes no further: whichever check found the
        # move (ours, or a new connection asking the sentinels), busy connections come back
        # here, and redis-py's asyncio pool would otherwise reuse them as they are.
        master = self.master_address
        if master is not None and (connection.host, connection.port) != tuple(master):
            await connection.disconnect()
        await super().release(connection)

    async def keep_current(self, connection: Any) -> bool:
        """For a connection held outside the pool: False if it was closed, its master gone.

        A held connection (see :class:`streamflow.pipelines.Held`) is neither checked out
        nor released, where the pool follows the master: it asks here before each use, and
        one opened to a former master is closed (the holder reconnects it to the new one).
        """
        await self._follow_master()
        master = self.master_address
        if master is None or (connection.host, connection.port) == tuple(master):
            return True
        await connection.disconnect()
        return False

    async def aclose(self) -> None:
        """Close the pool and the connections to the sentinels."""
        try:
            await super().aclose()
        finally:
            await self.sentinel_manager.aclose()
