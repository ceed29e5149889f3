"""Which Redis failures are outages, and connection classes whose failures can be told.

An outage is a failure that waiting cures: back off, reconnect and retry, never crash, never
blame the caller (:data:`TRANSIENT_ERRORS`, :func:`is_outage`); :class:`Backoff` and
:func:`retry_outages` are how loops wait it out, :func:`public_errors` how the public API
reports it. Everything here is re-exported by :mod:`streamflow.connect`, the module that
reaches Redis, and is normally used as ``connect.X``.

The connection classes (:func:`safe`) fail only in ways streamflow can classify. Writes fail
with a connection error, never anything else, and a refusal that redis-py has no class for but
that is an outage (``MISCONF``, ``BUSY``, ``NOREPLICAS``, ``UNBLOCKED``) is raised as
:class:`Refused`, so that catching :data:`TRANSIENT_ERRORS` catches it. redis-py 8.1's asyncio
connections can leak ``AttributeError`` (``'NoneType' object has no attribute 'writelines'``)
or ``TypeError`` from a write when the transport was torn down under it: a peer reset of an
idle pooled connection (redis-py issue #4287), or, on a cluster, the client disconnecting
every node's connections after one failed while other tasks were still connecting or
writing. Neither is a ``RedisError``, so they escaped every loop's outage handling and
stopped workers during a cluster failover. These classes turn them into ``ConnectionError``:
the command was not sent completely, the caller reconnects and goes on. Only the write path
is wrapped: arguments are encoded before it, so a bad argument still raises its own error.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import anyio
import redis.exceptions
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.exceptions import (
    AskError,
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

from streamflow.errors import RedisCommandError, RedisUnavailable, StreamflowError

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

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


def safe(connection_class: type[Any]) -> type[Any]:
    """The safe twin of one of redis-py's connection classes (others are returned as is)."""
    return _SAFE.get(connection_class, connection_class)


# redis-py 8.2 raises RedisClusterUnreachableError from a cluster command when no node answers
# (a connection error is its cause); earlier versions have no such class (see
# ``connect._Cluster``), and ClusterDownError, listed anyway, stands in for it.
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


def describe(exc: BaseException) -> str:
    """One line for a log or an error message: a refusal keeps its code (``OOM ...``).

    redis-py strips the code from the text of the refusals it has a class for.
    """
    text = one_line(exc)
    if isinstance(exc, ResponseError):
        code = error_code(exc)
        if code and not text.startswith(code):
            return f"{code} {text}"
    return text


def one_line(exc: BaseException) -> str:
    """The first line of ``exc``'s text, or its class name when it has none."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


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

    async def attempt(self, step: Callable[[], Awaitable[object]]) -> bool:
        """Run one step of a loop; True if it succeeded, False once an outage is waited out.

        Any error but an outage (:func:`is_outage`) is raised.
        """
        try:
            await step()
        except Exception as exc:
            if not is_outage(exc):
                raise
            await self.failed(exc)
            return False
        self.succeeded()
        return True

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
