"""The wire protocol: the models of every stream entry, and bytes to models and back.

Every entry streamflow writes is one of the models below, encoded as JSON (orjson) in a single
stream field. A role stream entry holds a :class:`Job` in the field ``message``; a dead-letter
stream entry holds a :class:`DeadLetter` in the field ``dead_letter`` and the original entry's
fields verbatim as ``raw:<field>``. ``docs/protocol.md`` is the reference for other languages.
"""

from __future__ import annotations

import os
import time
from typing import Annotated, Any, Literal, TypeVar, get_args

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from streamflow import hostile
from streamflow.errors import InputError, ProtocolError
from streamflow.keys import NAME_PATTERN

#: The protocol version this code writes and reads.
PROTOCOL_VERSION = 1
#: The stream field that holds a job's JSON envelope.
MESSAGE_FIELD = b"message"
#: The dead-letter stream field that holds the :class:`DeadLetter` JSON.
DEAD_LETTER_FIELD = b"dead_letter"
#: Prefix of the dead-letter fields that keep the original entry's fields verbatim.
RAW_FIELD_PREFIX = b"raw:"
#: Default limit on one encoded message; larger entries are dead-lettered unread.
DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024

Name = Annotated[str, Field(pattern=f"^{NAME_PATTERN.pattern}$")]
# An int, not Literal[1]: JSON ``true`` would pass as 1 in a Literal. Required on the wire.
Version = Annotated[
    int,
    Field(ge=PROTOCOL_VERSION, le=PROTOCOL_VERSION, json_schema_extra={"const": PROTOCOL_VERSION}),
]
#: Integers stay within 64 bits so that every language can hold them.
INT64_MAX = 2**63 - 1
Timestamp = Annotated[int, Field(ge=0, le=INT64_MAX)]
DedupKey = Annotated[str, Field(min_length=1, max_length=256)]
MessageId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:\-]+$")]

#: Dead-letter reasons that mean the entry itself was malformed (metrics outcome ``rejected``).
MalformedReason = Literal[
    "too_large",
    "invalid_json",
    "too_complex",
    "unsupported_version",
    "unknown_kind",
    "invalid_message",
    "wrong_role",
    "invalid_payload",
]
DeadLetterReason = (
    MalformedReason
    | Literal["failed", "fatal", "max_deliveries", "expired", "missing_input", "invalid_input"]
)
MALFORMED_REASONS: frozenset[str] = frozenset(get_args(MalformedReason))

#: How a delivery ended when it was cancelled (acknowledged, not dead-lettered or retried).
CANCELLED = "cancelled"


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class BatchRef(_Model):
    """One batch of a parent node, given to a child fed ``on: batch``.

    Attributes:
        node: The parent node id.
        index: The batch's index among the parent's batches (0, 1, ...).
        ref: The Redis key that holds the batch (a JSON array).
    """

    node: Name
    index: Annotated[int, Field(ge=0, le=INT64_MAX)]
    ref: Annotated[str, Field(min_length=1, max_length=512)]


class JobRetry(_Model):
    """A task node's retry policy, carried by its jobs (overrides the role's policy)."""

    max_attempts: Annotated[int, Field(ge=1, le=1000)] = 3
    backoff: Annotated[float, Field(ge=0, le=86_400)] = 1.0
    factor: Annotated[float, Field(ge=1, le=100)] = 2.0
    max_backoff: Annotated[float, Field(ge=0, le=86_400)] = 300.0


class Job(_Model):
    """A unit of work for one role: the entry of a role stream.

    Attributes:
        protocol: The protocol version, 1.
        kind: Always ``"job"``.
        id: The message id chosen by the publisher; unique per message, kept across retries.
        role: The role that handles it; must match the stream it is on.
        payload: Any JSON value; the handler's declared type validates it.
        attempt: 1 for the first attempt, growing with each retry.
        created_at_ms: When it was first published, milliseconds since the Unix epoch.
        deadline_ms: Optional time after which it must not start, ms since the epoch.
        task_id: The DAG task it belongs to, if any.
        node_id: The DAG node it belongs to, if any.
        dedup_key: Optional publisher key; publishing twice with one key publishes once.
        invocation: For a task node: which run of the node this is (0, 1, ...; a node fed per
            batch runs once per parent batch).
        input: For a node fed ``on: batch``: the parent batch it processes.
        inputs: For a node fed ``on: done`` or ``on: failure``: how many batches each parent
            produced (their keys are listed in the task's output lists).
        failures: For a remediation node: the error of each failed parent.
        retry: The node's retry policy, overriding the role's.
        timeout: The node's time limit in seconds, overriding the role's.
    """

    protocol: Version
    kind: Literal["job"]
    id: MessageId
    role: Name
    payload: Any = None
    attempt: Annotated[int, Field(ge=1, le=INT64_MAX)] = 1
    created_at_ms: Timestamp
    deadline_ms: Timestamp | None = None
    task_id: Name | None = None
    node_id: Name | None = None
    dedup_key: DedupKey | None = None
    invocation: Annotated[int, Field(ge=0, le=INT64_MAX)] | None = None
    input: BatchRef | None = None
    inputs: dict[Name, Annotated[int, Field(ge=0, le=INT64_MAX)]] | None = None
    failures: dict[Name, Annotated[str, Field(max_length=4000)]] | None = None
    retry: JobRetry | None = None
    timeout: Annotated[float, Field(gt=0, le=7 * 86_400)] | None = None


class ErrorInfo(_Model):
    """What went wrong in a handler or while decoding.

    Attributes:
        type: The exception's class name.
        message: ``str(exception)``, truncated.
        traceback: The last lines of the traceback, if any.
    """

    type: str
    message: str
    traceback: str | None = None


class DeadLetter(_Model):
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


class CancelSignal(_Model):
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


class CancelReport(_Model):
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


EventType = Literal["accepted", "batch", "done", "failed", "cancelled"]


class TaskEvent(_Model):
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
    }
)

#: Every message kind, by the value of its ``kind`` field.
MESSAGE_KINDS: dict[str, type[_Model]] = {
    "job": Job,
    "dead_letter": DeadLetter,
    "cancel": CancelSignal,
    "event": TaskEvent,
}


_MESSAGE_ID = TypeAdapter(MessageId)
_DEDUP_KEY = TypeAdapter(DedupKey)
_TIMESTAMP = TypeAdapter(Timestamp)


def check_publish_fields(message_id: str, dedup_key: str | None, deadline_ms: int | None) -> None:
    """Refuse, at the publisher, fields that a worker would dead-letter as ``invalid_message``.

    Raises:
        ValueError: Naming the field and the rule it breaks.
    """
    for adapter, value, name in (
        (_MESSAGE_ID, message_id, "message id"),
        (_DEDUP_KEY, dedup_key, "dedup key"),
        (_TIMESTAMP, deadline_ms, "deadline"),
    ):
        if value is None:
            continue
        try:
            adapter.validate_python(value)
        except ValidationError as exc:
            raise ValueError(f"invalid {name} {value!r}: {exc.errors()[0]['msg']}") from None


def now_ms() -> int:
    """The current time in milliseconds since the Unix epoch."""
    return time.time_ns() // 1_000_000


def new_message_id() -> str:
    """A fresh random message id (32 hex digits: 128 random bits).

    ``os.urandom`` directly: ``uuid.uuid4().hex`` gives the same digits at four times the cost
    (less six bits fixed for the version), and this runs once per published job.
    """
    return os.urandom(16).hex()


def encode(model: BaseModel) -> bytes:
    """Encode any protocol model as compact JSON bytes."""
    return orjson.dumps(model.model_dump(mode="json", exclude_none=True))


def encode_job_fields(
    *,
    message_id: str,
    role: str,
    payload: Any,
    created_at_ms: int,
    deadline_ms: int | None = None,
    task_id: str | None = None,
    node_id: str | None = None,
    dedup_key: str | None = None,
    attempt: int = 1,
) -> bytes:
    """Encode a job envelope straight from its fields, for publishing in bulk.

    This skips building a :class:`Job` (the fast path of ``publish_many``); the caller has
    validated the names. The bytes decode to exactly the :class:`Job` with these fields.
    """
    doc: dict[str, Any] = {
        "protocol": PROTOCOL_VERSION,
        "kind": "job",
        "id": message_id,
        "role": role,
        "payload": payload,
        "attempt": attempt,
        "created_at_ms": created_at_ms,
    }
    if deadline_ms is not None:
        doc["deadline_ms"] = deadline_ms
    if task_id is not None:
        doc["task_id"] = task_id
    if node_id is not None:
        doc["node_id"] = node_id
    if dedup_key is not None:
        doc["dedup_key"] = dedup_key
    return orjson.dumps(doc)


#: The job model's validator, called directly: the hot path skips ``model_validate_json``'s
#: Python wrapper (the same validation).
_JOB_VALIDATOR = Job.__pydantic_validator__


def decode_job(fields: dict[bytes, bytes], *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Job:
    """Turn a role stream entry's fields into a :class:`Job`.

    Args:
        fields: The entry's fields as Redis returned them.
        max_bytes: Entries whose ``message`` field is larger are refused before parsing.

    Raises:
        ProtocolError: With ``reason`` one of the dead-letter reasons ``too_large``,
            ``invalid_json``, ``unsupported_version``, ``unknown_kind`` or ``invalid_message``.
    """
    raw = fields.get(MESSAGE_FIELD)
    if raw is None:
        names = ", ".join(repr(k.decode(errors="replace")) for k in fields) or "none"
        raise ProtocolError(
            "invalid_message", f"entry has no 'message' field (fields: {names})", None
        )
    if len(raw) > max_bytes:
        raise ProtocolError("too_large", f"message is {len(raw)} bytes, limit {max_bytes}", raw)
    try:
        job: Job = _JOB_VALIDATOR.validate_json(raw)
    except ValidationError:
        # Hostile input first, as before parsing: its reason wins over a schema mismatch.
        if hostile.screen(raw)[0]:
            hostile.check(raw)
    else:
        # The fast parser accepts what the full check refuses (big integers, NaN, duplicate
        # keys, deep nesting...); a look at what it returned says when the full check must run.
        kept = _keys_kept(job)
        # Two upper bounds on the keys written: every key is followed by a colon (a cheap
        # count), and by a quote then a colon or white space (fewer false alarms).
        if kept != raw.count(b":") and kept != hostile.key_tokens(raw):
            hostile.check(raw)  # raises for hostile input; else the job is fine
        return job
    # The fast path failed: parse again only to name the reason precisely.
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError("invalid_json", f"message is not valid JSON: {exc}", raw) from None
    if not isinstance(doc, dict):
        raise ProtocolError("invalid_message", "message is not a JSON object", raw)
    _check_header(doc, raw, expected_kind="job")
    try:
        Job.model_validate(doc)
    except ValidationError as exc:
        raise ProtocolError("invalid_message", _summarize(exc), raw) from None
    raise ProtocolError("invalid_message", "message does not match the job schema", raw)


def _keys_kept(job: Job) -> int:
    """How many object keys the parsed job holds, at every level (-1: see below).

    -1 when its payload breaks (or may break) a limit of :func:`hostile.check`. The header's
    fields are bounded by the model; only the payload is free-form.
    """
    count = len(job.model_fields_set)
    if job.payload is not None:
        # The payload is the value of a key of the message object: depth 2.
        kept = hostile.measure(job.payload, depth=2)
        if kept is None:
            return -1
        count += kept
    if job.task_id is not None:  # the task node fields, rare on the hot path
        for value in (job.input, job.retry):
            if value is not None:
                count += len(value.model_fields_set)
        count += len(job.inputs or ()) + len(job.failures or ())
    return count


def _check_header(doc: dict[str, Any], raw: bytes, *, expected_kind: str) -> None:
    version = doc.get("protocol")
    # ``type() is int``: ``1.0`` and ``true`` compare equal to 1 in Python, and the docs promise
    # ``unsupported_version`` for anything but the JSON integer 1.
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError(
            "unsupported_version",
            f"protocol version {version!r} is not supported (this worker speaks "
            f"{PROTOCOL_VERSION})",
            raw,
        )
    kind = doc.get("kind")
    if kind != expected_kind:
        raise ProtocolError(
            "unknown_kind", f"kind {kind!r} is not valid here (expected {expected_kind!r})", raw
        )


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
        raise ProtocolError("invalid_message", _summarize(exc), raw) from None
    originals = {
        name[len(RAW_FIELD_PREFIX) :].decode(errors="replace"): value
        for name, value in fields.items()
        if name.startswith(RAW_FIELD_PREFIX)
    }
    return letter, originals


def _summarize(exc: ValidationError, limit: int = 5) -> str:
    """One line per validation problem, the first ``limit`` of them."""
    parts = []
    for err in exc.errors()[:limit]:
        where = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"{where}: {err['msg']}")
    more = exc.error_count() - limit
    if more > 0:
        parts.append(f"... and {more} more")
    return "; ".join(parts)


def decode_signal(fields: dict[bytes, bytes]) -> CancelSignal:
    """Turn a signals stream entry into its model.

    Raises:
        ProtocolError: Not a valid signal (bad JSON, unknown kind or version, wrong fields).
    """
    return _decode_small(fields, SIGNAL_FIELD, CancelSignal)


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
            _check_header(doc, raw, expected_kind=kind)
        raise ProtocolError("invalid_message", _summarize(exc), raw) from None


def decode_batch(raw: bytes | Exception, what: str, max_bytes: int) -> list[Any]:
    """The items of a task node's batch as read back from Redis (a GET's reply).

    Args:
        raw: The value, or the error Redis gave for the key (another type: ``WRONGTYPE``).
        what: The batch, named for the error message.
        max_bytes: The largest batch accepted.

    Raises:
        InputError: The key holds another type, or a value that is not a JSON array, or one
            larger than ``max_bytes``.
    """
    if isinstance(raw, Exception):
        raise InputError(f"{what} cannot be read: {raw}")
    if len(raw) > max_bytes:
        raise InputError(f"{what} is {len(raw)} bytes, limit {max_bytes}")
    try:
        items = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InputError(f"{what} is not JSON: {exc}") from None
    if not isinstance(items, list):
        raise InputError(f"{what} is not a JSON array")
    return items


def json_schemas() -> dict[str, dict[str, Any]]:
    """The JSON Schema of every message kind, keyed by kind."""
    return {kind: model.model_json_schema() for kind, model in MESSAGE_KINDS.items()}
