"""How a delivery ends: the rules that make a :class:`~streamflow.delivery.Decision` (no I/O).

The worker decodes and runs; these rules decide. :mod:`streamflow.settle` applies the decision
to Redis. This module imports the data types from :mod:`streamflow.delivery` and nothing that
talks to Redis.
"""

from __future__ import annotations

import traceback
from typing import Any, Protocol

from streamflow import logs
from streamflow.app import RetryPolicy, Role
from streamflow.context import Fatal, Retry
from streamflow.delivery import Decision, Delivery
from streamflow.errors import InputError, PayloadError, ProtocolError
from streamflow.protocol import DeadLetterReason, Job, decode_job, now_ms
from streamflow.records import CancelSignal, ErrorInfo


class CancelLookup(Protocol):
    """Where preflight looks up cancels: the worker's :class:`streamflow.signals.CancelBook`."""

    def match(self, job: Job) -> CancelSignal | None:
        """The cancel that applies to ``job``, if any."""


RELEASE = Decision("release")
LOST = Decision("lost")
#: The handler returned: acknowledge. One shared object (the job is the delivery's), so the hot
#: path builds no decision per message.
ACK = Decision("ack")


def succeeded(job: Job, result: Any) -> Decision:
    """A decision to acknowledge a job whose outcome is kept, with its handler's result."""
    return Decision("ack", job, keep=True, result=result)


def cancelled(job: Job | None, signal_id: str, reason: str) -> Decision:
    """A decision to acknowledge as ``cancelled``."""
    return Decision("cancelled", job, detail=reason, signal_id=signal_id)


#: The most characters of a dead letter's ``detail`` (as of a kept failure's): it may quote
#: text from outside (a handler's exception, a hostile entry's keys), and is logged whole.
MAX_DETAIL = 4000


def dead(
    reason: DeadLetterReason, detail: str, job: Job | None = None, error: ErrorInfo | None = None
) -> Decision:
    """A decision to dead-letter with ``reason``; ``detail`` cut to :data:`MAX_DETAIL`."""
    if len(detail) > MAX_DETAIL:
        detail = detail[: MAX_DETAIL - len(logs.ELISION)] + logs.ELISION
    return Decision("dead_letter", job, reason, detail, error)


def error_info(exc: BaseException) -> ErrorInfo:
    """What a dead letter records of an exception: type, message and the traceback's tail."""
    tb = "".join(traceback.format_exception(exc, limit=-5))
    return ErrorInfo(type=type(exc).__name__, message=str(exc)[:2000], traceback=tb[-4000:])


def stopped(delivery: Delivery) -> Decision:
    """The decision for a delivery whose handler was stopped from outside."""
    if delivery.lost:
        return LOST
    if delivery.cancel is not None:
        # Cancelled, whether the handler stopped by itself or was hard-cancelled.
        return cancelled(delivery.job, delivery.cancel.id, delivery.cancel.reason)
    return RELEASE  # shutdown past the grace


def after_error(delivery: Delivery, job: Job, exc: Exception) -> Decision:
    """The decision after the handler raised ``exc``."""
    if delivery.lost:
        return LOST
    if delivery.cancel is not None:
        # Cancelled work is never retried, whatever the handler raised on its way out.
        return cancelled(job, delivery.cancel.id, delivery.cancel.reason)
    if delivery.released:
        return RELEASE
    if isinstance(exc, InputError):  # ctx.inputs() found a forged or garbled batch
        return dead("invalid_input", str(exc), job, error_info(exc))
    if isinstance(exc, Fatal):
        return dead("fatal", str(exc) or "fatal error", job, error_info(exc))
    return failure(delivery.role, job, exc)


def preflight(delivery: Delivery, book: CancelLookup, max_bytes: int) -> Decision | tuple[Job, Any]:
    """Decode and check an entry before it starts; a decision when it must not start."""
    role, entry = delivery.role, delivery.entry
    if not entry.fields:
        # Re-read from the pending list after the entry itself was deleted (XDEL, MAXLEN).
        detail = "the entry was deleted from the stream while pending: its content is lost"
        return dead("invalid_message", detail)
    try:
        job = decode_job(entry.fields, max_bytes=max_bytes)
    except ProtocolError as exc:
        return dead(exc.reason, exc.detail)  # type: ignore[arg-type]
    if job.role != role.name:
        return dead("wrong_role", f"message is for {job.role!r}, not {role.name!r}", job)
    signal = book.match(job)
    if signal is not None:
        return cancelled(job, signal.id, signal.reason)
    if job.deadline_ms is not None and job.deadline_ms < now_ms():
        return dead("expired", f"deadline passed {now_ms() - job.deadline_ms} ms ago", job)
    try:
        return job, role.validate_payload(job.payload)
    except PayloadError as exc:
        detail = f"payload does not match {_type_name(role.payload_type)}: {exc}"
        return dead("invalid_payload", detail, job)


def failure(role: Role, job: Job, exc: Exception) -> Decision:
    """Retry per the role's policy, or dead-letter as ``failed`` once attempts run out."""
    info = error_info(exc)
    timeout = job.timeout or role.timeout
    if isinstance(exc, TimeoutError) and timeout:
        info = info.model_copy(update={"message": f"timed out after {timeout}s"})
    policy = role.retry
    if job.retry is not None:  # a task node's own policy
        policy = RetryPolicy(**job.retry.model_dump())
    if job.attempt >= policy.max_attempts:
        detail = f"attempt {job.attempt} of {policy.max_attempts} failed: {info.message}"
        return dead("failed", detail, job, info)
    delay = policy.delay(job.attempt)
    if isinstance(exc, Retry) and exc.delay is not None:
        delay = exc.delay
    return Decision("retry", job, detail=info.message, error=info, delay=delay)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or repr(tp)
