"""Settling deliveries: every delivery ends in one decision, applied here and only here.

The worker decides (decode -> preflight -> execute); the :class:`Settler` applies the decision
to Redis: ack (batched by the acker), retry (next attempt to the delayed schedule), dead-letter,
release (shutdown: hand back for immediate adoption, not a failed attempt) or lost (another
consumer owns the entry: apply nothing). Every write is owner-checked in a Lua script, so a
worker that lost its lease can never apply an outcome.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from streamflow import connect, decisions, logs, nodes, results, scripts, streams
from streamflow.context import NEVER
from streamflow.delivery import (
    Decision,
    Delivery,
    InFlight,
    Outcome,
    OutcomeStatus,
    WorkerStatistics,
)
from streamflow.events import EventLog
from streamflow.keys import Keys
from streamflow.leases import LeaseKeeper
from streamflow.protocol import MALFORMED_REASONS, PROTOCOL_VERSION, Job, encode, now_ms
from streamflow.records import (
    DEAD_LETTER_FIELD,
    RAW_FIELD_PREFIX,
    DeadLetter,
    ErrorInfo,
    EventType,
    JobOutcome,
)
from streamflow.scripts import Scripts

logger = logging.getLogger("streamflow.worker")


class Settler:
    """Applies decisions for one worker: the only code that settles entries in Redis.

    Args:
        redis: The client.
        scripts: The registered Lua scripts.
        keys: Key names.
        consumer: The worker's consumer name.
        held: The registry of entries the worker holds; settled entries leave it.
        leases: The lease keeper (releases entries).
        max_message_bytes: Raw fields kept in dead letters are cut at this size.
        dead_letter_max_len: Dead-letter streams are capped near this many entries.
        on_outcome: Called with every :class:`Outcome`.
        on_scheduled: Called with the shard when a retry is scheduled (wakes its promoter).
    """

    def __init__(
        self,
        redis: Redis,
        scripts: Scripts,
        keys: Keys,
        consumer: str,
        held: InFlight,
        leases: LeaseKeeper,
        *,
        max_message_bytes: int,
        dead_letter_max_len: int,
        on_outcome: Callable[[Outcome], None] | None,
        on_scheduled: Callable[[str], None] | None = None,
    ) -> None:
        self._redis = redis
        self._scripts = scripts
        self._keys = keys
        self.consumer = consumer
        self._held = held
        self._leases = leases
        self._max_bytes = max_message_bytes
        self._dead_max_len = dead_letter_max_len
        self._on_outcome = on_outcome
        self._on_scheduled = on_scheduled
        self.stats = WorkerStatistics()
        self.acker = _Acker(self)
        #: Where the lifecycle events of settled jobs go, or None (no events at all).
        self.events: EventLog | None = None
        #: Awaited after a settle applied here (retries, dead letters; not the acker's acks),
        #: outside the shielded write: the middleware's outcome hooks. None: nobody listens.
        self.on_settled: Callable[[Delivery, Decision, OutcomeStatus], Awaitable[None]] | None = (
            None
        )
        #: Applies a ``park`` decision (:meth:`streamflow.keylimits.KeyLimiter.park`).
        self.parker: Callable[[Delivery, Decision], Awaitable[bool]] | None = None

    async def apply(self, delivery: Delivery, decision: Decision) -> None:
        """Settle a delivery in Redis according to its decision (the one place that does)."""
        job = decision.job or delivery.job
        acked = decision.kind in ("ack", "cancelled") and not nodes.is_node_job(job)
        keep_ms = self._keep_ms(delivery, job) if acked else 0
        if acked and not keep_ms:
            self.ack_nowait(delivery, decision)  # writes the held-back progress itself
            return
        if self.events is not None:
            # The handler ended: the progress it held back goes before its final event.
            self.events.last_progress(delivery.context)
        if acked:
            decision, kept = self._outcome(delivery, decision, keep_ms)
            if kept is not None:
                self._ack_kept_nowait(delivery, decision, kept)
                return
        delivery.settling = True
        status: OutcomeStatus | None = None
        # Settling writes finish even when the worker is being cancelled, within a time limit.
        with anyio.move_on_after(10, shield=True):
            try:
                status = await self._settle_one(delivery, decision)
            except connect.TRANSIENT_ERRORS as exc:
                # Applied, or still pending under this consumer: then adopted after the lease
                # TTL, or resumed by a restart with the same consumer name.
                self._unsettled(
                    logging.WARNING,
                    ", outcome unknown: it was applied, or the entry stays pending and is run "
                    "again after the lease TTL: %s",
                    delivery,
                    decision,
                    exc,
                )
                return
            except ResponseError as exc:
                if not streams.is_group_lost(exc):
                    self._refused(delivery, decision, exc)
                    return
                status = "lost"  # the group is gone with its pending list: nothing to apply
            self._held.discard(delivery)
            self.report(delivery, job.id if job else None, status, decision.reason, decision.error)
            if self.events is not None and delivery.role.events:
                self._tell(self.events, delivery, decision, status)
        if status is not None and self.on_settled is not None:
            await self.on_settled(delivery, decision, status)

    def _refused(self, delivery: Delivery, decision: Decision, exc: ResponseError) -> None:
        """Redis refused a settle for a reason of the data (``WRONGTYPE``): nothing applied.

        A key of another type where the settle writes (the dead letters, the delayed schedule,
        the events stream: anyone with a worker's rights may write one) must not stop the
        worker; the entry stays pending and is run again after the lease TTL.
        """
        self._unsettled(
            logging.ERROR,
            ": Redis refused (%s); is one of the role's keys of another type? The entry stays "
            "pending and is run again after the lease TTL",
            delivery,
            decision,
            exc,
        )

    def _unsettled(
        self, level: int, then: str, delivery: Delivery, decision: Decision, exc: Exception
    ) -> None:
        """Log a settle that failed and forget the entry (no longer this worker's to settle).

        ``then`` ends the message: what becomes of the entry, with ``exc``.
        """
        logger.log(
            level,
            "could not settle %s entry %s (%s)" + then,
            delivery.role.name,
            delivery.entry.id.decode(),
            decision.kind,
            exc,
            extra=_log_fields(delivery, decision.job),
        )
        self._held.discard(delivery)

    def _tell(
        self, events: EventLog, delivery: Delivery, decision: Decision, status: OutcomeStatus
    ) -> None:
        """Write the lifecycle event of a settle that was applied (none for a refused one)."""
        job, role = decision.job or delivery.job, delivery.role.name
        if status in ("lost", "released", "parked"):
            return  # nothing happened to the job (it runs again, here or elsewhere)
        if status == "retried":
            events.job("retrying", job, role, detail=decision.detail, delay=decision.delay)
        elif status == "dead_lettered":
            final = "failed" if decision.reason in ("failed", "fatal") else "dead_lettered"
            events.job(final, job, role, reason=decision.reason, detail=decision.detail)
        else:
            reason = delivery.cancel.reason if delivery.cancel is not None else decision.detail
            cancelled = status == "cancelled"
            events.job(status_event(status), job, role, reason=reason if cancelled else None)

    def tell_acked(
        self, items: list[Delivery], refused: set[bytes], cancelled: Mapping[Delivery, object]
    ) -> None:
        """Write the ``succeeded`` or ``cancelled`` events of a batch the acker settled.

        ``items`` are one stream's, so one role's: its ``succeeded`` events go as one group
        (:meth:`EventLog.succeeded`), with nothing done per delivery but taking its job.
        """
        events = self.events
        if events is None or not items[0].role.events:
            return
        role = items[0].role.name
        if not refused and not cancelled:  # the hot path: every one acknowledged, succeeded
            events.succeeded([d.job for d in items if d.job is not None], role)
            return
        done = []
        for delivery in items:
            if delivery.entry.id in refused:
                continue  # refused by the owner check: it was not settled here
            if delivery not in cancelled:
                if delivery.job is not None:
                    done.append(delivery.job)
                continue
            cancel = delivery.cancel
            reason = cancel.reason if cancel is not None else None
            events.job("cancelled", delivery.job, role, reason=reason)
        if done:
            events.succeeded(done, role)

    def ack_nowait(self, delivery: Delivery, decision: Decision) -> None:
        """Queue an ``ack`` or ``cancelled`` decision for the acker's next batch."""
        # The acker forgets the delivery once acknowledged.
        events, ctx = self.events, delivery.context
        if events is not None and ctx is not None and ctx._progress_at != NEVER:
            # It reported progress (few do: the test is here, not behind a call per job): the
            # held-back report goes before the job's final event.
            events.last_progress(ctx)
        if decision.kind == "ack":
            self.acker.add(delivery)
        else:
            job = decision.job or delivery.job
            self.acker.add_cancelled(delivery, job.id if job else None)

    async def _settle_one(self, delivery: Delivery, decision: Decision) -> OutcomeStatus:
        if delivery.node is not None and decision.kind not in ("ack", "cancelled"):
            await self._start_told(delivery, decision)
        if decision.kind == "lost" or delivery.lost:
            return "lost"
        if decision.kind == "release":
            return "released" if await self._leases.release(delivery) else "lost"
        if decision.kind == "retry":
            return "retried" if await self._schedule_retry(delivery, decision) else "lost"
        if decision.kind == "park":
            if self.parker is None:  # nobody to park it: hand it back rather than lose it
                return "released" if await self._leases.release(delivery) else "lost"
            return "parked" if await self.parker(delivery, decision) else "lost"
        if decision.kind in ("ack", "cancelled"):
            return await self._finish_node(delivery, decision)
        return "dead_lettered" if await self._dead_letter(delivery, decision) else "lost"

    # -- kept outcomes (see streamflow.results): only for jobs whose role or publisher asks --

    def _keep_ms(self, delivery: Delivery, job: Job | None) -> int:
        return results.keep_ms(delivery.role.keep_result_ms, job)

    def _outcome(
        self, delivery: Delivery, decision: Decision, keep_ms: int
    ) -> tuple[Decision, scripts.Kept | None]:
        """The record of an ``ack`` or ``cancelled`` to keep; a dead letter if it cannot be."""
        job = decision.job or delivery.job
        assert job is not None
        status: JobOutcome = "succeeded" if decision.kind == "ack" else "cancelled"
        try:
            record = results.encode_record(
                job,
                status,
                self.consumer,
                max_bytes=self._max_bytes,
                result=decision.result,
                detail=None if decision.kind == "ack" else decision.detail,
            )
        except results.UnkeepableResult as exc:
            return decisions.dead(exc.reason, str(exc), job), None
        key = self._keys.result(delivery.shard, job.id)
        return decision, scripts.Kept(delivery.entry.id, key, record, keep_ms)

    def _ack_kept_nowait(self, delivery: Delivery, decision: Decision, kept: scripts.Kept) -> None:
        """Queue an ``ack`` or ``cancelled`` whose outcome is kept, for the acker's next batch.

        The acker writes the records with the acknowledgements, in one owner-checked call per
        stream (``result.lua``): the consumer does not wait for it, as for a plain ack.
        """
        self.acker.keep(delivery, kept)
        self.ack_nowait(delivery, decision)

    def _failure(self, delivery: Delivery, decision: Decision) -> scripts.Kept | None:
        """A dead-lettered job's failure record to keep (in the dead-letter step), or None."""
        job = decision.job
        ttl = self._keep_ms(delivery, job)
        if job is None or not ttl:
            return None
        try:
            record = results.encode_record(
                job,
                "dead_lettered",
                self.consumer,
                max_bytes=self._max_bytes,
                reason=decision.reason,
                detail=decision.detail[:4000],
                error=decision.error,
            )
        except results.UnkeepableResult as exc:
            logger.warning(
                "dead-lettering %s message %s without keeping its failure as its result "
                "(client.result waits for it in vain; streamflow job finds the dead letter): %s",
                delivery.role.name,
                job.id,
                exc,
                extra=_log_fields(delivery, job),
            )
            return None
        key = self._keys.result(delivery.shard, job.id)
        return scripts.Kept(delivery.entry.id, key, record, ttl)

    @staticmethod
    async def _start_told(delivery: Delivery, decision: Decision) -> None:
        """A node run ending otherwise than by its settle script: its ``accepted`` goes first.

        Dropped when the run is not this worker's to end (lost, handed back): the next run
        tells its own start. Best effort: it only tells that the node ran.
        """
        run = delivery.node
        assert run is not None
        if decision.kind in ("lost", "release", "park") or delivery.lost:
            await run.settle_events()
            return
        try:
            await run.send_accepted()
        except RedisError as exc:
            logger.warning("job %s: could not report its start (%s)", run.job.id, logs.shown(exc))

    def _node_event(self, delivery: Delivery, decision: Decision, type_: EventType) -> bytes:
        job = decision.job or delivery.job
        assert job is not None
        fields: dict[str, object] = {}
        if type_ == "done":
            fields["total"] = delivery.node.emitted if delivery.node is not None else 0
        elif type_ == "failed":
            fields["error"] = f"{decision.reason}: {decision.detail}"[:4000]
        if delivery.node is not None and delivery.node.trace is not None:
            fields["trace"] = delivery.node.trace  # the run's span: the coordinator continues it
        return nodes.event(
            job, type_, delivery=delivery.entry.deliveries, consumer=self.consumer, **fields
        )

    async def _finish_node(self, delivery: Delivery, decision: Decision) -> OutcomeStatus:
        """Acknowledge a task node's job and report ``done`` or ``cancelled``, in one step."""
        done = decision.kind == "ack"
        run = delivery.node
        finished = await scripts.finish(
            self._scripts,
            self._redis,
            stream=delivery.stream,
            consumer=self.consumer,
            entry_id=delivery.entry.id,
            events=self._keys.events(delivery.shard),
            event=self._node_event(delivery, decision, "done" if done else "cancelled"),
            before=await run.settle_events() if run is not None else (),
        )
        if not finished:
            return "lost"
        return "acked" if done else "cancelled"

    async def _schedule_retry(self, delivery: Delivery, decision: Decision) -> bool:
        job = decision.job
        assert job is not None
        following = job.model_copy(update={"attempt": job.attempt + 1})
        due = 0 if decision.delay <= 0 else now_ms() + int(decision.delay * 1000)
        scheduled = await scripts.schedule_retry(
            self._scripts,
            self._redis,
            stream=delivery.stream,
            # The next attempt waits in the schedule of the level it ran at, and goes back to it.
            schedule=self._keys.delayed(
                delivery.shard, self._keys.level_of_stream(delivery.stream)
            ),
            consumer=self.consumer,
            entry_id=delivery.entry.id,
            due_ms=due,
            message=encode(following),
        )
        if scheduled and self._on_scheduled is not None:
            self._on_scheduled(delivery.shard)
        if scheduled:
            logger.info(
                "retrying %s message %s (attempt %d of %d) in %.2fs: %s",
                delivery.role.name,
                job.id,
                job.attempt + 1,
                job.retry.max_attempts if job.retry else delivery.role.retry.max_attempts,
                decision.delay,
                logs.printable(decision.detail),  # a handler's text: escaped whatever formats it
                extra=_log_fields(delivery, job),
            )
        return scheduled

    async def _dead_letter(self, delivery: Delivery, decision: Decision) -> bool:
        entry, job = delivery.entry, decision.job
        assert decision.reason is not None
        letter = DeadLetter(
            protocol=PROTOCOL_VERSION,
            kind="dead_letter",
            reason=decision.reason,
            detail=decision.detail,
            role=delivery.role.name,
            entry_id=entry.id.decode(),
            message_id=job.id if job else None,
            consumer=self.consumer,
            attempts=job.attempt if job else 0,
            dead_at_ms=now_ms(),
            error=decision.error,
            job=job,
        )
        fields = [(DEAD_LETTER_FIELD, encode(letter))]
        # Raw fields are kept verbatim, but cut at the message size limit: a flood of oversized
        # messages must not fill Redis through the dead-letter stream.
        fields += [
            (RAW_FIELD_PREFIX + name, value[: self._max_bytes])
            for name, value in entry.fields.items()
        ]
        node_job = nodes.is_node_job(job)
        moved = await scripts.dead_letter(
            self._scripts,
            self._redis,
            stream=delivery.stream,
            dead_stream=self._keys.dead_letters(delivery.shard),
            consumer=self.consumer,
            entry_id=entry.id,
            fields=fields,
            max_len=self._dead_max_len,
            events=self._keys.events(delivery.shard) if node_job else None,
            event=self._node_event(delivery, decision, "failed") if node_job else b"",
            kept=self._failure(delivery, decision),
        )
        if moved is not None:
            logger.warning(
                "dead-lettered %s entry %s (message %s): %s: %s",
                delivery.role.name,
                letter.entry_id,
                letter.message_id,
                decision.reason,
                logs.printable(decision.detail),  # a handler's text: escaped whatever formats it
                extra=_log_fields(delivery, job),
            )
        return moved is not None

    def report(
        self,
        delivery: Delivery,
        message_id: str | None,
        status: OutcomeStatus,
        reason: str | None = None,
        error: ErrorInfo | None = None,
    ) -> None:
        """Count an applied outcome and tell the ``on_outcome`` listener."""
        stats = self.stats
        # Every status is also the name of its counter.
        setattr(stats, status, getattr(stats, status) + 1)
        role = delivery.role.name
        outcome: str = status
        if status == "dead_lettered" and reason is not None:
            stats.by_reason[reason] = stats.by_reason.get(reason, 0) + 1
            stats.dead_by_role[role, reason] = stats.dead_by_role.get((role, reason), 0) + 1
            if reason in MALFORMED_REASONS:
                outcome = "rejected"
        elif status == "lost":
            self._report_lost(delivery)
        stats.by_role[role, outcome] = stats.by_role.get((role, outcome), 0) + 1
        if self._on_outcome is not None:
            self._on_outcome(
                Outcome(
                    delivery.role.name,
                    delivery.entry.id.decode(),
                    message_id,
                    status,
                    reason if status == "dead_lettered" else None,
                    error,
                )
            )

    def _report_lost(self, delivery: Delivery) -> None:
        """Log a lost lease once, and count it where it was found."""
        if delivery.lost:
            # Found earlier (renewal, confirmation before start), counted and logged there.
            if delivery.started:
                logger.warning(
                    "lease on %s entry %s was lost while its handler ran; its outcome was not "
                    "applied",
                    delivery.role.name,
                    delivery.entry.id.decode(),
                    extra=_log_fields(delivery),
                )
            return
        delivery.stop("lease_lost", "lease lost", hard=False)
        if not delivery.started:
            self._leases.count_loss("unstarted")
            return
        self._leases.count_loss("settle")
        logger.warning(
            "lease on %s entry %s was lost before its outcome could be applied (another worker "
            "owns it now, or it is gone): its handler ran here and may have run twice; its "
            "outcome was not applied",
            delivery.role.name,
            delivery.entry.id.decode(),
            extra=_log_fields(delivery),
        )

    def report_acked(self, role: str, count: int) -> None:
        """Count ``count`` applied acks of one role at once (no ``on_outcome`` listener)."""
        stats = self.stats
        stats.acked += count
        stats.by_role[role, "acked"] = stats.by_role.get((role, "acked"), 0) + count


def status_event(status: OutcomeStatus) -> str:
    """The lifecycle event type of an acknowledged job: ``succeeded`` or ``cancelled``."""
    return "cancelled" if status == "cancelled" else "succeeded"


def _log_fields(delivery: Delivery, job: Job | None = None) -> dict[str, Any]:
    """The fields of a log line about a delivery (ids only, never the payload)."""
    job = job or delivery.job
    return logs.message_fields(
        delivery.role.name,
        message_id=job.id if job else None,
        task_id=job.task_id if job else None,
        node_id=job.node_id if job else None,
        attempt=job.attempt if job else None,
        entry_id=delivery.entry.id.decode(),
    )


class _Acker:
    """Batches acknowledgements: one owner-checked settle call per stream per flush.

    Per delivery it only appends the delivery to its stream's batch: no record is built and no
    later pass marks or counts deliveries one by one (a batch's stream is one role's, and all
    but the few cancelled ones are acks).
    """

    def __init__(self, settler: Settler) -> None:
        self._settler = settler
        self._pending: dict[str, list[Delivery]] = defaultdict(list)
        # The message ids of deliveries acknowledged as cancelled, until they are reported.
        self._cancelled: dict[Delivery, str | None] = {}
        # The outcomes to keep with their acknowledgements (only for roles and jobs that ask).
        self._kept: dict[Delivery, scripts.Kept] = {}
        self._wakeup = anyio.Event()
        self._lock = anyio.Lock()
        self._backoff = connect.Backoff("acknowledging")

    def add(self, delivery: Delivery) -> None:
        """Queue the acknowledgement of a delivery whose handler finished (``acked``)."""
        # Marked now, while the delivery is at hand, rather than in a pass over the batch: from
        # here its outcome is decided, and a renewal that finds it gone is not a lost lease (a
        # refused acknowledgement is, found at settle).
        delivery.settling = True
        if not self._pending:
            # Only the first entry of a batch wakes the acker: while it is non-empty, the
            # wake-up is set or a flush in progress takes the batch.
            self._wakeup.set()
        self._pending[delivery.stream].append(delivery)

    def add_cancelled(self, delivery: Delivery, message_id: str | None) -> None:
        """Queue the acknowledgement of a cancelled delivery (``cancelled``)."""
        self._cancelled[delivery] = message_id
        self.add(delivery)

    def keep(self, delivery: Delivery, kept: scripts.Kept) -> None:
        """Write ``kept`` with the acknowledgement of ``delivery`` (queued next by the caller)."""
        self._kept[delivery] = kept

    async def run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup = anyio.Event()
            await self.flush()

    async def flush(self) -> None:
        # Shielded: a flush that started must finish even when the worker is being cancelled,
        # or handlers that completed would be run again elsewhere.
        with anyio.move_on_after(30, shield=True):
            async with self._lock:
                while self._pending:
                    batch, self._pending = self._pending, defaultdict(list)
                    try:
                        await self._settle(batch)
                    except connect.TRANSIENT_ERRORS as exc:
                        # What is left of the batch goes again; its outcome is unknown (the
                        # connection may have dropped after Redis applied it).
                        for stream, items in batch.items():
                            for delivery in items:
                                delivery.ack_unknown = True
                            self._pending[stream][:0] = items
                        await self._backoff.failed(exc)
                    else:
                        self._backoff.succeeded()

    async def _settle(self, batch: dict[str, list[Delivery]]) -> None:
        """Settle ``batch``, removing each stream's items from it once they are reported."""
        settler = self._settler
        failed: Exception | None = None
        for stream in list(batch):
            items = batch[stream]
            try:
                refused = await self._ack(stream, items)
                if refused:
                    refused -= await self._applied_before(stream, items, refused)
            except connect.TRANSIENT_ERRORS as exc:
                # Left in the batch for the retry, and the other streams go on: a full Redis
                # refuses result.lua (it writes), never settle.lua's acknowledgements.
                failed = failed or exc
                continue
            settler._held.discard_many(stream, items)
            del batch[stream]
            settler.tell_acked(items, refused, self._cancelled)
            if refused or settler._on_outcome is not None or self._cancelled:
                self._report_each(items, refused)
            else:
                settler.report_acked(items[0].role.name, len(items))
        if failed is not None:
            raise failed

    async def _ack(self, stream: str, items: list[Delivery]) -> set[bytes]:
        """Acknowledge one stream's deliveries, keeping the outcomes to keep; the refused ids.

        Plain acks go through ``settle.lua``; those whose outcome is kept through
        ``result.lua``, which writes each record in the same owner-checked step (a worker that
        lost its lease never writes a result). A role keeps all or none: mostly one call.
        """
        settler, kept = self._settler, self._kept
        ids: list[bytes] = []
        records: list[scripts.Kept] = []
        if not kept:  # the hot path: no outcome kept, one comprehension
            ids = [delivery.entry.id for delivery in items]
        for delivery in items if kept else ():
            record = kept.get(delivery)
            if record is None:
                ids.append(delivery.entry.id)
            else:
                records.append(record)
        refused: set[bytes] = set()
        if ids:
            redis, mine = settler._redis, settler.consumer
            refused.update(await scripts.settle(settler._scripts, redis, stream, mine, ids))
        if records:
            refused |= await scripts.keep_results(
                settler._scripts,
                settler._redis,
                stream=stream,
                consumer=settler.consumer,
                kept=records,
            )
            for delivery in items:
                kept.pop(delivery, None)
        return refused

    def _report_each(self, items: list[Delivery], refused: set[bytes]) -> None:
        """Report each acknowledged delivery: its status, and its outcome to the listener."""
        cancelled = self._cancelled
        for delivery in items:
            status: OutcomeStatus = "acked"
            if delivery in cancelled:
                status = "cancelled"
                message_id = cancelled.pop(delivery)
            else:
                message_id = delivery.job.id if delivery.job is not None else None
            if delivery.entry.id in refused:
                status = "lost"
            self._settler.report(delivery, message_id, status)

    async def _applied_before(
        self, stream: str, items: list[Delivery], refused: set[bytes]
    ) -> set[bytes]:
        """Of the refused ids, those an earlier try whose reply was lost had acknowledged.

        Refused means "not pending under this consumer". After a lost reply that is what an
        applied acknowledgement leaves too, so such an id counts as lost only if another
        consumer holds it now; one that is not pending at all was acknowledged (and deleted).
        """
        unknown = [d.entry.id for d in items if d.ack_unknown and d.entry.id in refused]
        if not unknown:
            return set()
        owners = await streams.pending_owners(self._settler._redis, stream, unknown)
        applied = {entry_id for entry_id in unknown if entry_id not in owners}
        if applied:
            self._settler.stats.ack_replies_lost += len(applied)
            logger.warning(
                "the reply to an acknowledgement of %d entries of %s was lost (the connection "
                "dropped); they are no longer pending, so it was applied (unless the outage "
                "outlasted the lease TTL and another worker adopted and finished them): counted "
                "as settled, not as lost leases",
                len(applied),
                stream,
            )
        return applied
