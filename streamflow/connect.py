"""Reaching Redis: the clients (single node, cluster, Sentinel), TLS, ping, and what is an outage.

The one module that builds Redis clients (the CLI, :class:`~streamflow.Client` and
:class:`~streamflow.SyncClient` all go through :func:`connect` or :func:`connect_sync`), as
arq's ``connections.py`` does. Three modules below it hold its parts that stand on their own,
and it re-exports their names, so ``connect.X`` is the one way the rest of the package says
any of this:

* :mod:`streamflow.outage`: which failures are outages (:data:`TRANSIENT_ERRORS`,
  :func:`is_outage`, :func:`public_errors`, :class:`Backoff`, :func:`retry_outages`), and the
  connection classes whose failures can be told apart;
* :mod:`streamflow.urls`: URL schemes, checking and redacting URLs, parsing cluster and
  ``redis+sentinel://`` URLs (the Sentinel URL's form is described there);
* :mod:`streamflow.sentinel`: the Sentinel connection, pool and manager classes that follow
  the master through failovers.

Here: TLS options, building each kind of client, ``ping`` and ``wait_until_up``, and the
one-line diagnosis of a connection or TLS handshake that failed.
"""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Callable, Iterable
from typing import Any, TypedDict, cast
from urllib.parse import urlsplit

import redis as redis_sync
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.cluster import PRIMARY
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    RedisClusterException,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry as SyncRetry

from streamflow.errors import ConfigError, RedisUnavailable
from streamflow.outage import (
    OUTAGE_CODES,
    REFUSAL_CODES,
    TRANSIENT_ERRORS,
    Backoff,
    Refused,
    describe,
    error_code,
    is_outage,
    one_line,
    public_errors,
    retry_outages,
    safe,
)
from streamflow.sentinel import (
    MASTER_CHECK_INTERVAL,
    SENTINEL_TIMEOUT,
    MasterConnection,
    MasterPool,
    SentinelManager,
)
from streamflow.urls import (
    CLUSTER_SCHEME,
    CLUSTER_TLS_SCHEME,
    SENTINEL_PORT,
    SENTINEL_SCHEME,
    TLS_SCHEMES,
    URL_SCHEMES,
    SentinelURL,
    cluster_nodes,
    is_cluster_url,
    parse_sentinel_url,
    redact_url,
    split_credentials,
    validate_url,
)

__all__ = [
    "CLUSTER_SCHEME",
    "CLUSTER_TLS_SCHEME",
    "MASTER_CHECK_INTERVAL",
    "OUTAGE_CODES",
    "REFUSAL_CODES",
    "SENTINEL_PORT",
    "SENTINEL_SCHEME",
    "SENTINEL_TIMEOUT",
    "TLS_SCHEMES",
    "TRANSIENT_ERRORS",
    "URL_SCHEMES",
    "Backoff",
    "Refused",
    "SentinelURL",
    "TLSFiles",
    "TLSPath",
    "check_tls_file",
    "cluster_nodes",
    "connect",
    "connect_sync",
    "describe",
    "error_code",
    "is_cluster",
    "is_cluster_url",
    "is_outage",
    "parse_sentinel_url",
    "ping",
    "public_errors",
    "redact_url",
    "retry_outages",
    "split_credentials",
    "tls_arguments",
    "validate_url",
    "wait_until_up",
]

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
            Sentinel-monitored group (see :mod:`streamflow.urls`), followed through
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
    # connection errors (see :mod:`streamflow.urls`): redis-py takes no connection class here.
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
        return f"Redis{where} refused the connection: {one_line(exc)}"
    return _tls_failure(redis, exc) or f"cannot connect to Redis{where}: {one_line(exc)}"


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
        return f"TLS connection to {where} closed by the server: {one_line(exc)}{hint}"
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


def is_cluster(redis: Redis) -> bool:
    """Whether ``redis`` is a Redis Cluster client (from a ``redis+cluster://`` URL)."""
    return isinstance(redis, RedisCluster)


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
        url: The URL (see :mod:`streamflow.urls`).
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
    manager = SentinelManager(
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
        connection_pool_class=MasterPool,
        connection_class=MasterConnection,
        max_connections=max_connections,
        timeout=20,
    )
    return cast(Redis, client)
