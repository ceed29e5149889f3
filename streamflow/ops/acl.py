"""Least-privilege Redis ACL rules for each part of streamflow, as data.

Each part (``worker``, ``coordinator``, ``publisher``, ``operator``, ``dashboard``) gets one
Redis user whose
rules allow exactly what that part's code sends, on exactly the key families it touches, and
nothing else. The tables below list every command with who sends it and every key pattern with
what it holds; :func:`rules` turns one table into the words of an ``ACL SETUSER`` command.
The key families are the :class:`~streamflow.keys.KeyKind` s that :class:`~streamflow.keys.Keys`
builds every key from, so a pattern is the key's name with ``*`` for its variable parts and cannot
drift from it.

How Redis checks them, and why the tables look the way they do:

* A command is allowed when the user's root permissions, or one of its selectors, allow the
  command *and* every key it names. So commands that can overwrite or remove a key of any type
  (``SET``, ``DEL``, ``PEXPIRE``), ``XDEL`` and the consumer-group commands are granted in
  selectors (:class:`Narrow`), on the few key families that need them: a worker may ``XADD``
  to a role stream but not ``DEL`` it or ``SET`` over it, and may not read the events streams
  with ``XREADGROUP``; a coordinator publishes jobs but cannot read or acknowledge them.
* The commands a Lua script calls are checked against the same rules as the user's own
  commands, when the script reaches them, so every command of every script a part runs is
  listed, and a script can never do more than its caller may: loading one's own script gains
  nothing. The script's ``KEYS`` must match the user's root patterns.
* Scripts reach Redis through redis-py's ``Script``: ``EVALSHA``, then ``SCRIPT LOAD`` and
  ``EVALSHA`` again after ``NOSCRIPT``. A script queued on a pipeline first sends
  ``SCRIPT EXISTS`` (only the coordinator does that). ``EVAL`` is never sent and not granted.
* The names are those on the wire, not redis-py's: ``incr`` sends ``INCRBY``.
* Connecting needs ``CLIENT SETNAME`` when the client has a name
  (:func:`streamflow.connect.connect` names most of them); ``AUTH`` and ``HELLO`` (redis-py 8
  speaks RESP3: ``HELLO 3 AUTH``) need no permission. ``PING`` is the health check. On newer
  servers redis-py also sends ``CLIENT SETINFO`` (Redis 7.2+) and ``CLIENT
  MAINT_NOTIFICATIONS`` and ignores a refusal; they are not granted, because Redis 7.0 does not
  know them and would refuse the whole rule. Each refusal is an ``ACL LOG`` entry.
* ``streamflow worker`` and ``coordinator`` check the server at start-up
  (:mod:`streamflow.ops.guard`): they get ``INFO`` and ``ACL WHOAMI``, not ``CONFIG GET``, whose
  refusal the checks expect (one ``ACL LOG`` entry per start).
* ``SELECT`` is not granted: use database 0 (the default), or add ``+select``.
* ``SCAN`` is keyless: Redis cannot limit it to a pattern, so the part that scans (the
  operator) can list every key *name* in the database, though it can read only its own keys.
* Nothing subscribes to pub/sub channels: ``resetchannels``.

Over 600 lines on purpose: most of it is data, one table of rules per part with the reason
for every grant; the tables read best side by side.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, get_args

from streamflow.keys import (
    BATCH,
    CANCEL_INDEX,
    CANCEL_MARKER,
    CANCEL_REPORT,
    CONSUMER_ALIVE,
    CONSUMER_INFO,
    COORDINATOR_REGISTRY,
    DEAD_LETTERS,
    DEDUP,
    DELAYED,
    EVENTS,
    FLOW_CONTROL,
    FLOW_KEY_RATE,
    FLOW_KEY_SLOTS,
    FLOW_KEYS,
    FLOW_RATE,
    FLOW_RUNNING,
    FLOW_WAITING,
    JOB_PROGRESS,
    KNOWN_FUNCTIONS,
    KNOWN_ROLES,
    LEVEL_DELAYED,
    LEVEL_STREAM,
    LIFECYCLE,
    RESULT,
    ROLE_CONFIG,
    ROLE_MARK,
    ROLE_PARK,
    ROLE_PARKED,
    ROLE_SLOTS,
    ROLE_STREAM,
    SCHEDULE_DEFS,
    SCHEDULE_RUNS,
    SCHEDULE_TICKS,
    SCHEDULER_REGISTRY,
    SCHEDULES_PAUSED,
    SIGNALS,
    STARTS,
    SUBMISSION,
    TASK_OUTBOX,
    TASK_OUTPUT,
    TASK_PARTIALS,
    TASK_RESULT,
    TASK_STATE,
    TASKS_ACTIVE,
    TASKS_CONTROL,
    TASKS_INDEX,
    TASKS_MARK,
    TASKS_SUBMISSIONS,
    KeyKind,
    Keys,
    validate_name,
)

Part = Literal["worker", "coordinator", "publisher", "operator", "dashboard"]
#: The parts that can be given a user, in the order the documentation describes them.
PARTS: tuple[Part, ...] = get_args(Part)

#: An environment variable name, as a shell accepts it.
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: A password given by its SHA-256, as ``ACL SETUSER`` takes it.
SHA256_WORD = re.compile(r"#[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class Narrow:
    """Commands granted only on some of a part's key families (one ACL selector).

    Attributes:
        commands: Each command, with who sends it.
        keys: The key families it may touch.
    """

    commands: Mapping[str, str]
    keys: tuple[KeyKind, ...]


@dataclass(frozen=True, slots=True)
class PartRules:
    """What one part may do.

    Attributes:
        summary: One line on what the part does with these rights.
        keys: Every key family it touches, with what for.
        commands: The commands it may send on any of those keys, with who sends them.
        narrow: Commands allowed on fewer key families (see :class:`Narrow`).
    """

    summary: str
    keys: Mapping[KeyKind, str]
    commands: Mapping[str, str]
    narrow: tuple[Narrow, ...] = field(default=())


#: Sent by every part on every connection.
_CONNECTION = {
    "ping": "health checks, the start-up check and redis-py's check of idle connections",
    "client|setname": "connect.connect names its connections (CLIENT SETNAME on connect)",
    "cluster|slots": "a redis+cluster:// client reads the slot map (refused outside a cluster)",
    "command": "a redis+cluster:// client learns where each command's keys are (COMMAND)",
}
#: How every Lua script is run.
_SCRIPTS = {
    "evalsha": "every Lua script (redis-py's Script)",
    "script|load": "redis-py's Script after NOSCRIPT (a restarted or new Redis)",
}

#: The start-up checks of ``streamflow worker`` and ``coordinator`` (:mod:`streamflow.ops.guard`).
#: ``CONFIG GET`` is not granted: the checks read the AOF flag and the eviction policy from
#: ``INFO`` instead and skip the RDB snapshot schedule; ``ACL GETUSER`` (asked only of the
#: ``default`` user) is not needed.
_STARTUP_CHECKS = {
    "info": "start-up checks: Redis version, AOF, maxmemory-policy",
    "acl|whoami": "start-up checks: the connection's user",
}

#: The run-time schedule store (:mod:`streamflow.scheduler`).
_SCHEDULE_KEYS = (SCHEDULE_DEFS, SCHEDULES_PAUSED, SCHEDULE_TICKS, SCHEDULE_RUNS)

PUBLISHER = PartRules(
    summary="publishes jobs (now, delayed, deduplicated, in bulk) and submits tasks",
    keys={
        ROLE_STREAM: "XADD of jobs (also in publish_many.lua and publish_dedup.lua)",
        LEVEL_STREAM: "XADD of jobs with a priority (the same commands)",
        DELAYED: "ZADD of delayed jobs (also in publish_dedup.lua)",
        LEVEL_DELAYED: "ZADD of delayed jobs with a priority",
        DEDUP: "publish_dedup.lua: GET, SET of the dedup marker",
        ROLE_CONFIG: "HMGET of the role's partitions and priority levels",
        KNOWN_ROLES: "submit: SMEMBERS (graph check), SADD of the graph's roles; "
        "publish: SMEMBERS (the unknown-role warning)",
        KNOWN_FUNCTIONS: "submit: SMEMBERS (graph check)",
        TASKS_INDEX: "submit: ZADD",
        TASKS_ACTIVE: "submit: SADD",
        TASKS_CONTROL: "submit: XADD 'task <id> type submitted'",
        TASK_STATE: "submit: task_commit.lua (HGET v, HSET); submit --wait: HGET",
        TASK_OUTBOX: "submit: a key of task_commit.lua (not written at creation)",
        TASKS_SUBMISSIONS: "a submission from any language: XADD",
        SUBMISSION: "Client.submission: GET of a submission's outcome",
        RESULT: "result, call: GET of a job's kept outcome",
        LIFECYCLE: "submit --wait, result, call: XREVRANGE (start position), XREAD (the task's "
        "or the job's events)",
    },
    commands={
        **_CONNECTION,
        **_SCRIPTS,
        "xadd": "publish, publish_many.lua, publish_dedup.lua, submit, a submission",
        "zadd": "delayed publish, publish_dedup.lua, submit (index)",
        "get": "publish_dedup.lua (is the dedup key used?); result, call (a kept outcome); "
        "a submission's outcome",
        "smembers": "submit (known roles and functions)",
        "sadd": "submit (active set, known roles)",
        "hget": "task_commit.lua (version), submit --wait",
        "hmget": "a role's partitions and priority levels",
        "hset": "task_commit.lua (the new task's state)",
    },
    narrow=(
        Narrow({"set": "publish_dedup.lua (the dedup marker)"}, (DEDUP,)),
        # EXISTS only: a publisher learns whether an id it chose is cancelled, not the cancels.
        Narrow(
            {"exists": "publish or submit with a chosen id: is it cancelled already?"},
            (CANCEL_MARKER,),
        ),
        # HGETALL only: submit learns whether a coordinator runs, and cannot forge one.
        Narrow({"hgetall": "submit: is a coordinator running?"}, (COORDINATOR_REGISTRY,)),
        # The scheduler (streamflow scheduler runs as the publisher): it reads the schedules,
        # writes those declared in code and raises their last ticks (ZADD GT).
        Narrow(
            {
                "hgetall": "scheduler: the schedules",
                "hset": "scheduler: the schedules declared in code",
                "smembers": "scheduler: the paused schedules",
                "zrange": "scheduler: the last ticks and runs",
                "zadd": "scheduler: ZADD GT of a last tick or run, ZADD NX of a new schedule's",
            },
            _SCHEDULE_KEYS,
        ),
        # The scheduler's registry entry (HDEL: its own on a clean stop, and day-old ones).
        Narrow(
            {
                "hset": "scheduler: its registry entry, every 5 s",
                "hgetall": "scheduler: the registry (day-old entries to forget)",
                "hdel": "scheduler: its entry on a clean stop, day-old entries",
            },
            (SCHEDULER_REGISTRY,),
        ),
        # Reads of the lifecycle events only: a publisher follows news, never reads jobs.
        Narrow(
            {
                "xrevrange": "submit --wait, result, call (the events' start position)",
                "xread": "submit --wait, result, call (the task's or the job's events)",
            },
            (LIFECYCLE,),
        ),
    ),
)

WORKER = PartRules(
    summary="reads its roles' streams, runs handlers, settles, retries, dead-letters, "
    "follows cancels, and runs task nodes",
    keys={
        ROLE_STREAM: "XGROUP CREATE, XREADGROUP, XPENDING; every settling script",
        LEVEL_STREAM: "the same, for the priority levels above 0",
        DELAYED: "retry.lua ZADD, promote.lua ZRANGE and ZREM",
        LEVEL_DELAYED: "the same, for the priority levels above 0",
        DEAD_LETTERS: "dead_letter.lua XADD",
        EVENTS: "task node events: XADD accepted, emit/finish/dead_letter.lua",
        STARTS: "starts of redelivered entries: GET, MULTI INCRBY PEXPIRE EXEC",
        BATCH: "emit.lua SET of an emitted batch; GET of an input batch",
        RESULT: "result.lua and dead_letter.lua: SET PX of a kept outcome",
        ROLE_CONFIG: "HSETNX + HMGET of the role's partitions and priority levels at start-up",
        SIGNALS: "XREVRANGE (start position), XREAD (follow)",
        CANCEL_MARKER: "GET at start-up; mark_cancel.lua SET NX PX, PTTL",
        CANCEL_INDEX: "the cancel index: ZRANGE at start-up; mark_cancel.lua ZADD",
        CANCEL_REPORT: "HSET + PEXPIRE of its cancel report",
        CONSUMER_ALIVE: "alive.lua: GET, SET PX, DEL of its liveness key",
        CONSUMER_INFO: "its registry entry: SET PX, DEL",
        ROLE_MARK: "its marks: SET PX, DEL; forget.lua EXISTS of other workers' marks",
        KNOWN_ROLES: "SMISMEMBER, then SADD of the roles it serves",
        TASK_OUTPUT: "ctx.inputs(): LRANGE of a parent's batch keys",
        TASK_RESULT: "ctx.inputs() and input batches: GET of a function node's output",
        LIFECYCLE: "XADD MAXLEN ~ of its jobs' lifecycle events (started, progress, outcomes)",
        JOB_PROGRESS: "SET PX of a run's latest progress, DEL when the run ends (only runs "
        "that report progress)",
        FLOW_CONTROL: "HGET, HMGET of its roles' pause and limits, every half second; "
        "limit.lua HGET, HEXISTS",
        FLOW_RATE: "limit.lua GET, SET PX of the next start's time",
        FLOW_RUNNING: "limit.lua ZADD, ZREM, ZREMRANGEBYSCORE, ZCARD; ZCOUNT (limits read)",
        FLOW_KEY_SLOTS: "key_limit.lua ZADD, ZREM, ZREMRANGEBYSCORE, ZCARD, ZRANGE of a limit "
        "key's running slots",
        FLOW_KEY_RATE: "key_limit.lua GET, SET PX of a limit key's next start time",
        FLOW_KEYS: "key_limit.lua ZADD, ZREM, ZREMRANGEBYSCORE of the keys holding slots",
        FLOW_WAITING: "key_limit.lua ZINCRBY, ZSCORE, ZREM of the keys with parked jobs",
        ROLE_PARKED: "park.lua ZADD; unpark.lua ZSCORE, ZADD, ZREM; ZRANGEBYSCORE of the due keys",
        ROLE_PARK: "park.lua LPUSH or RPUSH; unpark.lua LPOP, LLEN",
    },
    commands={
        **_CONNECTION,
        **_SCRIPTS,
        **_STARTUP_CHECKS,
        "xadd": "retry, promote, dead_letter, emit and finish.lua; the accepted event; "
        "lifecycle events",
        "zadd": "retry.lua, mark_cancel.lua",
        "zrange": "promote.lua, the cancel index at start-up",
        "zrem": "promote.lua",
        "time": "promote.lua, mark_cancel.lua (the server's clock)",
        "pttl": "mark_cancel.lua",
        "get": "alive.lua, cancel markers, start counts, input batches",
        "incrby": "start counts of redelivered entries (redis-py's incr sends INCRBY)",
        "multi": "start counts (INCRBY and PEXPIRE in one transaction)",
        "exec": "start counts",
        "xrevrange": "signals listener (start position)",
        "xread": "signals listener",
        "hset": "cancel reports",
        "sadd": "known roles",
        "smismember": "known roles (read first: a full Redis refuses even a needless SADD)",
        "lrange": "ctx.inputs()",
        "hsetnx": "a role's partitions, recorded by the first worker",
        "hget": "whether its roles are paused, limit.lua",
        "hmget": "its roles' partitions and priority levels, its roles' limits",
        "hexists": "limit.lua",
        "zremrangebyscore": "limit.lua (slots of dead workers)",
        "zcard": "limit.lua",
        "zcount": "its roles' running slots",
        "zscore": "unpark.lua, key_limit.lua",
        "zincrby": "key_limit.lua (a key with parked jobs)",
        "zrangebyscore": "parked keys due to be woken",
        "lpush": "park.lua",
        "rpush": "park.lua",
        "lpop": "unpark.lua",
        "llen": "unpark.lua",
        "exists": "forget.lua (is a consumer's mark alive?)",
        "xinfo|consumers": "the cleanup of dead consumer names",
    },
    narrow=(
        # The consumer group commands on role streams only: not on the events streams, whose
        # group belongs to the coordinators.
        Narrow(
            {
                "xgroup|create": "streams.ensure_group at start-up and after NOGROUP",
                "xinfo|groups": "streams.ensure_group when Redis is full (does it exist?)",
                "xreadgroup": "the reader (also in read_levels.lua)",
                "xpending": "the reader (resumed entries' counts); owner-checking scripts",
                "xrange": "park.lua (the entry it parks)",
                "xclaim": "renew.lua, release.lua",
                "xautoclaim": "claim.lua",
                "xack": "settle, retry, dead_letter, finish, result and park.lua",
                "xdel": "settle, retry, dead_letter, finish, result and park.lua",
                "xtrim": "settle.lua (MINID: the acknowledged entries before the oldest pending)",
                "xgroup|delconsumer": "forget.lua (a dead consumer that holds nothing)",
            },
            (ROLE_STREAM, LEVEL_STREAM),
        ),
        Narrow(
            {
                "set": (
                    "alive.lua, registry entry, marks, mark_cancel.lua, emit.lua, result.lua, "
                    "dead_letter.lua, limit.lua, key_limit.lua, a run's latest progress, the "
                    "start count of a parked job woken"
                )
            },
            (
                CONSUMER_ALIVE,
                CONSUMER_INFO,
                ROLE_MARK,
                CANCEL_MARKER,
                BATCH,
                RESULT,
                FLOW_RATE,
                FLOW_KEY_RATE,
                JOB_PROGRESS,
                STARTS,
            ),
        ),
        Narrow(
            {
                "del": "alive.lua release, registry entry and marks on a clean stop; a run's "
                "latest progress when it ends; park.lua (the start count it carries)"
            },
            (CONSUMER_ALIVE, CONSUMER_INFO, ROLE_MARK, JOB_PROGRESS, STARTS),
        ),
        Narrow(
            {"pexpire": "start counts, cancel reports"},
            (STARTS, CANCEL_REPORT),
        ),
    ),
)

COORDINATOR = PartRules(
    summary="turns task events into task state and publishes, cancels and limits task nodes",
    keys={
        KNOWN_FUNCTIONS: "SADD of the functions it provides",
        COORDINATOR_REGISTRY: "its registry entry: HSET, HGETALL, HDEL",
        KNOWN_ROLES: "SMEMBERS (which events streams to read)",
        TASKS_CONTROL: "XGROUP CREATE, XREADGROUP, XACK, XDEL, XAUTOCLAIM",
        TASKS_SUBMISSIONS: "XGROUP CREATE, XREADGROUP, XACK, XDEL, XAUTOCLAIM",
        SUBMISSION: "EXISTS, SET NX PX (or SET PX) of a submission's outcome",
        TASKS_INDEX: "ZADD of a task submitted on the submissions stream",
        TASKS_ACTIVE: "SMEMBERS (sweep), SREM of ended tasks; SADD of a submitted task",
        EVENTS: "XGROUP CREATE, XREADGROUP, XACK, XDEL, XAUTOCLAIM",
        DEAD_LETTERS: "XADD of a malformed event",
        ROLE_STREAM: "publish_dedup.lua, publish_committed.lua: XADD of a node's job",
        DEDUP: "publish_dedup.lua, publish_committed.lua: GET, SET of the dispatch marker",
        DELAYED: "publish_dedup.lua, publish_committed.lua: a key, never written (due 0)",
        ROLE_SLOTS: "slot.lua (SISMEMBER, SCARD, SADD); sweep SMEMBERS, SREM",
        BATCH: "GET of a function's inputs; PEXPIRE when the task ends",
        ROLE_CONFIG: "HMGET of a role's partitions and priority levels",
        TASK_STATE: "HMGET, HGET; task_commit.lua",
        TASK_OUTBOX: "HGETALL, HDEL; task_commit.lua; publish_committed.lua HGET",
        TASK_OUTPUT: "LRANGE; task_commit.lua RPUSH",
        TASK_PARTIALS: "HGETALL; task_commit.lua HSET",
        TASK_RESULT: "SET PX of a reduce's result; GET as an input",
        SIGNALS: "XREVRANGE, XREAD (cancels); cancel.lua XADD",
        CANCEL_MARKER: "GET at start-up; mark_cancel.lua SET NX PX, PTTL; cancel.lua SET",
        CANCEL_INDEX: "ZRANGE at start-up; cancel.lua and mark_cancel.lua ZADD",
        TASKS_MARK: "its mark by the control stream: SET PX, DEL; forget.lua EXISTS",
        ROLE_MARK: "its marks by the events streams: SET PX, DEL; forget.lua EXISTS",
        LIFECYCLE: "XADD MAXLEN ~ of task and node state changes",
    },
    commands={
        **_CONNECTION,
        **_SCRIPTS,
        **_STARTUP_CHECKS,
        "exists": "forget.lua (is a consumer's mark alive?), is a submission answered?",
        "xinfo|consumers": "the cleanup of dead consumer names",
        "script|exists": "publish_dedup.lua queued on a pipeline (redis-py checks first)",
        "sadd": "known functions; slot.lua",
        "smembers": "known roles, active tasks, role slots",
        "srem": "ended tasks, freed role slots",
        "sismember": "slot.lua",
        "scard": "slot.lua",
        "xadd": "publish_dedup.lua, publish_committed.lua, cancel.lua, malformed events, "
        "lifecycle events",
        "get": "publish_dedup.lua, publish_committed.lua, batches, cancel markers",
        "hmget": "loading a task, roles' partitions and priority levels",
        "hget": "task states, specs, roles' partitions; publish_committed.lua (outbox item)",
        "hgetall": "outboxes, partials, the coordinator registry",
        "hset": "task_commit.lua, its registry entry",
        "hdel": "outbox items carried out, its (and day-old) registry entries",
        "rpush": "task_commit.lua",
        "lrange": "batch keys of a node",
        "xrevrange": "signals listener",
        "xread": "signals listener",
        "zrange": "signals listener (the cancel index)",
        "zadd": "cancel.lua, mark_cancel.lua (the cancel index); a submitted task (index)",
        "zremrangebyscore": "cancel.lua (expired index entries)",
        "time": "cancel.lua, mark_cancel.lua (the server's clock)",
        "pttl": "mark_cancel.lua",
    },
    narrow=(
        Narrow(
            {
                "set": "publish_dedup.lua, publish_committed.lua, a reduce's result, "
                "cancel.lua, mark_cancel.lua, marks, a submission's outcome"
            },
            (
                DEDUP,
                TASK_RESULT,
                CANCEL_MARKER,
                TASKS_MARK,
                ROLE_MARK,
                SUBMISSION,
            ),
        ),
        Narrow(
            {"del": "its marks on a clean stop"},
            (TASKS_MARK, ROLE_MARK),
        ),
        Narrow(
            {"pexpire": "task_commit.lua (retention of an ended task), its batches"},
            (
                TASK_STATE,
                TASK_OUTBOX,
                TASK_OUTPUT,
                TASK_PARTIALS,
                TASK_RESULT,
                BATCH,
            ),
        ),
        # The consumer group commands on the control and events streams only: a coordinator
        # publishes jobs but never reads or acknowledges them.
        Narrow(
            {
                "xgroup|create": "the coordinators group of the control and events streams",
                "xinfo|groups": "streams.ensure_group when Redis is full (does it exist?)",
                "xreadgroup": "control and events",
                "xack": "control and events, once applied",
                "xdel": "control and events, once applied",
                "xautoclaim": "claim.lua (adoption of another coordinator's events)",
                "xgroup|delconsumer": "forget.lua (a dead coordinator that holds nothing)",
                "xpending": "claim.lua (adopted counts); forget.lua (does a dead one hold any?)",
            },
            (TASKS_CONTROL, TASKS_SUBMISSIONS, EVENTS),
        ),
    ),
)

OPERATOR = PartRules(
    summary="inspect, workers, dlq list/show/replay/purge, cancel, pause, resume, limit, tasks, "
    "status, result, job (and the exporter)",
    keys={
        ROLE_STREAM: "inspect (SCAN, EXISTS, XLEN, XINFO, XPENDING); replay.lua XADD; "
        "cancel: SCAN, XRANGE (does the message exist?)",
        DELAYED: "inspect: EXISTS, ZCARD; cancel: SCAN, ZRANGE",
        LEVEL_STREAM: "inspect: XLEN, XINFO, XPENDING per level; replay.lua XADD; cancel: SCAN, "
        "XRANGE",
        LEVEL_DELAYED: "inspect: ZCARD; cancel: SCAN, ZRANGE",
        DEAD_LETTERS: "dlq: XLEN, XRANGE; replay.lua XDEL; purge MULTI XLEN DEL EXEC",
        EVENTS: "exporter: XLEN (task events backlog)",
        BATCH: "result: GET",
        ROLE_CONFIG: "inspect, dlq, exporter: HMGET of the role's partitions and priority "
        "levels; pause, inspect: EXISTS (is the role known?)",
        CONSUMER_ALIVE: "inspect: EXISTS; cancel --wait: SCAN",
        CONSUMER_INFO: "workers: SCAN + GET",
        COORDINATOR_REGISTRY: "workers: HGETALL",
        SCHEDULER_REGISTRY: "workers: HGETALL",
        SIGNALS: "cancel.lua XADD",
        CANCEL_MARKER: "cancel.lua SET",
        CANCEL_INDEX: "cancel.lua ZADD, ZREMRANGEBYSCORE",
        CANCEL_REPORT: "cancel --wait: HGETALL",
        KNOWN_ROLES: "inspect: SMEMBERS, SISMEMBER",
        TASKS_INDEX: "tasks: ZREVRANGE",
        TASKS_ACTIVE: "exporter: SMEMBERS",
        TASK_STATE: "tasks, status, result: HGET; cancel: EXISTS",
        TASK_OUTPUT: "result: LRANGE",
        TASK_RESULT: "result: GET",
        RESULT: "job, result: GET of a job's kept outcome",
        LIFECYCLE: "events, cancel --wait: XREVRANGE (start position), XREAD",
        JOB_PROGRESS: "job: GET of a running job's latest progress; status TASK: MGET of its "
        "running nodes' jobs'",
        FLOW_CONTROL: "pause: HSETNX; resume: HDEL; limit: HSET, HDEL, HMGET; inspect: HGET",
        FLOW_RUNNING: "limit, inspect: ZCOUNT of the running slots",
        FLOW_KEYS: "limit, inspect: ZCOUNT of the limit keys holding slots",
        ROLE_PARKED: "limit, inspect: ZCARD of the limit keys with parked jobs",
    },
    commands={
        **_CONNECTION,
        **_SCRIPTS,
        "scan": "inspect (role streams), workers (registry), cancel --wait (liveness keys)",
        "smembers": "inspect, exporter",
        "sismember": "inspect ROLE",
        "exists": "inspect, cancel (is the task known?)",
        "zrange": "cancel (is the message delayed?), job (delayed or retrying?)",
        "xlen": "inspect, dlq list, purge, exporter",
        "zcard": "inspect",
        "xinfo|groups": "inspect",
        "xinfo|consumers": "inspect",
        "xpending": "inspect, job (is it running, and where?)",
        "time": "inspect (ages by the server's clock), cancel.lua",
        "zadd": "cancel.lua (the cancel index)",
        "zremrangebyscore": "cancel.lua (expired index entries)",
        "get": "workers, result, job (a kept outcome, a running job's progress)",
        "xrange": "dlq list, show, replay; cancel, job (is the message queued or running?)",
        "xrevrange": "job (is it dead-lettered?); events, cancel --wait (where events start)",
        "xadd": "replay.lua, cancel.lua",
        "multi": "dlq purge",
        "exec": "dlq purge",
        "hgetall": "cancel --wait, workers (coordinators, schedulers)",
        "zrevrange": "tasks",
        "hget": "tasks, status, result, inspect (paused?)",
        "hmget": "limit, inspect (a role's limits), roles' partitions and priority levels",
        "zcount": "limit, inspect (running slots)",
        "lrange": "result",
        "xread": "events, cancel --wait (lifecycle events)",
        "mget": "status TASK (its running nodes' latest progress)",
    },
    narrow=(
        Narrow({"set": "cancel.lua (the cancel marker)"}, (CANCEL_MARKER,)),
        Narrow({"del": "dlq purge", "xdel": "replay.lua"}, (DEAD_LETTERS,)),
        # streamflow schedule list/add/remove/pause/resume (run-now is a plain publish).
        Narrow(
            {
                "hgetall": "schedule list (definitions)",
                "hset": "schedule add",
                "hdel": "schedule remove",
                "sadd": "schedule pause",
                "srem": "schedule resume, remove",
                "zrem": "schedule remove (its last tick and run)",
                "zadd": "schedule resume (ZADD GT: the paused ticks count as done)",
                "zrange": "schedule list (last ticks and runs)",
                "smembers": "schedule list (paused)",
            },
            _SCHEDULE_KEYS,
        ),
        Narrow(
            {"hsetnx": "pause", "hset": "limit", "hdel": "resume, limit --reset"}, (FLOW_CONTROL,)
        ),
    ),
)

#: ``streamflow dashboard``: the operator's reads, and exactly the actions its pages offer
#: (replay, purge, cancel, pause and resume a role or a schedule, run a role's schedule now);
#: not ``limit``, ``schedule add/remove``, ``cancel --wait``, ``events`` nor the exporter's reads.
DASHBOARD = PartRules(
    summary="streamflow dashboard: the overview, roles, workers, jobs, tasks, dead letters and "
    "schedules, with replay, purge, cancel, pause/resume and run-now",
    keys={
        ROLE_STREAM: "overview (SCAN, EXISTS, XLEN, XINFO, XPENDING); replay.lua and a schedule "
        "run now: XADD; cancel, jobs: XRANGE (does the message exist?)",
        DELAYED: "overview: EXISTS, ZCARD; cancel, jobs: ZRANGE",
        LEVEL_STREAM: "overview: XLEN per level; replay.lua XADD; cancel, jobs: XRANGE",
        LEVEL_DELAYED: "overview: ZCARD; cancel, jobs: ZRANGE",
        DEAD_LETTERS: "dead letters: XLEN, XRANGE; replay.lua XDEL; purge MULTI XLEN DEL EXEC",
        BATCH: "a task's result: GET",
        ROLE_CONFIG: "overview, dead letters, run now: HMGET of the role's partitions and "
        "priority levels; EXISTS (is the role known?)",
        CONSUMER_ALIVE: "a role's consumers: EXISTS",
        CONSUMER_INFO: "workers: SCAN + GET",
        COORDINATOR_REGISTRY: "overview, workers: HGETALL",
        SCHEDULER_REGISTRY: "overview, workers: HGETALL",
        SIGNALS: "cancel.lua XADD",
        CANCEL_MARKER: "cancel.lua SET",
        CANCEL_INDEX: "cancel.lua ZADD, ZREMRANGEBYSCORE",
        KNOWN_ROLES: "overview: SMEMBERS, SISMEMBER; run now: SMEMBERS (unknown-role warning)",
        TASKS_INDEX: "tasks: ZREVRANGE",
        TASK_STATE: "tasks, a task: HGET; cancel: EXISTS",
        TASK_OUTPUT: "a task's result: LRANGE",
        TASK_RESULT: "a task's result: GET",
        RESULT: "jobs: GET of a job's kept outcome",
        LIFECYCLE: "a task's events, the overview's sparklines: XRANGE; jobs: XREVRANGE",
        JOB_PROGRESS: "jobs: GET of a running job's latest progress",
        FLOW_CONTROL: "overview, role: HGET, HMGET (paused? limits?); pause: HSETNX; resume: HDEL",
        FLOW_RUNNING: "overview, role: ZCOUNT of the running slots",
        FLOW_KEYS: "overview, role: ZCOUNT of the limit keys holding slots",
        ROLE_PARKED: "overview, role: ZCARD of the limit keys with parked jobs",
    },
    commands={
        **_CONNECTION,
        **_SCRIPTS,
        "scan": "overview (role streams), workers (registry)",
        "smembers": "overview (known roles)",
        "sismember": "a role's page",
        "exists": "overview, cancel (is the task known?)",
        "zrange": "cancel (is the message delayed?), jobs (delayed or retrying?)",
        "xlen": "overview, dead letters, purge",
        "zcard": "overview",
        "xinfo|groups": "overview",
        "xinfo|consumers": "overview",
        "xpending": "overview, jobs (is it running, and where?)",
        "time": "overview (ages by the server's clock), cancel.lua",
        "zadd": "cancel.lua (the cancel index)",
        "zremrangebyscore": "cancel.lua (expired index entries)",
        "get": "workers, a task's result, jobs (a kept outcome, a running job's progress)",
        "xrange": "dead letters, replay; cancel, jobs; a task's events and the sparklines",
        "xrevrange": "jobs (is it dead-lettered?)",
        "xadd": "replay.lua, cancel.lua, a schedule run now",
        "multi": "dead-letter purge, schedule resume",
        "exec": "dead-letter purge, schedule resume",
        "hgetall": "overview, workers (coordinators, schedulers)",
        "zrevrange": "tasks",
        "hget": "tasks, a task, overview (paused?)",
        "hmget": "overview, role (a role's limits), roles' partitions and priority levels",
        "zcount": "overview, role (running slots)",
        "lrange": "a task's result",
    },
    narrow=(
        Narrow({"set": "cancel.lua (the cancel marker)"}, (CANCEL_MARKER,)),
        Narrow({"del": "dead-letter purge", "xdel": "replay.lua"}, (DEAD_LETTERS,)),
        Narrow(
            {
                "hgetall": "schedules (definitions)",
                "smembers": "schedules (paused)",
                "zrange": "schedules (last ticks and runs)",
                "sadd": "schedule pause",
                "srem": "schedule resume",
                "zadd": "schedule resume (ZADD GT: the paused ticks count as done)",
            },
            _SCHEDULE_KEYS,
        ),
        Narrow({"hsetnx": "role pause", "hdel": "role resume"}, (FLOW_CONTROL,)),
    ),
)

#: Every part's table.
TABLES: dict[Part, PartRules] = {
    "worker": WORKER,
    "coordinator": COORDINATOR,
    "publisher": PUBLISHER,
    "operator": OPERATOR,
    "dashboard": DASHBOARD,
}


def default_user(part: Part) -> str:
    """The user name a part gets unless told: ``sf-<part>``."""
    return f"sf-{part}"


def default_password_env(part: Part) -> str:
    """The variable that holds a part's password unless told: ``SF_<PART>_PASSWORD``.

    Not ``STREAMFLOW_*``: streamflow refuses to start when an unknown variable with that prefix
    is set.
    """
    return f"SF_{part.upper()}_PASSWORD"


def rules(
    namespace: str, part: Part, user: str | None = None, *, password: str | None = None
) -> list[str]:
    """The words of the ``ACL SETUSER`` command that gives ``part`` its rights.

    The words are ``ACL SETUSER <user> reset on``, the password word if given, the key
    patterns, ``resetchannels``, ``-@all``, the commands, then one selector word
    ``(~pattern ... +command)`` per :class:`Narrow`. ``reset`` makes the command replace
    whatever the user had, so running it again is safe. Without a password word the user
    cannot log in.

    Args:
        namespace: The key namespace the part works in.
        part: ``worker``, ``coordinator``, ``publisher``, ``operator`` or ``dashboard``.
        user: The ACL user name; ``sf-<part>`` by default.
        password: A password word, ``#<sha-256 hex>`` or ``>password`` (see
            :func:`password_word`).

    Raises:
        InvalidNameError: The namespace or user name is not a valid name.
        ValueError: ``part`` is not a part.
    """
    table = TABLES.get(part)
    if table is None:
        raise ValueError(f"unknown part {part!r}: use one of {', '.join(PARTS)}")
    prefix = Keys(namespace).namespace
    name = validate_name(user or default_user(part), "user name")
    words = ["ACL", "SETUSER", name, "reset", "on"]
    if password is not None:
        if not (password.startswith(">") or SHA256_WORD.fullmatch(password)):
            raise ValueError("a password word is '#' and 64 hex digits (a SHA-256), or '>password'")
        words.append(password)
    words += [f"~{prefix}:{kind.pattern}" for kind in table.keys]
    words += ["resetchannels", "-@all"]
    words += [f"+{command}" for command in table.commands]
    for narrow in table.narrow:
        inner = [f"~{prefix}:{kind.pattern}" for kind in narrow.keys]
        inner += [f"+{command}" for command in narrow.commands]
        words.append("(" + " ".join(inner) + ")")
    return words


def granted(part: Part) -> frozenset[str]:
    """Every command ``part`` may send on some of its keys (``xinfo|groups`` style names)."""
    table = TABLES[part]
    return frozenset(table.commands).union(*(narrow.commands for narrow in table.narrow))


def password_word(var: str, environ: Mapping[str, str]) -> tuple[str, bool]:
    """The ACL word that sets the password held in the environment variable ``var``.

    Returns ``(word, hashed)``: ``#<sha-256 hex>`` of the variable's value when it is set
    (the password itself never appears), else the placeholder ``>${var}`` for a tool such as
    ``envsubst`` to fill in.

    Raises:
        ValueError: ``var`` is not a variable name, starts with ``STREAMFLOW_``, or is set but
            empty.
    """
    if ENV_NAME.fullmatch(var) is None:
        raise ValueError(f"{var!r} is not an environment variable name")
    if var.upper().startswith("STREAMFLOW_"):
        raise ValueError(
            f"{var}: choose a name outside STREAMFLOW_*: streamflow refuses to start while an "
            "unknown STREAMFLOW_* variable is set"
        )
    value = environ.get(var)
    if value is None:
        return ">${" + var + "}", False
    if value == "":
        raise ValueError(f"{var} is set but empty: a user needs a password")
    # Redis hashes the password's bytes; os.fsencode gives back the bytes the value came from.
    return "#" + hashlib.sha256(os.fsencode(value)).hexdigest(), True


def line(words: list[str]) -> str:
    """``words`` as one line that ``redis-cli`` (and ``shlex.split``) split back into them.

    A word with a space (a selector), a quote or a backslash is double-quoted, with its quotes
    and backslashes escaped; names are validated, so only a literal password could hold them.
    """
    return " ".join(_quoted(word) for word in words)


def _quoted(word: str) -> str:
    if word and not any(c in word for c in " \"\\'\t\n"):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'
