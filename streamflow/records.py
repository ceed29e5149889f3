"""The wire records besides the job: their models, stream fields and decoders; the JSON Schemas.

A dead-letter stream entry holds a :class:`DeadLetter` in the field ``dead_letter`` and the
original entry's fields verbatim as ``raw:<field>``; the signals stream carries
:class:`CancelSignal`, a signal's report hash :class:`CancelReport`; a role's events stream
:class:`TaskEvent`; a result key :class:`JobResult`; a lifecycle events stream
:class:`LifecycleEvent` items. The :class:`~streamflow.protocol.Job`, what every model shares and
the limits are in :mod:`streamflow.protocol`; :func:`json_schemas` assembles both modules' models.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

import orjson
from pydantic import Field, ValidationError, model_validator

from streamflow import hostile
from streamflow.errors import ProtocolError
from streamflow.protocol import (
    INT64_MAX,
    MESSAGE_FIELD,
    DeadLetterReason,
    Headers,
    Job,
    MessageId,
    Name,
    Timestamp,
    Version,
    WireModel,
    check_envelope,
    summarize_errors,
)

#: The dead-letter stream field that holds the :class:`DeadLetter` JSON.
DEAD_LETTER_FIELD = b"dead_letter"
#: Prefix of the dead-letter fields that keep the original entry's fields verbatim.
RAW_FIELD_PREFIX = b"raw:"


class ErrorInfo(WireModel):
    """What went wrong in a handler or while decoding.

    Attributes:
        type: The exception's class name.
        message: ``str(exception)``, truncated.
        traceback: The last lines of the traceback, if any.
    """

    type: str
    message: str
    traceback: str | None = None


class DeadLetter(WireModel):
    """An entry of a role's dead-letter stream.

    Attributes:
        protocol: The protocol version, 1.
        kind: Always ``"dead_letter"``.
        reason: Why the entry was dead-lettered (see ``DeadLetterReason``).
        detail: A human-readable explanation.
        role: The role stream the entry came from.
        entry_id: The original stream entry id.
        message_id: The job's id, when the entry decoded far enough to have one.
        consumer: The consumer that dead-lettered it.
        attempts: The job's attempt number when it was dead-lettered (0 if it never decoded).
        dead_at_ms: When it was dead-lettered, ms since the epoch.
        error: The handler's error, for reasons ``failed`` and ``fatal``.
        job: The decoded job, when the entry was a valid job.
    """

    protocol: Version
    kind: Literal["dead_letter"]
    reason: DeadLetterReason
    detail: str
    role: Name
    entry_id: str
    message_id: str | None = None
    consumer: str
    attempts: Annotated[int, Field(ge=0, le=INT64_MAX)] = 0
    dead_at_ms: Timestamp
    error: ErrorInfo | None = None
    job: Job | None = None


class CancelSignal(WireModel):
    """A cancel command on the signals stream (field ``signal``); every worker sees it.

    Attributes:
        protocol: The protocol version, 1.
        kind: Always ``"cancel"``.
        id: The signal's id, chosen by the sender (reports of what it stopped use it).
        target: What to cancel: every message of a ``task``, one ``message``, or ``any``
            message whose id or task id is ``target_id``.
        target_id: The task id or message id.
        reason: Why; handlers see it as ``ctx.cancel.reason``.
        requested_by: Who asked (a user, a service), for the logs.
        created_at_ms: When it was sent, ms since the epoch.
    """

    protocol: Version
    kind: Literal["cancel"]
    id: MessageId
    target: Literal["task", "message", "any"]
    target_id: MessageId
    reason: Annotated[str, Field(max_length=1000)] = "cancelled"
    requested_by: Annotated[str, Field(max_length=200)] = ""
    created_at_ms: Timestamp


class CancelReport(WireModel):
    """What one worker did about one cancel signal (written to the signal's report hash).

    Attributes:
        consumer: The worker's consumer name.
        stopped: Message ids it stopped while running, or refused to start.
        running: Message ids matching the cancel still running on it (0 once they stopped).
        at_ms: When it wrote this report.
    """

    consumer: str
    stopped: list[str]
    running: int
    at_ms: Timestamp


JobOutcome = Literal["succeeded", "dead_lettered", "cancelled"]


class JobResult(WireModel):
    """How a job ended, kept under its result key when its role or its publisher asks.

    Written by the worker that settled the job, in the same owner-checked step as the
    acknowledgement (``succeeded``, ``cancelled``) or as the dead letter (``dead_lettered``);
    it expires after the time asked for.

    Attributes:
        protocol: The protocol version, 1.
        kind: Always ``"result"``.
        message_id: The job's id.
        role: Its role.
        status: ``succeeded``, ``dead_lettered`` or ``cancelled``.
        result: For ``succeeded``: the handler's return value (any JSON value).
        reason: For ``dead_lettered``: the dead-letter reason.
        detail: For ``dead_lettered`` and ``cancelled``: why, in words.
        error: For ``dead_lettered`` after a handler's error: the error.
        attempt: The attempt that ended it.
        consumer: The worker that settled it.
        finished_at_ms: When, ms since the epoch.
    """

    protocol: Version
    kind: Literal["result"]
    message_id: MessageId
    role: Name
    status: JobOutcome
    result: Any = None
    reason: DeadLetterReason | None = None
    detail: str | None = None
    error: ErrorInfo | None = None
    attempt: Annotated[int, Field(ge=0, le=INT64_MAX)] = 1
    consumer: str
    finished_at_ms: Timestamp


EventType = Literal["accepted", "batch", "done", "failed", "cancelled"]


class TaskEvent(WireModel):
    """What a worker reports about a task node's job, on its role's events stream.

    The coordinator turns these into task state. A worker writes ``accepted`` when a run
    starts; ``batch`` for each batch it emits (after storing the batch at ``ref``); and one of
    ``done`` (with the number of batches emitted), ``failed`` (no attempts left) or
    ``cancelled`` in the same step that settles the job. ``attempt`` and ``delivery`` order the
    runs of one invocation: events of an older run than one already seen are ignored.

    Attributes:
        protocol: The protocol version, 1.
        kind: Always ``"event"``.
        type: ``accepted``, ``batch``, ``done``, ``failed`` or ``cancelled``.
        task_id: The task.
        node_id: The node.
        invocation: The node invocation (the job's ``invocation``).
        attempt: The job's attempt.
        delivery: The stream entry's delivery count (grows when another worker adopts it).
        at_ms: When it happened, ms since the epoch.
        seq: For ``batch``: the batch's number within this invocation (0, 1, ...).
        ref: For ``batch``: the key holding the batch.
        items: For ``batch``: how many items it holds.
        total: For ``done``: how many batches the invocation emitted.
        error: For ``failed``: what went wrong.
        consumer: The worker's consumer name.
        trace: The W3C trace context (``traceparent``, ``tracestate``) of the run's handler
            span, when a tracing middleware traced it: the coordinator's spans continue it.
    """

    protocol: Version
    kind: Literal["event"]
    type: EventType
    task_id: Name
    node_id: Name
    invocation: Annotated[int, Field(ge=0, le=INT64_MAX)]
    attempt: Annotated[int, Field(ge=1, le=INT64_MAX)] = 1
    delivery: Annotated[int, Field(ge=1, le=INT64_MAX)] = 1
    at_ms: Timestamp
    seq: Annotated[int, Field(ge=0, le=INT64_MAX)] | None = None
    ref: Annotated[str, Field(min_length=1, max_length=512)] | None = None
    items: Annotated[int, Field(ge=0, le=INT64_MAX)] | None = None
    total: Annotated[int, Field(ge=0, le=INT64_MAX)] | None = None
    error: Annotated[str, Field(max_length=4000)] | None = None
    consumer: Annotated[str, Field(max_length=200)] | None = None
    trace: Headers | None = None


#: What a lifecycle event reports: a job's ``started`` ... ``cancelled``, or a ``task`` or
#: ``node`` that changed state.
LifecycleType = Literal[
    "started",
    "progress",
    "retrying",
    "succeeded",
    "failed",
    "dead_lettered",
    "cancelled",
    "task",
    "node",
]
#: The job lifecycle types after which the job runs no more (unless replayed).
FINAL_JOB_TYPES: frozenset[str] = frozenset({"succeeded", "failed", "dead_lettered", "cancelled"})


class LifecycleEvent(WireModel):
    """One lifecycle event, for subscribers: an item of a lifecycle events stream entry.

    Each entry of the stream holds one or more events, in order, as a JSON array in its field
    ``events`` (a worker writes what it buffered in one entry, not one entry per event); a
    plain job's ``started`` and ``succeeded`` events come as :class:`LifecycleJobs` items, which
    :func:`decode_lifecycle` expands into these.

    Best-effort observability: written after the change it reports was committed (a settle the
    owner check refused reports nothing), but a worker that dies in between never writes it,
    and the stream is capped. The state in Redis (streams, task state) is the truth.

    Attributes:
        protocol: The protocol version, 1.
        kind: Always ``"lifecycle"``.
        type: ``started``, ``progress``, ``retrying``, ``succeeded``, ``failed`` (its last
            attempt failed, or it raised ``Fatal``: dead-lettered), ``dead_lettered`` (for any
            other reason), ``cancelled``; ``task`` or ``node``: a state change.
        at_ms: When it happened, ms since the epoch.
        role: The job's role.
        message_id: The job's message id.
        task_id: The task, for a task node's job, a ``task`` or a ``node`` event.
        node_id: The node, for a task node's job or a ``node`` event.
        attempt: The job's attempt.
        consumer: The worker or coordinator that wrote it.
        state: ``task`` and ``node``: the new state.
        previous: ``task`` and ``node``: the state before, if any.
        progress: ``progress``: a number or a small JSON object.
        message: ``progress``: an optional text.
        reason: ``failed``, ``dead_lettered``: the dead-letter reason; ``cancelled``: the
            cancel's reason.
        detail: ``retrying``, ``failed``, ``dead_lettered``: what went wrong.
        delay: ``retrying``: seconds until the next attempt.
    """

    protocol: Version
    kind: Literal["lifecycle"]
    type: LifecycleType
    at_ms: Timestamp
    role: Name | None = None
    message_id: MessageId | None = None
    task_id: Name | None = None
    node_id: Name | None = None
    attempt: Annotated[int, Field(ge=1, le=INT64_MAX)] | None = None
    consumer: Annotated[str, Field(max_length=200)] | None = None
    state: Annotated[str, Field(max_length=32)] | None = None
    previous: Annotated[str, Field(max_length=32)] | None = None
    progress: int | float | dict[str, Any] | None = None
    message: Annotated[str, Field(max_length=1000)] | None = None
    reason: Annotated[str, Field(max_length=1000)] | None = None
    detail: Annotated[str, Field(max_length=4000)] | None = None
    delay: Annotated[float, Field(ge=0)] | None = None


#: The most jobs one :class:`LifecycleJobs` item names (a worker writes at most 100).
MAX_ITEM_JOBS = 1_000


class LifecycleJobs(WireModel):
    """The ``started`` or ``succeeded`` events of many plain jobs of one role, as one item.

    The compact form a worker writes for its hot events (not a task node's job): one item per
    millisecond of ``started`` events, one per acknowledged batch of ``succeeded`` ones,
    instead of an object per job. A reader expands it (:meth:`events`) into one
    :class:`LifecycleEvent` per job, in order, with the item's ``type``, ``at_ms``, ``role``
    and ``consumer``.

    Attributes:
        protocol: The protocol version, 1.
        kind: Always ``"lifecycle_jobs"``.
        type: ``started`` or ``succeeded``.
        at_ms: When, ms since the epoch: the millisecond the jobs started, or the time their
            acknowledgement was applied.
        role: The jobs' role.
        consumer: The worker that wrote it.
        message_ids: The jobs' message ids, in order.
        attempts: Their attempts, in the same order.
    """

    protocol: Version
    kind: Literal["lifecycle_jobs"]
    type: Literal["started", "succeeded"]
    at_ms: Timestamp
    role: Name
    consumer: Annotated[str, Field(max_length=200)]
    message_ids: Annotated[list[MessageId], Field(min_length=1, max_length=MAX_ITEM_JOBS)]
    attempts: Annotated[
        list[Annotated[int, Field(ge=1, le=INT64_MAX)]],
        Field(min_length=1, max_length=MAX_ITEM_JOBS),
    ]

    @model_validator(mode="after")
    def _one_attempt_per_job(self) -> LifecycleJobs:
        if len(self.attempts) != len(self.message_ids):
            raise ValueError("attempts and message_ids differ in length")
        return self

    def events(self) -> list[LifecycleEvent]:
        """One event per job, in order."""
        # Every field was validated with this item: building the events again is not needed.
        return [
            LifecycleEvent.model_construct(
                protocol=self.protocol,
                kind="lifecycle",
                type=self.type,
                at_ms=self.at_ms,
                role=self.role,
                message_id=message_id,
                attempt=attempt,
                consumer=self.consumer,
            )
            for message_id, attempt in zip(self.message_ids, self.attempts, strict=True)
        ]


#: The lifecycle events stream field: a JSON array of :class:`LifecycleEvent` and
#: :class:`LifecycleJobs` objects, in order.
LIFECYCLE_FIELD = b"events"
#: The largest lifecycle events entry a reader accepts.
MAX_LIFECYCLE_BYTES = 4 * 1024 * 1024
#: The most events a reader takes from one entry (:class:`LifecycleJobs` items expand).
MAX_ENTRY_EVENTS = 10_000

#: The events stream field that holds a :class:`TaskEvent`'s JSON.
EVENT_FIELD = b"event"

#: The stream field that holds a signal's JSON.
SIGNAL_FIELD = b"signal"

#: The control stream's fields: the task's id, and what happened to it.
CONTROL_TASK_FIELD = b"task"
CONTROL_TYPE_FIELD = b"type"
#: The control entry type of a newly submitted task.
CONTROL_SUBMITTED = b"submitted"

#: The dead-letter stream field a coordinator writes in place of :data:`DEAD_LETTER_FIELD` for
#: an events entry it cannot read (why, as text); the entry's fields follow under
#: :data:`RAW_FIELD_PREFIX`.
INVALID_EVENT_FIELD = b"invalid_event"

#: The task submissions stream's fields (see :mod:`streamflow.dag.submissions`): the id the
#: client chose (the task's id), and the submission's JSON.
SUBMISSION_ID_FIELD = b"id"
SUBMISSION_FIELD = b"submission"

#: The role stream field a job woken from a per-key limit's parked list carries: how many
#: times it was parked (see :mod:`streamflow.keylimits`); parked again, it goes to the front.
PARKED_FIELD = b"parked"


def decode_parked_item(item: bytes) -> tuple[int, dict[bytes, bytes]] | None:
    """A parked job's priority level and stream fields, from ``park.lua``'s list item.

    The item is ``<start count>[,<level>];`` then each field and value as
    ``<length>:<bytes>``. Untrusted bytes: None for anything that does not parse.
    """
    head, sep, rest = item.partition(b";")
    if not sep:
        return None
    _, _, level = head.partition(b",")
    parts: list[bytes] = []
    at = 0
    while at < len(rest):
        colon = rest.find(b":", at)
        if colon < 0 or not rest[at:colon].isdigit():
            return None
        end = colon + 1 + int(rest[at:colon])
        if end > len(rest):
            return None
        parts.append(rest[colon + 1 : end])
        at = end
    if len(parts) % 2:
        return None
    return (int(level) if level.isdigit() else 0), dict(zip(parts[::2], parts[1::2], strict=True))


#: Every field name of the stream entries streamflow writes, besides the
#: :data:`RAW_FIELD_PREFIX` ones. Lua scripts spell some of them (tests check they are these).
ENTRY_FIELDS = frozenset(
    {
        MESSAGE_FIELD,
        DEAD_LETTER_FIELD,
        EVENT_FIELD,
        SIGNAL_FIELD,
        CONTROL_TASK_FIELD,
        CONTROL_TYPE_FIELD,
        INVALID_EVENT_FIELD,
        LIFECYCLE_FIELD,
        SUBMISSION_ID_FIELD,
        SUBMISSION_FIELD,
        PARKED_FIELD,
    }
)

#: Every message kind, by the value of its ``kind`` field.
MESSAGE_KINDS: dict[str, type[WireModel]] = {
    "job": Job,
    "dead_letter": DeadLetter,
    "cancel": CancelSignal,
    "event": TaskEvent,
    "result": JobResult,
    "lifecycle": LifecycleEvent,
    "lifecycle_jobs": LifecycleJobs,
}


def decode_dead_letter(fields: dict[bytes, bytes]) -> tuple[DeadLetter, dict[str, bytes]]:
    """Turn a dead-letter stream entry into its model and the original raw fields.

    Raises:
        ProtocolError: The entry is not a valid dead-letter entry.
    """
    raw = fields.get(DEAD_LETTER_FIELD)
    if raw is None:
        raise ProtocolError("invalid_message", "entry has no 'dead_letter' field")
    try:
        letter = DeadLetter.model_validate_json(raw)
    except ValidationError as exc:
        raise ProtocolError("invalid_message", summarize_errors(exc), raw) from None
    originals = {
        name[len(RAW_FIELD_PREFIX) :].decode(errors="replace"): value
        for name, value in fields.items()
        if name.startswith(RAW_FIELD_PREFIX)
    }
    return letter, originals


def decode_signal(fields: dict[bytes, bytes]) -> CancelSignal:
    """Turn a signals stream entry into its model.

    Raises:
        ProtocolError: Not a valid signal (bad JSON, unknown kind or version, wrong fields).
    """
    return _decode_small(fields, SIGNAL_FIELD, CancelSignal)


def decode_lifecycle(fields: dict[bytes, bytes]) -> tuple[list[LifecycleEvent], list[str]]:
    """The events of a lifecycle events stream entry, and what is wrong with each other item.

    Raises:
        ProtocolError: The entry as a whole is unreadable (no ``events`` field, too large, not
            JSON, not an array).
    """
    raw = fields.get(LIFECYCLE_FIELD)
    if raw is None:
        raise ProtocolError("invalid_message", "lifecycle entry has no 'events' field")
    if len(raw) > MAX_LIFECYCLE_BYTES:
        raise ProtocolError("too_large", f"lifecycle entry is {len(raw)} bytes", raw)
    hostile.check(raw, "lifecycle entry")
    try:
        items = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError("invalid_json", f"lifecycle entry is not JSON: {exc}", raw) from None
    if not isinstance(items, list):
        raise ProtocolError("invalid_message", "lifecycle entry is not a JSON array", raw)
    events: list[LifecycleEvent] = []
    problems: list[str] = []
    for index, item in enumerate(items):
        if len(events) >= MAX_ENTRY_EVENTS:
            problems.append(f"items {index} on: more than {MAX_ENTRY_EVENTS} events in an entry")
            break
        try:
            events += _lifecycle_item(item)
        except ValidationError as exc:
            problems.append(f"event {index}: {summarize_errors(exc)}")
    return events[:MAX_ENTRY_EVENTS], problems


def _lifecycle_item(item: Any) -> list[LifecycleEvent]:
    """The events of one item of a lifecycle entry: an event, or a :class:`LifecycleJobs`.

    Raises:
        ValidationError: The item is neither.
    """
    if isinstance(item, dict) and item.get("kind") == "lifecycle_jobs":
        return LifecycleJobs.model_validate(item).events()
    return [LifecycleEvent.model_validate(item)]


def decode_event(fields: dict[bytes, bytes]) -> TaskEvent:
    """Turn an events stream entry into its model.

    Raises:
        ProtocolError: Not a valid event.
    """
    return _decode_small(fields, EVENT_FIELD, TaskEvent)


_SmallT = TypeVar("_SmallT", CancelSignal, TaskEvent)


def _decode_small(fields: dict[bytes, bytes], name: bytes, model: type[_SmallT]) -> _SmallT:
    """Decode a signal or event: entries of at most 64 KiB in one field ``name``."""
    what = name.decode()
    raw = fields.get(name)
    if raw is None:
        raise ProtocolError("invalid_message", f"{what} entry has no {what!r} field")
    if len(raw) > 64 * 1024:
        raise ProtocolError("too_large", f"{what} is {len(raw)} bytes", raw)
    hostile.check(raw, what)  # rare and small: always the full check
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as bad:
            raise ProtocolError("invalid_json", f"{what} is not valid JSON: {bad}", raw) from None
        if isinstance(doc, dict):  # the same reasons, in the same order, as a job's
            kind = "cancel" if model is CancelSignal else "event"
            check_envelope(doc, raw, expected_kind=kind)
        raise ProtocolError("invalid_message", summarize_errors(exc), raw) from None


def json_schemas() -> dict[str, dict[str, Any]]:
    """The JSON Schema of every message kind, keyed by kind."""
    return {kind: model.model_json_schema() for kind, model in MESSAGE_KINDS.items()}
