"""Tasks in Redis: creating them, loading and committing their state, reading their results.

A task's keys share the hash tag ``{task:<id>}``. Its state hash holds the version ``v``, the
graph ``spec``, the ``task`` state (with every node's) and one ``inv:<node>:<n>`` record per
invocation; ``out:<node>`` lists the keys of a node's batches in index order; ``outbox`` holds
the dispatches a committed step decided and that are not yet confirmed published. Every change
goes through one version-checked script (``task_commit.lua``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis

from streamflow import streams
from streamflow.errors import InputError
from streamflow.graph import GraphSpec
from streamflow.keys import Keys
from streamflow.logs import shown
from streamflow.protocol import DEFAULT_MAX_MESSAGE_BYTES, decode_batch
from streamflow.tasks import Invocation, Step, TaskState, TaskStatus

logger = logging.getLogger(__name__)

#: How long a finished task (state, outputs) is kept, by default: 7 days.
DEFAULT_RETENTION_MS = 7 * 24 * 3600 * 1000


@dataclass(slots=True)
class Loaded:
    """A task's state as loaded, with the version a commit must find unchanged."""

    version: int
    spec: GraphSpec
    task: TaskState
    invocations: dict[str, Invocation]


class TaskStore:
    """Reads and writes tasks.

    Args:
        redis: The client.
        keys: Key names.
        scripts: The registered scripts.
        retention_ms: How long a finished task is kept.
    """

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        scripts: streams.Scripts | None = None,
        *,
        retention_ms: int = DEFAULT_RETENTION_MS,
    ) -> None:
        self._redis = redis
        self.keys = keys
        self._scripts = scripts or streams.Scripts(redis)
        self.retention_ms = retention_ms
        self._specs: dict[str, GraphSpec] = {}

    async def create(self, spec: GraphSpec, task: TaskState) -> None:
        """Write a new task and announce it to the coordinators.

        Raises:
            ValueError: A task with this id exists.
        """
        # Listed as active first: if the submit stops half-way, the coordinators' sweep still
        # finds the task and starts it.
        roles = sorted({n.role for n in spec.nodes if n.role is not None})
        pipe = self._redis.pipeline(transaction=False)
        pipe.zadd(self.keys.tasks_index(), {task.id: task.created_at_ms})
        pipe.sadd(self.keys.tasks_active(), task.id)
        if roles:
            pipe.sadd(self.keys.known_roles(), *roles)
        await pipe.execute()
        fields = {"spec": spec.to_json(), "task": task.model_dump_json().encode()}
        version = await self._commit(task.id, -1, fields, {}, [], [], 0)
        if version is None:
            raise ValueError(f"task {task.id!r} exists")
        await self._redis.xadd(
            self.keys.tasks_control(), {b"task": task.id.encode(), b"type": b"submitted"}
        )

    async def load(self, task_id: str, invocations: Sequence[str] = ()) -> Loaded | None:
        """The task's state and the named invocation records (``node:n``); None if unknown."""
        spec = self._specs.get(task_id)
        names = ["v", "task", *(f"inv:{key}" for key in invocations)]
        if spec is None:
            names.append("spec")
        values = await self._redis.hmget(self.keys.task_state(task_id), names)
        if values[0] is None or values[1] is None or (spec is None and values[-1] is None):
            return None
        if spec is None:
            spec = GraphSpec.model_validate_json(values[-1] or b"")
            self._specs[task_id] = spec
        invs = {
            key: Invocation.model_validate_json(raw)
            for key, raw in zip(invocations, values[2:], strict=False)
            if raw is not None
        }
        return Loaded(int(values[0]), spec, TaskState.model_validate_json(values[1]), invs)

    async def commit(
        self, loaded: Loaded, step: Step, outbox: dict[str, bytes], *, retention: bool
    ) -> int | None:
        """Commit a step with its outbox items; None when another commit came first."""
        task_id = step.task.id
        fields = {"task": step.task.model_dump_json().encode()}
        for key, inv in step.invocations.items():
            fields[f"inv:{key}"] = inv.model_dump_json().encode()
        appends = [
            (self.keys.task_output(task_id, n), r) for n, rs in step.outputs.items() for r in rs
        ]
        partials = [
            (self.keys.task_partials(task_id, node), str(number), orjson.dumps(value))
            for (node, number), value in step.partials.items()
        ]
        expire_ms = self.retention_ms if retention else 0
        version = await self._commit(
            task_id, loaded.version, fields, outbox, appends, partials, expire_ms, loaded.spec
        )
        if retention and version is not None:
            self._specs.pop(task_id, None)
        return version

    async def _commit(
        self,
        task_id: str,
        version: int,
        fields: dict[str, bytes],
        outbox: dict[str, bytes],
        appends: list[tuple[str, str]],
        partials: list[tuple[str, str, bytes]],
        expire_ms: int,
        spec: GraphSpec | None = None,
    ) -> int | None:
        keys = [self.keys.task_state(task_id), self.keys.task_outbox(task_id)]
        if expire_ms and spec is not None:  # every key of the task gets the retention
            for node in spec.nodes:
                keys += [
                    self.keys.task_output(task_id, node.id),
                    self.keys.task_partials(task_id, node.id),
                    self.keys.task_result(task_id, node.id),
                ]

        def index(key: str) -> int:
            if key not in keys:
                keys.append(key)
            return keys.index(key) + 1

        args: list[Any] = [version, expire_ms, len(fields)]
        for name, value in fields.items():
            args += [name, value]
        args.append(len(outbox))
        for name, value in outbox.items():
            args += [name, value]
        args.append(len(appends))
        for key, ref in appends:
            args += [index(key), ref]
        args.append(len(partials))
        for key, name, value in partials:
            args += [index(key), name, value]
        result = await self._scripts.task_commit(keys=keys, args=args, client=self._redis)
        return None if result is None else int(result)

    async def expire_batches(self, spec: GraphSpec, task_id: str) -> None:
        """Give every batch a finished task's nodes stored the task's retention.

        Workers store batches with their own TTL; a finished task's batches go with it.
        """
        for node in spec.nodes:
            try:
                listed = await self.batch_refs(task_id, node.id)
            except InputError as exc:
                logger.warning("task %s: not expiring the batches of %r: %s", task_id, node.id, exc)
                continue
            # Only keys that are batches of this node: a forged ref must not expire a stream.
            refs = [ref for ref in listed if self.keys.is_batch_of(ref, task_id, node.id)]
            for start in range(0, len(refs), 1000):
                pipe = self._redis.pipeline(transaction=False)
                for ref in refs[start : start + 1000]:
                    pipe.pexpire(ref, self.retention_ms)
                await pipe.execute()

    async def outbox(self, task_id: str) -> list[tuple[str, dict[str, Any]]]:
        """The task's outbox items in the order they were decided."""
        raw = await streams.hash_items(self._redis, self.keys.task_outbox(task_id))
        return [(name, orjson.loads(raw[name])) for name in sorted(raw)]

    async def clear_outbox(self, task_id: str, names: Sequence[str]) -> None:
        """Remove outbox items that were carried out."""
        if names:
            await self._redis.hdel(self.keys.task_outbox(task_id), *names)

    async def state(self, task_id: str) -> TaskState | None:
        """A task's state, or None if it is unknown (or expired)."""
        raw = await self._redis.hget(self.keys.task_state(task_id), "task")
        return TaskState.model_validate_json(raw) if raw is not None else None

    async def spec(self, task_id: str) -> GraphSpec | None:
        """A task's graph, or None if the task is unknown (or expired)."""
        spec = self._specs.get(task_id)
        if spec is None:
            raw = await self._redis.hget(self.keys.task_state(task_id), "spec")
            if raw is None:
                return None
            spec = GraphSpec.model_validate_json(raw)
        return spec

    async def find(self, *, state: TaskStatus | None = None, limit: int = 100) -> list[TaskState]:
        """The newest tasks first, optionally only those in ``state``."""
        found: list[TaskState] = []
        start = 0
        while len(found) < limit:
            ids = await self._redis.zrevrange(self.keys.tasks_index(), start, start + 199)
            if not ids:
                break
            start += len(ids)
            pipe = self._redis.pipeline(transaction=False)
            for task_id in ids:
                pipe.hget(self.keys.task_state(streams.text(task_id)), "task")
            for raw in await pipe.execute():
                if raw is None:
                    continue
                task = TaskState.model_validate_json(raw)
                if state is None or task.state == state:
                    found.append(task)
        return found[:limit]

    async def batch_refs(
        self, task_id: str, node_id: str, start: int = 0, stop: int = -1
    ) -> list[str]:
        """Keys of a node's batches ``start .. stop`` (inclusive) in index order.

        As listed, unchecked (check them with :meth:`Keys.is_batch_of` before reading one).

        Raises:
            InputError: Another type of key is at the list's name.
        """
        return await streams.batch_refs(
            self._redis, self.keys.task_output(task_id, node_id), start, stop
        )

    async def batches(
        self, refs: Sequence[str], *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    ) -> list[list[Any] | None]:
        """The batches stored at ``refs`` (None for one that expired).

        Raises:
            InputError: A key holds another type, or not a JSON array (see
                :func:`~streamflow.protocol.decode_batch`).
        """
        out: list[list[Any] | None] = []
        for start in range(0, len(refs), 500):
            chunk = refs[start : start + 500]
            values = await streams.get_many(self._redis, chunk, raise_on_error=False)
            for ref, raw in zip(chunk, values, strict=True):
                what = f"batch {shown(ref)}"
                out.append(None if raw is None else decode_batch(raw, what, max_bytes))
        return out

    async def output(self, task_id: str, node_id: str) -> list[Any]:
        """Every item a node produced, its batches in order.

        Raises:
            LookupError: A batch expired.
        """
        items: list[Any] = []
        refs = await self.batch_refs(task_id, node_id)
        for ref in refs:
            if not self.keys.is_batch_of(ref, task_id, node_id):
                raise InputError(f"{shown(ref)} is not a batch key of node {node_id!r}")
        for index, batch in enumerate(await self.batches(refs)):
            if batch is None:
                raise LookupError(f"batch {index} of node {node_id!r} expired")
            items.extend(batch)
        return items
