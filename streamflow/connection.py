"""redis-py connection classes whose failures streamflow can classify.

Writes fail with a connection error, never anything else, and a refusal that redis-py has no
class for but that is an outage (``MISCONF``, ``BUSY``, ``NOREPLICAS``, ``UNBLOCKED``) is raised
as :class:`Refused`, so that catching :data:`streamflow.streams.TRANSIENT_ERRORS` catches it.

redis-py 8.1's asyncio connections can leak ``AttributeError`` (``'NoneType' object has no
attribute 'writelines'``) or ``TypeError`` from a write when the transport was torn down under
it: a peer reset of an idle pooled connection (redis-py issue #4287), or, on a cluster, the
client disconnecting every node's connections after one failed while other tasks were still
connecting or writing. Neither is a ``RedisError``, so they escaped every loop's outage
handling and stopped workers during a cluster failover. These classes turn them into
``ConnectionError``: the command was not sent completely, the caller reconnects and goes on.

Only the write path is wrapped: arguments are encoded before it, so a bad argument still
raises its own error.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote

from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

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
