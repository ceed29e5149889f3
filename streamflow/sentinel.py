"""Redis Sentinel: ``redis+sentinel://`` URLs and clients that follow the master on failover.

The URL names the sentinels, not a Redis server::

    redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/SERVICE[?PARAMS]

* ``user`` and ``password`` are the credentials of the Redis servers (master and replicas);
* each ``host[:port]`` is a sentinel (port 26379 when omitted); one that answers is enough;
* ``SERVICE`` is the master's name in the sentinels' configuration (``sentinel monitor NAME``);
* ``PARAMS``: ``db=N`` (the database, 0 by default), and ``sentinel_username`` and
  ``sentinel_password`` for sentinels that require authentication themselves. Nothing else is
  accepted: a misspelt parameter is an error, not silence.

Percent-encode ``@`` in a ``sentinel_password`` (``%40``); the userinfo password may hold any
character. The client asks the sentinels for the master's address whenever it opens a
connection, so after a failover its loops reconnect to the promoted replica by themselves.
TLS is not supported with Sentinel yet.

This module only parses and builds; :func:`streamflow.streams.connect` dispatches to it and adds
the (password-free) URL to its errors.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import unquote

import anyio
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from streamflow.connection import SafeWrites, split_credentials
from streamflow.errors import ConfigError

__all__ = ["DEFAULT_PORT", "SCHEME", "SentinelURL", "connect", "parse_url"]

#: The URL scheme.
SCHEME = "redis+sentinel"
#: The sentinels' port when a host has none (Sentinel's well-known port).
DEFAULT_PORT = 26379
#: Seconds to wait for a sentinel (connect or reply) before asking the next one. Sentinels
#: answer in microseconds; a longer wait only delays finding the new master after a failover.
SENTINEL_TIMEOUT = 2.0

#: How often a pool in use asks the sentinels whether the master moved. Connections stay open
#: to whatever server they were opened to: without this check they would keep writing to a
#: master that a planned failover (``SENTINEL FAILOVER``) or a partition left behind, until
#: the sentinels reconfigure it (about 10 s later), and those writes are then lost.
MASTER_CHECK_INTERVAL = 1.0

logger = logging.getLogger(__name__)

_PARAMS = frozenset({"db", "sentinel_username", "sentinel_password"})
_SERVICE = re.compile(r"[^\s/?#,@]+")


@dataclass(frozen=True, slots=True)
class SentinelURL:
    """A parsed ``redis+sentinel://`` URL (its passwords are left out of ``repr``).

    Attributes:
        sentinels: The sentinels as (host, port) pairs, in the URL's order.
        service: The master's service name.
        db: The database number.
        username: The Redis servers' ACL user, if any.
        password: The Redis servers' password, if any.
        sentinel_username: The sentinels' ACL user, if any.
        sentinel_password: The sentinels' password, if any.
    """

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)


def parse_url(url: str) -> SentinelURL:
    """Parse a ``redis+sentinel://`` URL.

    Raises:
        ConfigError: The URL does not have the form above. The message says why without
            quoting the URL (it may hold passwords); callers add the redacted URL.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme != SCHEME:
        raise ConfigError(f"not a {SCHEME}:// URL")
    username, password, tail = split_credentials(rest)
    if "#" in tail:
        raise ConfigError(f"a {SCHEME}:// URL takes no #fragment")
    location, _, query = tail.partition("?")
    hosts, slash, path = location.partition("/")
    if "@" in query:
        raise ConfigError("percent-encode '@' in URL parameters as %40")
    if not slash or not path:
        raise ConfigError(
            f"{SCHEME}:// needs the master's service name after the sentinels: "
            f"{SCHEME}://host:port[,host:port...]/SERVICE"
        )
    service = unquote(path)
    if not _SERVICE.fullmatch(service):
        raise ConfigError(
            f"bad service name {path!r}: one word without '/' or spaces "
            "(give the database as ?db=N)"
        )
    params = _parse_query(query)
    return SentinelURL(
        sentinels=_parse_hosts(hosts),
        service=service,
        db=_parse_db(params.get("db", "0")),
        username=username,
        password=password,
        sentinel_username=params.get("sentinel_username") or None,
        sentinel_password=params.get("sentinel_password"),
    )


def _parse_hosts(hosts: str) -> tuple[tuple[str, int], ...]:
    found: list[tuple[str, int]] = []
    for item in hosts.split(","):
        seed = item.strip()
        if seed.startswith("["):  # [IPv6] or [IPv6]:port
            host, bracket, after = seed[1:].partition("]")
            port = after.removeprefix(":") if after else str(DEFAULT_PORT)
            valid = bool(bracket) and (not after or after.startswith(":"))
        else:
            host, colon, port = seed.partition(":")
            port = port if colon else str(DEFAULT_PORT)
            valid = ":" not in port  # a bare IPv6 address needs [brackets]
        if not valid or not host:
            raise ConfigError(f"each sentinel must be host[:port], got {seed!r}")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"bad port in sentinel {seed!r}")
        found.append((host, int(port)))
    return tuple(found)


def _parse_query(query: str) -> dict[str, str]:
    params: dict[str, str] = {}
    for part in query.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        name = unquote(name).strip().lower()
        if name not in _PARAMS:
            raise ConfigError(
                f"unknown parameter {name!r} in a {SCHEME}:// URL; known: "
                + ", ".join(sorted(_PARAMS))
            )
        if name in params:
            raise ConfigError(f"parameter {name!r} given twice")
        params[name] = unquote(value)
    return params


def _parse_db(value: str) -> int:
    if not value.isdigit():
        raise ConfigError("db must be a database number (?db=0)")
    return int(value)


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


class _Connection(SafeWrites, SentinelManagedConnection):
    """A master connection that turns "this is not the master any more" into an outage.

    The connection is closed and a connection error raised: streamflow's loops treat it like
    any outage (back off, reconnect), and the next connection asks the sentinels again.
    """

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
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


class _Sentinel(Sentinel):
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
        async with self._asking:
            return await super().discover_master(service_name)


class _SentinelPool(SentinelConnectionPool, BlockingConnectionPool):
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
        # A connection opened to a former master goes no further: whichever check found the
        # move (ours, or a new connection asking the sentinels), busy connections come back
        # here, and redis-py's asyncio pool would otherwise reuse them as they are.
        master = self.master_address
        if master is not None and (connection.host, connection.port) != tuple(master):
            await connection.disconnect()
        await super().release(connection)

    async def aclose(self) -> None:
        try:
            await super().aclose()
        finally:
            await self.sentinel_manager.aclose()


def connect(
    url: str,
    *,
    socket_timeout: float | None = 10.0,
    name: str | None = None,
    max_connections: int = 64,
) -> Redis:
    """A client of the master named by a ``redis+sentinel://`` URL, with retries turned off.

    Each new connection asks the sentinels (the first that answers) where the master is. When
    the master dies, commands fail with connection errors until the sentinels have promoted a
    replica (redis-py's ``MasterNotFoundError`` meanwhile); a connection still open to a
    demoted master turns its ``READONLY`` error into a connection error and disconnects. So
    streamflow's loops see the failover as an outage, back off and reconnect to the new master.
    Nothing is retried by the client itself (a retried XADD would publish twice).

    Args:
        url: The URL (see the module docstring).
        socket_timeout: Seconds to wait for the master's reply; must exceed any BLOCK time.
        name: A client name shown by ``CLIENT LIST`` on the master.
        max_connections: The pool's size; waiting for a free connection times out after 20 s.

    Raises:
        ConfigError: The URL is invalid.
    """
    parsed = parse_url(url)
    no_retry = Retry(NoBackoff(), 0)
    asking = SENTINEL_TIMEOUT if socket_timeout is None else min(socket_timeout, SENTINEL_TIMEOUT)
    sentinel_kwargs: dict[str, Any] = {
        # One connection per sentinel (the manager asks one call at a time anyway), held by
        # its client and closed with it.
        "single_connection_client": True,
        "socket_timeout": asking,
        "socket_connect_timeout": asking,
        "retry": no_retry,
        "username": parsed.sentinel_username,
        "password": parsed.sentinel_password,
    }
    manager = _Sentinel(
        list(parsed.sentinels),
        sentinel_kwargs=sentinel_kwargs,
        username=parsed.username,
        password=parsed.password,
        db=parsed.db,
        socket_timeout=socket_timeout,
        socket_connect_timeout=5.0,
        retry=no_retry,
        client_name=name,
        health_check_interval=30,
    )
    client = manager.master_for(
        parsed.service,
        connection_pool_class=_SentinelPool,
        connection_class=_Connection,
        max_connections=max_connections,
        timeout=20,
    )
    return cast(Redis, client)
