"""Publishing jobs from any Python service: :class:`Client` (async) and :class:`SyncClient`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Self

import orjson
import redis as redis_sync
from pydantic import BaseModel
from redis.asyncio import Redis
from redis.backoff import NoBackoff
from redis.retry import Retry as SyncRetry

from streamflow import streams
from streamflow.errors import PayloadError, RedisUnavailable
from streamflow.keys import Keys, validate_name
from streamflow.protocol import check_publish_fields, encode_job_fields, new_message_id, now_ms

#: How long a dedup key is remembered by default: a second publish within it is dropped.
DEFAULT_DEDUP_WINDOW = timedelta(hours=24)


@dataclass(frozen=True, slots=True)
class _Prepared:
    stream: str
    message_id: str
    body: bytes
    dedup_marker: str | None


class _Publisher:
    """Builds the bytes to publish; the async and sync clients only do the I/O."""

    def __init__(self, namespace: str, dedup_window: timedelta) -> None:
        self.keys = Keys(namespace)
        self._dedup_ms = int(dedup_window.total_seconds() * 1000)

    def prepare(
        self,
        role: str,
        payload: Any,
        *,
        message_id: str | None,
        dedup_key: str | None,
        deadline: datetime | timedelta | None,
        task_id: str | None,
        node_id: str | None,
    ) -> _Prepared:
        stream = self.keys.role_stream(role)
        message_id = message_id or new_message_id()
        deadline_ms = _deadline_ms(deadline)
        check_publish_fields(message_id, dedup_key, deadline_ms)
        body = _encode(
            message_id,
            role,
            payload,
            now_ms(),
            deadline_ms=deadline_ms,
            task_id=validate_name(task_id, "task id") if task_id else None,
            node_id=validate_name(node_id, "node id") if node_id else None,
            dedup_key=dedup_key,
        )
        marker = self.keys.dedup(role, dedup_key) if dedup_key else None
        return _Prepared(stream, message_id, body, marker)

    def bodies(self, role: str, payloads: Iterable[Any]) -> list[tuple[str, str, bytes]]:
        stream = self.keys.role_stream(role)
        created = now_ms()
        out = []
        for payload in payloads:
            message_id = new_message_id()
            out.append((stream, message_id, _encode(message_id, role, payload, created)))
        return out

    @property
    def dedup_ms(self) -> int:
        return self._dedup_ms


class Client:
    """Publishes jobs to roles from async code.

    Publishing is never retried behind your back: a retried XADD whose first reply was lost
    would publish twice. On a connection failure the call raises :class:`RedisUnavailable`;
    pass a ``dedup_key`` to make a retry of your own safe.

    Args:
        redis: An asyncio Redis client, e.g. from :meth:`from_url`.
        namespace: The key namespace shared with the workers.
        dedup_window: How long a dedup key is remembered.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        namespace: str = "sf",
        dedup_window: timedelta = DEFAULT_DEDUP_WINDOW,
    ) -> None:
        self.redis = redis
        self._pub = _Publisher(namespace, dedup_window)
        self._scripts = streams.Scripts(redis)

    @classmethod
    def from_url(cls, url: str, *, namespace: str = "sf", **kwargs: Any) -> Self:
        """A client connected to ``url`` (``redis://``, ``rediss://`` or ``unix://``)."""
        return cls(streams.connect(url, name="streamflow-client"), namespace=namespace, **kwargs)

    async def publish(
        self,
        role: str,
        payload: Any = None,
        *,
        message_id: str | None = None,
        dedup_key: str | None = None,
        deadline: datetime | timedelta | None = None,
        task_id: str | None = None,
        node_id: str | None = None,
    ) -> str:
        """Publish one job and return its message id.

        Args:
            role: The role that handles it.
            payload: Any JSON-serializable value or a pydantic model.
            message_id: The message id; a random one by default.
            dedup_key: When given, publishing again with the same key within the dedup window
                publishes nothing and returns the first message's id.
            deadline: When the job must not start any more (absolute, or relative to now).
            task_id: The DAG task it belongs to.
            node_id: The DAG node it belongs to.

        Raises:
            RedisUnavailable: Redis could not be reached; the job may or may not be published.
            PayloadError: The payload cannot be encoded as JSON.
            InvalidNameError: A role, task or node name is invalid.
            ValueError: The message id, dedup key or deadline is out of the protocol's bounds.
        """
        prepared = self._pub.prepare(
            role,
            payload,
            message_id=message_id,
            dedup_key=dedup_key,
            deadline=deadline,
            task_id=task_id,
            node_id=node_id,
        )
        try:
            if prepared.dedup_marker is None:
                await streams.publish(self.redis, prepared.stream, prepared.body)
                return prepared.message_id
            result = await streams.publish_dedup(
                self._scripts,
                self.redis,
                stream=prepared.stream,
                marker=prepared.dedup_marker,
                message_id=prepared.message_id,
                message=prepared.body,
                window_ms=self._pub.dedup_ms,
            )
        except streams.TRANSIENT_ERRORS as exc:
            raise RedisUnavailable(f"publishing to role {role!r} failed: {exc}") from None
        published, first = result
        return prepared.message_id if published else first

    async def publish_many(
        self, role: str, payloads: Iterable[Any], *, chunk_size: int = 1000
    ) -> list[str]:
        """Publish many jobs to one role in pipelined chunks; returns their message ids.

        Raises:
            RedisUnavailable: Redis could not be reached; earlier chunks were published.
        """
        prepared = self._pub.bodies(role, payloads)
        try:
            for chunk in _chunks(prepared, chunk_size):
                await streams.publish_many(self.redis, [(s, body) for s, _, body in chunk])
        except streams.TRANSIENT_ERRORS as exc:
            raise RedisUnavailable(f"publishing to role {role!r} failed: {exc}") from None
        return [message_id for _, message_id, _ in prepared]

    async def aclose(self) -> None:
        """Close the connections."""
        await self.redis.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class SyncClient:
    """The blocking twin of :class:`Client`, for services that are not async.

    Args:
        url: A ``redis://``, ``rediss://`` or ``unix://`` URL.
        namespace: The key namespace shared with the workers.
        dedup_window: How long a dedup key is remembered.
    """

    def __init__(
        self,
        url: str,
        *,
        namespace: str = "sf",
        dedup_window: timedelta = DEFAULT_DEDUP_WINDOW,
    ) -> None:
        streams.validate_url(url)
        self.redis = redis_sync.Redis.from_url(
            url, socket_timeout=10.0, socket_connect_timeout=5.0, retry=SyncRetry(NoBackoff(), 0)
        )
        self._pub = _Publisher(namespace, dedup_window)
        script_text = streams.Scripts.source("publish_dedup.lua")
        self._dedup = self.redis.register_script(script_text)

    def publish(
        self,
        role: str,
        payload: Any = None,
        *,
        message_id: str | None = None,
        dedup_key: str | None = None,
        deadline: datetime | timedelta | None = None,
        task_id: str | None = None,
        node_id: str | None = None,
    ) -> str:
        """Publish one job and return its message id (see :meth:`Client.publish`)."""
        prepared = self._pub.prepare(
            role,
            payload,
            message_id=message_id,
            dedup_key=dedup_key,
            deadline=deadline,
            task_id=task_id,
            node_id=node_id,
        )
        try:
            if prepared.dedup_marker is None:
                self.redis.xadd(prepared.stream, {b"message": prepared.body})
                return prepared.message_id
            flag, value = self._dedup(
                keys=[prepared.stream, prepared.dedup_marker],
                args=[prepared.message_id, self._pub.dedup_ms, prepared.body],
            )
        except streams.TRANSIENT_ERRORS as exc:
            raise RedisUnavailable(f"publishing to role {role!r} failed: {exc}") from None
        return prepared.message_id if flag else bytes(value).decode()

    def publish_many(
        self, role: str, payloads: Iterable[Any], *, chunk_size: int = 1000
    ) -> list[str]:
        """Publish many jobs to one role in pipelined chunks; returns their message ids."""
        prepared = self._pub.bodies(role, payloads)
        try:
            for chunk in _chunks(prepared, chunk_size):
                pipe = self.redis.pipeline(transaction=False)
                for stream, _, body in chunk:
                    pipe.xadd(stream, {b"message": body})
                pipe.execute()
        except streams.TRANSIENT_ERRORS as exc:
            raise RedisUnavailable(f"publishing to role {role!r} failed: {exc}") from None
        return [message_id for _, message_id, _ in prepared]

    def close(self) -> None:
        """Close the connections."""
        self.redis.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _encode(message_id: str, role: str, payload: Any, created_at_ms: int, **extra: Any) -> bytes:
    if isinstance(payload, BaseModel):
        payload = payload.model_dump(mode="json")
    try:
        # orjson takes dicts, lists, dataclasses, datetimes and UUIDs as they are.
        return encode_job_fields(
            message_id=message_id,
            role=role,
            payload=payload,
            created_at_ms=created_at_ms,
            **extra,
        )
    except orjson.JSONEncodeError as exc:
        raise PayloadError(f"payload cannot be encoded as JSON: {exc}") from None


def _deadline_ms(deadline: datetime | timedelta | None) -> int | None:
    if deadline is None:
        return None
    if isinstance(deadline, timedelta):
        return now_ms() + int(deadline.total_seconds() * 1000)
    return int(deadline.timestamp() * 1000)


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
