"""Follow-up jobs: what a handler publishes or submits, once per parent message.

A handler may run more than once for one message: it is retried, or its worker dies and
another adopts it. ``ctx.publish`` and ``ctx.submit`` make the jobs and tasks it starts
idempotent across those runs: each call is named by the parent's message id (kept across
retries and redeliveries) and a per-call key, and that name becomes the child's dedup key
(``ctx.publish``, checked and written in one script with the XADD) or task id
(``ctx.submit``, created only if absent). A second run's call returns the first child's id and
publishes nothing.

The per-call key is the caller's ``idempotency_key`` when given, else the call's ordinal
among this run's calls to the same role (``"orders#0"``, ``"orders#1"``; ``"submit#0"`` for
tasks). The ordinal is right as long as every run makes the same calls to a role in the same
order; a handler whose calls depend on something that may change between runs (the clock, a
database read, a random choice) must pass ``idempotency_key``. See docs/concepts.md.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis

from streamflow.middleware import Middleware, overrides
from streamflow.publishing import When

if TYPE_CHECKING:
    from streamflow.client import Client
    from streamflow.context import Context
    from streamflow.dag import graph as graphs

#: Prefix of the dedup keys of follow-up jobs (the rest is the parent's id and the call key).
DEDUP_PREFIX = "followup:"


def call_name(parent_id: str, call_key: str) -> str:
    """The name of one follow-up call: ``parent id`` and ``call key``, as a dedup key.

    Readable when it fits the protocol's 256 characters, else a hash of both.
    """
    readable = f"{DEDUP_PREFIX}{parent_id}/{call_key}"
    if len(readable) <= 256:
        return readable
    return DEDUP_PREFIX + _digest(parent_id, call_key)


def child_task_id(parent_id: str, call_key: str) -> str:
    """The id of a task submitted by a handler: a hash of the parent's id and the call key."""
    return "t" + _digest(parent_id, call_key)


def _digest(parent_id: str, call_key: str) -> str:
    text = f"{parent_id}\n{call_key}".encode()
    return hashlib.blake2b(text, digest_size=16).hexdigest()


class FollowUps:
    """Publishes and submits on behalf of handlers, through one lazily made client.

    Args:
        redis: The worker's asyncio Redis client.
        namespace: The worker's namespace.
    """

    def __init__(self, redis: Redis, namespace: str) -> None:
        self._redis = redis
        self._namespace = namespace
        self._client: Client | None = None
        self._middleware: tuple[Middleware, ...] = ()

    def use(self, middleware: Iterable[Middleware]) -> None:
        """Run the publish hooks of ``middleware`` (the app's) around every follow-up publish.

        So a tracing middleware sends a follow-up from inside the handler's span: its trace
        context, not the parent job's incoming one, is the child's.
        """
        self._middleware = tuple(m for m in middleware if overrides(m, "publish"))
        self._client = None

    @property
    def client(self) -> Client:
        """The client that publishes (made on first use: most workers never need it)."""
        if self._client is None:
            # Imported on first use: the client brings the DAG wing (submit), which the
            # delivery path does not import (docs/architecture.md).
            from streamflow.client import Client

            self._client = Client(self._redis, namespace=self._namespace)
            if self._middleware:
                self._client.add_middleware(*self._middleware)
        return self._client

    async def publish(
        self,
        parent: Context,
        role: str,
        payload: Any,
        *,
        call_key: str,
        key: str | None,
        deadline: datetime | timedelta | None,
        delay: When,
        headers: Mapping[str, str] | None,
        priority: int | None = None,
    ) -> str:
        """Publish a child of ``parent`` once; see :meth:`streamflow.Context.publish`."""
        return await self.client.publish(
            role,
            payload,
            key=key,
            dedup_key=call_name(parent.message_id, call_key),
            deadline=deadline,
            delay=delay,
            headers=_inherited(parent, headers),
            priority=priority,
        )

    async def submit(
        self,
        parent: Context,
        graph: graphs.Graph | graphs.GraphSpec | dict[str, Any],
        *,
        call_key: str,
        params: dict[str, Any] | None,
        headers: Mapping[str, str] | None,
        roles: Iterable[str] | None,
        functions: Iterable[str] | None,
    ) -> str:
        """Submit a task of ``parent`` once; see :meth:`streamflow.Context.submit`."""
        task_id = child_task_id(parent.message_id, call_key)
        try:
            return await self.client.submit(
                graph,
                params=params,
                task_id=task_id,
                roles=roles,
                functions=functions,
                headers=_inherited(parent, headers),
            )
        except ValueError:
            # Taken: an earlier run of the parent submitted it (its commit is atomic).
            if await self.client.task(task_id) is not None:
                return task_id
            raise


def _inherited(parent: Context, headers: Mapping[str, str] | None) -> dict[str, str] | None:
    """The parent's headers, updated with the call's own."""
    inherited = parent.headers
    if not inherited and not headers:
        return None
    return {**inherited, **(headers or {})}
