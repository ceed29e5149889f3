"""Task submissions from any language: an XADD that coordinators check, create, and answer.

A service in any language submits a DAG task with one command::

    XADD sf:{tasks}:submissions * id <task id> submission <JSON of a Submission>

The coordinators read the stream as their group ``coordinators`` (one coordinator takes each
entry) and answer under ``sf:{tasks}:submission:<task id>``: the JSON of a
:class:`SubmissionResult`, ``accepted`` (the task exists and runs) or ``rejected`` with every
problem found, kept :data:`RESULT_TTL_MS`. The entry is untrusted: it is bounded in size,
parsed strictly (:mod:`streamflow.hostile`), and whatever it holds ends in a result or a log
line, never in a stopped coordinator.

The id is chosen by the client and is the task's id, so a retried XADD is harmless: an id's
first outcome stands. The outcome is also told on the lifecycle events stream
(:mod:`streamflow.events`) as a ``task`` event: state ``queued`` when the task was created,
``rejected`` with the problems as its ``detail``.

Two coordinators racing over two entries of one id agree through the task store (creating a
task whose id is in use is refused): the one that created the task writes ``accepted`` over
anything; every other outcome is written only where none is yet. (So two different graphs
sent under one id at the same moment may show ``rejected``, "in use", for the instant before
the creator's ``accepted`` replaces it; one graph sent twice never does.)
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis.asyncio import Redis

from streamflow import connect, hostile, streams
from streamflow.dag import graph as graphs
from streamflow.dag.store import TaskStore
from streamflow.dag.tasks import TaskState
from streamflow.errors import InvalidNameError, ProtocolError
from streamflow.events import EventLog
from streamflow.keys import Keys, validate_name
from streamflow.logs import shown
from streamflow.protocol import Name, Timestamp, Version, now_ms
from streamflow.records import SUBMISSION_FIELD, SUBMISSION_ID_FIELD

logger = logging.getLogger(__name__)

#: The largest submission accepted: the largest graph, and room for the rest.
MAX_SUBMISSION_BYTES = graphs.MAX_DOCUMENT_BYTES + 64 * 1024
#: How long a submission's outcome is kept (and a reused id is recognised): 7 days.
RESULT_TTL_MS = 7 * 24 * 3600 * 1000
#: The most problems a result lists (a huge hostile document cannot make a huge answer).
MAX_PROBLEMS = 100


class Submission(BaseModel):
    """A DAG task submitted by XADD; its id is the entry's ``id`` field.

    Attributes:
        protocol: The protocol version, 1.
        kind: Always ``"submission"``.
        graph: The task graph, as ``streamflow submit`` reads it from a file.
        params: Task parameters, updating the graph's own ``params``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    protocol: Version
    kind: Literal["submission"]
    graph: graphs.GraphSpec
    params: dict[str, Any] = Field(default_factory=dict)


SubmissionState = Literal["accepted", "rejected"]


class SubmissionResult(BaseModel):
    """What became of a submission, at ``<ns>:{tasks}:submission:<id>``.

    Attributes:
        protocol: The protocol version, 1.
        kind: Always ``"submission_result"``.
        id: The submission's id, which is the task's id.
        state: ``accepted`` (the task was created and runs) or ``rejected``.
        problems: For ``rejected``: every problem found (at most :data:`MAX_PROBLEMS`).
        entry_id: The submissions stream entry this outcome is about.
        at_ms: When it was decided, ms since the epoch.
        coordinator: The coordinator that decided.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    protocol: Version
    kind: Literal["submission_result"]
    id: Name
    state: SubmissionState
    problems: list[Annotated[str, Field(max_length=2000)]] = Field(default_factory=list)
    entry_id: Annotated[str, Field(max_length=64)]
    at_ms: Timestamp
    coordinator: Annotated[str, Field(max_length=200)]


def json_schemas() -> dict[str, dict[str, Any]]:
    """The JSON Schema of a submission and of its result, keyed by kind."""
    return {
        "submission": Submission.model_json_schema(),
        "submission_result": SubmissionResult.model_json_schema(),
    }


def parse(raw: bytes | None) -> tuple[Submission | None, list[str]]:
    """A submission's JSON read strictly: the submission, or every problem found."""
    if raw is None:
        return None, ["the entry has no 'submission' field"]
    if len(raw) > MAX_SUBMISSION_BYTES:
        return None, [f"the submission is {len(raw)} bytes, over {MAX_SUBMISSION_BYTES}"]
    try:
        doc = hostile.check(raw, "the submission")
    except ProtocolError as exc:
        return None, [exc.detail]
    if not isinstance(doc, dict):
        return None, ["a submission is a JSON object with 'protocol', 'kind' and 'graph'"]
    problems = _envelope_problems(doc)
    if "graph" not in doc:
        return None, [*problems, "graph: Field required"]
    try:
        spec = graphs.parse(doc["graph"])
    except graphs.GraphError as exc:
        return None, problems + [f"graph: {p}" for p in exc.problems]
    if problems:
        return None, problems
    return Submission.model_validate({**doc, "graph": spec}), []


def _envelope_problems(doc: dict[str, Any]) -> list[str]:
    """Problems of everything but the graph (checked on its own, with its own messages)."""
    envelope = {k: v for k, v in doc.items() if k != "graph"}
    try:
        _Envelope.model_validate(envelope)
    except ValidationError as exc:
        return [
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" if err["loc"] else err["msg"]
            for err in exc.errors()
        ]
    return []


class _Envelope(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    protocol: Version
    kind: Literal["submission"]
    params: dict[str, Any] = Field(default_factory=dict)


class Submissions:
    """A coordinator's side of wire submissions: check, create the task, record the outcome.

    Args:
        redis: The coordinator's client.
        keys: The namespace's keys.
        store: The task store the task is created in.
        functions: The coordinator functions this coordinator provides.
        consumer: The coordinator's name, written in each result.
    """

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        store: TaskStore,
        *,
        functions: set[str],
        consumer: str,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._store = store
        self._functions = functions
        self._consumer = consumer
        #: Where outcomes are also told, as ``task`` lifecycle events (set by the coordinator).
        self.events: EventLog | None = None
        self.accepted = 0
        self.rejected = 0
        self.duplicates = 0
        self.unreadable = 0

    def statistics(self) -> dict[str, int]:
        """Entries taken so far, by outcome (``unreadable``: no valid id to answer under)."""
        return {
            "accepted": self.accepted,
            "rejected": self.rejected,
            "duplicate": self.duplicates,
            "unreadable": self.unreadable,
        }

    async def take(self, entry: streams.Entry) -> None:
        """Handle one submissions entry; only an outage escapes (the entry stays pending)."""
        raw_id = entry.fields.get(SUBMISSION_ID_FIELD, b"")
        try:
            submission_id = validate_name(raw_id.decode("utf-8", errors="replace"), "id")
        except InvalidNameError:
            # No id to answer under: the log is the only place to say so.
            self.unreadable += 1
            logger.warning(
                "submission %s has no valid 'id' field (%s): dropped",
                entry.id.decode(),
                shown(raw_id[:200]),
            )
            return
        try:
            await self._take(submission_id, entry)
        except Exception as exc:
            if connect.is_outage(exc) or streams.is_group_lost(exc):
                raise
            # A bug or a key of the wrong type must not stop the coordinator: answer, go on.
            logger.exception("submission %s (%s) failed", shown(submission_id), entry.id.decode())
            await self._answer_failure(submission_id, entry, exc)

    async def _answer_failure(
        self, submission_id: str, entry: streams.Entry, exc: Exception
    ) -> None:
        """Reject a submission whose handling failed, if Redis lets it be written."""
        try:
            await self._record(
                submission_id, entry, "rejected", [f"the coordinator failed: {shown(exc)}"]
            )
        except Exception as again:
            if connect.is_outage(again):
                raise
            logger.warning("submission %s: no outcome written (%s)", submission_id, shown(again))

    async def _take(self, submission_id: str, entry: streams.Entry) -> None:
        if await self._redis.exists(self._keys.submission(submission_id)):
            # An id's first outcome stands (a retried XADD, or an id used again).
            self.duplicates += 1
            logger.info(
                "submission %s: id already answered, entry %s ignored",
                submission_id,
                entry.id.decode(),
            )
            return
        submission, problems = parse(entry.fields.get(SUBMISSION_FIELD))
        if submission is not None:
            spec = submission.graph
            if submission.params:
                spec = spec.model_copy(update={"params": {**spec.params, **submission.params}})
            problems = graphs.check(spec, **await self._registered())
        if submission is None or problems:
            await self._record(submission_id, entry, "rejected", problems)
            return
        await self._create(submission_id, entry, spec)

    async def _create(
        self, submission_id: str, entry: streams.Entry, spec: graphs.GraphSpec
    ) -> None:
        try:
            await self._store.create(spec, TaskState.new(submission_id, spec, now_ms()))
        except ValueError:
            # The id is in use: by this very submission when an earlier try was cut short after
            # creating it (the same graph), else by another task.
            stored = await self._store.spec(submission_id)
            if stored is not None and stored.to_json() == spec.to_json():
                await self._record(submission_id, entry, "accepted", [])
            else:
                problem = f"task id {submission_id!r} is in use by another task"
                await self._record(submission_id, entry, "rejected", [problem])
            return
        await self._record(submission_id, entry, "accepted", [], created=True)

    async def _registered(self) -> dict[str, set[str]]:
        """The roles and functions a submitted graph may name (as :meth:`Client.submit`)."""
        # A registry of another type counts as empty (the coordinator warns of it).
        roles = await streams.set_members(self._redis, self._keys.known_roles())
        functions = await streams.set_members(self._redis, self._keys.known_functions())
        return {"roles": roles or set(), "functions": {*self._functions, *(functions or ())}}

    async def _record(
        self,
        submission_id: str,
        entry: streams.Entry,
        state: SubmissionState,
        problems: list[str],
        *,
        created: bool = False,
    ) -> None:
        """Write the outcome: over anything when this call created the task, else only once."""
        listed = [p[:2000] for p in problems[:MAX_PROBLEMS]]
        if len(problems) > MAX_PROBLEMS:
            listed[-1] = f"... and {len(problems) - MAX_PROBLEMS + 1} more problems"
        result = SubmissionResult(
            protocol=1,
            kind="submission_result",
            id=submission_id,
            state=state,
            problems=listed,
            entry_id=entry.id.decode(),
            at_ms=now_ms(),
            coordinator=self._consumer,
        )
        written = await self._redis.set(
            self._keys.submission(submission_id),
            result.model_dump_json(),
            px=RESULT_TTL_MS,
            nx=not created,
        )
        if not written:
            self.duplicates += 1
            return
        self._tell(result)
        if state == "accepted":
            self.accepted += 1
            logger.info("submission %s accepted: task created", submission_id)
        else:
            self.rejected += 1
            logger.info("submission %s rejected: %s", submission_id, shown("; ".join(listed), 1000))

    def _tell(self, result: SubmissionResult) -> None:
        """The outcome as a ``task`` lifecycle event: ``queued`` (created) or ``rejected``."""
        if self.events is None:
            return
        self.events.add(
            "task",
            task_id=result.id,
            state="queued" if result.state == "accepted" else "rejected",
            detail="; ".join(result.problems)[:4000] or None,
            consumer=self._consumer,
        )


def decode_result(raw: bytes | str) -> SubmissionResult:
    """A stored outcome read back (see :meth:`streamflow.Client.submission`)."""
    return SubmissionResult.model_validate_json(raw)


def encode_submission(
    graph: graphs.Graph | graphs.GraphSpec | dict[str, Any],
    params: dict[str, Any] | None = None,
) -> bytes:
    """The ``submission`` field of an XADD, as another language would write it (for tools)."""
    spec = graphs.parse(graph)
    doc = {"protocol": 1, "kind": "submission", "graph": orjson.loads(spec.to_json())}
    return orjson.dumps(doc | ({"params": params} if params else {}))
