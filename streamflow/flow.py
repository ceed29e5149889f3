"""Flow control of roles: pausing and resuming them.

A role's flow control is one hash per role, :meth:`~streamflow.keys.Keys.flow_control`
(``<ns>:{flow:<role>}:control``); while the role is paused its ``paused`` field holds the time
(ms since the epoch) it was paused. Being a key, a pause survives restarts of workers and of
Redis (with persistence) and reaches a worker that starts later.

Operators write it (:func:`pause`, :func:`resume`: ``streamflow pause``, ``Client.pause``);
workers read it through a :class:`PauseWatch`: one pipelined ``HGET`` per role every
:data:`REFRESH_EVERY` seconds, and each reader looks at the cached value before each read. A
poll rather than a signal on the signals stream: the key has to be read anyway (at start-up,
after a missed signal, after an outage), one round trip per worker per half second costs
nothing next to the reads, and half a second is below one blocking read (``block_ms``, 1 s), so
a pause takes effect within one read cycle either way with a single mechanism.

The pause and resume operations are written once as :mod:`streamflow.steps` generators, for the
asyncio and the blocking client alike.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import anyio
from redis.asyncio import Redis

from streamflow import connect, steps
from streamflow.errors import UnknownRoleError
from streamflow.keys import Keys, validate_name
from streamflow.protocol import now_ms
from streamflow.steps import Steps

logger = logging.getLogger(__name__)

#: The field of a role's flow control hash that says it is paused (and since when, in ms).
PAUSED_FIELD = "paused"
#: Seconds between a worker's looks at whether its roles are paused.
REFRESH_EVERY = 0.5


def role_known(redis: Any, keys: Keys, role: str) -> Steps[bool]:
    """Whether ``role`` exists: its stream, delayed schedule or dead letters, or a known role."""
    pipe = redis.pipeline(transaction=False)
    pipe.exists(keys.role_stream(role), keys.delayed(role), keys.dead_letters(role))
    pipe.sismember(keys.known_roles(), role)
    existing, known = yield pipe.execute()
    return bool(existing) or bool(known)


def pause(redis: Any, keys: Keys, role: str, *, force: bool = False) -> Steps[bool]:
    """Pause ``role``; True if it was running (a pause keeps the time of the first).

    Raises:
        InvalidNameError: ``role`` is not a valid role name.
        UnknownRoleError: Nothing is known of ``role`` (no stream, no worker served it) and
            ``force`` is not set: a misspelt name would otherwise pause nothing, silently.
    """
    validate_name(role, "role")
    if not force and not (yield from role_known(redis, keys, role)):
        raise UnknownRoleError(
            f"unknown role {role!r}: no stream and no worker has served it "
            "(force=True / --force pauses it anyway, before it exists)"
        )
    added = yield redis.hsetnx(keys.flow_control(role), PAUSED_FIELD, str(now_ms()))
    return bool(added)


def resume(redis: Any, keys: Keys, role: str) -> Steps[bool]:
    """Resume ``role``; True if it was paused.

    Raises:
        InvalidNameError: ``role`` is not a valid role name.
    """
    removed = yield redis.hdel(keys.flow_control(validate_name(role, "role")), PAUSED_FIELD)
    return bool(removed)


def paused_since(redis: Any, keys: Keys, roles: Sequence[str]) -> Steps[dict[str, int]]:
    """The roles of ``roles`` that are paused, each with the time it was paused (ms).

    One round trip for all. A garbled value (anything may write the key) reads as paused since
    0: a key that says paused is obeyed.
    """
    if not roles:
        return {}
    pipe = redis.pipeline(transaction=False)
    for role in roles:
        pipe.hget(keys.flow_control(role), PAUSED_FIELD)
    replies = yield pipe.execute()
    out: dict[str, int] = {}
    for role, value in zip(roles, replies, strict=True):
        if value is not None:
            out[role] = int(value) if value.isdigit() else 0
    return out


class PauseWatch:
    """A worker's cached view of which of its roles are paused.

    Args:
        redis: The client.
        keys: Key names.
        roles: The roles the worker serves.
        stopping: Set when the worker stops: waiters return.
        every: Seconds between refreshes.
    """

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        roles: Sequence[str],
        stopping: anyio.Event,
        *,
        every: float = REFRESH_EVERY,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._roles = list(roles)
        self._stopping = stopping
        self._every = every
        self._paused: dict[str, int] = {}
        self._changed = anyio.Event()

    def is_paused(self, role: str) -> bool:
        """Whether ``role`` was paused at the last refresh."""
        return role in self._paused

    def paused(self) -> dict[str, int]:
        """The roles paused at the last refresh, each with the time it was paused (ms)."""
        return dict(self._paused)

    def states(self) -> dict[str, bool]:
        """Each role watched: whether it was paused at the last refresh."""
        return {role: role in self._paused for role in self._roles}

    async def refresh(self) -> None:
        """Read whether the roles are paused now; wake the readers of resumed roles."""
        found = await steps.run(paused_since(self._redis, self._keys, self._roles))
        if found.keys() != self._paused.keys():
            for role in found.keys() - self._paused.keys():
                logger.info("role %s is paused: no new jobs of it start here", role)
            for role in self._paused.keys() - found.keys():
                logger.info("role %s is resumed", role)
        self._paused = found
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    async def wait_resumed(self, role: str) -> None:
        """Wait until ``role`` is not paused (or the worker stops)."""
        while self.is_paused(role) and not self._stopping.is_set():
            await self._changed.wait()

    def stop(self) -> None:
        """The worker stops: wake every waiter."""
        self._changed.set()

    async def run(self) -> None:
        """Refresh every ``every`` seconds until the worker stops (an outage is waited out)."""
        backoff = connect.Backoff("reading which roles are paused")
        while not self._stopping.is_set():
            with anyio.move_on_after(self._every):
                await self._stopping.wait()
            if self._stopping.is_set():
                return
            try:
                await self.refresh()
            except Exception as exc:
                if not connect.is_outage(exc):
                    raise
                await backoff.failed(exc)
            else:
                backoff.succeeded()
