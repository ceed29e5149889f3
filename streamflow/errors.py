"""Every exception streamflow raises, in one tree.

StreamflowError
├── ConfigError        a setting, URL, app path or role is wrong; raised at start-up
│   └── MissingExtraError  a feature needs an optional extra that is not installed
├── StartupError       an ``@app.on_startup`` hook raised: the process does not serve
├── InvalidNameError   a name that would reach a Redis key does not match the name pattern
├── ProtocolError      bytes that are not a valid wire-protocol entry
├── PayloadError       a payload that the handler's declared type rejects
├── InputError         a task node's input (a batch read back from Redis) cannot be used
├── UnknownTargetError a cancel names no known task and no queued, delayed or running message
├── UnknownRoleError   a pause names a role nothing is known of (no stream, never served)
├── JobFailedError     a job whose outcome was kept ended without a result
│   ├── JobDeadLetteredError  it was dead-lettered (failed, fatal, invalid, result too large)
│   │   └── JobExpiredError   its deadline passed before it started
│   └── JobCancelledError     it was cancelled
├── ResultTimeoutError no outcome of a job within the time asked (also a TimeoutError)
├── RedisUnavailable   Redis cannot serve now: unreachable, full, read-only, loading, failing over
└── RedisCommandError  Redis refused a command for good (no permission under an ACL, wrong type)

Warnings (``warnings.warn``; the CLI prints them as one ``warning:`` line):

StreamflowWarning (UserWarning)
├── CancelledIdWarning a task or message id is published or submitted under a cancel in force
├── UnknownRoleWarning a job is published to a role that no worker ever served
└── NoCoordinatorWarning a task is submitted while no coordinator is running
"""

from __future__ import annotations


class StreamflowError(Exception):
    """Base class of every streamflow error."""


class ConfigError(StreamflowError):
    """A setting, URL, application path or role name is wrong."""


class StartupError(StreamflowError):
    """An ``@app.on_startup`` hook raised; its traceback is in the log, the process stops."""


class MissingExtraError(ConfigError):
    """A feature needs an optional extra (``pip install 'streamflow[NAME]'``) that is missing.

    Attributes:
        extra: The extra to install, e.g. ``yaml`` or ``testing``.
        feature: What needed it, e.g. ``a YAML task graph``.
    """

    def __init__(self, extra: str, feature: str) -> None:
        super().__init__(f"{feature} needs the {extra} extra: pip install 'streamflow[{extra}]'")
        self.extra = extra
        self.feature = feature


class InvalidNameError(StreamflowError, ValueError):
    """A name that would become part of a Redis key does not match the allowed pattern."""


class ProtocolError(StreamflowError):
    """Bytes that are not a valid wire-protocol entry.

    Attributes:
        reason: A short machine-readable reason, used as the dead-letter reason.
        raw: The offending bytes (possibly truncated by the caller for logging).
    """

    def __init__(self, reason: str, detail: str, raw: bytes | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.raw = raw


class PayloadError(StreamflowError):
    """A payload that does not validate against the handler's declared payload type."""


class InputError(StreamflowError):
    """A task node's input batch read back from Redis is unusable (wrong key, type or JSON)."""


class UnknownTargetError(StreamflowError, LookupError):
    """A cancel names no known task and no queued, delayed or running message.

    Cancelling an id before it exists is possible, but only when asked for explicitly
    (``preemptive=True``, ``streamflow cancel --preemptive``): the marker would otherwise cancel
    whatever is later published or submitted under that id, for 7 days.
    """


class UnknownRoleError(StreamflowError, LookupError):
    """A pause names a role nothing is known of: no stream, and no worker ever served it."""


class JobFailedError(StreamflowError):
    """A job whose outcome was kept ended without a result (see ``Client.result``).

    Attributes:
        message_id: The job's id.
        role: Its role.
        reason: The dead-letter reason, or ``cancelled``.
        detail: Why, in words (the handler's error, the cancel's reason...).
    """

    def __init__(self, message_id: str, role: str, reason: str, detail: str) -> None:
        super().__init__(f"job {message_id} of role {role!r}: {reason}: {detail}")
        self.message_id = message_id
        self.role = role
        self.reason = reason
        self.detail = detail


class JobDeadLetteredError(JobFailedError):
    """The job was dead-lettered: attempts used up, fatal, invalid, or its result too large."""


class JobExpiredError(JobDeadLetteredError):
    """The job's deadline passed before it started (dead-lettered as ``expired``)."""


class JobCancelledError(JobFailedError):
    """The job was cancelled before or while it ran."""


class ResultTimeoutError(StreamflowError, TimeoutError):
    """No outcome of the job was found within the time asked.

    It still waits or runs, or neither its role nor its publisher asked to keep it, or the
    kept outcome expired.

    Attributes:
        message_id: The job's id (for :meth:`streamflow.Client.call`: the job it published).
    """

    def __init__(self, message_id: str, text: str) -> None:
        super().__init__(text)
        self.message_id = message_id


class StreamflowWarning(UserWarning):
    """Base class of every warning streamflow issues."""


class CancelledIdWarning(StreamflowWarning):
    """A task or message id is published or submitted while a cancel of it is in force.

    Workers refuse it at once (acknowledged as ``cancelled``) until the cancel's marker expires.
    """


class UnknownRoleWarning(StreamflowWarning):
    """A job is published to a role that no worker serves or ever served in the namespace.

    It waits in the role's stream until a worker serving the role starts.
    """


class NoCoordinatorWarning(StreamflowWarning):
    """A task is submitted while no coordinator is running in the namespace.

    It stays ``queued`` until one starts (``streamflow coordinator``).
    """


class RedisUnavailable(StreamflowError):
    """Redis cannot serve now: an outage (see :func:`streamflow.connect.is_outage`).

    Unreachable, connection lost or timed out, authentication failed, full (``OOM`` with
    ``noeviction``), read-only, loading, persistence failing, a cluster slot moving or without
    a master. A write may or may not have happened: retry with a dedup key.
    """


class RedisCommandError(StreamflowError):
    """Redis refused a command, and retrying will not help (e.g. ``NOPERM``, ``WRONGTYPE``)."""
