"""The outbox: a committed step's decisions as typed items, and carrying them out.

A step's dispatches, reduces, slot releases and task cancel are committed with its state as
outbox items (one field each of the task's ``outbox`` hash, see :mod:`streamflow.dag.store`),
named so that sorting keeps the order they were decided in. Carrying them out publishes each
job once (under a dedup marker named after its ``(task, node, invocation)``), runs coordinator
functions, sends the cancel and frees role slots. The coordinator that committed the items
carries them out from memory; a tick of the task (the sweep, every second) reads the outbox
back from Redis, which is how items left behind by a crashed coordinator are finished.

Role slots (the per-role limit on running nodes) are taken here too, for the step to come.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from streamflow import connect, partitions, scripts, signals, streams
from streamflow.context import Batch
from streamflow.dag.graph import GraphSpec
from streamflow.dag.store import Loaded, TaskStore
from streamflow.dag.tasks import Dispatch, Event, Internal, Step
from streamflow.dag.tracing import (
    Carrier,
    Causes,
    TaskTracing,
    carrier_of,
    dispatch_span,
    span_attributes,
)
from streamflow.errors import InputError
from streamflow.functions import Function
from streamflow.keys import Keys, validate_shard
from streamflow.logs import shown
from streamflow.protocol import PROTOCOL_VERSION, BatchRef, Job, JobRetry, encode, now_ms
from streamflow.scripts import Scripts

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class JobItem:
    """Publish a node's job, once.

    Attributes:
        role: The job's role.
        shard: The role partition chosen when the dispatch was decided (a retried publish goes
            to the same one, where its dedup marker is); None in items written before
            partitions existed: the role's first.
        id: The job id, which names its dedup marker.
        job: The encoded job.
        trace: The trace context of the step that decided it (see
            :mod:`streamflow.dag.tracing`), or None.
    """

    role: str
    shard: str | None
    id: str
    job: str
    trace: Carrier | None = None


@dataclass(frozen=True, slots=True)
class FunctionItem:
    """Run one invocation of a coordinator function's ``map``.

    Attributes:
        node: The function node.
        invocation: The invocation.
        batch: For a node fed per batch: (parent, parent batch index, batch key).
        inputs: For a node fed when its parents are done: batches per parent.
        trace: The trace context of the step that decided it, or None.
    """

    node: str
    invocation: int
    batch: tuple[str, int, str] | None = None
    inputs: dict[str, int] | None = None
    trace: Carrier | None = None


@dataclass(frozen=True, slots=True)
class ReduceItem:
    """Run a function node's ``reduce`` over its partial results (``trace``: as a job's)."""

    node: str
    trace: Carrier | None = None


@dataclass(frozen=True, slots=True)
class ReleaseItem:
    """Free the role slot a node held."""

    role: str
    node: str


@dataclass(frozen=True, slots=True)
class CancelItem:
    """Send the task a cancel (it failed or was cancelled): its running jobs stop."""

    reason: str


Item = JobItem | FunctionItem | ReduceItem | ReleaseItem | CancelItem
#: Outbox items with their names, in name order (the order they were decided in).
Items = list[tuple[str, Item]]


def encode_item(item: Item) -> bytes:
    """An item as stored: a JSON object with its ``kind`` (the format of every version)."""
    fields: dict[str, Any]
    if isinstance(item, JobItem):
        fields = {"kind": "job", "role": item.role, "shard": item.shard, "id": item.id}
        fields["job"] = item.job
    elif isinstance(item, FunctionItem):
        fields = {"kind": "function", "node": item.node, "invocation": item.invocation}
        if item.batch is not None:
            fields["batch"] = list(item.batch)
        else:
            fields["inputs"] = item.inputs
    elif isinstance(item, ReduceItem):
        fields = {"kind": "reduce", "node": item.node}
    elif isinstance(item, ReleaseItem):
        fields = {"kind": "release", "role": item.role, "node": item.node}
    else:
        fields = {"kind": "cancel", "reason": item.reason}
    if isinstance(item, JobItem | FunctionItem | ReduceItem) and item.trace is not None:
        fields["trace"] = item.trace
    return orjson.dumps(fields)


def decode_item(raw: bytes | str) -> Item | None:
    """A stored item; None for a kind this version does not know.

    Raises:
        ValueError: It is not JSON.
        LookupError, TypeError: A field is missing or of the wrong type (the outbox is written
            by coordinators only).
    """
    data = orjson.loads(raw)
    kind = data["kind"]
    # Untrusted like the rest, but only ever a hint: one that is not a trace context is dropped.
    traced = carrier_of(data.get("trace"))
    if kind == "job":
        return JobItem(data["role"], data.get("shard") or None, data["id"], data["job"], traced)
    if kind == "function":
        batch = data.get("batch")
        parent_batch = None if batch is None else (str(batch[0]), int(batch[1]), str(batch[2]))
        return FunctionItem(
            data["node"], int(data["invocation"]), parent_batch, data.get("inputs"), traced
        )
    if kind == "reduce":
        return ReduceItem(data["node"], traced)
    if kind == "release":
        return ReleaseItem(data["role"], data["node"])
    if kind == "cancel":
        return CancelItem(data["reason"])
    return None


@dataclass
class CarriedOut:
    """What carrying out items did.

    Attributes:
        done: The names of the items carried out (to remove from the outbox).
        events: The results of the functions run, to record before the items are removed.
        partials: Their partial results, by (node, invocation).
    """

    done: list[str] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    partials: dict[tuple[str, int], Any] = field(default_factory=dict)


class Outbox:
    """Turns steps into outbox items and carries them out, for one coordinator.

    Args:
        redis: The client.
        keys: Key names.
        scripts: The registered scripts.
        store: The coordinator's task store.
        layouts: Role partitions (a job goes to the partition its task id picks).
        functions: The coordinator functions this coordinator runs (read when called).
        role_limits: Per limited role, the most nodes of that role that may run at once.
        consumer: The coordinator's consumer name (it signs the cancels it sends).
    """

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        scripts: Scripts,
        store: TaskStore,
        layouts: partitions.Layouts,
        *,
        functions: Mapping[str, Function],
        role_limits: Mapping[str, int],
        consumer: str,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._scripts = scripts
        self._store = store
        self._layouts = layouts
        self._functions = functions
        self._role_limits = role_limits
        self._consumer = consumer
        #: Node jobs published (each once, even when an outbox is carried out again).
        self.dispatches = 0
        #: What traces dispatches and function runs (see :mod:`streamflow.dag.tracing`).
        self.tracing: TaskTracing | None = None

    # -- a step's items ---------------------------------------------------------------------

    async def items_of(
        self, loaded: Loaded, step: Step, causes: Causes | None = None
    ) -> dict[str, Item]:
        """The step's decisions as outbox items, named so that sorting keeps their order.

        With ``causes``, jobs and function runs carry the trace context of what caused them.
        """
        prefix = f"{loaded.version + 1:012d}"
        items: dict[str, Item] = {}
        refs = await self._input_refs(loaded, step)
        for number, dispatch in enumerate(step.dispatches):
            item = await self._dispatch_item(loaded.spec, step.task.id, dispatch, refs)
            if causes:
                ref = refs[dispatch.batch] if dispatch.batch is not None else None
                item = replace(item, trace=causes.of(dispatch.node_id, ref))
            items[f"{prefix}.{number:06d}"] = item
        for node_id in step.reduce:
            trace = causes.of(node_id) if causes else None
            items[f"{prefix}.r.{node_id}"] = ReduceItem(node_id, trace)
        for node_id in step.released:
            role = loaded.spec.node(node_id).role
            assert role is not None  # only nodes of a limited role hold slots
            items[f"{prefix}.s.{node_id}"] = ReleaseItem(role, node_id)
        if step.cancel is not None:
            items[f"{prefix}.c"] = CancelItem(step.cancel)
        return items

    async def _dispatch_item(
        self, spec: GraphSpec, task_id: str, dispatch: Dispatch, refs: dict[tuple[str, int], str]
    ) -> JobItem | FunctionItem:
        if spec.node(dispatch.node_id).function is not None:
            if dispatch.batch is not None:
                parent, index = dispatch.batch
                batch = (parent, index, refs[dispatch.batch])
                return FunctionItem(dispatch.node_id, dispatch.invocation, batch=batch)
            return FunctionItem(dispatch.node_id, dispatch.invocation, inputs=dispatch.inputs)
        job = _job(spec, task_id, dispatch, refs)
        # The partition is chosen now and recorded: a retried dispatch goes to the same one,
        # where its dedup marker is.
        shard = (await self._layouts.get(job.role)).for_key(job.task_id or "")
        return JobItem(job.role, shard, job.id, encode(job).decode())

    async def _input_refs(self, loaded: Loaded, step: Step) -> dict[tuple[str, int], str]:
        """The batch key of every parent batch the step dispatches."""
        refs: dict[tuple[str, int], str] = {}
        missing: dict[str, list[int]] = defaultdict(list)
        for dispatch in step.dispatches:
            if dispatch.batch is None:
                continue
            parent, index = dispatch.batch
            known = loaded.task.nodes[parent].batches_out
            new = step.outputs.get(parent, [])
            if index >= known and index - known < len(new):
                refs[dispatch.batch] = new[index - known]
            else:
                missing[parent].append(index)
        for parent, indexes in missing.items():
            found = await self._store.batch_refs(step.task.id, parent, min(indexes), max(indexes))
            for index in indexes:
                refs[(parent, index)] = found[index - min(indexes)]
        return refs

    async def stored(self, task_id: str) -> Items:
        """The task's outbox read back from Redis, in name order (to finish a crashed one's).

        Items of a kind this version does not know are removed: nothing here can carry them
        out.
        """
        items: Items = []
        unknown: list[str] = []
        for name, raw in await self._store.outbox(task_id):
            item = decode_item(raw)
            if item is None:
                unknown.append(name)
            else:
                items.append((name, item))
        await self._store.clear_outbox(task_id, unknown)
        return items

    # -- carrying out -----------------------------------------------------------------------

    async def carry_out(self, task_id: str, items: Items) -> CarriedOut:
        """Carry out ``items``: the jobs first, in one pipeline; then the others, in order.

        Function results are returned, not recorded: the caller records them before it
        removes the items, so that a crash in between runs the functions again (harmless)
        rather than losing their results.
        """
        out = CarriedOut()
        jobs = [(name, item) for name, item in items if isinstance(item, JobItem)]
        if jobs:
            await self._publish([item for _, item in jobs])
            out.done += [name for name, _ in jobs]
        calls = any(isinstance(item, FunctionItem | ReduceItem) for _, item in items)
        spec = await self._store.spec(task_id) if calls else None
        for name, item in items:
            if isinstance(item, FunctionItem | ReduceItem) and spec is not None:
                function = spec.node(item.node).function
                if function not in self._functions:
                    # Another coordinator (with the app that has it) carries it out.
                    logger.warning("task %s needs function %r: not here", task_id, function)
                    continue
                out.events.append(await self._traced_call(task_id, spec, item, out.partials))
            elif isinstance(item, CancelItem):
                await self.cancel_task(task_id, item.reason)
            elif isinstance(item, ReleaseItem):
                slot = f"{task_id}/{item.node}"
                await self._redis.srem(self._keys.role_slots(item.role), slot)
            if not isinstance(item, JobItem):
                out.done.append(name)
        return out

    async def _publish(self, jobs: Sequence[JobItem]) -> None:
        with ExitStack() as spans:
            bodies = [
                dispatch_span(self.tracing, item.role, item.job.encode(), item.trace, spans)
                for item in jobs
            ]
            published = await self._publish_bodies(jobs, [body for body, _ in bodies])
            for (_, span), sent in zip(bodies, published, strict=True):
                if span is not None and not sent:
                    span.set_attribute("streamflow.dispatch.duplicate", True)

    async def _publish_bodies(self, jobs: Sequence[JobItem], bodies: list[bytes]) -> list[bool]:
        publishes = []
        for item, body in zip(jobs, bodies, strict=True):
            # A partitioned role gets all of one task's jobs on one partition (by task id), so
            # each task's events come back on one stream and tasks spread over the partitions.
            shard = validate_shard(item.shard or item.role)
            publishes.append(
                scripts.DedupPublish(
                    stream=self._keys.role_stream(shard),
                    marker=self._keys.dedup(shard, "dispatch:" + item.id),
                    schedule=self._keys.delayed(shard),
                    message_id=item.id,
                    message=body,
                    window_ms=self._store.retention_ms,
                )
            )
        published = await scripts.publish_dedup_many(self._scripts, self._redis, publishes)
        self.dispatches += sum(published)
        return published

    async def cancel_task(self, task_id: str, reason: str) -> None:
        """Send a task cancel on behalf of this coordinator (its running jobs stop)."""
        await signals.send_cancel(
            self._redis,
            self._scripts,
            self._keys,
            target="task",
            target_id=task_id,
            reason=reason[:1000],
            requested_by=f"coordinator {self._consumer}",
        )

    # -- coordinator functions --------------------------------------------------------------

    async def _traced_call(
        self,
        task_id: str,
        spec: GraphSpec,
        item: FunctionItem | ReduceItem,
        partials: dict[tuple[str, int], Any],
    ) -> Internal:
        """:meth:`_call`, in a ``function <node>`` span when traced; its result carries it.

        The span is the child of the step that decided the call, else of the task's own trace
        context (its headers); none when there is neither.
        """
        parent = (item.trace or carrier_of(spec.headers)) if self.tracing is not None else None
        if self.tracing is None or parent is None:
            return await self._call(task_id, spec, item, partials)
        node = spec.node(item.node)
        more: dict[str, str | int | bool | None] = {"streamflow.function": node.function}
        more["streamflow.function.step"] = "reduce" if isinstance(item, ReduceItem) else "map"
        if isinstance(item, FunctionItem):
            more["streamflow.invocation"] = item.invocation
        attributes = span_attributes(task_id, item.node, more)
        with self.tracing.coordinator_span(
            f"function {item.node}", parent, producer=False, attributes=attributes
        ) as span:
            result = await self._call(task_id, spec, item, partials)
            if span is None:
                return result
            if result.type == "function_failed":
                span.set_attribute("streamflow.function.failed", result.reason[:1000])
            return replace(result, trace=span.carrier)

    async def _call(
        self,
        task_id: str,
        spec: GraphSpec,
        item: FunctionItem | ReduceItem,
        partials: dict[tuple[str, int], Any],
    ) -> Internal:
        """Run a function invocation's map, or a function node's reduce; failures fail it."""
        try:
            if isinstance(item, ReduceItem):
                return await self._reduce(task_id, spec, item.node)
            return await self._map(task_id, spec, item, partials)
        except Exception as exc:
            if connect.is_outage(exc):
                raise  # not the function's failure: the step is retried
            logger.warning("task %s: function node %r failed: %r", task_id, item.node, exc)
            return Internal("function_failed", item.node, reason=f"{type(exc).__name__}: {exc}")

    async def _map(
        self,
        task_id: str,
        spec: GraphSpec,
        item: FunctionItem,
        partials: dict[tuple[str, int], Any],
    ) -> Internal:
        node = spec.node(item.node)
        assert node.function is not None
        function = self._functions[node.function]
        params = {**spec.params, **node.params}
        partial = function.map(params, await self._inputs(task_id, item))
        orjson.dumps(partial)  # must be storable
        partials[(item.node, item.invocation)] = partial
        return Internal("function_done", item.node, item.invocation)

    async def _inputs(self, task_id: str, item: FunctionItem) -> list[Batch]:
        if item.batch is not None:
            parent, index, ref = item.batch
            _check_ref(self._keys, task_id, parent, ref)
            (items,) = await self._store.batches([ref])
            if items is None:
                raise LookupError(f"input batch {index} of {parent!r} is gone ({ref})")
            return [Batch(parent, index, items)]
        out: list[Batch] = []
        for parent, count in (item.inputs or {}).items():
            refs = await self._store.batch_refs(task_id, parent, 0, count - 1) if count else []
            for ref in refs:
                _check_ref(self._keys, task_id, parent, ref)
            for index, batch in enumerate(await self._store.batches(refs)):
                if batch is None:
                    raise LookupError(f"batch {index} of {parent!r} is gone")
                out.append(Batch(parent, index, batch))
        return out

    async def _reduce(self, task_id: str, spec: GraphSpec, node_id: str) -> Internal:
        node = spec.node(node_id)
        assert node.function is not None
        function = self._functions[node.function]
        key = self._keys.task_partials(task_id, node_id)
        try:
            raw = await streams.hash_items(self._redis, key)
        except ResponseError as exc:  # WRONGTYPE: the function fails, Redis is not down
            raise InputError(f"the partial results {key} cannot be read: {exc}") from None
        partials = [orjson.loads(raw[k]) for k in sorted(raw, key=int)]
        result = function.reduce({**spec.params, **node.params}, partials)
        if result is None:
            return Internal("reduced", node_id, at_ms=now_ms())
        key = self._keys.task_result(task_id, node_id)
        await self._redis.set(key, orjson.dumps(result), px=self._store.retention_ms)
        return Internal("reduced", node_id, ref=key, items=len(result), at_ms=now_ms())

    # -- role slots -------------------------------------------------------------------------

    async def take_slots(self, task_id: str, spec: GraphSpec, nodes: set[str]) -> frozenset[str]:
        """Take a role slot for each of ``nodes`` that can have one; returns those granted."""
        granted = set()
        for node_id in sorted(nodes):
            role = spec.node(node_id).role
            assert role is not None
            slots = self._keys.role_slots(role)
            limit = self._role_limits[role]
            if await scripts.take_slot(
                self._scripts, self._redis, slots, f"{task_id}/{node_id}", limit
            ):
                granted.add(node_id)
        return frozenset(granted)

    async def free_leaked_slots(self) -> None:
        """Free slots of nodes that finished without freeing them (a crash in between)."""
        for role in list(self._role_limits):
            slots = self._keys.role_slots(role)
            for raw in await self._redis.smembers(slots):
                member = streams.text(raw)
                task_id, _, node_id = member.partition("/")
                if not await self._store.node_running(task_id, node_id):
                    await self._redis.srem(slots, member)


def _job(
    spec: GraphSpec, task_id: str, dispatch: Dispatch, refs: dict[tuple[str, int], str]
) -> Job:
    node = spec.node(dispatch.node_id)
    assert node.role is not None
    batch = None
    if dispatch.batch is not None:
        parent, index = dispatch.batch
        batch = BatchRef(node=parent, index=index, ref=refs[dispatch.batch])
    return Job(
        protocol=PROTOCOL_VERSION,
        kind="job",
        id=node_job_id(task_id, dispatch.node_id, dispatch.invocation),
        role=node.role,
        payload={**spec.params, **node.params},
        created_at_ms=now_ms(),
        task_id=task_id,
        node_id=dispatch.node_id,
        invocation=dispatch.invocation,
        input=batch,
        inputs=dispatch.inputs,
        failures=dispatch.failures,
        retry=JobRetry(**node.retry.model_dump()) if node.retry else None,
        timeout=node.timeout,
        headers=spec.headers or None,
    )


def node_job_id(task_id: str, node_id: str, invocation: int) -> str:
    """The id of a node invocation's job: ``task.node.invocation``, hashed when too long."""
    readable = f"{task_id}.{node_id}.{invocation}"
    if len(readable) <= 128:
        return readable
    digest = hashlib.blake2b(f"{task_id}.{node_id}".encode(), digest_size=16).hexdigest()
    return f"{digest}.{invocation}"


def _check_ref(keys: Keys, task_id: str, parent: str, ref: str) -> None:
    """Refuse (``InputError``: the function fails) a ref that is not a batch of ``parent``."""
    if not keys.is_batch_of(ref, task_id, parent):
        raise InputError(f"{shown(ref)} is not a batch key of task {task_id!r}, node {parent!r}")
