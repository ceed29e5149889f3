"""The decision table of :mod:`streamflow.decisions` (no Redis): one row per way a delivery ends.

Each row builds a delivery as the worker holds it at one point (read, handler raised, handler
stopped from outside) and checks the :class:`~streamflow.delivery.Decision` the rules return:
its kind (retry, dead letter, release, lost, cancelled), dead-letter reason, detail and retry
delay. The rows are ordered by the function that decides, and within it by precedence (a lost
lease wins over a cancel, a cancel over the handler's exception, ...). The acknowledgement of a
handler that returned is :data:`streamflow.decisions.ACK`, returned by the worker itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import pytest

from streamflow import App, Context, RetryPolicy
from streamflow.context import Fatal, Retry
from streamflow.decisions import LOST, RELEASE, after_error, preflight, stopped
from streamflow.delivery import Decision, DecisionKind, Delivery
from streamflow.errors import InputError
from streamflow.protocol import MESSAGE_FIELD, DeadLetterReason, Job, JobRetry, encode, now_ms
from streamflow.records import CancelSignal
from streamflow.signals import CancelBook
from streamflow.streams import Entry

APP = App()
#: Backoff 2 s, times 3 per attempt, capped at 10 s: bases 2, 6, 10 (capped), then dead.
POLICY = RetryPolicy(max_attempts=4, backoff=2.0, factor=3.0, max_backoff=10.0)
MAX_BYTES = 1000


@APP.role("work", retry=POLICY, timeout=2.0)
async def work(ctx: Context, payload: int) -> None:
    pass


ROLE = APP.get_role("work")
NOW = now_ms()


def job(**fields: Any) -> Job:
    """A valid job of role ``work``, id ``m-1``, with ``fields`` changed."""
    doc: dict[str, Any] = {
        "protocol": 1,
        "kind": "job",
        "id": "m-1",
        "role": "work",
        "payload": 7,
        "created_at_ms": NOW,
        **fields,
    }
    return Job(**doc)


def signal(target: str = "message", target_id: str = "m-1") -> CancelSignal:
    return CancelSignal(
        protocol=1,
        kind="cancel",
        id=f"sig-{target}",
        target=target,  # type: ignore[arg-type]
        target_id=target_id,
        reason="user asked",
        created_at_ms=NOW,
    )


def delivery(fields: dict[bytes, bytes] | None = None, *, stops: tuple[str, ...] = ()) -> Delivery:
    """A delivery of one entry (the job above unless ``fields``), stopped for each of ``stops``."""
    if fields is None:
        fields = {MESSAGE_FIELD: encode(job())}
    held = Delivery(ROLE, "work", "ns:work", Entry(b"1-0", fields))
    for cause in stops:
        if cause == "cancelled":
            held.stop("cancelled", "user asked", hard=False, signal=signal())
        elif cause == "lease_lost":
            held.stop("lease_lost", "lease lost", hard=False)
        else:
            held.stop("shutdown", "", hard=False)
    return held


def raw(doc: dict[str, Any]) -> dict[bytes, bytes]:
    """Entry fields holding ``doc`` as the message, bypassing the model's checks."""
    return {MESSAGE_FIELD: orjson.dumps(doc)}


def checked(fields: dict[bytes, bytes], *cancels: CancelSignal) -> Decision | tuple[Job, Any]:
    """Preflight of an entry with ``fields``, with ``cancels`` in the worker's cancel book."""
    book = CancelBook()
    for cancel in cancels:
        book.add(cancel)
    return preflight(delivery(fields), book, MAX_BYTES)


def raised(exc: Exception, *, stops: tuple[str, ...] = (), **fields: Any) -> Decision:
    """The decision after the handler of ``job(**fields)`` raised ``exc``."""
    return after_error(delivery(stops=stops), job(**fields), exc)


@dataclass(frozen=True)
class Row:
    """One rule: what happened, and the decision expected."""

    decide: Callable[[], Decision | tuple[Job, Any]]
    kind: DecisionKind
    reason: DeadLetterReason | None = None
    #: Text the decision's detail must contain.
    detail: str = ""
    #: The retry delay's bounds (jitter draws between half the base and the base).
    delay: tuple[float, float] = (0.0, 0.0)
    signal_id: str | None = None


ENCODED = {MESSAGE_FIELD: encode(job())}
VALID = {"protocol": 1, "kind": "job", "id": "m-1", "role": "work", "created_at_ms": NOW}

TABLE: dict[str, Row] = {
    # -- preflight: before the handler starts -------------------------------------------------
    "entry deleted while pending": Row(
        lambda: checked({}), "dead_letter", "invalid_message", "deleted from the stream"
    ),
    "no message field": Row(
        lambda: checked({b"other": b"x"}), "dead_letter", "invalid_message", "no 'message'"
    ),
    "too large": Row(
        lambda: checked(raw({**VALID, "payload": "x" * MAX_BYTES})), "dead_letter", "too_large"
    ),
    "not JSON": Row(lambda: checked({MESSAGE_FIELD: b"{not json"}), "dead_letter", "invalid_json"),
    "unsupported version": Row(
        lambda: checked(raw({**VALID, "protocol": 2})), "dead_letter", "unsupported_version"
    ),
    "unknown kind": Row(
        lambda: checked(raw({**VALID, "kind": "nope"})), "dead_letter", "unknown_kind"
    ),
    "for another role": Row(
        lambda: checked(raw({**VALID, "role": "other"})), "dead_letter", "wrong_role", "'other'"
    ),
    "cancelled before it started": Row(
        lambda: checked(ENCODED, signal()),
        "cancelled",
        detail="user asked",
        signal_id="sig-message",
    ),
    "its task cancelled before it started": Row(
        lambda: checked({MESSAGE_FIELD: encode(job(task_id="t-1"))}, signal("task", "t-1")),
        "cancelled",
        signal_id="sig-task",
    ),
    "cancel wins over a passed deadline": Row(
        lambda: checked({MESSAGE_FIELD: encode(job(deadline_ms=NOW - 1000))}, signal()),
        "cancelled",
        signal_id="sig-message",
    ),
    "deadline passed": Row(
        lambda: checked({MESSAGE_FIELD: encode(job(deadline_ms=NOW - 1000))}),
        "dead_letter",
        "expired",
        "deadline passed",
    ),
    "payload of the wrong type": Row(
        lambda: checked({MESSAGE_FIELD: encode(job(payload="seven"))}),
        "dead_letter",
        "invalid_payload",
        "payload does not match int",
    ),
    # -- after_error: the handler raised ------------------------------------------------------
    "failed, first attempt: retry after base 2 s": Row(
        lambda: raised(ValueError("boom")), "retry", detail="boom", delay=(1.0, 2.0)
    ),
    "failed, second attempt: base times 3": Row(
        lambda: raised(ValueError("boom"), attempt=2), "retry", delay=(3.0, 6.0)
    ),
    "failed, third attempt: base capped at max_backoff": Row(
        lambda: raised(ValueError("boom"), attempt=3), "retry", delay=(5.0, 10.0)
    ),
    "failed, last attempt: dead letter": Row(
        lambda: raised(ValueError("boom"), attempt=4),
        "dead_letter",
        "failed",
        "attempt 4 of 4 failed: boom",
    ),
    "Retry(delay) overrides the backoff": Row(
        lambda: raised(Retry("later", delay=30.0)), "retry", detail="later", delay=(30.0, 30.0)
    ),
    "Retry past the last attempt: dead letter": Row(
        lambda: raised(Retry("later", delay=30.0), attempt=4), "dead_letter", "failed"
    ),
    "timed out: a failed attempt naming the role's limit": Row(
        lambda: raised(TimeoutError()), "retry", detail="timed out after 2.0s", delay=(1.0, 2.0)
    ),
    "timed out: the node's own limit": Row(
        lambda: raised(TimeoutError(), timeout=0.5),
        "retry",
        detail="timed out after 0.5s",
        delay=(1.0, 2.0),
    ),
    "the node's retry policy overrides the role's": Row(
        lambda: raised(ValueError("boom"), retry=JobRetry(max_attempts=1)),
        "dead_letter",
        "failed",
        "attempt 1 of 1 failed",
    ),
    "Fatal: dead letter at once": Row(
        lambda: raised(Fatal("no such account")), "dead_letter", "fatal", "no such account"
    ),
    "Fatal without a message": Row(lambda: raised(Fatal()), "dead_letter", "fatal", "fatal error"),
    "unusable input batch": Row(
        lambda: raised(InputError("bad batch")), "dead_letter", "invalid_input", "bad batch"
    ),
    "raised while shutting down past the grace: release": Row(
        lambda: raised(ValueError("boom"), stops=("shutdown",)), "release"
    ),
    "raised after a cancel: cancelled, never retried": Row(
        lambda: raised(Fatal("x"), stops=("cancelled",)), "cancelled", signal_id="sig-message"
    ),
    "cancel wins over shutdown": Row(
        lambda: raised(ValueError("boom"), stops=("shutdown", "cancelled")), "cancelled"
    ),
    "raised after its lease was lost: apply nothing": Row(
        lambda: raised(ValueError("boom"), stops=("cancelled", "lease_lost")), "lost"
    ),
    # -- stopped: the handler was stopped from outside ----------------------------------------
    "stopped by shutdown: release, not a failed attempt": Row(
        lambda: stopped(delivery(stops=("shutdown",))), "release"
    ),
    "stopped by a cancel": Row(
        lambda: stopped(delivery(stops=("cancelled",))),
        "cancelled",
        detail="user asked",
        signal_id="sig-message",
    ),
    "stopped by a lost lease": Row(lambda: stopped(delivery(stops=("lease_lost",))), "lost"),
    "lost lease wins over cancel and shutdown": Row(
        lambda: stopped(delivery(stops=("shutdown", "cancelled", "lease_lost"))), "lost"
    ),
}


@pytest.mark.parametrize("row", TABLE.values(), ids=TABLE.keys())
def test_each_situation_gets_its_decision(row: Row) -> None:
    decision = row.decide()
    assert isinstance(decision, Decision), decision
    assert decision.kind == row.kind
    assert decision.reason == row.reason
    assert row.detail in decision.detail
    low, high = row.delay
    assert low <= decision.delay <= high
    if row.signal_id is not None:
        assert decision.signal_id == row.signal_id


def test_a_valid_entry_passes_preflight_with_its_validated_payload() -> None:
    checked_job, payload = checked(ENCODED)  # type: ignore[misc]
    assert checked_job == job()
    assert payload == 7


@pytest.mark.parametrize("decision", [LOST, RELEASE])
def test_lost_and_release_carry_no_job_so_nothing_is_written_for_them(decision: Decision) -> None:
    assert decision.job is None and decision.reason is None and decision.error is None


def test_a_retry_and_a_failure_record_the_error_for_the_dead_letter() -> None:
    for attempt in (1, 4):  # retried, then dead-lettered
        decision = raised(ValueError("boom"), attempt=attempt)
        assert decision.job == job(attempt=attempt)
        assert decision.error is not None
        assert (decision.error.type, decision.error.message) == ("ValueError", "boom")
        assert "ValueError: boom" in (decision.error.traceback or "")
