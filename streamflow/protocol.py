"""The wire protocol's core: the :class:`Job`, its limits, and its bytes to model and back.

Every entry streamflow writes is a :class:`WireModel`, encoded as JSON (orjson) in a single
stream field. A role stream entry holds a :class:`Job` in the field ``message``; this module
also holds what every model shares (the version, names, ids, timestamps, headers and their
limits, the trace context a header or a record may carry, the dead-letter reasons) and the
validation helpers. The other records (dead letters,
cancel signals and reports, task events, job results, lifecycle events), their fields and
decoders, and the JSON Schemas are in :mod:`streamflow.records`. ``docs/protocol.md`` is the
reference for other languages.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from datetime import timedelta
from typing import Annotated, Any, Literal, get_args

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
)

from streamflow import hostile
from streamflow.errors import InputError, ProtocolError
from streamflow.keys import MAX_PRIORITIES, NAME_PATTERN
from streamflow.logs import shown

#: The protocol version this code writes and reads.
PROTOCOL_VERSION = 1
#: The stream field that holds a job's JSON envelope.
MESSAGE_FIELD = b"message"
#: Default limit on one encoded message; larger entries are dead-lettered unread.
DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024
#: The longest a job's outcome may be kept: 30 days.
MAX_KEEP_RESULT_MS = 30 * 86_400_000

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

#: Most headers a job may carry.
MAX_HEADERS = 64
#: Longest header name, in characters (names are ASCII letters, digits and ``_.:-``).
MAX_HEADER_NAME = 128
#: Longest header value, in characters.
MAX_HEADER_VALUE = 4096
#: Most characters of all header names and values together.
MAX_HEADERS_TOTAL = 16 * 1024
HeaderName = Annotated[
    str, Field(min_length=1, max_length=MAX_HEADER_NAME, pattern=r"^[A-Za-z0-9_.:\-]+$")
]
HeaderValue = Annotated[str, Field(max_length=MAX_HEADER_VALUE)]


def _headers_total(headers: dict[str, str]) -> dict[str, str]:
    total = sum(len(name) + len(value) for name, value in headers.items())
    if total > MAX_HEADERS_TOTAL:
        raise ValueError(
            f"headers hold {total} characters of names and values, limit {MAX_HEADERS_TOTAL}"
        )
    return headers


#: A W3C trace context: ``traceparent`` and maybe ``tracestate`` (header names to values).
Carrier = dict[str, str]
#: The header names a trace context is made of.
TRACE_FIELDS = ("traceparent", "tracestate")
#: The longest trace context value kept (``traceparent`` is 55 characters; ``tracestate`` at
#: most 512).
MAX_TRACE_VALUE = 512


def carrier_of(raw: object) -> Carrier | None:
    """The trace context in ``raw`` (untrusted: anything), or None if it holds none that fits.

    Only ``traceparent`` and ``tracestate`` are kept, as non-empty strings of at most
    :data:`MAX_TRACE_VALUE` characters; without a ``traceparent`` there is none. Whether the
    values parse is the tracer's to judge (one that does not is ignored there).
    """
    if not isinstance(raw, Mapping):
        return None
    out: Carrier = {}
    for name in TRACE_FIELDS:
        value = raw.get(name)
        if isinstance(value, str) and 0 < len(value) <= MAX_TRACE_VALUE:
            out[name] = value
    return out if "traceparent" in out else None


#: A job's metadata: string names to string values, bounded in count and size.
Headers = Annotated[
    dict[HeaderName, HeaderValue],
    Field(max_length=MAX_HEADERS),
    AfterValidator(_headers_total),
]

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
    | Literal["result_too_large", "invalid_result"]
)
MALFORMED_REASONS: frozenset[str] = frozenset(get_args(MalformedReason))

#: How a delivery ended when it was cancelled (acknowledged, not dead-lettered or retried).
CANCELLED = "cancelled"


class WireModel(BaseModel):
    """The base of every wire model: frozen, no unknown fields, strict types."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class BatchRef(WireModel):
    """One batch of a parent node, given to a child fed ``on: batch``.

    Attributes:
        node: The parent node id.
        index: The batch's index among the parent's batches (0, 1, ...).
        ref: The Redis key that holds the batch (a JSON array).
    """

    node: Name
    index: Annotated[int, Field(ge=0, le=INT64_MAX)]
    ref: Annotated[str, Field(min_length=1, max_length=512)]


class JobRetry(WireModel):
    """A task node's retry policy, carried by its jobs (overrides the role's policy)."""

    max_attempts: Annotated[int, Field(ge=1, le=1000)] = 3
    backoff: Annotated[float, Field(ge=0, le=86_400)] = 1.0
    factor: Annotated[float, Field(ge=1, le=100)] = 2.0
    max_backoff: Annotated[float, Field(ge=0, le=86_400)] = 300.0


class Job(WireModel):
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
        keep_result_ms: Keep the job's outcome (its result, or how it failed) this many ms
            under its result key, whatever its role says (see :class:`JobResult`).
        headers: Metadata for handlers and tools (trace context, correlation ids): string
            names to string values, at most :data:`MAX_HEADERS` of them, names of at most
            :data:`MAX_HEADER_NAME` characters (letters, digits, ``_.:-``), values of at most
            :data:`MAX_HEADER_VALUE`, :data:`MAX_HEADERS_TOTAL` characters in all. Handlers
            read them as ``ctx.headers``; follow-up jobs and task node jobs inherit them.
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
    keep_result_ms: Annotated[int, Field(ge=1, le=MAX_KEEP_RESULT_MS)] | None = None
    headers: Headers | None = None
    priority: Annotated[int, Field(strict=True, ge=0, lt=MAX_PRIORITIES)] | None = None


_MESSAGE_ID = TypeAdapter(MessageId)
_DEDUP_KEY = TypeAdapter(DedupKey)
_TIMESTAMP = TypeAdapter(Timestamp)
_HEADERS = TypeAdapter(Headers)


def check_headers(headers: Any) -> dict[str, str]:
    """Refuse, at the publisher, headers that a worker would dead-letter as ``invalid_message``.

    Returns:
        The headers as a plain dict.

    Raises:
        ValueError: Naming the rule they break (count, a name, a value's size, total size).
    """
    try:
        return _HEADERS.validate_python(dict(headers), strict=True)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ValidationError):
            raise ValueError(f"invalid headers: {summarize_errors(exc)}") from None
        raise ValueError(f"invalid headers: not a mapping of strings ({exc})") from None


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
            msg = exc.errors()[0]["msg"]
            raise ValueError(f"invalid {name} {shown(repr(value))}: {msg}") from None


def keep_result_ms(keep: timedelta | float | None) -> int | None:
    """How long to keep a job's outcome, in ms: seconds or a timedelta (None: not asked).

    Raises:
        ValueError: Not from 1 ms to 30 days.
    """
    if keep is None:
        return None
    seconds = keep.total_seconds() if isinstance(keep, timedelta) else float(keep)
    ms = int(seconds * 1000)
    if not 1 <= ms <= MAX_KEEP_RESULT_MS:
        raise ValueError(f"keep_result must be from 1 ms to 30 days, not {keep!r}")
    return ms


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
    keep_result_ms: int | None = None,
    headers: dict[str, str] | None = None,
    priority: int | None = None,
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
    if keep_result_ms is not None:
        doc["keep_result_ms"] = keep_result_ms
    if headers:
        doc["headers"] = headers
    if priority:  # level 0 is the default: a plain job's bytes stay as they were
        doc["priority"] = priority
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
            ``invalid_json``, ``too_complex``, ``unsupported_version``, ``unknown_kind`` or
            ``invalid_message``.
    """
    raw = fields.get(MESSAGE_FIELD)
    if raw is not None and len(raw) <= max_bytes:
        try:
            job: Job = _JOB_VALIDATOR.validate_json(raw)
        except ValidationError:
            pass
        else:
            # The fast parser accepts what the full check refuses (big integers, NaN, duplicate
            # keys, deep nesting...); a look at what it returned says when the full check must
            # run. Two upper bounds on the keys written: every key is followed by a colon (a
            # cheap count), and by a quote then a colon or white space (fewer false alarms).
            kept = _keys_kept(job)
            if kept != raw.count(b":") and not _keys_explained(job, kept, raw):
                hostile.check(raw)  # raises for hostile input; else the job is fine
            return job
    raise _refusal(fields, raw, max_bytes)


def _refusal(fields: dict[bytes, bytes], raw: bytes | None, max_bytes: int) -> ProtocolError:
    """Why :func:`decode_job` refuses an entry the fast path did not accept (rare: parse again)."""
    if raw is None:
        names = ", ".join(repr(k.decode(errors="replace")) for k in fields) or "none"
        return ProtocolError(
            "invalid_message", f"entry has no 'message' field (fields: {names})", None
        )
    if len(raw) > max_bytes:
        return ProtocolError("too_large", f"message is {len(raw)} bytes, limit {max_bytes}", raw)
    try:
        # Hostile input first, as before parsing: its reason wins over a schema mismatch.
        if hostile.screen(raw)[0]:
            hostile.check(raw)
        doc = orjson.loads(raw)
    except ProtocolError as exc:
        return exc
    except orjson.JSONDecodeError as exc:
        return ProtocolError("invalid_json", f"message is not valid JSON: {exc}", raw)
    if not isinstance(doc, dict):
        return ProtocolError("invalid_message", "message is not a JSON object", raw)
    try:
        check_envelope(doc, raw, expected_kind="job")
        Job.model_validate(doc)
    except ProtocolError as exc:
        return exc
    except ValidationError as exc:
        return ProtocolError("invalid_message", summarize_errors(exc), raw)
    return ProtocolError("invalid_message", "message does not match the job schema", raw)


def _keys_kept(job: Job) -> int:
    """How many object keys the parsed job holds, at every level (-1: see below).

    -1 when its payload breaks (or may break) a limit of :func:`hostile.check`. The header's
    fields are bounded by the model; only the payload is free-form.
    """
    # The attribute behind ``model_fields_set``, read directly: this runs once per message.
    count = len(job.__pydantic_fields_set__)
    payload = job.payload
    if payload is not None:
        # The payload is the value of a key of the message object: depth 2.
        kept = hostile.measure(payload, 2)
        if kept is None:
            return -1
        count += kept
    if job.task_id is not None:  # the task node fields, rare on the hot path
        for value in (job.input, job.retry):
            if value is not None:
                count += len(value.model_fields_set)
        count += len(job.inputs or ()) + len(job.failures or ())
    return count


def _keys_explained(job: Job, kept: int, raw: bytes) -> bool:
    """Whether the keys ``raw`` holds are the ``kept`` ones, once header names are counted.

    :func:`_keys_kept` leaves header names out, and they are counted only here, after the colon
    count did not match (it cannot for a job with headers: the count bounds the keys written,
    header names included): a job without headers pays nothing for them. Then the second
    bound, :func:`hostile.key_tokens`.
    """
    if job.headers is not None:
        kept += len(job.headers)
        if kept == raw.count(b":"):
            return True
    return kept == hostile.key_tokens(raw)


def check_envelope(doc: dict[str, Any], raw: bytes, *, expected_kind: str) -> None:
    """Refuse a parsed entry whose ``protocol`` or ``kind`` is not the one expected.

    Raises:
        ProtocolError: ``unsupported_version`` or ``unknown_kind``.
    """
    version = doc.get("protocol")
    # ``type() is int``: ``1.0`` and ``true`` compare equal to 1 in Python, and the docs promise
    # ``unsupported_version`` for anything but the JSON integer 1.
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError(
            "unsupported_version",
            f"protocol version {shown(repr(version))} is not supported (this worker speaks "
            f"{PROTOCOL_VERSION})",
            raw,
        )
    kind = doc.get("kind")
    if kind != expected_kind:
        raise ProtocolError(
            "unknown_kind",
            f"kind {shown(repr(kind))} is not valid here (expected {expected_kind!r})",
            raw,
        )


def summarize_errors(exc: ValidationError, limit: int = 5) -> str:
    """One line per validation problem, the first ``limit`` of them."""
    parts = []
    for err in exc.errors()[:limit]:
        # A location names the entry's own keys: text from outside, echoed bounded.
        where = shown(".".join(str(p) for p in err["loc"])) or "(root)"
        parts.append(f"{where}: {err['msg']}")
    more = exc.error_count() - limit
    if more > 0:
        parts.append(f"... and {more} more")
    return "; ".join(parts)


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
