"""Names of every Redis key, stream and consumer group streamflow uses.

Nothing else in the package builds a key by hand. Every key has the form
``<namespace>:{<tag>}:<part>``: the part in braces is the Redis Cluster hash tag, so all keys that
one Lua script or pipeline touches together share a slot. A role's stream, its dead-letter stream
its delayed schedule and its dedup markers share the tag ``{role:<name>}`` because
dead-lettering, retry scheduling, promotion of due retries, replay and publishing with a dedup key
are single scripts over them.

A role split into partitions has one such family of keys per partition, each under its own tag
``{role:<role>#<index>[.<salt>]}`` (a "shard"; the first partition keeps the plain
``{role:<role>}``), chosen so that the partitions' slots fall on different cluster masters.
Methods below that take ``role`` accept a shard too; which shards a role has is recorded in its
``config`` hash (see :mod:`streamflow.partitions`).

Over 600 lines on purpose: it is the table of every key family (one ``KeyKind`` and one
builder each, with its docstring) that the ACL rules and the docs are generated from; split,
the one place to look up a key would become several.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from streamflow.errors import InvalidNameError
from streamflow.logs import shown

#: Role, namespace, consumer, task and node names: letters, digits, ``_``, ``-`` and ``.``,
#: starting with a letter or digit, at most 64 characters. This excludes the separator ``:``,
#: the hash-tag braces and the ``SCAN MATCH`` glob characters ``* ? [ ]``.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")

#: A role's partition, as named in keys ("a shard"): the role's name, then for partitions after
#: the first ``#<index>`` and, when needed to land it on its own slot range, ``.<salt>``. ``#``
#: cannot appear in a role name, so a shard never names another role.
SHARD_PATTERN = re.compile(
    r"(?P<role>[A-Za-z0-9][A-Za-z0-9_.\-]{0,63})(?:#[1-9][0-9]{0,3}(?:\.[0-9]{1,6})?)?"
)

#: The most partitions a role may have.
MAX_PARTITIONS = 64

#: The most priority levels a role may have (``@app.role(priorities=N)``, N ≤ this). Each level
#: is one more stream the role's workers read, so the number is kept small.
MAX_PRIORITIES = 5

#: The consumer group every role stream has; one per stream, shared by all workers of the role.
GROUP = "workers"
#: The consumer group of every role's events stream, shared by all coordinators.
COORDINATORS = "coordinators"


def validate_name(value: str, what: str = "name") -> str:
    """Return ``value`` if it may appear in a key, else raise :class:`InvalidNameError`.

    Args:
        value: The name to check.
        what: What the name is ("role", "namespace", ...), used in the error message.

    Raises:
        InvalidNameError: The name is empty, too long or contains a forbidden character.
    """
    if not isinstance(value, str) or NAME_PATTERN.fullmatch(value) is None:
        raise InvalidNameError(
            f"invalid {what} {shown(repr(value))}: use 1-64 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit"
        )
    return value


def validate_shard(value: str) -> str:
    """Return ``value`` if it names a role or one of its partitions, else raise.

    Raises:
        InvalidNameError: It is neither a role name nor ``<role>#<index>[.<salt>]``.
    """
    if not isinstance(value, str) or SHARD_PATTERN.fullmatch(value) is None:
        raise InvalidNameError(
            f"invalid role partition {shown(repr(value))}: expected ROLE or ROLE#N[.S]"
        )
    return value


#: The targets of a cancel, as named in its marker's key.
CANCEL_TARGETS = ("task", "message", "any")
#: A cancel's target id (a task id or a message id), as the protocol allows it.
_TARGET_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")


def cancel_member(target: str, target_id: str) -> str:
    """The cancel index's member for a marker: ``<target>:<target id>``."""
    return f"{target}:{target_id}"


def cancel_target(member: str) -> tuple[str, str] | None:
    """The (target, target id) a cancel index member names, or None if it names no marker.

    The index is read back from Redis, so a member is untrusted: only what
    :func:`cancel_member` could have written is accepted.
    """
    target, sep, target_id = member.partition(":")
    if not sep or target not in CANCEL_TARGETS or _TARGET_ID.fullmatch(target_id) is None:
        return None
    return target, target_id


def role_of_shard(shard: str) -> str:
    """The role a shard (partition name) belongs to."""
    return shard.partition("#")[0]


def shard_tag(shard: str) -> str:
    """The hash tag (the text inside the braces) of a shard's keys."""
    return f"role:{validate_shard(shard)}"


#: A message id, as the protocol allows it (see :data:`streamflow.protocol.MessageId`).
_MESSAGE_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")

#: A batch key's invocation or sequence number: a decimal integer within 64 bits.
_INDEX = re.compile(r"0|[1-9][0-9]{0,18}")


def _level(level: int) -> str:
    """A priority level above 0, as named in keys.

    Raises:
        InvalidNameError: It is not an integer from 1 to ``MAX_PRIORITIES - 1``.
    """
    if type(level) is not int or not 1 <= level < MAX_PRIORITIES:
        raise InvalidNameError(f"invalid priority level {shown(repr(level))}")
    return str(level)


def validate_message_id(message_id: str) -> str:
    """``message_id``, checked.

    Raises:
        InvalidNameError: It is not a message id the protocol allows.
    """
    if not isinstance(message_id, str) or _MESSAGE_ID.fullmatch(message_id) is None:
        raise InvalidNameError(f"invalid message id {shown(repr(message_id))}")
    return message_id


@dataclass(frozen=True, slots=True)
class BatchKey:
    """What a batch key names (see :meth:`Keys.batch`)."""

    shard: str
    task_id: str
    node_id: str
    invocation: int
    seq: int


@dataclass(frozen=True, slots=True)
class KeyKind:
    """One family of keys: ``<namespace>:{<tag>}:<part>``, then ``:<rest>`` if it has one.

    The hash tag is ``<slot>`` alone (``{tasks}``) or, for one key per role, consumer or task,
    ``<slot>:<name>`` (``{role:<shard>}``). :class:`Keys` builds every key from its kind, and the
    ACL rules (:mod:`streamflow.ops.acl`) and ``SCAN MATCH`` patterns come from :attr:`pattern`,
    so a key's name is written here once.

    Attributes:
        slot: The first word of the hash tag: ``role``, ``consumer``, ``task``, ``tasks``,
            ``signals``, ``lifecycle``, ``schedules`` or ``flow``.
        part: The word after the tag.
        named: Whether the tag carries a name.
        rest: Whether the key goes on after the part (``:<entry id>``, ``:<node id>``, ...).
    """

    slot: str
    part: str
    named: bool = False
    rest: bool = False

    @property
    def pattern(self) -> str:
        """Every key of this kind after ``<namespace>:``, with ``*`` for the name and the rest."""
        return self.form("*" if self.named else None, "*" if self.rest else None)

    def form(self, name: str | None = None, rest: str | None = None) -> str:
        """One key of this kind after ``<namespace>:``; ``name`` and ``rest`` already checked.

        Raises:
            ValueError: A name or a rest is given to a kind without one, or missing.
        """
        if (name is not None) != self.named or (rest is not None) != self.rest:
            raise ValueError(f"key kind {self.slot}/{self.part}: name or rest does not fit")
        tag = self.slot if name is None else f"{self.slot}:{name}"
        return f"{{{tag}}}:{self.part}" + ("" if rest is None else f":{rest}")


# Keys of a role's shard: all in its slot (see the module docstring).
ROLE_CONFIG = KeyKind("role", "config", named=True)
ROLE_STREAM = KeyKind("role", "stream", named=True)
#: The stream of a priority level above 0 of a role with priorities (``:level:<n>``, n ≥ 1);
#: level 0 is the role's own stream. In the shard's slot, so every script of the shard takes it.
LEVEL_STREAM = KeyKind("role", "level", named=True, rest=True)
#: The delayed schedule of a priority level above 0 (due retries go back to that level).
LEVEL_DELAYED = KeyKind("role", "level-delayed", named=True, rest=True)
DEAD_LETTERS = KeyKind("role", "dead", named=True)
DELAYED = KeyKind("role", "delayed", named=True)
STARTS = KeyKind("role", "starts", named=True, rest=True)
DEDUP = KeyKind("role", "dedup", named=True, rest=True)
EVENTS = KeyKind("role", "events", named=True)
BATCH = KeyKind("role", "batch", named=True, rest=True)
ROLE_SLOTS = KeyKind("role", "slots", named=True)
#: A job's kept result (or how it failed), next to its stream: written with the settle.
RESULT = KeyKind("role", "result", named=True, rest=True)
#: A consumer's mark next to a role's stream or events stream (:meth:`Keys.consumer_mark`).
ROLE_MARK = KeyKind("role", "alive", named=True, rest=True)
# Keys of one live process.
CONSUMER_ALIVE = KeyKind("consumer", "alive", named=True)
CONSUMER_INFO = KeyKind("consumer", "info", named=True)
# Cancels: one slot, so a cancel's marker, index entry and announcement are one script.
SIGNALS = KeyKind("signals", "stream")
CANCEL_MARKER = KeyKind("signals", "cancel", rest=True)
CANCEL_INDEX = KeyKind("signals", "cancels")
CANCEL_REPORT = KeyKind("signals", "report", rest=True)
# Keys of one task.
TASK_STATE = KeyKind("task", "state", named=True)
TASK_OUTBOX = KeyKind("task", "outbox", named=True)
TASK_OUTPUT = KeyKind("task", "out", named=True, rest=True)
TASK_PARTIALS = KeyKind("task", "partials", named=True, rest=True)
TASK_RESULT = KeyKind("task", "result", named=True, rest=True)
# Keys shared by all tasks.
TASKS_INDEX = KeyKind("tasks", "index")
TASKS_ACTIVE = KeyKind("tasks", "active")
TASKS_CONTROL = KeyKind("tasks", "control")
KNOWN_ROLES = KeyKind("tasks", "roles")
COORDINATOR_REGISTRY = KeyKind("tasks", "coordinators")
KNOWN_FUNCTIONS = KeyKind("tasks", "functions")
#: A coordinator's mark next to the control stream (:meth:`Keys.consumer_mark`).
TASKS_MARK = KeyKind("tasks", "alive", rest=True)
#: Task submissions from any language (a stream read by the coordinators' group).
TASKS_SUBMISSIONS = KeyKind("tasks", "submissions")
#: A submission's outcome, by its id (JSON, with a TTL).
SUBMISSION = KeyKind("tasks", "submission", rest=True)
#: The namespace's lifecycle events stream (one per namespace: see :meth:`Keys.lifecycle`).
LIFECYCLE = KeyKind("lifecycle", "stream")
#: A running job's latest progress event, next to the stream (see :meth:`Keys.job_progress`).
JOB_PROGRESS = KeyKind("lifecycle", "progress", rest=True)
#: A role's flow control (paused or not), under its own ``{flow:<role>}`` tag: one per role,
#: whatever its partitions (see :mod:`streamflow.flow`).
FLOW_CONTROL = KeyKind("flow", "control", named=True)
#: A role's start rate state (GCRA's theoretical arrival time, ms) and its running slots.
FLOW_RATE = KeyKind("flow", "rate", named=True)
FLOW_RUNNING = KeyKind("flow", "running", named=True)
#: Per-key limits of a role (see :mod:`streamflow.keylimits`): one key's running slots (a
#: sorted set: token -> expiry ms), its start rate state, and the keys holding slots (a sorted
#: set: limit key -> latest slot expiry ms).
FLOW_KEY_SLOTS = KeyKind("flow", "keyslots", named=True, rest=True)
FLOW_KEY_RATE = KeyKind("flow", "keyrate", named=True, rest=True)
FLOW_KEYS = KeyKind("flow", "keys", named=True)
#: The limit keys with parked jobs (a sorted set: key -> how many times a job of it was parked
#: since the mark was last removed): a worker that frees a key's slot wakes a job only if marked.
FLOW_WAITING = KeyKind("flow", "waiting", named=True)
#: Jobs parked by a per-key limit, next to their partition's stream (moved there and back by
#: one script each): the keys with parked jobs (a sorted set: limit key -> when to wake one,
#: ms) and each key's parked jobs (a list, oldest first).
ROLE_PARKED = KeyKind("role", "parked", named=True)
ROLE_PARK = KeyKind("role", "park", named=True, rest=True)

# Schedules: one slot, so a scheduler reads every definition, pause and last tick in one trip.
#: Run-time schedule definitions (a hash: schedule id -> JSON).
SCHEDULE_DEFS = KeyKind("schedules", "defs")
#: The paused schedules (a set of ids).
SCHEDULES_PAUSED = KeyKind("schedules", "paused")
#: Each schedule's last tick fired or skipped (a sorted set: id -> epoch ms), only raised.
SCHEDULE_TICKS = KeyKind("schedules", "ticks")
#: Each schedule's last tick that published a job (a sorted set: id -> epoch ms), only raised.
SCHEDULE_RUNS = KeyKind("schedules", "runs")
#: What each scheduler says about itself (a hash: name -> JSON), the schedulers' registry.
SCHEDULER_REGISTRY = KeyKind("schedules", "schedulers")

#: Every kind of key streamflow uses.
KINDS: tuple[KeyKind, ...] = (
    ROLE_CONFIG,
    ROLE_STREAM,
    LEVEL_STREAM,
    LEVEL_DELAYED,
    DEAD_LETTERS,
    DELAYED,
    STARTS,
    DEDUP,
    EVENTS,
    BATCH,
    ROLE_SLOTS,
    RESULT,
    ROLE_MARK,
    CONSUMER_ALIVE,
    CONSUMER_INFO,
    SIGNALS,
    CANCEL_MARKER,
    CANCEL_INDEX,
    CANCEL_REPORT,
    TASK_STATE,
    TASK_OUTBOX,
    TASK_OUTPUT,
    TASK_PARTIALS,
    TASK_RESULT,
    TASKS_INDEX,
    TASKS_ACTIVE,
    TASKS_CONTROL,
    KNOWN_ROLES,
    COORDINATOR_REGISTRY,
    KNOWN_FUNCTIONS,
    TASKS_MARK,
    TASKS_SUBMISSIONS,
    SUBMISSION,
    LIFECYCLE,
    JOB_PROGRESS,
    SCHEDULE_DEFS,
    SCHEDULES_PAUSED,
    SCHEDULE_TICKS,
    SCHEDULE_RUNS,
    SCHEDULER_REGISTRY,
    FLOW_CONTROL,
    FLOW_RATE,
    FLOW_RUNNING,
    FLOW_KEY_SLOTS,
    FLOW_KEY_RATE,
    FLOW_KEYS,
    FLOW_WAITING,
    ROLE_PARKED,
    ROLE_PARK,
)


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names under one namespace.

    Args:
        namespace: The prefix of every key; validated like a role name.
    """

    namespace: str = "sf"

    def __post_init__(self) -> None:
        validate_name(self.namespace, "namespace")

    def _key(self, kind: KeyKind, name: str | None = None, rest: str | None = None) -> str:
        return f"{self.namespace}:{kind.form(name, rest)}"

    def _around(self, kind: KeyKind) -> tuple[str, str]:
        """What comes before and after the name in a key of ``kind`` (before its rest)."""
        before, after = f"{self.namespace}:{kind.form('*', '' if kind.rest else None)}".split("*")
        return before, after

    def _task_node(self, kind: KeyKind, task_id: str, node_id: str) -> str:
        node = validate_name(node_id, "node id")  # checked first, as it always was
        return self._key(kind, validate_name(task_id, "task id"), node)

    def role_config(self, role: str) -> str:
        """The role's recorded settings (a hash): ``shards``, its partitions' names in order.

        Under the first partition's tag; written once when the role is created.
        """
        return self._key(ROLE_CONFIG, validate_name(role, "role"))

    def role_stream(self, role: str, level: int = 0) -> str:
        """The stream that carries a role's jobs (of priority ``level``; 0 is the role's own).

        Raises:
            InvalidNameError: The shard is invalid or the level out of range.
        """
        if level == 0:
            return self._key(ROLE_STREAM, validate_shard(role))
        return self._key(LEVEL_STREAM, validate_shard(role), _level(level))

    def level_streams(self, role: str, levels: int) -> list[str]:
        """The streams of a role's (shard's) priority levels, from the lowest (0) up."""
        return [self.role_stream(role, level) for level in range(levels)]

    def level_of_stream(self, key: str) -> int:
        """The priority level of a role stream key (0 for the role's own stream)."""
        _, sep, rest = key.rpartition("}:" + LEVEL_STREAM.part + ":")
        if not sep or not rest.isdigit() or not 1 <= int(rest) < MAX_PRIORITIES:
            return 0
        return int(rest)

    def dead_letters(self, role: str) -> str:
        """The role's dead-letter stream."""
        return self._key(DEAD_LETTERS, validate_shard(role))

    def delayed(self, role: str, level: int = 0) -> str:
        """The role's delayed schedule: a sorted set of messages scored by due time (ms).

        One per priority level: a level's due jobs go back to that level's stream.
        """
        if level == 0:
            return self._key(DELAYED, validate_shard(role))
        return self._key(LEVEL_DELAYED, validate_shard(role), _level(level))

    def consumer_alive(self, consumer: str) -> str:
        """The liveness key held by the one live process using a consumer name."""
        return self._key(CONSUMER_ALIVE, validate_name(consumer, "consumer name"))

    def consumer_mark(self, stream: str, consumer: str) -> str:
        """A live consumer's mark next to a stream it reads: ``<ns>:{<tag>}:alive:<name>``.

        A worker or coordinator keeps one per stream it reads (a TTL, refreshed while it lives).
        The consumer cleanup checks it and the group's pending list in one script, so it lives
        in the stream's slot, not in the ``{consumer:<name>}`` one of the liveness key.

        Args:
            stream: A stream key of this namespace (built by this class).
            consumer: The consumer name.

        Raises:
            InvalidNameError: ``stream`` is not a key of this namespace, or the name is invalid.
        """
        name = validate_name(consumer, "consumer name")
        prefix = f"{self.namespace}:{{"
        end = stream.find("}:", len(prefix))
        if not stream.startswith(prefix) or end < 0:
            raise InvalidNameError(f"{stream!r} is not a stream of namespace {self.namespace!r}")
        return f"{stream[: end + 1]}:{ROLE_MARK.part}:{name}"

    def starts(self, role: str, entry_id: str) -> str:
        """How many times an entry delivered more than once was started (poison detection)."""
        return self._key(STARTS, validate_shard(role), entry_id)

    def signals(self) -> str:
        """The signals stream every worker reads (a broadcast, not a consumer group)."""
        return self._key(SIGNALS)

    def cancel_marker(self, target: str, target_id: str) -> str:
        """The persistent marker of a cancel of a ``task``, ``message`` or ``any`` id.

        It shares the ``{signals}`` tag with the stream, so setting it and announcing the cancel
        are one script.
        """
        return self._key(CANCEL_MARKER, rest=f"{target}:{target_id}")

    def cancel_index(self) -> str:
        """The index of the cancel markers (a sorted set).

        Members name a marker (:func:`cancel_member`), scored by the marker's expiry in ms by
        the server's clock; written in the same script as the marker, so that a starting worker
        reads this one key instead of scanning the keyspace for markers.
        """
        return self._key(CANCEL_INDEX)

    def cancel_report(self, signal_id: str) -> str:
        """Where workers report what a cancel stopped (a hash: consumer -> report)."""
        return self._key(CANCEL_REPORT, rest=signal_id)

    def consumer_info(self, consumer: str) -> str:
        """What a live worker says about itself (the registry), with the liveness key's TTL."""
        return self._key(CONSUMER_INFO, validate_name(consumer, "consumer name"))

    def consumer_info_pattern(self) -> str:
        """A ``SCAN MATCH`` pattern for the registry entries of every live worker."""
        return f"{self.namespace}:{CONSUMER_INFO.pattern}"

    def consumer_alive_pattern(self) -> str:
        """A ``SCAN MATCH`` pattern for the liveness keys of every live worker."""
        return f"{self.namespace}:{CONSUMER_ALIVE.pattern}"

    def consumer_of_alive_key(self, key: str) -> str | None:
        """The consumer name of a liveness key, or None."""
        prefix, suffix = self._around(CONSUMER_ALIVE)
        if key.startswith(prefix) and key.endswith(suffix):
            return key[len(prefix) : -len(suffix)] or None
        return None

    def dedup(self, role: str, dedup_key: str) -> str:
        """The marker that makes publishing with ``dedup_key`` happen at most once.

        The user's key is hashed, so it may hold any characters.
        """
        digest = hashlib.blake2b(dedup_key.encode(), digest_size=16).hexdigest()
        return self._key(DEDUP, validate_shard(role), digest)

    def result(self, role: str, message_id: str) -> str:
        """Where a job's outcome is kept when its role or publisher asks (a JSON string, PX).

        In the shard's slot, so that the worker writes it in the same owner-checked step that
        acknowledges the job. Read it with a plain ``GET`` (see docs/protocol.md).

        Raises:
            InvalidNameError: The shard or the message id is invalid.
        """
        return self._key(RESULT, validate_shard(role), validate_message_id(message_id))

    def role_pattern(self) -> str:
        """A ``SCAN MATCH`` pattern for every role stream of the namespace."""
        return f"{self.namespace}:{ROLE_STREAM.pattern}"

    def delayed_pattern(self) -> str:
        """A ``SCAN MATCH`` pattern for every delayed schedule of the namespace."""
        return f"{self.namespace}:{DELAYED.pattern}"

    def level_patterns(self) -> tuple[str, str]:
        """``SCAN MATCH`` patterns for the level streams and level schedules (levels above 0)."""
        return (
            f"{self.namespace}:{LEVEL_STREAM.pattern}",
            f"{self.namespace}:{LEVEL_DELAYED.pattern}",
        )

    def role_of_stream(self, key: str) -> str | None:
        """The shard (role or role partition) of a role stream key (any priority level)."""
        prefix, suffix = self._around(ROLE_STREAM)
        if key.startswith(prefix) and key.endswith(suffix):
            return key[len(prefix) : -len(suffix)] or None
        level = self.level_of_stream(key)
        if level and key.startswith(prefix):
            shard = key[len(prefix) :].rpartition("}:")[0]
            if SHARD_PATTERN.fullmatch(shard) and self.role_stream(shard, level) == key:
                return shard
        return None

    # -- tasks ------------------------------------------------------------------------------

    def events(self, role: str) -> str:
        """The stream where workers of a role report on task nodes (for the coordinators).

        It shares the role's tag, so settling a job and reporting it are one script.
        """
        return self._key(EVENTS, validate_shard(role))

    def batch(self, role: str, task_id: str, node_id: str, invocation: int, seq: int) -> str:
        """Where a worker stores one batch a task node emitted (a JSON array, with a TTL).

        In the role's slot, so storing it and reporting it are one owner-checked script.
        """
        validate_name(task_id, "task id")
        validate_name(node_id, "node id")
        rest = f"{task_id}:{node_id}:{int(invocation)}:{int(seq)}"
        return self._key(BATCH, validate_shard(role), rest)

    def parse_batch(self, key: str) -> BatchKey | None:
        """What a batch key names, or None if ``key`` is not exactly a key :meth:`batch` builds.

        Keys read back from Redis or from a message (a job's ``input.ref``, a task's output
        lists) are untrusted: only a key this builder would have written may be read as a batch.
        """
        prefix, between = self._around(BATCH)
        shard, sep, rest = key.removeprefix(prefix).partition(between)
        parts = rest.split(":")
        if not key.startswith(prefix) or not sep or len(parts) != 4:
            return None
        task_id, node_id, invocation, seq = parts
        if not (_INDEX.fullmatch(invocation) and _INDEX.fullmatch(seq)):
            return None
        try:
            rebuilt = self.batch(shard, task_id, node_id, int(invocation), int(seq))
        except InvalidNameError:
            return None
        if rebuilt != key:  # e.g. an index written with leading zeros
            return None
        return BatchKey(shard, task_id, node_id, int(invocation), int(seq))

    def is_batch_of(self, key: str, task_id: str, node_id: str) -> bool:
        """Whether ``key`` may hold a batch of node ``node_id`` of task ``task_id``.

        That is a key :meth:`batch` builds for them (a worker's emitted batch, in any role's
        slot) or the node's :meth:`task_result` (a coordinator function's output).
        """
        if key == self.task_result(task_id, node_id):
            return True
        named = self.parse_batch(key)
        return named is not None and (named.task_id, named.node_id) == (task_id, node_id)

    def role_slots(self, role: str) -> str:
        """The nodes (``task/node``) holding one of a role's node slots (per-role limit)."""
        return self._key(ROLE_SLOTS, validate_shard(role))

    def task(self, task_id: str, part: str) -> str:
        """A key of one task, named by ``part``.

        Parts: ``state`` (hash), ``outbox`` (hash), ``out:<node>`` (list of the node's batch
        keys), ``partials:<node>`` (hash) or ``result:<node>`` (a batch). Every key of a task
        shares the tag ``{task:<id>}``, so one script updates them together.
        """
        kind = KeyKind(TASK_STATE.slot, part, named=True)
        return self._key(kind, validate_name(task_id, "task id"))

    def task_state(self, task_id: str) -> str:
        """The task's state hash: spec, task and node states, invocations, version."""
        return self._key(TASK_STATE, validate_name(task_id, "task id"))

    def task_outbox(self, task_id: str) -> str:
        """Dispatches decided but not yet confirmed published (hash: dispatch id -> item)."""
        return self._key(TASK_OUTBOX, validate_name(task_id, "task id"))

    def task_output(self, task_id: str, node_id: str) -> str:
        """The list of a node's batch keys, in batch index order."""
        return self._task_node(TASK_OUTPUT, task_id, node_id)

    def task_partials(self, task_id: str, node_id: str) -> str:
        """A coordinator function node's partial results by invocation."""
        return self._task_node(TASK_PARTIALS, task_id, node_id)

    def task_result(self, task_id: str, node_id: str) -> str:
        """The one batch a coordinator function node outputs."""
        return self._task_node(TASK_RESULT, task_id, node_id)

    def task_pattern(self, task_id: str) -> str:
        """A ``SCAN MATCH`` pattern for every key of one task."""
        return self.task(task_id, "*")

    def tasks_index(self) -> str:
        """Every task by creation time (sorted set: task id -> created ms)."""
        return self._key(TASKS_INDEX)

    def tasks_active(self) -> str:
        """The tasks not yet finished (a set), swept by the coordinators."""
        return self._key(TASKS_ACTIVE)

    def tasks_control(self) -> str:
        """The stream that tells coordinators a task was submitted (the sweep also finds it)."""
        return self._key(TASKS_CONTROL)

    def known_roles(self) -> str:
        """The roles that workers serve or tasks use (a set).

        Coordinators follow their events streams; submit checks graphs against it.
        """
        return self._key(KNOWN_ROLES)

    def coordinators(self) -> str:
        """What each coordinator says about itself (a hash: consumer name -> JSON).

        Refreshed every few seconds by each running coordinator; a field not refreshed within
        :data:`streamflow.registry.TTL_MS` is a coordinator that stopped or died.
        """
        return self._key(COORDINATOR_REGISTRY)

    def known_functions(self) -> str:
        """The coordinator functions that running coordinators provide (a set)."""
        return self._key(KNOWN_FUNCTIONS)

    def task_submissions(self) -> str:
        """The stream any service XADDs a task submission to (read by the coordinators)."""
        return self._key(TASKS_SUBMISSIONS)

    def submission(self, submission_id: str) -> str:
        """A submission's outcome (JSON: accepted or rejected, with every problem), by its id."""
        return self._key(SUBMISSION, rest=validate_name(submission_id, "submission id"))

    def lifecycle(self) -> str:
        """The namespace's lifecycle events stream: jobs, tasks and nodes as they change.

        One stream per namespace, not per role: a subscriber follows every role, task and node
        with one ``XREAD`` and one cursor (a read of several streams cannot span cluster
        slots), and events of one job, its task and its nodes stay in order. Capped with
        ``MAXLEN ~`` (see :mod:`streamflow.events`).
        """
        return self._key(LIFECYCLE)

    def job_progress(self, message_id: str) -> str:
        """A job's latest ``progress`` event (its JSON, PX), while a run that reported it lasts.

        Written only by runs that call ``ctx.progress()``, in the round trip of their events
        (hence in the lifecycle stream's slot), and deleted when the run ends; read by
        ``streamflow job`` (see :mod:`streamflow.events`).

        Raises:
            InvalidNameError: The message id is invalid.
        """
        return self._key(JOB_PROGRESS, rest=validate_message_id(message_id))

    # -- schedules --------------------------------------------------------------------------

    def schedules(self) -> str:
        """Every schedule's definition (a hash: schedule id -> JSON)."""
        return self._key(SCHEDULE_DEFS)

    def schedules_paused(self) -> str:
        """The ids of the paused schedules (a set)."""
        return self._key(SCHEDULES_PAUSED)

    def schedule_ticks(self) -> str:
        """Each schedule's last tick fired or skipped (a sorted set scored by epoch ms).

        Only ever raised (``ZADD GT``), so that a tick is never considered twice.
        """
        return self._key(SCHEDULE_TICKS)

    def schedule_runs(self) -> str:
        """Each schedule's last tick that published a job (a sorted set scored by epoch ms).

        The run ``overlap="skip"`` looks at; only ever raised.
        """
        return self._key(SCHEDULE_RUNS)

    def schedulers(self) -> str:
        """What each scheduler says about itself (a hash: its name -> JSON).

        Refreshed every few seconds by each running scheduler, as coordinators do theirs (see
        :mod:`streamflow.registry`); a field not refreshed within
        :data:`streamflow.registry.TTL_MS` is a scheduler that stopped or died.
        """
        return self._key(SCHEDULER_REGISTRY)

    def flow_control(self, role: str) -> str:
        """A role's flow control (a hash): ``paused``, the ms time it was paused, while it is.

        One per role, not per partition: pausing a role pauses all of its partitions. Written by
        operators (``streamflow pause``), read by the workers of the role.
        """
        return self._key(FLOW_CONTROL, validate_name(role, "role"))

    def flow_rate(self, role: str) -> str:
        """A rate-limited role's GCRA state: the next start's earliest time (ms, a string, PX)."""
        return self._key(FLOW_RATE, validate_name(role, "role"))

    def flow_running(self, role: str) -> str:
        """A concurrency-limited role's running slots (a sorted set: token -> expiry ms)."""
        return self._key(FLOW_RUNNING, validate_name(role, "role"))

    def flow_key_slots(self, role: str, limit_key: str) -> str:
        """One limit key's running slots in a role (a sorted set: token -> expiry ms).

        ``limit_key`` must already be checked (:func:`streamflow.keylimits.check_limit_key`).
        """
        return self._key(FLOW_KEY_SLOTS, validate_name(role, "role"), limit_key)

    def flow_key_rate(self, role: str, limit_key: str) -> str:
        """One limit key's start rate state in a role (GCRA's next start time, ms, with PX)."""
        return self._key(FLOW_KEY_RATE, validate_name(role, "role"), limit_key)

    def flow_keys(self, role: str) -> str:
        """A role's limit keys holding running slots (a sorted set: key -> latest expiry ms)."""
        return self._key(FLOW_KEYS, validate_name(role, "role"))

    def flow_waiting(self, role: str) -> str:
        """A role's limit keys with parked jobs (a sorted set: key -> times marked)."""
        return self._key(FLOW_WAITING, validate_name(role, "role"))

    def parked(self, shard: str) -> str:
        """A role partition's limit keys with parked jobs (a sorted set: key -> wake ms)."""
        return self._key(ROLE_PARKED, validate_shard(shard))

    def park(self, shard: str, limit_key: str) -> str:
        """One limit key's jobs parked on a role partition (a list of JSON items, oldest first)."""
        return self._key(ROLE_PARK, validate_shard(shard), limit_key)
