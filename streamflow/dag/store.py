"""Tasks in Redis: creating them, loading and committing their state, reading their results.

A task's keys share the hash tag ``{task:<id>}``. Its state hash holds the version ``v``, the
graph ``spec``, the ``task``'s own state, one ``node:<id>`` state per node (a step rewrites only
the nodes it touched) and one ``inv:<node>:<n>`` record per invocation; ``out:<node>`` lists
the keys of a node's batches in index order; ``outbox`` holds the dispatches a committed step
decided and that are not yet confirmed published. Every change goes through one
version-checked script (``task_commit.lua``).

Slightly past the ~600 lines of the house rule on purpose: :class:`TaskStore` is the one owner
of a task's keys, and its cache of the last committed version (what lets a step skip a load) is
only correct if every read and write of those keys goes through it; the field codec at the end
(``encode_state``, ``decode_state``) is the layout that cache and ``task_commit.lua`` share.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import orjson
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from streamflow import connect, scripts, streams
from streamflow.dag import graph as graphs
from streamflow.dag.graph import GraphSpec
from streamflow.dag.tasks import Invocation, NodeState, Step, TaskState, TaskStatus, failed_state
from streamflow.errors import InputError, StreamflowError
from streamflow.keys import Keys
from streamflow.logs import BadKeys, shown
from streamflow.protocol import DEFAULT_MAX_MESSAGE_BYTES, decode_batch
from streamflow.records import CONTROL_SUBMITTED, CONTROL_TASK_FIELD, CONTROL_TYPE_FIELD
from streamflow.scripts import Scripts

logger = logging.getLogger(__name__)

#: Told of each registry key read or written: (kind, key, why it failed or None).
BadKey = Callable[[str, str, "str | None"], None]

#: How long a finished task (state, outputs) is kept, by default: 7 days.
DEFAULT_RETENTION_MS = 7 * 24 * 3600 * 1000
#: Tasks whose graph (with what it implies, see graph.GraphIndex) and last committed state one
#: store keeps in memory; the least recently used is dropped first, a finished task's at once.
SPEC_CACHE_SIZE = 256
#: And at most this many nodes in all of them: a node's spec, index and state take about
#: 2.5 KB (24 MB for a 10,000-node chain, measured), so about 120 MB at most.
SPEC_CACHE_NODES = 50_000


#: Invocation records one store keeps per task before it starts its record over (see _Cached).
INVOCATIONS_KEPT = 512


@dataclass(slots=True)
class _Cached:
    """What a store keeps of a task it steps: its checked graph, and the state it committed.

    ``base`` is a state read from Redis (version-checked) after which every commit of the task
    was this store's, and ``invocations`` the invocation records read or committed since then
    (None: known to be absent). An invocation record is only ever written for an invocation
    already dispatched (events of others are ignored), so a record of an invocation that
    ``base`` had not dispatched yet, and that is not kept here, does not exist. While that
    holds, a step needs nothing from Redis: its commit's version check is what confirms it
    (see :meth:`TaskStore.load`). ``base`` None: read first.
    """

    spec: GraphSpec
    version: int = -1
    task: TaskState | None = None
    base: TaskState | None = None
    invocations: dict[str, Invocation | None] = field(default_factory=dict)

    def known(self, keys: Sequence[str]) -> dict[str, Invocation] | None:
        """The records ``keys`` name that exist, if all are known without a read; else None."""
        if self.base is None or self.task is None:
            return None
        found: dict[str, Invocation] = {}
        for key in keys:
            if key in self.invocations:
                inv = self.invocations[key]
                if inv is not None:
                    found[key] = inv
                continue
            node_id, _, number = key.rpartition(":")
            node = self.base.nodes.get(node_id)
            if node is not None and int(number) < node.dispatched:
                return None  # it may have been written before ``base``: read it
        return found

    def rebase(self, task: TaskState) -> None:
        """Start over from ``task``, the state at ``version`` (read or committed)."""
        self.base, self.invocations = task, {}


class UnrunnableTask(StreamflowError, ValueError):
    """A task's stored state cannot be run (written by hand, or corrupted): why.

    ``writable`` is False when its state key is not a hash, so that no failed state can be
    recorded there.
    """

    def __init__(self, reason: str, *, writable: bool = True) -> None:
        super().__init__(reason[:1000])
        self.reason = reason[:1000]
        self.writable = writable


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
        scripts: Scripts | None = None,
        *,
        retention_ms: int = DEFAULT_RETENTION_MS,
        bad_key: BadKey | None = None,
    ) -> None:
        self._redis = redis
        self.keys = keys
        self._scripts = scripts or Scripts(redis)
        self.retention_ms = retention_ms
        #: Registry keys of another type met while writing, by kind (``known_roles``): each
        #: warned of and counted once until it is written again (unless ``bad_key`` is given).
        self._bad_keys = BadKeys(logger)
        self.bad_records = self._bad_keys.counts
        self._bad_key = bad_key or self._bad_keys.seen
        self._cache: OrderedDict[str, _Cached] = OrderedDict()
        self._cached_nodes = 0

    def _check_listed(self, replies: list[Any]) -> None:
        """Raise the index writes' errors; a known roles key of another type is only warned of.

        Anyone with a worker's rights may write another type of key at the known roles' name:
        the task still runs (its roles were registered by their workers).
        """
        for reply in replies[:2]:
            if isinstance(reply, Exception):
                raise reply
        if len(replies) < 3:  # no role to list
            return
        listed = replies[2]
        if isinstance(listed, ResponseError) and connect.is_outage(listed):
            raise listed
        problem = None
        if isinstance(listed, ResponseError):
            problem = (
                f"another type of key is there ({shown(listed)}), task roles not added; DEL it"
            )
        self._bad_key("known_roles", self.keys.known_roles(), problem)

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
        replies = await pipe.execute(raise_on_error=False)
        self._check_listed(replies)
        fields = {"spec": spec.to_json(), **encode_state(task, task.nodes)}
        version = await self._commit(task.id, -1, fields, {}, [], [], 0)
        if version is None:
            raise ValueError(f"task {task.id!r} exists")
        await self._redis.xadd(
            self.keys.tasks_control(),
            {CONTROL_TASK_FIELD: task.id.encode(), CONTROL_TYPE_FIELD: CONTROL_SUBMITTED},
        )

    async def load(
        self, task_id: str, invocations: Sequence[str] = (), *, verify: bool = True
    ) -> Loaded | None:
        """The task's state and the named invocation records (``node:n``); None if unknown.

        Everything read is checked (it may have been written by hand): the graph once per task,
        against the DAG rules and the size limits; the state whenever it is read. The state this
        store committed last is kept, and read again only when the version moved.

        With ``verify`` False, a task whose every commit since it was last read was this
        store's (and whose named records are known, see ``_Cached``) is not read at all: the
        state kept is returned with its version, and the commit's version check confirms it
        (a lost commit makes the next load read). That saves a round trip per step.

        Raises:
            UnrunnableTask: The stored task cannot be run; the reason says why.
        """
        cached = self._cached(task_id)
        if not verify and cached is not None and cached.task is not None:
            known = cached.known(invocations)
            if known is not None:
                return Loaded(cached.version, cached.spec, cached.task, known)
        names = ["v", *(f"inv:{key}" for key in invocations)]
        if cached is None:
            names += ["spec", "task"]  # the task only to tell unknown from incomplete
        got = dict(zip(names, await self._hmget(task_id, names), strict=True))
        if got["v"] is None:
            if got.get("task") is None and got.get("spec") is None:
                self._forget(task_id)
                return None  # unknown or expired
            raise UnrunnableTask("its stored state is incomplete")
        version = streams.text(got["v"])
        if not version.isdigit():
            raise UnrunnableTask("its version is not a number")
        spec = cached.spec if cached is not None else self._remember_spec(task_id, got["spec"])
        task = await self._state_at(task_id, int(version), spec)
        invs = {
            key: _parsed(Invocation, got[f"inv:{key}"], f"its invocation record {key!r}")
            for key in invocations
            if got[f"inv:{key}"] is not None
        }
        kept = self._cache.get(task_id)
        if kept is not None and kept.base is not None:
            kept.invocations.update({key: invs.get(key) for key in invocations})
        return Loaded(int(version), spec, task, invs)

    async def _hmget(self, task_id: str, names: list[str]) -> list[Any]:
        try:
            return list(await self._redis.hmget(self.keys.task_state(task_id), names))
        except ResponseError as exc:
            if "WRONGTYPE" not in str(exc):
                raise
            raise UnrunnableTask("its state key is not a hash", writable=False) from None

    def _cached(self, task_id: str) -> _Cached | None:
        cached = self._cache.get(task_id)
        if cached is not None:
            self._cache.move_to_end(task_id)
        return cached

    def _remember_spec(self, task_id: str, raw: bytes | None) -> GraphSpec:
        if raw is None:
            raise UnrunnableTask("its stored state is incomplete")
        spec = self._checked_spec(raw)
        self._cache[task_id] = _Cached(spec)
        self._cached_nodes += len(spec.nodes)
        # The newest entry stays, even alone past the node bound: it is the one being stepped.
        while len(self._cache) > 1 and (
            len(self._cache) > SPEC_CACHE_SIZE or self._cached_nodes > SPEC_CACHE_NODES
        ):
            self._forget(next(iter(self._cache)))
        return spec

    def _forget(self, task_id: str) -> None:
        cached = self._cache.pop(task_id, None)
        if cached is not None:
            self._cached_nodes -= len(cached.spec.nodes)

    async def _state_at(self, task_id: str, version: int, spec: GraphSpec) -> TaskState:
        """The state at ``version``: the one this store committed or read last, else read.

        A state read after ``version`` was (a commit came in between) is newer than its label:
        harmless, as the version moved too, so that the step's commit loses the race and the
        next load reads the state again.
        """
        cached = self._cache.get(task_id)
        if cached is not None and cached.task is not None and cached.version == version:
            if cached.base is None:
                cached.rebase(cached.task)
            return cached.task
        ids = list(spec.index.nodes)
        values = await self._hmget(task_id, ["task", *(node_field(n) for n in ids)])
        task = decode_state(values[0], dict(zip(ids, values[1:], strict=True)))
        if task.id != task_id:
            raise UnrunnableTask("its state does not match its graph")
        if cached is not None:
            cached.version, cached.task = version, task
            cached.rebase(task)
        return task

    @staticmethod
    def _checked_spec(raw: bytes | str) -> GraphSpec:
        if len(raw) > graphs.MAX_DOCUMENT_BYTES:
            limit = graphs.MAX_DOCUMENT_BYTES
            raise UnrunnableTask(f"its graph is {len(raw):,} bytes; at most {limit:,} are allowed")
        spec = _parsed(GraphSpec, raw, "its graph")
        problems = graphs.check(spec)
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise UnrunnableTask("its graph is invalid: " + "; ".join(problems[:3]) + more)
        return spec

    async def fail(
        self, task_id: str, reason: str, now: int
    ) -> Literal["failed", "ended", "raced"]:
        """Record that a task that cannot be run failed, with ``reason``.

        The stored state is kept where it reads (its nodes that finished stay so); its outbox
        is dropped, and everything of the task gets the retention. Returns ``failed``;
        ``ended`` when its state says it had ended already (nothing is written); ``raced`` when
        another commit came first.
        """
        version, raw, spec = await self._hmget(task_id, ["v", "task", "spec"])
        own = _tolerant(TaskState, raw)
        if own is not None and own.id == task_id and own.terminal:
            return "ended"
        ids = _node_ids(spec)
        if len(ids) > graphs.MAX_NODES:
            ids = []  # readers of an ended task skip nodes without a record
        values = await self._hmget(task_id, [node_field(n) for n in ids]) if ids else []
        nodes = {}
        for node_id, value in zip(ids, values, strict=True):
            node = _tolerant(NodeState, value)
            nodes[node_id] = node if node is not None and node.terminal else NodeState()
        if own is None or own.id != task_id:
            own = TaskState(id=task_id, nodes={}, created_at_ms=now)
        task = own.model_copy(update={"nodes": nodes})
        ended = failed_state(task, reason, now)
        fields = encode_state(ended, ended.nodes)
        expected = -1 if version is None else version
        if await self._commit(task_id, expected, fields, {}, [], [], self.retention_ms) is None:
            return "raced"
        await self._redis.delete(self.keys.task_outbox(task_id))
        self._forget(task_id)
        return "failed"

    async def commit(
        self,
        loaded: Loaded,
        step: Step,
        outbox: dict[str, bytes],
        *,
        retention: bool,
        publishes: Sequence[scripts.CommittedPublish] = (),
    ) -> tuple[int | None, list[bool | None]]:
        """Commit a step with its outbox items, then run ``publishes`` in the same round trip.

        Returns the new version (None when another commit came first) and, per publish, what
        :func:`streamflow.scripts.commit_and_publish` says of it (all None when none ran). A
        step that ends the task (``retention``) publishes nothing with its commit.
        """
        task_id = step.task.id
        fields = encode_state(step.task, step.touched)
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
        published: list[bool | None] = [None] * len(publishes)
        if publishes and not retention:
            version, published = await scripts.commit_and_publish(
                self._scripts,
                self._redis,
                publishes,
                state=self.keys.task_state(task_id),
                outbox=self.keys.task_outbox(task_id),
                version=loaded.version,
                fields=fields,
                items=outbox,
                appends=appends,
                partials=partials,
            )
        else:
            version = await self._commit(
                task_id, loaded.version, fields, outbox, appends, partials, expire_ms, loaded.spec
            )
        self._committed(task_id, step, version, retention)
        return version, published

    def _committed(self, task_id: str, step: Step, version: int | None, retention: bool) -> None:
        """Keep (or forget) the state a commit wrote, for the next step to start from."""
        cached = self._cache.get(task_id)
        if retention and version is not None:
            self._forget(task_id)
        elif cached is not None and version is None:
            cached.base = None  # another commit came first: read before the next step
        elif cached is not None and version is not None:
            cached.version, cached.task = version, step.task
            if cached.base is not None and len(cached.invocations) > INVOCATIONS_KEPT:
                cached.rebase(step.task)  # bounded: older records are read again if needed
            elif cached.base is not None:
                cached.invocations.update(step.invocations)

    async def _commit(
        self,
        task_id: str,
        version: int | bytes | str,
        fields: dict[str, bytes],
        outbox: dict[str, bytes],
        appends: list[tuple[str, str]],
        partials: list[tuple[str, str, bytes]],
        expire_ms: int,
        spec: GraphSpec | None = None,
    ) -> int | None:
        expire: list[str] = []
        if expire_ms and spec is not None:  # every key of the task gets the retention
            for node in spec.nodes:
                expire += [
                    self.keys.task_output(task_id, node.id),
                    self.keys.task_partials(task_id, node.id),
                    self.keys.task_result(task_id, node.id),
                ]
        return await scripts.commit_task(
            self._scripts,
            self._redis,
            state=self.keys.task_state(task_id),
            outbox=self.keys.task_outbox(task_id),
            version=version,
            fields=fields,
            items=outbox,
            appends=appends,
            partials=partials,
            expire_ms=expire_ms,
            expire=expire,
        )

    async def expire_batches(self, spec: GraphSpec, task_id: str) -> None:
        """Give every batch a finished task's nodes stored the task's retention.

        Workers store batches with their own TTL; a finished task's batches go with it.
        """
        for first in range(0, len(spec.nodes), 500):  # one round trip per 500 nodes, not each
            refs = await self._listed_batches(task_id, spec.nodes[first : first + 500])
            for start in range(0, len(refs), 1000):
                pipe = self._redis.pipeline(transaction=False)
                for ref in refs[start : start + 1000]:
                    pipe.pexpire(ref, self.retention_ms)
                await pipe.execute()

    async def _listed_batches(self, task_id: str, nodes: Sequence[Any]) -> list[str]:
        """The batch keys that ``nodes`` listed, each checked to be a batch of its node.

        A forged ref must not give a stream the task's retention; a list of another type is
        skipped with a warning.
        """
        pipe = self._redis.pipeline(transaction=False)
        for node in nodes:
            pipe.lrange(self.keys.task_output(task_id, node.id), 0, -1)
        found: list[Any] = await pipe.execute(raise_on_error=False)
        refs: list[str] = []
        for node, listed in zip(nodes, found, strict=True):
            if isinstance(listed, Exception):
                logger.warning(
                    "task %s: not expiring the batches of %r: %s", task_id, node.id, shown(listed)
                )
                continue
            texts = (streams.text_lenient(ref) for ref in listed)
            refs += [ref for ref in texts if self.keys.is_batch_of(ref, task_id, node.id)]
        return refs

    async def outbox(self, task_id: str) -> list[tuple[str, bytes]]:
        """The task's outbox items as stored, in the order they were decided.

        :mod:`streamflow.dag.outbox` reads them (items are its business; the state's is here).
        """
        raw = await streams.hash_items(self._redis, self.keys.task_outbox(task_id))
        return [(name, raw[name]) for name in sorted(raw)]

    async def clear_outbox(self, task_id: str, names: Sequence[str]) -> None:
        """Remove outbox items that were carried out."""
        if names:
            await self._redis.hdel(self.keys.task_outbox(task_id), *names)

    async def state(self, task_id: str) -> TaskState | None:
        """A task's state, or None if it is unknown (or expired).

        Raises:
            UnrunnableTask: The stored state does not read (written by hand, or damaged).
        """
        return await self._read_state(task_id)

    async def own_state(self, task_id: str) -> TaskState | None:
        """The task's own state, its nodes left out (one field read); None if unknown.

        Raises:
            UnrunnableTask: It does not parse.
        """
        raw = await self._redis.hget(self.keys.task_state(task_id), "task")
        return None if raw is None else _parsed(TaskState, raw, "its state")

    async def node_running(self, task_id: str, node_id: str) -> bool:
        """Whether a task and its node exist and have not ended (two fields read, not the task).

        A state that does not read counts as ended: nothing can run it.
        """
        raw, node = await self._hget_many(
            self.keys.task_state(task_id), ["task", node_field(node_id)]
        )
        own, state = _tolerant(TaskState, raw), _tolerant(NodeState, node)
        return own is not None and not own.terminal and state is not None and not state.terminal

    async def _read_state(self, task_id: str, raw: bytes | str | None = None) -> TaskState | None:
        """Its own state (``raw`` if given) with every node's, the nodes named by the graph.

        HGETs in pipelines, not HMGET: the publisher and operator ACL users may only HGET.
        """
        key = self.keys.task_state(task_id)
        if raw is None:
            raw, spec = await self._hget_many(key, ["task", "spec"])
        else:
            (spec,) = await self._hget_many(key, ["spec"])
        if raw is None:
            return None
        ids = _node_ids(spec)
        if not ids and not _parsed(TaskState, raw, "its state").terminal:
            raise UnrunnableTask("its graph does not parse")
        values = await self._hget_many(key, [node_field(n) for n in ids])
        return decode_state(raw, dict(zip(ids, values, strict=True)))

    async def _hget_many(self, key: str, names: list[str]) -> list[Any]:
        pipe = self._redis.pipeline(transaction=False)
        for name in names:
            pipe.hget(key, name)
        return list(await pipe.execute()) if names else []

    async def spec(self, task_id: str) -> GraphSpec | None:
        """A task's graph, or None if the task is unknown (or expired)."""
        spec = self._cache[task_id].spec if task_id in self._cache else None
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
            for task_id, raw in zip(ids, await pipe.execute(), strict=True):
                if raw is None or len(found) >= limit:
                    continue
                if state is None or TaskState.model_validate_json(raw).state == state:
                    task = await self._read_state(streams.text(task_id), raw)
                    if task is not None:
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


_M = TypeVar("_M", GraphSpec, TaskState, NodeState, Invocation)


def _parsed(model: type[_M], raw: bytes | str | None, what: str) -> _M:
    """``raw`` read as ``model``; a clear :class:`UnrunnableTask` when it does not parse."""
    try:
        return model.model_validate_json(raw or b"")
    except ValidationError as exc:
        first = exc.errors()[0]
        # A location may name a key of the input: escaped (control and bidi characters become
        # backslash escapes) and bounded, as it reaches logs and terminals.
        where = ".".join(str(p) for p in first["loc"])[:100].encode("unicode_escape").decode()
        raise UnrunnableTask(
            f"{what} does not parse ({exc.error_count()} errors; first: {where or 'document'}: "
            f"{first['msg']})"
        ) from None


def node_field(node_id: str) -> str:
    """The field of the state hash that holds a node's state."""
    return f"node:{node_id}"


def encode_state(task: TaskState, nodes: Iterable[str]) -> dict[str, bytes]:
    """State hash fields: the task's own state (``task``, its nodes left out) and ``nodes``'.

    One field per node, so that a step writes the nodes it touched, not every node.
    """
    fields = {"task": task.model_copy(update={"nodes": {}}).model_dump_json().encode()}
    for node_id in nodes:
        fields[node_field(node_id)] = task.nodes[node_id].model_dump_json().encode()
    return fields


def decode_state(raw: bytes | str | None, nodes: Mapping[str, bytes | str | None]) -> TaskState:
    """A task's state from its ``task`` field and the ``node:<id>`` fields of ``nodes``.

    A task that ended may lack some: one that could not be run ended with those it had.

    Raises:
        UnrunnableTask: A field is missing or does not parse.
    """
    task = _parsed(TaskState, raw, "its state")
    states = {}
    for node_id, value in nodes.items():
        if value is None and task.terminal:
            continue  # a task that could not run ended with the node records it had
        if value is None:
            raise UnrunnableTask(f"its state has no record of node {node_id!r}")
        states[node_id] = _parsed(NodeState, value, f"its record of node {node_id!r}")
    return task.model_copy(update={"nodes": states})


def _node_ids(spec: bytes | str | None) -> list[str]:
    """The node ids of a stored graph, read without a full parse; empty if it does not read."""
    try:
        return [str(n["id"]) for n in orjson.loads(spec or b"")["nodes"]]
    except (orjson.JSONDecodeError, LookupError, TypeError):
        return []


def _tolerant(model: type[_M], raw: bytes | str | None) -> _M | None:
    try:
        return model.model_validate_json(raw or b"")
    except ValidationError:
        return None
