"""Publishing, written once for :class:`~streamflow.Client` and :class:`~streamflow.SyncClient`.

One client awaits Redis and the other blocks on it, but they publish the same way: look up the
role's partitions (warning about a role no worker ever served), build and check the entry, look
up a cancel of a chosen id, then XADD, ZADD or a script. :class:`Publisher` writes each of these
once, as steps that run on either client (see :mod:`streamflow.steps`); the clients only run
them and turn Redis failures into documented errors.

The common publish (no dedup key, no delay, the role's layout known) takes a shorter way:
:meth:`Publisher.plain` builds its commands without I/O, the client's held connection (see
:mod:`streamflow.pipelines`) sends them, coalesced with concurrent publishes, and
:meth:`Publisher.check_plain` reads the replies; ``publish_many`` sends all its chunks there in
one round trip.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, NotRequired, TypedDict, Unpack

import orjson
from pydantic import BaseModel
from redis.exceptions import NoScriptError, ResponseError

from streamflow import connect, partitions, pipelines, scripts, signals, streams
from streamflow.errors import (
    CancelledIdWarning,
    ConfigError,
    PayloadError,
    RedisUnavailable,
    UnknownRoleWarning,
)
from streamflow.keys import Keys, validate_name
from streamflow.protocol import (
    check_headers,
    check_publish_fields,
    encode_job_fields,
    keep_result_ms,
    new_message_id,
    now_ms,
)
from streamflow.steps import Steps

if TYPE_CHECKING:
    from streamflow.middleware import Publish

#: How long a dedup key is remembered by default: a second publish within it is dropped.
DEFAULT_DEDUP_WINDOW = timedelta(hours=24)

#: When a job may start: a datetime, or a timedelta or seconds from now.
When = datetime | timedelta | float | None

_PACKAGE = str(Path(__file__).parent)


class JobOptions(TypedDict):
    """A job's options, as :meth:`streamflow.Client.publish` takes them (each may be None)."""

    key: str | None
    message_id: str | None
    dedup_key: str | None
    deadline: datetime | timedelta | None
    delay: When
    task_id: str | None
    node_id: str | None
    keep_result: NotRequired[timedelta | float | None]
    priority: NotRequired[int | None]
    headers: Mapping[str, str] | None


@dataclass(frozen=True, slots=True)
class Plain:
    """A publish as the commands of one round trip (see :meth:`Publisher.plain`).

    Attributes:
        message_id: The job's message id.
        commands: An ``EXISTS`` of its cancel markers when the id was chosen, then the XADD.
    """

    message_id: str
    commands: tuple[tuple[Any, ...], ...]


@dataclass(frozen=True, slots=True)
class _Prepared:
    stream: str
    schedule: str
    message_id: str
    body: bytes
    dedup_marker: str | None
    due_ms: int


class Publisher:
    """One client's publishing: what to send, in what order, and what the replies mean.

    Args:
        redis: The client's Redis client, asyncio or blocking; the steps call its commands.
        keys: The namespace's keys.
        dedup_window: How long a dedup key is remembered.
        layouts: The client's cache of role layouts.
        dedup_script: ``publish_dedup.lua`` registered on ``redis``.
        many_script: ``publish_many.lua`` registered on ``redis``.
        lane: The client's held connection (see :mod:`streamflow.pipelines`); None on a cluster.
    """

    def __init__(
        self,
        redis: Any,
        keys: Keys,
        dedup_window: timedelta,
        layouts: partitions.LayoutCache,
        *,
        dedup_script: Any,
        many_script: Any,
        lane: pipelines.AutoPipeline | pipelines.HeldConnection | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.dedup_ms = int(dedup_window.total_seconds() * 1000)
        self.layouts = layouts
        self._dedup = dedup_script
        self._many = many_script
        #: The held connection that one-call publishes and ``publish_many`` use (not on a
        #: cluster, whose commands go to their slot's node).
        self.lane: Any = lane
        #: The roles workers registered, as last read (when a role was found unknown).
        self._served: list[str] = []
        self._streams: dict[str, str] = {}

    def layout(self, role: str, strict: bool) -> Steps[partitions.Layout]:
        """The role's partitions; a warning (``strict``: an error) for an unknown role.

        The record is read once per role and client (again a second later while the role does
        not exist), and so are the roles workers registered, for the warning: never per publish.

        Raises:
            ConfigError: ``strict`` and no worker ever served the role.
        """
        layout = self.layouts.cached(role)
        if layout is None:
            validate_name(role, "role")
            recorded = yield from partitions.read_record(self.redis, self.keys, role)
            layout = self.layouts.record(role, recorded)
            if recorded[0] is None:  # read at most once a second per role: not per publish
                self._served = yield from self._known_roles()
                if not strict:
                    _warn(self._unknown_role(role), UnknownRoleWarning)
        if strict and self.layouts.missing(role):
            raise ConfigError(self._unknown_role(role))
        return layout

    def publish(
        self, role: str, payload: Any, *, strict: bool, **job: Unpack[JobOptions]
    ) -> Steps[str]:
        """Publish one job; returns its message id (see :meth:`streamflow.Client.publish`)."""
        layout = yield from self.layout(role, strict)
        priority = job.get("priority")
        level = 0 if priority is None else check_priority(layout, priority)
        p = self._prepare(role, payload, layout.pick(job["key"], job["dedup_key"]), level, job)
        if job["message_id"] is not None:
            yield from self.warn_if_cancelled("message", job["message_id"])
        if p.dedup_marker is not None:
            published, first = yield from scripts.publish_dedup(
                self._dedup,
                self.redis,
                stream=p.stream,
                marker=p.dedup_marker,
                schedule=p.schedule,
                message_id=p.message_id,
                message=p.body,
                window_ms=self.dedup_ms,
                due_ms=p.due_ms,
            )
            return p.message_id if published else first
        if p.due_ms:
            yield from streams.schedule(self.redis, p.schedule, p.due_ms, p.body)
        else:
            yield from streams.publish(self.redis, p.stream, p.body)
        return p.message_id

    def plain(
        self,
        role: str,
        payload: Any,
        key: str | None,
        message_id: str | None,
        deadline: datetime | timedelta | None,
        task_id: str | None,
        node_id: str | None,
        strict: bool,
        priority: int | None = None,
    ) -> Plain | None:
        """A publish without dedup key or delay as commands, when no lookup must come first.

        The same checks as :meth:`publish`, without I/O: None when the role's layout is not
        cached (run :meth:`publish` then, which reads it). With a chosen ``message_id`` the
        cancel lookup goes first in the same round trip; :meth:`check_plain` reads its reply.

        Raises:
            ConfigError: ``strict`` and no worker ever served the role.
        """
        layout = self.layouts.cached(role)
        if layout is None:
            return None
        if strict and self.layouts.missing(role):
            raise ConfigError(self._unknown_role(role))
        level = 0 if priority is None else check_priority(layout, priority)
        deadline_ms = None if deadline is None else _absolute_ms(deadline)
        chosen = message_id is not None
        if message_id is None:
            message_id = new_message_id()  # valid by construction
        if chosen or deadline_ms is not None:
            check_publish_fields(message_id, None, deadline_ms)
        body = _encode(
            message_id,
            layout.role,
            payload,
            now_ms(),
            deadline_ms=deadline_ms,
            task_id=validate_name(task_id, "task id") if task_id else None,
            node_id=validate_name(node_id, "node id") if node_id else None,
            priority=level,
        )
        shard = layout.pick(key)
        stream = self._stream(shard) if not level else self.keys.role_stream(shard, level)
        xadd = (b"XADD", stream, b"*", b"message", body)
        if not chosen:
            return Plain(message_id, (xadd,))
        # Both markers share one slot: one EXISTS reads them (see signals.cancelled_already).
        markers = signals.cancel_markers(self.keys, "message", message_id)
        return Plain(message_id, ((b"EXISTS", *markers), xadd))

    def plain_for(
        self, role: str, payload: Any, options: dict[str, Any], headers: object
    ) -> Plain | None:
        """:meth:`plain` for a call with :meth:`streamflow.Client.publish`'s options.

        None when the call must take the full path (:meth:`publish`): it has headers, a
        dedup key, a delay or a kept outcome (:meth:`plain` carries none of them), or the
        role's layout is not cached.
        """
        full = ("dedup_key", "delay", "keep_result")
        if headers is not None or any(options[name] is not None for name in full):
            return None
        return self.plain(
            role,
            payload,
            options["key"],
            options["message_id"],
            options["deadline"],
            options["task_id"],
            options["node_id"],
            options["strict"],
            options.get("priority"),
        )

    def check_plain(self, plain: Plain, replies: list[Any]) -> str:
        """The message id of a :meth:`plain` publish, given its commands' replies.

        Raises:
            RedisUnavailable: An outage (the job may or may not be published).
            RedisCommandError: Redis refused the XADD.
        """
        *lookup, added = replies
        if isinstance(added, Exception):
            raise added
        if lookup:
            hit = lookup[0]
            if isinstance(hit, connect.TRANSIENT_ERRORS):
                raise RedisUnavailable(f"looking up cancels failed: {hit}") from None
            # A refusal (e.g. ACL rules older than this check): no warning, no failure.
            if not isinstance(hit, Exception) and hit:
                text = signals.cancelled_already_text("message", plain.message_id)
                _warn(text, CancelledIdWarning)
        return plain.message_id

    def _stream(self, shard: str) -> str:
        """The stream of a partition (its name checked once, then remembered)."""
        stream = self._streams.get(shard)
        if stream is None:
            stream = self._streams[shard] = self.keys.role_stream(shard)
        return stream

    def publish_many(
        self,
        role: str,
        payloads: Iterable[Any],
        *,
        keys: Iterable[str | None] | None,
        chunk_size: int,
        strict: bool,
        headers: Mapping[str, str] | None = None,
        each_headers: Sequence[Mapping[str, str]] | None = None,
        priorities: Iterable[int] | None = None,
    ) -> Steps[list[str]]:
        """Publish many jobs, one script call per chunk of one stream; returns their ids.

        ``each_headers``: one job's headers each (instead of ``headers`` for all).
        ``priorities`` gives each job its level (see :meth:`streamflow.Client.publish_many`).
        """
        checked = check_headers(headers) if headers else None
        each = None
        if each_headers is not None:
            each = [check_headers(own) if own else None for own in each_headers]
        layout = yield from self.layout(role, strict)
        prepared = self._bodies(layout, payloads, keys, checked, each, priorities)
        if self.lane is not None:
            yield from self._many_on_lane(prepared, chunk_size)
        else:
            for chunk in _chunks(prepared, chunk_size):
                bodies = [body for _, _, body in chunk]
                yield from scripts.publish_many(self._many, self.redis, chunk[0][0], bodies)
        return [message_id for _, message_id, _ in prepared]

    def publish_messages(self, messages: Sequence[Publish], chunk_size: int) -> Steps[list[str]]:
        """:meth:`publish_many` of messages that passed a publish middleware (one role).

        Raises:
            ValueError: A middleware changed a message's role.
        """
        role = messages[0].role
        if any(message.role != role for message in messages):
            raise ValueError(f"a publish middleware changed the role of a publish_many to {role!r}")
        return (
            yield from self.publish_many(
                role,
                [message.payload for message in messages],
                keys=[message.options.get("key") for message in messages],
                chunk_size=chunk_size,
                strict=bool(messages[0].options.get("strict")),
                each_headers=[message.headers for message in messages],
                priorities=_priorities_of(messages),
            )
        )

    def _many_on_lane(self, prepared: list[tuple[str, str, bytes]], size: int) -> Steps[None]:
        """Every chunk's script call in one round trip on the client's held connection.

        Chunks refused with ``NOSCRIPT`` (the script cache was flushed) did not run: the
        script is loaded and they are sent again.
        """
        commands = [
            (b"EVALSHA", self._many.sha, 1, chunk[0][0], *(body for _, _, body in chunk))
            for chunk in _chunks(prepared, size)
        ]
        replies = yield self.lane.call(commands)
        again = [c for c, reply in zip(commands, replies, strict=True) if _no_script(reply)]
        _raise_first([reply for reply in replies if not _no_script(reply)])
        if again:
            yield self.redis.script_load(self._many.script)
            _raise_first((yield self.lane.call(again)))

    def warn_if_cancelled(self, target: str, target_id: str) -> Steps[None]:
        """Warn when a cancel of a chosen id is in force: its work would be refused at once.

        Raises:
            RedisUnavailable: The lookup met an outage.
        """
        try:
            hit = yield from signals.cancelled_already(self.redis, self.keys, target, target_id)
        except connect.TRANSIENT_ERRORS as exc:
            raise RedisUnavailable(f"looking up cancels failed: {exc}") from None
        except ResponseError:  # e.g. ACL rules older than this check: no warning, no failure
            return
        if hit:
            _warn(signals.cancelled_already_text(target, target_id), CancelledIdWarning)

    def _prepare(
        self, role: str, payload: Any, shard: str, level: int, job: JobOptions
    ) -> _Prepared:
        """The checked entry and where it goes (no I/O)."""
        message_id = job["message_id"] or new_message_id()
        dedup_key = job["dedup_key"]
        deadline_ms = _absolute_ms(job["deadline"])
        check_publish_fields(message_id, dedup_key, deadline_ms)
        task_id, node_id = job["task_id"], job["node_id"]
        body = _encode(
            message_id,
            role,
            payload,
            now_ms(),
            deadline_ms=deadline_ms,
            task_id=validate_name(task_id, "task id") if task_id else None,
            node_id=validate_name(node_id, "node id") if node_id else None,
            dedup_key=dedup_key,
            keep_result_ms=keep_result_ms(job.get("keep_result")),
            headers=check_headers(job["headers"]) if job["headers"] else None,
            priority=level,
        )
        return _Prepared(
            stream=self.keys.role_stream(shard, level),
            schedule=self.keys.delayed(shard, level),
            message_id=message_id,
            body=body,
            dedup_marker=self.keys.dedup(shard, dedup_key) if dedup_key else None,
            due_ms=_absolute_ms(job["delay"]) or 0,
        )

    def _known_roles(self) -> Steps[list[str]]:
        """The roles workers registered, named in the unknown-role warning.

        None when the key holds another type (anyone with a publisher's rights may write one
        there): the warning only loses its list, the publish goes on.
        """
        try:
            served = yield self.redis.smembers(self.keys.known_roles())
        except ResponseError as exc:
            if connect.is_outage(exc):
                raise
            return []
        return sorted(streams.text_lenient(name) for name in served)

    def _unknown_role(self, role: str) -> str:
        """The warning (or error) for a publish to a role no worker ever served."""
        return partitions.unknown_role_text(self.keys.namespace, role, self._served)

    def _bodies(
        self,
        layout: partitions.Layout,
        payloads: Iterable[Any],
        keys: Iterable[str | None] | None,
        headers: dict[str, str] | None,
        each_headers: Sequence[dict[str, str] | None] | None = None,
        priorities: Iterable[int] | None = None,
    ) -> list[tuple[str, str, bytes]]:
        """(stream, message id, body) per payload, each on its key's partition or round-robin.

        With ``priorities``, each payload goes to its level's stream of that partition; every
        priority is checked before anything is built, so a bad one publishes nothing.
        """
        role = layout.role
        streams_of = {shard: self.keys.role_stream(shard) for shard in layout.shards}
        created = now_ms()
        out = []
        pairs: Iterable[tuple[Any, str | None]] = (
            zip(payloads, keys, strict=True)
            if keys is not None
            else ((payload, None) for payload in payloads)
        )
        if priorities is not None:
            return self._leveled(
                layout, list(pairs), list(priorities), headers, each_headers, created
            )
        for number, (payload, key) in enumerate(pairs):
            stream = streams_of[layout.pick(key)]
            message_id = new_message_id()
            own = headers if each_headers is None else each_headers[number]
            body = _encode(message_id, role, payload, created, headers=own)
            out.append((stream, message_id, body))
        return out

    def _leveled(
        self,
        layout: partitions.Layout,
        pairs: list[tuple[Any, str | None]],
        priorities: list[int],
        headers: dict[str, str] | None,
        each_headers: Sequence[dict[str, str] | None] | None,
        created: int,
    ) -> list[tuple[str, str, bytes]]:
        """:meth:`_bodies` with a priority per payload."""
        if len(priorities) != len(pairs):
            raise ValueError("priorities and payloads differ in length")
        levels = [check_priority(layout, priority) for priority in priorities]
        out = []
        for number, ((payload, key), level) in enumerate(zip(pairs, levels, strict=True)):
            stream = self.keys.role_stream(layout.pick(key), level)
            message_id = new_message_id()
            own = headers if each_headers is None else each_headers[number]
            body = _encode(message_id, layout.role, payload, created, headers=own, priority=level)
            out.append((stream, message_id, body))
        return out


def check_priority(layout: partitions.Layout, priority: object) -> int:
    """The level a publish with ``priority`` goes to: ``priority`` itself, checked.

    Raises:
        ValueError: It is not an integer, or not one of the role's levels (``0`` to
            ``levels - 1``; a role without priorities, or not created yet, has only 0).
    """
    if type(priority) is not int:
        raise ValueError(f"priority must be an integer, not {type(priority).__name__}")
    if not 0 <= priority < layout.levels:
        if layout.levels == 1:
            have = "has no priority levels (declare them with @app.role(priorities=N))"
        else:
            have = f"has priority levels 0 to {layout.levels - 1}"
        raise ValueError(f"priority {priority} refused: role {layout.role!r} {have}")
    return priority


def _priorities_of(messages: Sequence[Publish]) -> list[int] | None:
    """The messages' levels (0 where none was given), or None if none has one."""
    if all(message.options.get("priority") is None for message in messages):
        return None
    return [message.options.get("priority") or 0 for message in messages]


def _no_script(reply: Any) -> bool:
    return isinstance(reply, NoScriptError)


def _raise_first(replies: list[Any]) -> None:
    """Raise the first error among a pipeline's replies (a refusal of one of its commands)."""
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply


def _warn(text: str, category: type[Warning]) -> None:
    """Warn at the first frame outside streamflow: the code that called the client.

    A fixed ``stacklevel`` would depend on how many steps, drivers and wrappers lie between.
    """
    frame = sys._getframe(1)
    level = 2
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame = frame.f_back
        level += 1
    warnings.warn(text, category, stacklevel=level)


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


def _absolute_ms(when: When) -> int | None:
    """A datetime, or a timedelta / seconds from now, as ms since the epoch."""
    if when is None:
        return None
    if isinstance(when, datetime):
        return int(when.timestamp() * 1000)
    seconds = when.total_seconds() if isinstance(when, timedelta) else float(when)
    return now_ms() + int(seconds * 1000)


def _chunks(items: Sequence[tuple[str, str, bytes]], size: int) -> Iterable[Sequence[Any]]:
    """Chunks of at most ``size`` items, each on one stream (one partition), in order."""
    by_stream: dict[str, list[tuple[str, str, bytes]]] = {}
    for item in items:
        by_stream.setdefault(item[0], []).append(item)
    for group in by_stream.values():
        for start in range(0, len(group), size):
            yield group[start : start + size]
