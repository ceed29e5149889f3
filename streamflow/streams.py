"""Redis access: connections, scripts, and raw stream replies turned into typed objects.

Everything above this module sees :class:`Entry` objects and plain results; no other module
parses an XREADGROUP reply or calls a Lua script by hand.
"""

from __future__ import annotations

import logging
import os
import re
import ssl
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypedDict, TypeVar, cast
from urllib.parse import urlsplit

import anyio
import redis.exceptions
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
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

from streamflow import connection, sentinel
from streamflow.errors import (
    ConfigError,
    InputError,
    RedisCommandError,
    RedisUnavailable,
    StreamflowError,
)
from streamflow.keys import GROUP

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

URL_SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster", sentinel.SCHEME)
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
#:   (a replica, e.g. a demoted master), and, as :class:`~streamflow.connection.Refused`,
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
    connection.Refused,
    _UNREACHABLE,
)
#: The same refusals by their error code (the reply's first word), for errors that did not
#: pass through streamflow's connection classes (the synchronous client, a transaction's
#: queued replies).
OUTAGE_CODES = frozenset(
    {
        *connection.REFUSAL_CODES,
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
        return connection.error_code(exc) in OUTAGE_CODES
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


@dataclass(slots=True)
class Entry:
    """One stream entry as Redis returned it (read-only by convention).

    Not a frozen dataclass: a worker makes one per entry it reads, and a frozen one costs three
    times as much to build (0.41 us against 0.14).

    Attributes:
        id: The stream entry id, e.g. ``b"1718000000000-0"``.
        fields: The entry's field/value pairs.
        deliveries: The pending list's delivery counter: 1 for a first read, higher after
            adoptions and re-reads.
    """

    id: bytes
    fields: dict[bytes, bytes]
    deliveries: int = 1


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
    if url.startswith(f"{sentinel.SCHEME}://"):
        try:
            sentinel.parse_url(url)
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
            Sentinel-monitored group (see :mod:`streamflow.sentinel`), followed through
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
    if url.startswith(f"{sentinel.SCHEME}://"):
        if any(path is not None for path in (tls_ca_file, tls_cert_file, tls_key_file)):
            raise ConfigError("TLS is not supported with redis+sentinel:// yet")
        return sentinel.connect(
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
    pool.connection_class = connection.safe(pool.connection_class)
    return Redis.from_pool(pool)  # the client owns the pool: aclose() closes its connections


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
    username, password, _ = connection.split_credentials(url.partition("://")[2])
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
    # connection errors (see streamflow.connection): redis-py takes no connection class here.
    cluster.connection_kwargs["connection_class"] = connection.safe(
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
        code = connection.error_code(exc)
        if code and not text.startswith(code):
            return f"{code} {text}"
    return text


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


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
        }
    )

    def __init__(self, redis: Redis) -> None:
        strip = type(redis).__module__.startswith("fakeredis")
        self.settle = redis.register_script(_load("settle.lua", strip))
        self.dead_letter = redis.register_script(_load("dead_letter.lua", strip))
        self.publish_dedup = redis.register_script(_load("publish_dedup.lua", strip))
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

    @classmethod
    def source(cls, name: str) -> str:
        """The text of the Lua script ``name`` as real Redis gets it (shebang, prelude, body)."""
        text = _read(name)
        if name not in cls.FENCED:
            return text
        # The shebang must stay the first line: Redis reads the flags only there.
        shebang, body = text.split("\n", 1) if text.startswith("#!") else ("", text)
        return f"{shebang}\n{_read('fence.lua')}{body}"


def _read(name: str) -> str:
    return resources.files("streamflow").joinpath("lua").joinpath(name).read_text()


def _load(name: str, strip_shebang: bool) -> str:
    text = Scripts.source(name)
    if strip_shebang and text.startswith("#!"):
        text = text.split("\n", 1)[1]
    return text


async def ensure_group(redis: Redis, stream: str, group: str = GROUP) -> None:
    """Create the role's consumer group (and the stream) if missing.

    The group starts at ``0``, not ``$``: a group lost with a Redis restart must not skip the
    entries already in the stream.

    Raises:
        ConfigError: Another type of key is at the stream's name.
    """
    try:
        await redis.xgroup_create(stream, group, id="0", mkstream=True)
    except OutOfMemoryError:
        # Redis refuses XGROUP CREATE when full, even for a group that exists: a worker
        # started to drain a full Redis must not wait for memory it is there to free.
        if not await _has_group(redis, stream, group):
            raise
    except ResponseError as exc:
        if str(exc).startswith("WRONGTYPE"):
            # Anyone with write access to the namespace may have put another type there.
            raise ConfigError(
                f"{stream} is not a stream (another type of key is at its name): delete it"
            ) from None
        if "BUSYGROUP" not in str(exc):
            raise


async def _has_group(redis: Redis, stream: str, group: str) -> bool:
    try:
        groups: Any = await redis.xinfo_groups(stream)
    except ResponseError:  # no such key
        return False
    return any(text(info.get("name", b"")) == group for info in groups)


async def read_group(
    redis: Redis,
    stream: str,
    consumer: str,
    *,
    count: int,
    block_ms: int | None,
    after: bytes | str = ">",
) -> list[Entry]:
    """Read up to ``count`` entries for ``consumer`` with XREADGROUP.

    Args:
        redis: The client; its socket timeout must exceed ``block_ms``.
        stream: The role stream.
        consumer: This worker's consumer name.
        count: The most entries to return.
        block_ms: How long to wait when there is nothing; None returns at once.
        after: ``">"`` for new entries; an id (``"0"`` first) to re-read the entries already
            pending under ``consumer`` after that id. Re-reading counts as a delivery.
    """
    reply = await redis.xreadgroup(GROUP, consumer, {stream: after}, count=count, block=block_ms)
    return _entries(reply)


async def read_own_pending(
    redis: Redis, stream: str, consumer: str, *, after: bytes, count: int
) -> list[Entry]:
    """Re-read entries already pending under ``consumer`` after id ``after``, with counts.

    Used at start-up: a worker restarted under the same consumer name resumes its entries at
    once instead of waiting a lease TTL for them to be adopted.
    """
    entries = await read_group(redis, stream, consumer, count=count, block_ms=None, after=after)
    if not entries:
        return []
    rows = await redis.xpending_range(
        stream,
        GROUP,
        min=entries[0].id,
        max=entries[-1].id,
        count=len(entries),
        consumername=consumer,
    )
    counts = {row["message_id"]: int(row["times_delivered"]) for row in rows}
    return [Entry(e.id, e.fields, counts.get(e.id, 1)) for e in entries]


def text(value: Any) -> str:
    """A Redis reply item (bytes, or str with decoding on) as str."""
    return value.decode() if isinstance(value, bytes) else str(value)


def text_lenient(value: Any) -> str:
    """A reply item as str, whatever bytes it holds (values written by anyone: escaped)."""
    return value.decode(errors="backslashreplace") if isinstance(value, bytes) else str(value)


def _entries(reply: Any) -> list[Entry]:
    if not reply:
        return []
    # RESP2 reply: [[stream, [(id, {field: value}), ...]]]; one stream per read.
    _, items = reply[0]
    return [Entry(entry_id, fields or {}) for entry_id, fields in items]


async def read_range(redis: Redis, stream: str, *, count: int | None = None) -> list[Entry]:
    """The entries of ``stream`` from the oldest (XRANGE - +), at most ``count``."""
    reply: Any = await redis.xrange(stream, count=count)
    return [Entry(entry_id, fields or {}) for entry_id, fields in reply or []]


#: Lua's unpack() has a stack limit; scripts get ids in chunks of this size.
_CHUNK = 1000


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


async def pending_owners(redis: Redis, stream: str, ids: Sequence[bytes]) -> dict[bytes, bytes]:
    """The consumer each of ``ids`` is pending under; ids that are not pending are left out.

    One round trip (one XPENDING range per id, pipelined); for the rare checks after a reply
    was lost, not for the hot path.
    """
    pipe = one_slot_pipeline(redis)
    for entry_id in ids:
        pipe.xpending_range(stream, GROUP, min=entry_id, max=entry_id, count=1)
    replies: list[Any] = await pipe.execute()
    return {
        bytes(row["message_id"]): bytes(row["consumer"]) for rows in replies for row in rows[:1]
    }


async def settle(
    scripts: Scripts, redis: Redis, stream: str, consumer: str, ids: Sequence[bytes]
) -> list[bytes]:
    """Acknowledge and delete entries ``consumer`` still owns; return the refused ids."""
    # One argument for the whole chunk: redis-py packs each argument in Python.
    return await _owned_ids_script(
        scripts.settle, redis, stream, ids, lambda chunk: [GROUP, consumer, b" ".join(chunk)]
    )


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
) -> bytes | None:
    """Move an entry to the dead-letter stream; None if ``consumer`` no longer owns it.

    With ``events`` and ``event``, the same step reports a task node's failure.
    """
    flat: list[bytes | str | int] = [GROUP, consumer, entry_id, max_len, event]
    for name, value in fields:
        flat += (name, value)
    keys = [stream, dead_stream, events or stream]
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
) -> bool:
    """Acknowledge a task node's job and report how it ended, if ``consumer`` still owns it."""
    done = await scripts.finish(
        keys=[stream, events], args=[GROUP, consumer, entry_id, event], client=redis
    )
    return bool(done)


async def publish(redis: Redis, stream: str, message: bytes) -> bytes:
    """XADD one encoded job; returns the stream entry id."""
    entry_id = await redis.xadd(stream, {b"message": message})
    return bytes(entry_id) if not isinstance(entry_id, str) else entry_id.encode()


async def publish_many(
    scripts: Scripts, redis: Redis, stream: str, messages: Sequence[bytes]
) -> list[bytes]:
    """XADD many encoded jobs to one stream in one script call; returns their entry ids."""
    ids: list[bytes] = await scripts.publish_many(keys=[stream], args=list(messages), client=redis)
    return ids


async def publish_dedup(
    scripts: Scripts,
    redis: Redis,
    *,
    stream: str,
    marker: str,
    schedule: str,
    message_id: str,
    message: bytes,
    window_ms: int,
    due_ms: int = 0,
) -> tuple[bool, str]:
    """Publish (or schedule, with ``due_ms``) unless ``marker`` exists.

    Returns (published, entry id or ``"scheduled"``, or the first message's id).
    """
    flag, value = await scripts.publish_dedup(
        keys=[stream, marker, schedule],
        args=[message_id, window_ms, message, due_ms],
        client=redis,
    )
    # The first id is read back from the marker: whoever wrote it, it decodes.
    return bool(flag), value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def is_cluster_url(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster (``redis+cluster://`` or ``rediss+cluster://``)."""
    return url.partition("://")[0] in (CLUSTER_SCHEME, CLUSTER_TLS_SCHEME)


def is_cluster(redis: Redis) -> bool:
    """Whether ``redis`` is a Redis Cluster client (from a ``redis+cluster://`` URL)."""
    return isinstance(redis, RedisCluster)


def one_slot_pipeline(redis: Redis) -> Pipeline:
    """A MULTI/EXEC pipeline for commands on one slot; a plain pipeline on a cluster.

    redis-py 8.1's asyncio cluster client runs a transaction pipeline's commands in a helper
    thread with an event loop of its own: the connection it opens there belongs to that loop,
    and closing the client later fails with "Event loop is closed". So on a cluster the
    commands go in one round trip but without MULTI; callers say what that costs them.
    """
    return redis.pipeline(transaction=not is_cluster(redis))


#: How long an entry's start count is kept: far longer than any sane redelivery loop.
START_COUNT_TTL_MS = 7 * 24 * 3600 * 1000


async def count_start(redis: Redis, key: str) -> int:
    """Count one more start of a redelivered entry; returns the starts counted before it.

    On a cluster the INCR and PEXPIRE are sent together but not in MULTI (see
    :func:`one_slot_pipeline`): INCR alone is atomic, and a connection lost between the two
    only leaves the counter without its week-long TTL until the entry's next start sets it.
    """
    pipe = one_slot_pipeline(redis)
    pipe.incr(key)
    pipe.pexpire(key, START_COUNT_TTL_MS)
    count, _ = await pipe.execute()
    return int(count) - 1


async def get_count(redis: Redis, key: str) -> int:
    """An integer counter's value (0 when missing)."""
    value = await redis.get(key)
    return int(value) if value is not None else 0


async def last_id(redis: Redis, stream: str) -> bytes:
    """The id of the newest entry of ``stream``, or ``0-0`` if it is empty or missing."""
    reply: Any = await redis.xrevrange(stream, count=1)
    return bytes(reply[0][0]) if reply else b"0-0"


async def read_broadcast(
    redis: Redis, stream: str, *, after: bytes, count: int, block_ms: int | None
) -> list[Entry]:
    """Plain XREAD of entries after ``after``: each reader keeps its own position."""
    reply: Any = await redis.xread({stream: after}, count=count, block=block_ms)
    return _entries(reply)


async def scan_keys(redis: Redis, pattern: str) -> list[str]:
    """Every key matching ``pattern`` (SCAN, never KEYS)."""
    found: list[str] = []
    async for key in redis.scan_iter(match=pattern, count=1000):
        found.append(key.decode() if isinstance(key, bytes) else str(key))
    return found


async def get_many(redis: Redis, keys: Sequence[str], *, raise_on_error: bool = True) -> list[Any]:
    """GET of each key, pipelined (keys may be in different cluster slots).

    Returns:
        Each key's value, or None when it is missing; with ``raise_on_error=False``, the
        ``ResponseError`` of a key that holds another type, in its place, instead of raising
        the first one.
    """
    if not keys:
        return []
    pipe = redis.pipeline(transaction=False)
    for key in keys:
        pipe.get(key)
    values: list[Any] = await pipe.execute(raise_on_error=raise_on_error)
    return values


async def batch_refs(redis: Redis, key: str, start: int = 0, stop: int = -1) -> list[str]:
    """The batch keys a task's output list holds, ``start .. stop``, as listed (unchecked).

    Raises:
        InputError: Another type of key is at the list's name (a data problem, not an outage).
    """
    try:
        refs: list[Any] = await redis.lrange(key, start, stop)
    except ResponseError as exc:
        if not str(exc).startswith("WRONGTYPE"):
            raise
        raise InputError(f"the batch list {key} cannot be read: {exc}") from None
    return [text_lenient(r) for r in refs]


async def hash_items(redis: Redis, key: str) -> dict[str, bytes]:
    """HGETALL with field names decoded."""
    reply: Any = await redis.hgetall(key)
    return {bytes(k).decode(): bytes(v) for k, v in reply.items()}


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
) -> tuple[bytes, list[Entry], list[bytes]]:
    """One bounded XAUTOCLAIM step: (next cursor, adopted entries with counts, deleted ids)."""
    next_cursor, adopted, deleted = await scripts.claim(
        keys=[stream], args=[GROUP, consumer, min_idle_ms, cursor, count], client=redis
    )
    entries = [
        Entry(entry_id, _pairs(fields), int(deliveries)) for entry_id, fields, deliveries in adopted
    ]
    return next_cursor, entries, list(deleted)


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


async def schedule(redis: Redis, schedule_key: str, due_ms: int, message: bytes) -> None:
    """Add a message to a delayed schedule (publishing with a delay)."""
    await redis.zadd(schedule_key, {message: due_ms})


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


def is_group_lost(exc: BaseException) -> bool:
    """Whether ``exc`` says the consumer group or its stream is gone (``NOGROUP``).

    It comes after a Redis restart without persistence, or when the stream was deleted. A
    blocked read released with ``UNBLOCKED`` (the stream moved to another cluster node, or was
    deleted) is an outage instead: the read is retried where the key now lives, and finds the
    group there, or ``NOGROUP``.
    """
    return isinstance(exc, ResponseError) and connection.error_code(exc) == "NOGROUP"
