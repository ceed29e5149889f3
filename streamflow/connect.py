"""Reaching Redis: URLs, TLS, cluster and Sentinel clients, ping, and which errors are outages.

The one module that builds Redis clients (the CLI, :class:`~streamflow.Client` and
:class:`~streamflow.SyncClient` all go through :func:`connect` or :func:`connect_sync`) and
that says which Redis failures are outages (:data:`TRANSIENT_ERRORS`, :func:`is_outage`,
:class:`Backoff`, :func:`retry_outages`), as arq's ``connections.py`` does.

Its connection classes fail only in ways streamflow can classify. Writes fail with a
connection error, never anything else, and a refusal that redis-py has no class for but that
is an outage (``MISCONF``, ``BUSY``, ``NOREPLICAS``, ``UNBLOCKED``) is raised as
:class:`Refused`, so that catching :data:`TRANSIENT_ERRORS` catches it. redis-py 8.1's asyncio
connections can leak ``AttributeError`` (``'NoneType' object has no attribute 'writelines'``)
or ``TypeError`` from a write when the transport was torn down under it: a peer reset of an
idle pooled connection (redis-py issue #4287), or, on a cluster, the client disconnecting
every node's connections after one failed while other tasks were still connecting or
writing. Neither is a ``RedisError``, so they escaped every loop's outage handling and
stopped workers during a cluster failover. These classes turn them into ``ConnectionError``:
the command was not sent completely, the caller reconnects and goes on. Only the write path
is wrapped: arguments are encoded before it, so a bad argument still raises its own error.

Redis Sentinel (``redis+sentinel://``) URLs name the sentinels, not a Redis server::

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

Why one module of this size: the Sentinel glue needs the safe connection mix-in and the
credential parsing, and :func:`connect` dispatches to it; split in two, they would import
each other.
"""

from __future__ import annotations

import logging
import os
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypedDict, TypeVar, cast
from urllib.parse import unquote, urlsplit

import anyio
import redis as redis_sync
import redis.exceptions
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection
from redis.backoff import NoBackoff
from redis.cluster import PRIMARY
from redis.exceptions import (
    AskError,
    AuthenticationError,
    AuthorizationError,
    ClusterDownError,
    ClusterError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry as SyncRetry

from streamflow.errors import ConfigError, RedisCommandError, RedisUnavailable, StreamflowError

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

#: The scheme of a Redis Sentinel URL (see the module docstring).
SENTINEL_SCHEME = "redis+sentinel"
#: The sentinels' port when a host has none (Sentinel's well-known port).
SENTINEL_PORT = 26379
#: Seconds to wait for a sentinel (connect or reply) before asking the next one. Sentinels
#: answer in microseconds; a longer wait only delays finding the new master after a failover.
SENTINEL_TIMEOUT = 2.0

#: How often a pool in use asks the sentinels whether the master moved. Connections stay open
#: to whatever server they were opened to: without this check they would keep writing to a
#: master that a planned failover (``SENTINEL FAILOVER``) or a partition left behind, until
#: the sentinels reconfigure it (about 10 s later), and those writes are then lost.
MASTER_CHECK_INTERVAL = 1.0


_SENTINEL_PARAMS = frozenset({"db", "sentinel_username", "sentinel_password"})
_SERVICE = re.compile(r"[^\s/?#,@]+")

#: Error codes of refusals that are the server's state, not the command's fault, and that
#: redis-py raises as a plain ``ResponseError``: persistence failing (``MISCONF``), a script
#: or module command running too long (``BUSY``), too few replicas for ``min-replicas-to-write``
#: (``NOREPLICAS``), a blocked read released because its key moved or vanished (``UNBLOCKED``).
REFUSAL_CODES = frozenset({"MISCONF", "BUSY", "NOREPLICAS", "UNBLOCKED"})


class Refused(ResponseError):
    """Redis refused a command because of its own state (one of :data:`REFUSAL_CODES`).

    Its text is the server's, code included, so tests on the text still hold.
    """


def error_code(exc: ResponseError) -> str:
    """The error code of a refusal (``OOM``, ``NOGROUP``, ...), or "" when it has none.

    redis-py 8.2 strips the code of the refusals it has a class for from the text and keeps
    it in ``status_code``; others keep it as the text's first word.
    """
    code = getattr(exc, "status_code", None)
    if isinstance(code, str) and code:
        return code
    first = str(exc).split(" ", 1)[0]
    return first if first.isupper() else ""


class SafeWrites(AbstractConnection):
    """Mix-in for a redis-py asyncio connection class (put it first in the bases)."""

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        """Send a packed command; a write on a torn-down transport raises ConnectionError."""
        try:
            await super().send_packed_command(command, check_health)
        except (AttributeError, TypeError) as exc:
            await self.disconnect(nowait=True)
            raise RedisConnectionError(
                f"connection to {self._host_error()} lost while writing "
                f"({type(exc).__name__}: {exc})"
            ) from exc

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        """Read a reply; an outage refusal without a redis-py class is raised as Refused."""
        try:
            return await super().read_response(*args, **kwargs)
        except ResponseError as exc:
            if type(exc) is ResponseError and error_code(exc) in REFUSAL_CODES:
                raise Refused(*exc.args, status_code=error_code(exc)) from exc
            raise


class SafeConnection(SafeWrites, Connection):
    """A TCP connection (``redis://``)."""


class SafeSSLConnection(SafeWrites, SSLConnection):
    """A TLS connection (``rediss://``)."""


class SafeUnixDomainSocketConnection(SafeWrites, UnixDomainSocketConnection):
    """A Unix socket connection (``unix://``)."""


_SAFE: dict[type[Any], type[Any]] = {
    Connection: SafeConnection,
    SSLConnection: SafeSSLConnection,
    UnixDomainSocketConnection: SafeUnixDomainSocketConnection,
}


def split_credentials(rest: str) -> tuple[str | None, str | None, str]:
    """(user, password, what follows ``@``) of a URL after its ``scheme://``.

    The last ``@`` ends the credentials, so a password may hold ``@`` unencoded; both are
    percent-decoded and None when absent or empty.
    """
    userinfo, at, tail = rest.rpartition("@")
    if not at:
        return None, None, rest
    user, colon, secret = userinfo.partition(":")
    return unquote(user) or None, unquote(secret) if colon else None, tail


def safe(connection_class: type[Any]) -> type[Any]:
    """The safe twin of one of redis-py's connection classes (others are returned as is)."""
    return _SAFE.get(connection_class, connection_class)


URL_SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster", SENTINEL_SCHEME)
#: The scheme of a Redis Cluster URL: ``redis+cluster://[user:password@]host:port[,host:port]``.
CLUSTER_SCHEME = "redis+cluster"
#: The same over TLS (every node, ``tls-cluster yes``).
CLUSTER_TLS_SCHEME = "rediss+cluster"
#: The schemes whose connections are TLS.
TLS_SCHEMES = ("rediss", CLUSTER_TLS_SCHEME)
# redis-py 8.2 raises RedisClusterUnreachableError from a cluster command when no node answers
# (a connection error is its cause); earlier versions have no such class (see _Cluster), and
# ClusterDownError, listed anyway, stands in for it.
_UNREACHABLE: type[Exception] = getattr(
    redis.exceptions, "RedisClusterUnreachableError", ClusterDownError
)
#: The outage classifier, part 1: errors after which a command may or may not have run, and
#: refusals that are not the caller's fault. Callers back off, reconnect and retry, exactly as
#: for a dropped connection; :func:`is_outage` is the whole rule (use it where an error is not
#: caught by class). Besides connection errors and timeouts (``LOADING``, a password refused
#: and ``max number of clients`` are connection errors in redis-py):
#:
#: * Redis refusing writes: ``OOM`` (``maxmemory`` reached with ``noeviction``), ``READONLY``
#:   (a replica, e.g. a demoted master), and, as :class:`Refused`,
#:   ``MISCONF`` (persistence failing), ``BUSY`` (a script running too long) and
#:   ``NOREPLICAS`` (``min-replicas-to-write`` unmet);
#: * a blocked read released with ``UNBLOCKED`` (its key moved to another cluster node or was
#:   deleted: the retry finds it, or finds no group and recreates it);
#: * on a cluster: ``CLUSTERDOWN`` and ``MASTERDOWN``, ``TRYAGAIN`` (a slot being migrated),
#:   ``MOVED``/``ASK`` that escaped redis-py's redirection, ``ClusterError`` ("TTL exhausted":
#:   redirections that did not settle) and no node, or no agreeing slot map, answering.
TRANSIENT_ERRORS = (
    RedisConnectionError,
    RedisTimeoutError,
    ConnectionError,
    OSError,
    ClusterError,
    TryAgainError,
    AskError,
    SlotNotCoveredError,
    OutOfMemoryError,
    ReadOnlyError,
    Refused,
    _UNREACHABLE,
)
#: The same refusals by their error code (the reply's first word), for errors that did not
#: pass through streamflow's connection classes (the synchronous client, a transaction's
#: queued replies).
OUTAGE_CODES = frozenset(
    {
        *REFUSAL_CODES,
        "OOM",
        "READONLY",
        "LOADING",
        "MASTERDOWN",
        "CLUSTERDOWN",
        "TRYAGAIN",
        "MOVED",
        "ASK",
    }
)


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` is an outage: back off and retry, never crash, never blame the caller.

    The one classification every Redis loop, start-up step and public method uses (see
    :data:`TRANSIENT_ERRORS`). ``NOGROUP`` is not an outage but a lost group
    (:func:`is_group_lost`); ``NOPERM``, ``WRONGTYPE``, ``CROSSSLOT`` and script errors are the
    caller's, and stay errors.
    """
    if isinstance(exc, TRANSIENT_ERRORS):
        return True
    if isinstance(exc, ResponseError):
        return error_code(exc) in OUTAGE_CODES
    if isinstance(exc, RedisClusterException):
        # Raised when refreshing the slot map: no node answered, or their maps disagree or
        # leave slots uncovered (mid-resharding, mid-failover).
        return isinstance(exc.__cause__, TRANSIENT_ERRORS) or str(exc).startswith(_REFRESH_FAILURES)
    return False


@contextmanager
def public_errors(what: str) -> Iterator[None]:
    """Raise a Redis failure inside the block as a documented :class:`StreamflowError`.

    What the public API (``Client``, ``SyncClient``, the CLI) promises: an outage becomes
    :class:`RedisUnavailable` (a write may or may not have happened), any other refusal
    :class:`RedisCommandError`; the original error is kept as the cause.
    """
    try:
        yield
    except StreamflowError:
        raise
    except Exception as exc:
        if is_outage(exc):
            raise RedisUnavailable(f"{what} failed: {describe(exc)}") from exc
        if isinstance(exc, RedisError | RedisClusterException):
            raise RedisCommandError(f"{what} failed: Redis refused: {describe(exc)}") from exc
        raise


_REFRESH_FAILURES = (
    "Redis Cluster cannot be connected",
    "startup_nodes could not agree",
    "All slots are not covered",
)


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, safe to log.

    Plain string splitting, not ``urlsplit``: a password holding ``/``, ``#`` or ``?`` (often
    pasted without percent-encoding) makes ``urlsplit`` misread the host and miss it. The
    userinfo password and the ``password``/``sentinel_password`` parameters are found
    independently and every character either method calls secret is masked: a stray ``@`` in
    one of them may mask more than needed, never less.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    spans: list[tuple[int, int]] = []
    userinfo, at, _ = rest.rpartition("@")
    if at and ":" in userinfo:
        spans.append((userinfo.index(":") + 1, len(userinfo)))
    spans += [match.span(2) for match in _PASSWORD_PARAM.finditer(rest)]
    masked, end = [], 0
    for start, stop in sorted(spans):
        if start < end:  # overlaps the previous span: extend it
            end = max(end, stop)
            continue
        masked += [rest[end:start], "***"]
        end = stop
    return f"{scheme}{sep}{''.join(masked)}{rest[end:]}"


_PASSWORD_PARAM = re.compile(r"([?&](?:sentinel_)?password=)([^&#]*)", re.IGNORECASE)


def validate_url(url: str) -> str:
    """Return ``url`` if it is a Redis URL streamflow accepts, else raise :class:`ConfigError`."""
    if url.startswith(f"{SENTINEL_SCHEME}://"):
        try:
            parse_sentinel_url(url)
        except ConfigError as exc:
            raise ConfigError(f"invalid Redis URL {redact_url(url)!r}: {exc}") from None
        return url
    parts = urlsplit(url)
    if parts.scheme not in URL_SCHEMES:
        raise ConfigError(
            f"invalid Redis URL {redact_url(url)!r}: the scheme must be one of "
            + ", ".join(f"{s}://" for s in URL_SCHEMES)
        )
    if parts.scheme in (CLUSTER_SCHEME, CLUSTER_TLS_SCHEME):
        cluster_nodes(url)
        return url
    if parts.scheme == "unix" and not parts.path:
        raise ConfigError(f"invalid Redis URL {redact_url(url)!r}: unix:// needs a socket path")
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigError(f"invalid Redis URL {redact_url(url)!r}: no host")
    try:
        parts.port  # noqa: B018 - urlsplit checks the port lazily
    except ValueError:
        raise ConfigError(f"invalid Redis URL {redact_url(url)!r}: bad port") from None
    return url


def cluster_nodes(url: str) -> list[tuple[str, int]]:
    """The seed nodes of a ``redis+cluster://`` URL as (host, port) pairs.

    Several seeds are separated by commas (``host:port,host:port``); one reachable seed is
    enough for redis-py to discover the rest of the cluster. A port is required: a cluster's
    nodes rarely all listen on 6379, and a guessed port would only fail later.

    Raises:
        ConfigError: No seed, a seed without host or with a missing or bad port, or URL
            parameters or a path (not supported for a cluster yet).
    """
    shown = redact_url(url)
    rest = url.partition("://")[2]
    hosts = rest.rpartition("@")[2]
    if any(char in hosts for char in "/?#"):
        raise ConfigError(f"invalid Redis URL {shown!r}: a cluster URL takes no path or parameters")
    seeds: list[tuple[str, int]] = []
    for seed in hosts.split(","):
        host, colon, port = seed.strip().rpartition(":")
        host = host.strip("[]")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(
                f"invalid Redis URL {shown!r}: each cluster node must be host:port, "
                f"got {seed.strip()!r}"
            )
        seeds.append((host, int(port)))
    return seeds


#: A TLS file: a path given as text or a path object.
TLSPath = str | os.PathLike[str]


class TLSFiles(TypedDict, total=False):
    """The TLS files of a ``rediss://`` connection, as keyword arguments of :func:`connect`."""

    tls_ca_file: TLSPath | None
    tls_cert_file: TLSPath | None
    tls_key_file: TLSPath | None


def check_tls_file(path: TLSPath, what: str) -> None:
    """Raise :class:`ConfigError` unless ``path`` is a readable file (its content is not read)."""
    shown = os.fspath(path)
    if not os.path.exists(shown):
        raise ConfigError(f"{what} {shown!r} does not exist")
    if not os.path.isfile(shown):
        raise ConfigError(f"{what} {shown!r} is not a file")
    if not os.access(shown, os.R_OK):
        raise ConfigError(f"{what} {shown!r} is not readable")


def tls_arguments(
    url: str,
    *,
    tls_ca_file: TLSPath | None = None,
    tls_cert_file: TLSPath | None = None,
    tls_key_file: TLSPath | None = None,
) -> dict[str, Any]:
    """redis-py's ``ssl_*`` arguments for ``url`` and the TLS files (empty unless ``rediss://``).

    Certificates are always verified (``ssl_cert_reqs="required"``), and so is the host name:
    a host given as an IP address must be among the certificate's IP subject alternative names.
    An encrypted key is refused with a clear error instead of OpenSSL prompting on the terminal.

    Raises:
        ConfigError: TLS files with a URL that is not ``rediss://``, a key without its
            certificate, a file that is missing or unreadable, or ``ssl_*`` URL parameters
            (redis-py would take them, ``ssl_cert_reqs=none`` included).
    """
    query = urlsplit(url).query
    if any(name.strip().lower().startswith("ssl") for name, _, _ in _params(query)):
        # redis-py would take them, and ssl_cert_reqs=none would turn verification off.
        raise ConfigError(
            f"invalid Redis URL {redact_url(url)!r}: give TLS settings as options, "
            "not ssl_* URL parameters"
        )
    given = {
        "TLS CA file": tls_ca_file,
        "TLS certificate file": tls_cert_file,
        "TLS key file": tls_key_file,
    }
    if urlsplit(url).scheme not in TLS_SCHEMES:
        if any(path is not None for path in given.values()):
            raise ConfigError(
                "TLS files need a rediss:// or rediss+cluster:// URL, not "
                f"{redact_url(url).partition(':')[0]}://"
            )
        return {}
    if tls_key_file is not None and tls_cert_file is None:
        raise ConfigError("a TLS key file needs its certificate file (--tls-cert-file)")
    for what, path in given.items():
        if path is not None:
            check_tls_file(path, what)
    return {
        "ssl_cert_reqs": "required",
        "ssl_check_hostname": True,
        "ssl_ca_certs": _fspath(tls_ca_file),
        "ssl_certfile": _fspath(tls_cert_file),
        "ssl_keyfile": _fspath(tls_key_file),
        "ssl_password": _refuse_passphrase,
    }


def _params(query: str) -> list[tuple[str, str, str]]:
    return [part.partition("=") for part in query.split("&") if part]


def _fspath(path: TLSPath | None) -> str | None:
    return None if path is None else os.fspath(path)


def _refuse_passphrase() -> str:
    """OpenSSL asks for a key's passphrase with this: refuse rather than prompt on a terminal."""
    raise ssl.SSLError("the TLS key file is encrypted; give an unencrypted key")


def connect(
    url: str,
    *,
    socket_timeout: float | None = 10.0,
    name: str | None = None,
    max_connections: int = 64,
    tls_ca_file: TLSPath | None = None,
    tls_cert_file: TLSPath | None = None,
    tls_key_file: TLSPath | None = None,
) -> Redis:
    """Create an asyncio Redis client for ``url`` with client-side retries turned off.

    redis-py would otherwise retry any command whose reply was lost, including ones that already
    ran (a retried XADD publishes twice). streamflow decides per command instead: its loops
    reconnect and carry on, and publishing reports the failure.

    The pool blocks (up to 20 s) when all ``max_connections`` are busy instead of failing: a
    burst of settling writes (hundreds of handlers released at shutdown) waits its turn.

    Args:
        url: A ``redis://``, ``rediss://`` or ``unix://`` URL, with optional user and password,
            or ``redis+cluster://host:port[,host:port...]`` (``rediss+cluster://`` over TLS)
            for a Redis Cluster (see :func:`cluster_nodes`), which gives redis-py's
            ``RedisCluster``. Or
            ``redis+sentinel://host:port[,host:port...]/SERVICE`` for the master of a
            Sentinel-monitored group (see the module docstring), followed through
            failovers.
        socket_timeout: Seconds to wait for a reply; must exceed any BLOCK time used.
        name: A client name shown by ``CLIENT LIST``.
        max_connections: The pool's size; each blocking reader holds one connection.
        tls_ca_file: ``rediss://`` and ``rediss+cluster://`` only: the CA certificates (PEM)
            that signed the server's certificate; the system's CAs when omitted. The server
            certificate and its host name are always verified.
        tls_cert_file: ``rediss://`` and ``rediss+cluster://`` only: the client certificate
            (PEM), for servers that require one (``tls-auth-clients yes``); it may hold the
            key too.
        tls_key_file: The client certificate's private key (PEM, unencrypted).

    Raises:
        ConfigError: The URL is invalid, or the TLS files do not fit it (see
            :func:`tls_arguments`; TLS files with a Sentinel URL are refused for now).
    """
    validate_url(url)
    if urlsplit(url).scheme in (CLUSTER_SCHEME, CLUSTER_TLS_SCHEME):
        tls = tls_arguments(
            url, tls_ca_file=tls_ca_file, tls_cert_file=tls_cert_file, tls_key_file=tls_key_file
        )
        return _connect_cluster(
            url,
            socket_timeout=socket_timeout,
            name=name,
            max_connections=max_connections,
            tls=tls,
        )
    if url.startswith(f"{SENTINEL_SCHEME}://"):
        if any(path is not None for path in (tls_ca_file, tls_cert_file, tls_key_file)):
            raise ConfigError("TLS is not supported with redis+sentinel:// yet")
        return _connect_sentinel(
            url, socket_timeout=socket_timeout, name=name, max_connections=max_connections
        )
    tls = tls_arguments(
        url, tls_ca_file=tls_ca_file, tls_cert_file=tls_cert_file, tls_key_file=tls_key_file
    )
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=20,
        socket_timeout=socket_timeout,
        socket_connect_timeout=5.0,
        retry=Retry(NoBackoff(), 0),
        client_name=name,
        health_check_interval=30,
        **tls,
    )
    pool.connection_class = safe(pool.connection_class)
    return Redis.from_pool(pool)  # the client owns the pool: aclose() closes its connections


def connect_sync(
    url: str,
    *,
    tls_ca_file: TLSPath | None = None,
    tls_cert_file: TLSPath | None = None,
    tls_key_file: TLSPath | None = None,
) -> redis_sync.Redis:
    """A synchronous client for ``url`` (single node only), with client-side retries off.

    For :class:`~streamflow.SyncClient`; the TLS files are checked as for :func:`connect`.

    Raises:
        ConfigError: The URL is invalid, names a cluster or Sentinel (not supported by the
            synchronous client yet), or the TLS files do not fit it.
    """
    validate_url(url)
    for scheme in (CLUSTER_SCHEME, CLUSTER_TLS_SCHEME, SENTINEL_SCHEME):
        if url.startswith(f"{scheme}://"):
            raise ConfigError(f"SyncClient does not support {scheme}:// yet; use Client")
    tls = tls_arguments(
        url, tls_ca_file=tls_ca_file, tls_cert_file=tls_cert_file, tls_key_file=tls_key_file
    )
    return redis_sync.Redis.from_url(
        url,
        socket_timeout=10.0,
        socket_connect_timeout=5.0,
        retry=SyncRetry(NoBackoff(), 0),
        **tls,
    )


def _connect_cluster(
    url: str,
    *,
    socket_timeout: float | None,
    name: str | None,
    max_connections: int,
    tls: dict[str, Any],
) -> Redis:
    """A :class:`RedisCluster` client for a ``redis+cluster://`` URL, with no retries.

    ``retry=Retry(NoBackoff(), 0)`` turns off the cluster client's own loop, which would
    otherwise re-send a command after a connection or timeout error (10 times by default),
    exactly the double XADD the single-node client avoids; its node connections get no retry
    object and so do not retry either. MOVED and ASK redirects are still followed: Redis
    refused the command there, so sending it to the right node cannot run it twice.

    redis-py's cluster pool does not block: past ``max_connections`` per node a command fails
    at once (``MaxConnectionsError``) instead of waiting its turn.

    The client is typed as :class:`Redis`: it offers the same commands with the same
    signatures for everything streamflow sends (single-slot keys, scripts, non-transactional
    pipelines), which keeps the modules above this one free of a client union.

    Over TLS (``rediss+cluster://``) every node's certificate and host name are verified as
    for ``rediss://``. redis-py's cluster client takes no passphrase callback, so an encrypted
    key is refused here, before OpenSSL could prompt for it on a terminal.
    """
    if tls:
        tls = dict(tls, ssl=True)
        del tls["ssl_password"]
        if tls.get("ssl_keyfile") or tls.get("ssl_certfile"):
            _refuse_encrypted_key(tls.get("ssl_keyfile") or tls["ssl_certfile"])
    username, password, _ = split_credentials(url.partition("://")[2])
    cluster = _Cluster(
        startup_nodes=[ClusterNode(host, port) for host, port in cluster_nodes(url)],
        username=username,
        password=password,
        retry=Retry(NoBackoff(), 0),
        socket_timeout=socket_timeout,
        socket_connect_timeout=5.0,
        client_name=name,
        health_check_interval=30,
        max_connections=max_connections,
        **tls,
    )
    # Every node, known now or discovered later, gets connections whose writes fail as
    # connection errors (see the module docstring): redis-py takes no connection class here.
    cluster.connection_kwargs["connection_class"] = safe(
        cluster.connection_kwargs["connection_class"]
    )
    for node in cluster.nodes_manager.startup_nodes.values():
        node.connection_class = cluster.connection_kwargs["connection_class"]
    return cast(Redis, cluster)


class _Cluster(RedisCluster):
    """redis-py's cluster client, whose failure to reach any node is a connection error.

    After a connection error the client reloads the slot map before its next command; when no
    node answers it raises ``RedisClusterException("Redis Cluster cannot be connected")``,
    which is not a ``ConnectionError`` and would stop every loop instead of backing off; the
    same for nodes whose slot maps disagree or leave slots uncovered (mid-resharding or
    failover). Other ``RedisClusterException``s (keys in different slots, ...) stay errors.
    """

    def get_node(
        self, host: str | None = None, port: int | None = None, node_name: str | None = None
    ) -> ClusterNode | None:
        """The node at ``host:port``, added to the client's nodes if it is new to it.

        redis-py 8.2 follows an ``ASK`` redirection with ``get_node(host, port)`` and fails with
        ``AttributeError`` when that node is not in its cache yet: the first slot moved to a
        master just added (``redis-cli --cluster add-node`` then ``rebalance``) did so, under
        every command of that slot. A ``MOVED`` to a new node already adds it this way.
        """
        node = super().get_node(host, port, node_name)
        if node is None and host and port:
            node = ClusterNode(host, port, PRIMARY, **self.nodes_manager.connection_kwargs)
            self.nodes_manager.set_nodes(self.nodes_manager.nodes_cache, {node.name: node})
        return node

    async def initialize(self, *args: Any, **kwargs: Any) -> RedisCluster:
        try:
            return await super().initialize(*args, **kwargs)
        except RedisClusterException as exc:
            if not is_outage(exc):
                raise
            raise RedisConnectionError(f"no cluster node answers: {exc.__cause__ or exc}") from exc


def _refuse_encrypted_key(path: str) -> None:
    """Raise :class:`ConfigError` if the PEM file holds an encrypted private key."""
    with open(path, "rb") as pem:
        text = pem.read(1 << 20)
    if b"ENCRYPTED PRIVATE KEY" in text or b"Proc-Type: 4,ENCRYPTED" in text:
        raise ConfigError(f"the TLS key file {path!r} is encrypted; give an unencrypted key")


async def ping(redis: Redis, url: str = "") -> None:
    """Check that Redis answers, raising :class:`RedisUnavailable` with a one-line reason.

    A failed TLS handshake is named as such, with OpenSSL's reason (e.g. ``certificate verify
    failed: unable to get local issuer certificate``).
    """
    try:
        await redis.ping()
    except Exception as exc:
        if not (is_outage(exc) or isinstance(exc, ResponseError)):
            raise
        raise RedisUnavailable(_unavailable(redis, url, exc)) from None


async def wait_until_up(
    redis: Redis, url: str = "", *, stopping: Callable[[], bool] | None = None
) -> bool:
    """Ping until Redis answers; False if ``stopping`` said to give up first.

    For start-up: Redis down, restarting, loading its data or failing over is an outage,
    logged once and retried with backoff (a deploy may start workers before Redis). What
    waiting cannot cure is raised at once.

    Raises:
        RedisUnavailable: Authentication or the TLS handshake failed, or Redis refused PING.
    """

    async def attempt() -> bool:
        try:
            await redis.ping()
        except Exception as exc:
            if is_outage(exc) and not _incurable(redis, exc):
                raise
            if not (is_outage(exc) or isinstance(exc, ResponseError)):
                raise
            raise RedisUnavailable(_unavailable(redis, url, exc)) from None
        return True

    where = f" at {redact_url(url)}" if url else ""
    return bool(await retry_outages(attempt, f"connecting to Redis{where}", stopping=stopping))


def _incurable(redis: Redis, exc: BaseException) -> bool:
    """Whether a failure to connect is one that waiting will not cure (credentials, TLS)."""
    auth = (AuthenticationError, AuthorizationError)
    return any(isinstance(c, auth) for c in _chain(exc)) or _tls_failure(redis, exc) is not None


def _unavailable(redis: Redis, url: str, exc: BaseException) -> str:
    """The one-line reason of a failed PING."""
    where = f" at {redact_url(url)}" if url else ""
    if isinstance(exc, ResponseError) and not is_outage(exc):
        return f"Redis{where} refused the connection: {_one_line(exc)}"
    return _tls_failure(redis, exc) or f"cannot connect to Redis{where}: {_one_line(exc)}"


def _tls_failure(redis: Redis, exc: BaseException) -> str | None:
    """A one-line reason if ``exc`` came from TLS (redis-py wraps the SSL error), else None."""
    if is_cluster(redis):
        # Before the first successful command there is no default node, only the seeds.
        seeds = redis.nodes_manager.startup_nodes.values()  # type: ignore[attr-defined]
        node = redis.get_default_node() or next(iter(seeds))  # type: ignore[attr-defined]
        kwargs = node.connection_kwargs
        where = f"{node.host}:{node.port}"
    else:
        kwargs = redis.connection_pool.connection_kwargs
        where = f"{kwargs.get('host', '?')}:{kwargs.get('port', 6379)}"
    if "ssl_cert_reqs" not in kwargs:
        return None
    # TLS 1.3 servers check the client certificate after the handshake, then alert or hang up.
    hint = (
        " (does the server require a client certificate? give --tls-cert-file and --tls-key-file)"
        if kwargs.get("ssl_certfile") is None
        else ""
    )
    for cause in _chain(exc):
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"TLS handshake with {where} failed: certificate verify failed: " + str(
                cause.verify_message
            )
        if isinstance(cause, ssl.SSLError):
            return f"TLS handshake with {where} failed: {_ssl_reason(cause)}{hint}"
    if hint and any(isinstance(c, ConnectionResetError | BrokenPipeError) for c in _chain(exc)):
        return f"TLS connection to {where} closed by the server: {_one_line(exc)}{hint}"
    return None


def _chain(exc: BaseException) -> Iterable[BaseException]:
    cause: BaseException | None = exc
    while cause is not None:
        yield cause
        cause = cause.__cause__ or cause.__context__


def _ssl_reason(err: ssl.SSLError) -> str:
    # ssl.SSLError's str() of a one-argument error is the tuple; its text is the last string.
    texts = [arg for arg in err.args if isinstance(arg, str)]
    text = texts[-1] if texts else type(err).__name__
    return re.sub(r"\s*\(_ssl\.c:\d+\)$", "", text.strip())


def describe(exc: BaseException) -> str:
    """One line for a log or an error message: a refusal keeps its code (``OOM ...``).

    redis-py strips the code from the text of the refusals it has a class for.
    """
    text = _one_line(exc)
    if isinstance(exc, ResponseError):
        code = error_code(exc)
        if code and not text.startswith(code):
            return f"{code} {text}"
    return text


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def is_cluster_url(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster (``redis+cluster://`` or ``rediss+cluster://``)."""
    return url.partition("://")[0] in (CLUSTER_SCHEME, CLUSTER_TLS_SCHEME)


def is_cluster(redis: Redis) -> bool:
    """Whether ``redis`` is a Redis Cluster client (from a ``redis+cluster://`` URL)."""
    return isinstance(redis, RedisCluster)


class Backoff:
    """Capped exponential backoff that logs once per outage, not once per failed call."""

    #: Outages recovered from in this process (all loops together), for the metrics.
    recoveries = 0
    #: Outages met in this process (all loops together: one per loop that met it).
    outages = 0

    def __init__(self, what: str, *, first: float = 0.05, cap: float = 5.0) -> None:
        self._what = what
        self._first = first
        self._cap = cap
        self._delay = 0.0

    def note(self, exc: BaseException) -> float:
        """Log (once per outage) and count a failure; returns the seconds to wait."""
        if self._delay == 0.0:
            logger.warning("Redis unavailable while %s (%s); retrying", self._what, describe(exc))
            self._delay = self._first
            Backoff.outages += 1
        else:
            self._delay = min(self._delay * 2, self._cap)
        return self._delay

    async def failed(self, exc: BaseException) -> None:
        """Log (once per outage) and wait before the caller tries again."""
        await anyio.sleep(self.note(exc))

    def succeeded(self) -> None:
        """Reset after a success, logging the recovery if there was an outage."""
        if self._delay:
            logger.warning("Redis is back; %s resumed", self._what)
            self._delay = 0.0
            Backoff.recoveries += 1


async def retry_outages(
    step: Callable[[], Awaitable[_T]], what: str, *, stopping: Callable[[], bool] | None = None
) -> _T | None:
    """Run ``step`` until it succeeds, backing off and retrying on outages (:func:`is_outage`).

    Any other error is raised. Returns None, without running ``step`` again, once ``stopping``
    says so (a worker asked to stop while Redis is down).
    """
    backoff = Backoff(what)
    while stopping is None or not stopping():
        try:
            result = await step()
        except Exception as exc:
            if not is_outage(exc):
                raise
            await backoff.failed(exc)
            continue
        backoff.succeeded()
        return result
    return None


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


def parse_sentinel_url(url: str) -> SentinelURL:
    """Parse a ``redis+sentinel://`` URL.

    Raises:
        ConfigError: The URL does not have the form above. The message says why without
            quoting the URL (it may hold passwords); callers add the redacted URL.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme != SENTINEL_SCHEME:
        raise ConfigError(f"not a {SENTINEL_SCHEME}:// URL")
    username, password, tail = split_credentials(rest)
    if "#" in tail:
        raise ConfigError(f"a {SENTINEL_SCHEME}:// URL takes no #fragment")
    location, _, query = tail.partition("?")
    hosts, slash, path = location.partition("/")
    if "@" in query:
        raise ConfigError("percent-encode '@' in URL parameters as %40")
    if not slash or not path:
        raise ConfigError(
            f"{SENTINEL_SCHEME}:// needs the master's service name after the sentinels: "
            f"{SENTINEL_SCHEME}://host:port[,host:port...]/SERVICE"
        )
    service = unquote(path)
    if not _SERVICE.fullmatch(service):
        raise ConfigError(
            f"bad service name {path!r}: one word without '/' or spaces "
            "(give the database as ?db=N)"
        )
    params = _parse_sentinel_query(query)
    return SentinelURL(
        sentinels=_parse_sentinel_hosts(hosts),
        service=service,
        db=_parse_db(params.get("db", "0")),
        username=username,
        password=password,
        sentinel_username=params.get("sentinel_username") or None,
        sentinel_password=params.get("sentinel_password"),
    )


def _parse_sentinel_hosts(hosts: str) -> tuple[tuple[str, int], ...]:
    found: list[tuple[str, int]] = []
    for item in hosts.split(","):
        seed = item.strip()
        if seed.startswith("["):  # [IPv6] or [IPv6]:port
            host, bracket, after = seed[1:].partition("]")
            port = after.removeprefix(":") if after else str(SENTINEL_PORT)
            valid = bool(bracket) and (not after or after.startswith(":"))
        else:
            host, colon, port = seed.partition(":")
            port = port if colon else str(SENTINEL_PORT)
            valid = ":" not in port  # a bare IPv6 address needs [brackets]
        if not valid or not host:
            raise ConfigError(f"each sentinel must be host[:port], got {seed!r}")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"bad port in sentinel {seed!r}")
        found.append((host, int(port)))
    return tuple(found)


def _parse_sentinel_query(query: str) -> dict[str, str]:
    params: dict[str, str] = {}
    for part in query.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        name = unquote(name).strip().lower()
        if name not in _SENTINEL_PARAMS:
            raise ConfigError(
                f"unknown parameter {name!r} in a {SENTINEL_SCHEME}:// URL; known: "
                + ", ".join(sorted(_SENTINEL_PARAMS))
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


class _SentinelConnection(SafeWrites, SentinelManagedConnection):
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


def _connect_sentinel(
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
    parsed = parse_sentinel_url(url)
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
        connection_class=_SentinelConnection,
        max_connections=max_connections,
        timeout=20,
    )
    return cast(Redis, client)
