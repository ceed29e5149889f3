"""Start-up checks: Redis settings that put streamflow's guarantees at risk, found up front.

:func:`check_server` asks the server (``INFO``, ``CONFIG GET``, ``ACL WHOAMI``/``GETUSER``) and
warns once about each of: persistence off, an eviction policy that may evict our keys, the
password-less ``default`` user, a plaintext connection to another host, and a Redis older than
streamflow needs. A command refused by an ACL skips the checks that need it (said once, in one
line) and fails nothing: a least-privilege user is not an error. :func:`enforce` turns the
warnings into a refusal to start (``--strict``, or a Redis too old to run our scripts).

Gathering (I/O) and judging (pure) are apart, so that every verdict can be tested without a
server.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection
from redis.exceptions import ResponseError

from streamflow import connect, streams
from streamflow.errors import ConfigError

__all__ = ["MIN_VERSION", "ServerFacts", "ServerWarning", "assess", "check_server", "enforce"]

logger = logging.getLogger(__name__)

#: The oldest Redis streamflow runs on: ``#!lua`` script flags and XAUTOCLAIM's deleted ids.
MIN_VERSION = (7, 0)
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class ServerWarning:
    """One risk found in the Redis server's settings.

    Attributes:
        code: A stable short name: ``version``, ``persistence``, ``eviction``, ``default-user``
            or ``plaintext``.
        message: One line for the operator, saying the risk and the fix.
        refuse: streamflow cannot work on this server at all (not only with ``--strict``).
    """

    code: str
    message: str
    refuse: bool = False


@dataclass(frozen=True, slots=True)
class ServerFacts:
    """What the checks found out; None where a command was refused.

    Attributes:
        version: ``redis_version`` from INFO.
        aof: Whether the append-only file is on (INFO ``aof_enabled``).
        rdb_save: The RDB snapshot schedule (CONFIG GET ``save``); ``""`` when off.
        eviction_policy: ``maxmemory-policy`` (CONFIG GET, else INFO).
        user: The ACL user of the connection.
        authenticated: Whether the connection sends AUTH (a password or credential provider).
        default_nopass: Whether the ``default`` user takes any password (ACL GETUSER).
        transport: ``tls``, ``unix`` or ``tcp``.
        host: The host connected to (None over a unix socket).
        skipped: Why some checks could not run, one phrase each.
    """

    version: str | None = None
    aof: bool | None = None
    rdb_save: str | None = None
    eviction_policy: str | None = None
    user: str | None = None
    authenticated: bool = False
    default_nopass: bool | None = None
    transport: str = "tcp"
    host: str | None = None
    skipped: tuple[str, ...] = ()


async def check_server(redis: Redis, url: str, *, log: bool = True) -> list[ServerWarning]:
    """Check the server behind ``redis`` and warn (once each, one line) about risky settings.

    Call it once at start-up, after a successful ping. Commands that the connection's ACL user
    may not run are skipped; that is logged once and is not a failure.

    Args:
        redis: A client connected to the server.
        url: The URL it was connected with, for the messages (shown without its password).
        log: Log each warning (``logging.WARNING``) and the skipped checks (``INFO``).

    Returns:
        The warnings, in a fixed order (see :func:`assess`); empty when all is well.

    An outage during the checks (:func:`streamflow.connect.is_outage`) is raised as it is,
    for the caller to retry.
    """
    facts = await gather(redis)
    warnings = assess(facts)
    if log:
        where = connect.redact_url(url)
        for warning in warnings:
            logger.warning("Redis at %s: %s", where, warning.message)
        if facts.skipped:
            logger.info(
                "start-up checks of Redis at %s skipped in part: %s",
                where,
                "; ".join(facts.skipped),
            )
    return warnings


def enforce(warnings: Sequence[ServerWarning], *, strict: bool, url: str = "") -> None:
    """Refuse to start when a warning forbids it: any warning if ``strict``, else refuse-level.

    Raises:
        ConfigError: One line listing every problem.
    """
    blocking = [w for w in warnings if strict or w.refuse]
    if not blocking:
        return
    where = f" on Redis at {connect.redact_url(url)}" if url else ""
    why = " ".join(f"[{w.code}] {w.message}." for w in blocking)
    raise ConfigError(f"refusing to start{where}{' (--strict)' if strict else ''}: {why}")


async def gather(redis: Redis) -> ServerFacts:
    """Ask the server for everything :func:`assess` judges.

    An outage (:func:`streamflow.connect.is_outage`) is raised as it is: callers retry.
    """
    skipped: list[str] = []
    info, info_refused = await _allowed(redis.info())
    config, config_refused = await _allowed(
        redis.config_get("appendonly", "save", "maxmemory-policy")
    )
    user, nopass, authenticated = await _who(redis, skipped)
    if info_refused:
        skipped.append(f"INFO refused ({info_refused}): Redis version not checked")
    if config_refused:
        lost = "RDB snapshot schedule" if info else "persistence and eviction policy"
        skipped.append(f"CONFIG GET refused ({config_refused}): {lost} not checked")
    info = info or {}
    settings = {streams.text(k): streams.text(v) for k, v in (config or {}).items()}
    aof = info.get("aof_enabled", {"yes": 1, "no": 0}.get(settings.get("appendonly", "")))
    policy = settings.get("maxmemory-policy", info.get("maxmemory_policy"))
    transport, host = _transport(redis)
    return ServerFacts(
        version=None if "redis_version" not in info else str(info["redis_version"]),
        aof=None if aof is None else bool(int(aof)),
        rdb_save=settings.get("save"),
        eviction_policy=None if policy is None else str(policy),
        user=user,
        authenticated=authenticated,
        default_nopass=nopass,
        transport=transport,
        host=host,
        skipped=tuple(skipped),
    )


async def _allowed(command: Awaitable[_T]) -> tuple[_T | None, str]:
    """(the reply, "") or, when Redis refuses the command, (None, why in one line)."""
    try:
        return await command, ""
    except ResponseError as exc:
        if connect.is_outage(exc):
            raise  # LOADING, BUSY, ...: not a refusal of this command
        # NOPERM under an ACL, or "unknown command" when the command is renamed away.
        return None, _first_line(exc)


async def _who(redis: Redis, skipped: list[str]) -> tuple[str, bool | None, bool]:
    """(ACL user, whether ``default`` takes any password, whether we send AUTH)."""
    kwargs = _connection_kwargs(redis)
    authenticated = bool(kwargs.get("password") or kwargs.get("credential_provider"))
    whoami, _ = await _allowed(redis.acl_whoami())
    # Without AUTH a connection is the default user; AUTH with a password alone is too.
    user = streams.text(whoami) if whoami is not None else kwargs.get("username") or "default"
    nopass: bool | None = None
    if user == "default" and authenticated:
        # A nopass user accepts any password: a password in the URL proves nothing.
        found: Any
        found, refused = await _allowed(redis.acl_getuser("default"))
        if refused:
            skipped.append(f"ACL GETUSER refused ({refused}): default user's password not checked")
        else:
            nopass = "nopass" in {streams.text(flag) for flag in (found or {}).get("flags", ())}
    return str(user), nopass, authenticated


def _connection_kwargs(redis: Redis) -> dict[str, Any]:
    """How the client connects (host, password, ...); a cluster's from its default node."""
    if connect.is_cluster(redis):
        node = redis.get_default_node()  # type: ignore[attr-defined]
        return dict(node.connection_kwargs, host=node.host)
    return dict(redis.connection_pool.connection_kwargs)


def _transport(redis: Redis) -> tuple[str, str | None]:
    if connect.is_cluster(redis):
        # Every node is reached the same way: judge the default one.
        node = redis.get_default_node()  # type: ignore[attr-defined]
        kind = "tls" if issubclass(node.connection_class, SSLConnection) else "tcp"
        return kind, str(node.host)
    pool = redis.connection_pool
    if issubclass(pool.connection_class, UnixDomainSocketConnection):
        return "unix", None
    host = pool.connection_kwargs.get("host")
    if host is None:
        # A Sentinel pool has no fixed host: judge the master it connected to (the ping).
        master = getattr(pool, "master_address", None)
        host = master[0] if master else None
    kind = "tls" if issubclass(pool.connection_class, SSLConnection) else "tcp"
    return kind, None if host is None else str(host)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


# -- verdicts (pure) --------------------------------------------------------------------------


def assess(facts: ServerFacts) -> list[ServerWarning]:
    """Every warning ``facts`` call for, in a fixed order; unknown facts warn of nothing."""
    checks: list[Callable[[ServerFacts], ServerWarning | None]] = [
        _check_version,
        _check_persistence,
        _check_eviction,
        _check_default_user,
        _check_transport,
    ]
    return [warning for check in checks if (warning := check(facts)) is not None]


def _check_version(facts: ServerFacts) -> ServerWarning | None:
    if facts.version is None:
        return None
    try:
        numbers = tuple(int(part) for part in facts.version.split(".")[:2])
    except ValueError:
        return None
    if numbers >= MIN_VERSION:
        return None
    return ServerWarning(
        "version",
        f"Redis {facts.version} is older than {'.'.join(map(str, MIN_VERSION))}, which "
        "streamflow needs (#!lua script flags, XAUTOCLAIM reporting deleted entries)",
        refuse=True,
    )


def _check_persistence(facts: ServerFacts) -> ServerWarning | None:
    if facts.aof is not False:
        return None
    if facts.rdb_save == "":
        risk = (
            "persistence is off (appendonly no, no RDB snapshots): a restart or crash of Redis "
            "loses every job, pending entry and task"
        )
    else:
        risk = (
            "persistence is off (appendonly no): with RDB snapshots only, a crash of Redis "
            "loses every write since the last snapshot, acknowledged publishes included"
        )
    return ServerWarning("persistence", f"{risk}; set appendonly yes")


def _check_eviction(facts: ServerFacts) -> ServerWarning | None:
    policy = facts.eviction_policy
    if policy is None or policy == "noeviction":
        return None
    return ServerWarning(
        "eviction",
        f"maxmemory-policy is {policy}: under memory pressure Redis may evict whole role "
        "streams, schedules and dead letters (jobs vanish without trace); set "
        "maxmemory-policy noeviction",
    )


def _check_default_user(facts: ServerFacts) -> ServerWarning | None:
    if facts.user != "default":
        return None
    # A connection that got this far without AUTH proves that default needs no password.
    nopass = facts.default_nopass if facts.authenticated else True
    if not nopass:
        return None
    return ServerWarning(
        "default-user",
        "connected as the default user, which has no password: anyone who can reach this "
        "Redis can read and change every job; use an ACL user with a password",
    )


def _check_transport(facts: ServerFacts) -> ServerWarning | None:
    if facts.transport != "tcp" or facts.host is None or _is_loopback(facts.host):
        return None
    return ServerWarning(
        "plaintext",
        f"the connection to {facts.host} is not encrypted: passwords and payloads cross the "
        "network in clear text; use a rediss:// URL",
    )


def _is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
