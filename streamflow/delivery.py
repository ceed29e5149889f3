"""The message in flight and how it ends: the data every module of the hot path shares.

No I/O and no runtime import of an I/O module: the types named only in annotations
(``streams.Entry``, ``nodes.NodeRun``, ...) are imported for type checking alone. Reading,
leases, decisions, settling and metrics all import these types from here, so the rules in
:mod:`streamflow.decisions` depend on nothing that talks to Redis.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import anyio

    from streamflow.app import Role
    from streamflow.context import Context
    from streamflow.nodes import NodeRun
    from streamflow.protocol import DeadLetterReason, Job
    from streamflow.records import CancelSignal, ErrorInfo
    from streamflow.streams import Entry


#: Why a handler is stopped (see :meth:`Delivery.stop`).
StopCause = Literal["lease_lost", "cancelled", "shutdown"]


@dataclass(eq=False, slots=True)
class Delivery:
    """One entry this process holds, from read (or adoption) until it is settled.

    Attributes:
        role: The role it belongs to.
        shard: The role's partition it came from (the role's name when not partitioned); its
            keys (dead letters, schedule, events, ...) are the partition's.
        stream: The role stream key (the partition's).
        entry: The entry as read.
        confirmed_at: When its lease was last confirmed (``time.monotonic()`` when the read,
            adoption or renewal that confirmed it was sent).
        scope: The cancel scope of its running handler, once started.
        context: Its handler's context, once started.
        job: The decoded job, once decoded.
        lost: The lease was lost: another consumer owns it now; apply nothing.
        released: The worker is shutting down: hand it back instead of settling.
        settling: Its outcome (ack, retry, dead letter, release) is on its way to Redis, or
            for an ack queued for the acker's next batch: a renewal that finds it gone is not
            a lost lease (a refused settle is, found there).
        started: Its handler has started.
        ack_unknown: An acknowledgement of it was sent but its reply was lost: it may have
            been applied.
        cancel: The cancel signal that stopped it, if any.
        finished: Set when its handling has ended (created only when someone waits for it).
        node: For a task node's job: its run (batches emitted, events).

    Its stop flags (``lost``, ``released``, ``cancel``), its handler's cancel token and
    shutdown flag and its scope change only through :meth:`stop`.
    """

    role: Role
    shard: str
    stream: str
    entry: Entry
    # Fifth, so that the worker passes it positionally (the cheapest way, once per entry).
    confirmed_at: float = 0.0
    scope: anyio.CancelScope | None = None
    context: Context | None = None
    job: Job | None = None
    lost: bool = False
    released: bool = False
    settling: bool = False
    started: bool = False
    ack_unknown: bool = False
    cancel: CancelSignal | None = None
    finished: anyio.Event | None = None
    node: NodeRun | None = None

    def stop(
        self, cause: StopCause, reason: str, *, hard: bool, signal: CancelSignal | None = None
    ) -> None:
        """Stop this delivery's handler for ``cause``: the one place its stop flags change.

        ``lease_lost`` marks it lost (another consumer owns it: apply nothing); only ``hard``
        (its handler is running and may now run twice) sets its cancel token to ``reason``.
        ``cancelled`` records ``signal`` (if given) and sets the cancel token to ``reason``.
        ``shutdown`` marks it released (handed back, not a failed attempt) and sets the
        handler's ``ctx.shutting_down``, never its cancel token: a handler stopping on its
        token would abort on every deploy.

        Args:
            cause: Why it stops.
            reason: The cancel token's reason (``lease_lost`` and ``cancelled``).
            hard: Also cancel its handler's scope (if running) instead of waiting for the
                handler to stop cooperatively.
            signal: For ``cancelled``: the cancel signal that stopped it.
        """
        ctx = self.context
        if cause == "lease_lost":
            self.lost = True
            if hard and ctx is not None:
                ctx.cancel._set(reason)
        elif cause == "cancelled":
            if signal is not None:
                self.cancel = signal
            if ctx is not None:
                ctx.cancel._set(reason)
        else:
            self.released = True
            if ctx is not None:
                ctx._shut_down()
        if hard and self.scope is not None:
            self.scope.cancel()


@dataclass(slots=True)
class InFlight:
    """Every entry this process holds, by stream and entry id."""

    _by_stream: dict[str, dict[bytes, Delivery]] = field(default_factory=dict)

    def add(self, delivery: Delivery) -> None:
        """Hold a delivery (from read or adoption until settled)."""
        self._by_stream.setdefault(delivery.stream, {})[delivery.entry.id] = delivery

    def discard(self, delivery: Delivery) -> None:
        """Stop holding a delivery (settled, released or lost)."""
        held = self._by_stream.get(delivery.stream)
        if held is not None and held.get(delivery.entry.id) is delivery:
            del held[delivery.entry.id]

    def add_many(self, stream: str, deliveries: list[Delivery]) -> None:
        """Hold deliveries of one stream (one read)."""
        held = self._by_stream.get(stream)
        if held is None:
            held = self._by_stream[stream] = {}
        for delivery in deliveries:
            held[delivery.entry.id] = delivery

    def discard_many(self, stream: str, deliveries: list[Delivery]) -> None:
        """Stop holding deliveries of one stream (settled in one batch)."""
        held = self._by_stream.get(stream)
        if held is None:
            return
        for delivery in deliveries:
            entry_id = delivery.entry.id
            if held.get(entry_id) is delivery:
                del held[entry_id]

    def holds(self, stream: str, entry_id: bytes) -> bool:
        """Whether this process holds that entry."""
        return entry_id in self._by_stream.get(stream, ())

    def by_stream(self) -> Iterator[tuple[str, list[Delivery]]]:
        """(stream, held deliveries) for every stream with any, as a snapshot."""
        for stream, held in list(self._by_stream.items()):
            if held:
                yield stream, list(held.values())

    def __iter__(self) -> Iterator[Delivery]:
        for _, deliveries in self.by_stream():
            yield from deliveries

    def __len__(self) -> int:
        return sum(len(held) for held in self._by_stream.values())


DecisionKind = Literal["ack", "retry", "dead_letter", "release", "lost", "cancelled", "park"]


@dataclass(frozen=True, slots=True)
class Decision:
    """How a delivery ends; applied by :meth:`Settler.apply`."""

    kind: DecisionKind
    job: Job | None = None
    reason: DeadLetterReason | None = None
    detail: str = ""
    error: ErrorInfo | None = None
    delay: float = 0.0
    signal_id: str | None = None
    #: ``ack`` of a job whose outcome is kept: ``result`` is its handler's return value.
    keep: bool = False
    result: Any = None
    #: ``park`` (its limit key in ``detail``): when to look at the key again (server ms).
    wake_at_ms: int = 0


OutcomeStatus = Literal[
    "acked", "retried", "dead_lettered", "released", "lost", "cancelled", "parked"
]


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one delivery ended, as reported to ``on_outcome`` listeners.

    Attributes:
        role: The role stream it came from.
        entry_id: The stream entry id.
        message_id: The job's id, if the entry decoded far enough.
        status: ``acked``; ``retried`` (next attempt scheduled); ``dead_lettered``;
            ``released`` (handed back on shutdown); ``lost`` (another consumer owns it now);
            ``cancelled`` (acknowledged without finishing, because of a cancel); ``parked``
            (held back by its limit key, moved to the key's parked list: it runs later as a
            new entry, see :mod:`streamflow.keylimits`).
        reason: The dead-letter reason, when dead-lettered.
        error: The handler's or decoder's error, when there was one.
    """

    role: str
    entry_id: str
    message_id: str | None
    status: OutcomeStatus
    reason: str | None = None
    error: ErrorInfo | None = None


@dataclass(slots=True)
class WorkerStatistics:
    """Counters of one worker since it started.

    ``by_role`` and ``dead_by_role`` are keyed by ``(role, outcome)`` tuples, which JSON
    cannot carry: :meth:`to_dict` gives the snapshot as JSON-ready data, with those two
    nested as ``{role: {outcome: count}}``.
    """

    received: int = 0
    acked: int = 0
    retried: int = 0
    dead_lettered: int = 0
    released: int = 0
    lost: int = 0
    cancelled: int = 0
    parked: int = 0
    #: Acknowledgements whose reply was lost (the connection dropped) and whose entries were
    #: then no longer pending: taken as applied, not as lost leases.
    ack_replies_lost: int = 0
    adopted: int = 0
    renewals: int = 0
    in_flight: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    #: Leases found lost, by where: ``renewal`` (the handler was running and was cancelled),
    #: ``settle`` (the handler had run; an owner-checked write was refused) and ``unstarted``
    #: (found before the handler started here). The first two may mean a handler ran twice.
    lease_losses: dict[str, int] = field(default_factory=dict)
    #: Times the event loop did not run for longer than the stall threshold, by ``kind``:
    #: ``blocked`` (code on the loop did not yield) or ``frozen`` (the whole process was paused).
    loop_stalls: dict[str, int] = field(default_factory=dict)
    #: (role, outcome) -> count; outcome ``rejected`` for malformed input dead-lettered.
    by_role: dict[tuple[str, str], int] = field(default_factory=dict)
    #: (role, dead-letter reason) -> count.
    dead_by_role: dict[tuple[str, str], int] = field(default_factory=dict)
    #: Malformed records read back from Redis and skipped, by kind (see
    #: :attr:`streamflow.signals.SignalListener.bad_records`; ``signal`` for a malformed
    #: cancel signal).
    bad_records: dict[str, int] = field(default_factory=dict)
    #: Deliveries of entries delivered before (adopted, or resumed), by role.
    redeliveries: dict[str, int] = field(default_factory=dict)
    #: Entries adopted after their lease expired, by role.
    reclaims: dict[str, int] = field(default_factory=dict)
    #: Pending entries found deleted from the stream before they were settled, by role.
    trimmed: dict[str, int] = field(default_factory=dict)
    #: Cancel signals received.
    cancel_signals: int = 0
    #: Consumer names of stopped processes this worker deleted (they held nothing).
    consumers_deleted: int = 0
    #: Each role served: whether it is paused (as last read, see :mod:`streamflow.flow`).
    paused: dict[str, bool] = field(default_factory=dict)
    #: Reads of a limited role held back by its rate or concurrency limit, by role.
    limit_waits: dict[str, int] = field(default_factory=dict)
    #: Running slots of concurrency-limited roles this worker holds now, by role.
    limit_slots: dict[str, int] = field(default_factory=dict)
    #: Jobs parked by a per-key limit, and parked jobs woken, by this worker, by role.
    key_parks: dict[str, int] = field(default_factory=dict)
    key_wakes: dict[str, int] = field(default_factory=dict)
    #: Per-key running slots this worker holds now, by role.
    key_slots: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Every counter as JSON-ready data (``json.dumps`` or ``orjson.dumps`` takes it).

        Returns:
            The fields by name, as :func:`dataclasses.asdict` gives them, except ``by_role``
            and ``dead_by_role``: ``{role: {outcome: count}}`` and ``{role: {reason: count}}``.
        """
        data = asdict(self)
        data["by_role"] = _nested(self.by_role)
        data["dead_by_role"] = _nested(self.dead_by_role)
        return data


def _nested(counts: dict[tuple[str, str], int]) -> dict[str, dict[str, int]]:
    """``{(a, b): n}`` as ``{a: {b: n}}``."""
    nested: dict[str, dict[str, int]] = {}
    for (outer, inner), count in sorted(counts.items()):
        nested.setdefault(outer, {})[inner] = count
    return nested
