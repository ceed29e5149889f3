"""What a Redis URL may say: schemes, checking, redacting, parsing cluster and Sentinel URLs.

No I/O: :mod:`streamflow.connect` builds the clients from what is parsed here, and re-exports
these names (``connect.validate_url``, ``connect.redact_url``, ...).

Redis Sentinel (``redis+sentinel://``) URLs name the sentinels, not a Redis server::

    redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/SERVICE[?PARAMS]

* ``user`` and ``password`` are the credentials of the Redis servers (master and replicas);
* each ``host[:port]`` is a sentinel (port 26379 when omitted); one that answers is enough;
* ``SERVICE`` is the master's name in the sentinels' configuration (``sentinel monitor NAME``);
* ``PARAMS``: ``db=N`` (the database, 0 by default), and ``sentinel_username`` and
  ``sentinel_password`` for sentinels that require authentication themselves. Nothing else is
  accepted: a misspelt parameter is an error, not silence.

Percent-encode ``@`` in a ``sentinel_password`` (``%40``); the userinfo password may hold any
character. TLS is not supported with Sentinel yet.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from streamflow.errors import ConfigError

#: The scheme of a Redis Sentinel URL (see the module docstring).
SENTINEL_SCHEME = "redis+sentinel"
#: The sentinels' port when a host has none (Sentinel's well-known port).
SENTINEL_PORT = 26379


_SENTINEL_PARAMS = frozenset({"db", "sentinel_username", "sentinel_password"})
_SERVICE = re.compile(r"[^\s/?#,@]+")


URL_SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster", SENTINEL_SCHEME)
#: The scheme of a Redis Cluster URL: ``redis+cluster://[user:password@]host:port[,host:port]``.
CLUSTER_SCHEME = "redis+cluster"
#: The same over TLS (every node, ``tls-cluster yes``).
CLUSTER_TLS_SCHEME = "rediss+cluster"
#: The schemes whose connections are TLS.
TLS_SCHEMES = ("rediss", CLUSTER_TLS_SCHEME)


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


def is_cluster_url(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster (``redis+cluster://`` or ``rediss+cluster://``)."""
    return url.partition("://")[0] in (CLUSTER_SCHEME, CLUSTER_TLS_SCHEME)


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
