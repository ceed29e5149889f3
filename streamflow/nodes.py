"""Task nodes on the worker side: a node job's inputs, the batches it emits, its events.

A job with a task id, node id and invocation is one run of a task node. Its worker reports on
the role's events stream: ``accepted`` when it starts; one ``batch`` per emitted batch, stored
in the role's slot and reported in one owner-checked script; and ``done``, ``failed`` or
``cancelled`` in the same script that settles the job (see :mod:`streamflow.settle`).

A run that reads no input batch at its start (a source, a node fed when its parents are done)
writes its ``accepted`` (stamped with its start) up to ``ACCEPTED_DELAY`` late: a run that
ends sooner reports it in its settle's script, before ``done`` (one round trip fewer for the
worker, one wake-up fewer for the coordinator); a run that emits a batch, fails or is retried
sends it first. It only tells that the node runs: a run that dies before sending it is
delivered again, and that run tells it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable
from typing import Any

import orjson
from redis.asyncio import Redis

from streamflow import scripts, streams
from streamflow.context import Batch
from streamflow.errors import InputError, PayloadError, StreamflowError
from streamflow.keys import Keys
from streamflow.logs import shown
from streamflow.protocol import PROTOCOL_VERSION, Job, decode_batch, encode, now_ms
from streamflow.records import EVENT_FIELD, EventType, TaskEvent
from streamflow.scripts import Scripts

#: Largest encoded batch a node may emit.
DEFAULT_MAX_BATCH_BYTES = 1024 * 1024
#: How long an emitted batch is kept (ms): it must outlive the task that reads it.
DEFAULT_BATCH_TTL_MS = 7 * 24 * 3600 * 1000
#: Batch keys read per round trip when a node reads its parents' whole output.
READ_CHUNK = 100
#: Seconds a run without an input batch may wait to write its ``accepted``: one that ends
#: sooner reports it with its settle.
ACCEPTED_DELAY = 0.02

logger = logging.getLogger(__name__)


class LeaseLost(StreamflowError):
    """Raised by ``ctx.emit`` when the worker no longer owns the job (another runs it now)."""


def is_node_job(job: Job | None) -> bool:
    """Whether ``job`` is one run of a task node."""
    return (
        job is not None
        and job.task_id is not None
        and job.node_id is not None
        and job.invocation is not None
    )


def event(job: Job, type_: EventType, *, delivery: int, consumer: str, **fields: Any) -> bytes:
    """The encoded :class:`TaskEvent` of ``type_`` about a node job."""
    assert job.task_id is not None and job.node_id is not None and job.invocation is not None
    return encode(
        TaskEvent(
            protocol=PROTOCOL_VERSION,
            kind="event",
            type=type_,
            task_id=job.task_id,
            node_id=job.node_id,
            invocation=job.invocation,
            attempt=job.attempt,
            delivery=max(delivery, 1),
            at_ms=now_ms(),
            consumer=consumer,
            **fields,
        )
    )


class NodeRun:
    """One run of a task node: emits its batches and reads its inputs.

    Args:
        redis: The client.
        scripts: The registered scripts.
        keys: Key names.
        job: The node's job.
        stream: The role stream the job is on.
        shard: The role partition it is on; its batches and events go to that partition.
        entry_id: Its entry id (emits are owner-checked against it).
        delivery: The entry's delivery count.
        consumer: This worker's consumer name.
        max_batch_bytes: The largest encoded batch accepted.
        batch_ttl_ms: How long emitted batches are kept.
    """

    def __init__(
        self,
        redis: Redis,
        scripts: Scripts,
        keys: Keys,
        job: Job,
        *,
        stream: str,
        shard: str,
        entry_id: bytes,
        delivery: int,
        consumer: str,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        batch_ttl_ms: int = DEFAULT_BATCH_TTL_MS,
    ) -> None:
        self._redis = redis
        self._scripts = scripts
        self._keys = keys
        self.job = job
        self._stream = stream
        self._shard = shard
        self._entry_id = entry_id
        self.delivery = delivery
        self.consumer = consumer
        self._max_bytes = max_batch_bytes
        self._ttl_ms = batch_ttl_ms
        self.emitted = 0
        #: The trace context of the run's handler span (``ctx.trace_context``), or None: its
        #: batch and end events carry it (see :mod:`streamflow.dag.tracing`).
        self.trace: dict[str, str] | None = None
        # The ``accepted`` event not written yet, the timer that writes it, its write.
        self._accepted: bytes | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._late: asyncio.Task[None] | None = None

    def event(self, type_: EventType, **fields: Any) -> bytes:
        """An encoded event about this run (with its trace context, if traced)."""
        if self.trace is not None and type_ != "accepted":
            fields["trace"] = self.trace
        return event(self.job, type_, delivery=self.delivery, consumer=self.consumer, **fields)

    async def start(self) -> Batch | None:
        """Report that this run started, and read its input batch (one round trip).

        Returns:
            The parent batch this run processes (nodes fed per batch), or None.

        Raises:
            LookupError: The input batch is gone (expired or deleted).
            InputError: ``input.ref`` is not a batch key of this task and parent, or the key
                holds something else than a JSON array.
        """
        ref = self.job.input
        if ref is None:
            # Nothing to read: written later, or with the settle if the run ends first.
            self._accepted = self.event("accepted")
            self._timer = asyncio.get_running_loop().call_later(ACCEPTED_DELAY, self._send_late)
            return None
        self._check_ref(ref.ref, ref.node, f"input.ref {shown(ref.ref)}")
        pipe = self._redis.pipeline(transaction=False)
        pipe.xadd(self._keys.events(self._shard), {EVENT_FIELD: self.event("accepted")})
        pipe.get(ref.ref)
        # Errors as values: a wrong-type input key must not hide that the XADD went through.
        replies = await pipe.execute(raise_on_error=False)
        if isinstance(replies[0], Exception):
            raise replies[0]
        what = f"input batch {ref.index} of {ref.node!r} ({shown(ref.ref)})"
        if replies[-1] is None:
            raise LookupError(f"{what} is gone")
        return Batch(ref.node, ref.index, decode_batch(replies[-1], what, self._max_bytes))

    def _send_late(self) -> None:
        self._timer = None
        if self._accepted is not None and self._late is None:
            self._late = asyncio.ensure_future(self._write_late())

    async def _write_late(self) -> None:
        """The timer's write: best effort (what it could not write goes with the settle)."""
        try:
            await self._write_accepted()
        except Exception as exc:  # an outage, a key of another type: the settle tries again
            logger.warning("job %s: could not report its start yet (%r)", self.job.id, exc)

    async def send_accepted(self) -> None:
        """Write the ``accepted`` event not written yet, if any (before a batch or a failure).

        Raises:
            RedisError: It could not be written (it stays pending, for the settle).
        """
        await self._wait_late()
        await self._write_accepted()

    async def settle_events(self) -> list[bytes]:
        """The events to write before the run's last one (in its settle): its ``accepted``.

        Stops the timer; a write of it in flight is waited for (the order is kept).
        """
        await self._wait_late()
        raw, self._accepted = self._accepted, None
        return [] if raw is None else [raw]

    async def _write_accepted(self) -> None:
        raw, self._accepted = self._accepted, None
        if raw is None:
            return
        try:
            await self._redis.xadd(self._keys.events(self._shard), {EVENT_FIELD: raw})
        except BaseException:
            self._accepted = raw  # still to be told
            raise

    async def _wait_late(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        late, self._late = self._late, None
        if late is not None:
            await asyncio.shield(late)  # it catches its errors

    def _check_ref(self, key: str, parent: str, what: str) -> None:
        """Refuse a key that is not one of this task's batches of node ``parent``."""
        assert self.job.task_id is not None
        if not self._keys.is_batch_of(key, self.job.task_id, parent):
            raise InputError(
                f"{what} is not a batch key of task {self.job.task_id!r}, node {parent!r}"
            )

    async def inputs(self) -> AsyncIterator[Batch]:
        """Every batch of every parent (nodes fed when their parents are done), in order."""
        job = self.job
        assert job.task_id is not None
        for parent, count in (job.inputs or {}).items():
            key = self._keys.task_output(job.task_id, parent)
            refs = await streams.batch_refs(self._redis, key, 0, count - 1)
            for index, ref in enumerate(refs):
                self._check_ref(ref, parent, f"batch {index} of {parent!r} ({shown(ref)})")
            for start in range(0, len(refs), READ_CHUNK):
                chunk = refs[start : start + READ_CHUNK]
                values = await streams.get_many(self._redis, chunk, raise_on_error=False)
                for offset, raw in enumerate(values):
                    what = f"batch {start + offset} of {parent!r} ({shown(chunk[offset])})"
                    if raw is None:
                        raise LookupError(f"{what} is gone")
                    yield Batch(parent, start + offset, decode_batch(raw, what, self._max_bytes))

    async def emit(self, items: Iterable[Any]) -> None:
        """Store one batch and report it.

        Raises:
            PayloadError: The batch does not encode as JSON or is too large.
            LeaseLost: Another worker owns this job now.
        """
        batch = list(items)
        try:
            body = orjson.dumps(batch)
        except TypeError as exc:
            raise PayloadError(f"batch is not JSON-serializable: {exc}") from None
        if len(body) > self._max_bytes:
            raise PayloadError(f"batch is {len(body)} bytes, limit {self._max_bytes}")
        await self.send_accepted()  # the run's start before its first batch
        job, seq = self.job, self.emitted
        assert job.task_id is not None and job.node_id is not None and job.invocation is not None
        key = self._keys.batch(self._shard, job.task_id, job.node_id, job.invocation, seq)
        stored = await scripts.emit_batch(
            self._scripts,
            self._redis,
            stream=self._stream,
            consumer=self.consumer,
            entry_id=self._entry_id,
            key=key,
            batch=body,
            ttl_ms=self._ttl_ms,
            events=self._keys.events(self._shard),
            event=self.event("batch", seq=seq, ref=key, items=len(batch)),
        )
        if not stored:
            raise LeaseLost(f"job {job.id} is owned by another worker now")
        self.emitted += 1
