"""Unit tests of the wire protocol (no Redis)."""

from __future__ import annotations

import orjson
import pytest
from pydantic import ValidationError

from streamflow.errors import ProtocolError
from streamflow.protocol import MESSAGE_FIELD, Job, decode_job, encode, encode_job_fields

GOOD = {
    "protocol": 1,
    "kind": "job",
    "id": "3f2c",
    "role": "echo",
    "payload": {"text": "hi"},
    "attempt": 1,
    "created_at_ms": 1_700_000_000_000,
}


def fields(doc: object) -> dict[bytes, bytes]:
    return {MESSAGE_FIELD: orjson.dumps(doc)}


def test_fast_encoder_and_model_agree() -> None:
    raw = encode_job_fields(
        message_id="m1",
        role="echo",
        payload=[1, "x"],
        created_at_ms=5,
        deadline_ms=9,
        task_id="t1",
        node_id="n1",
        dedup_key="k",
    )
    job = decode_job({MESSAGE_FIELD: raw})
    assert job == Job(
        protocol=1,
        kind="job",
        id="m1",
        role="echo",
        payload=[1, "x"],
        created_at_ms=5,
        deadline_ms=9,
        task_id="t1",
        node_id="n1",
        dedup_key="k",
    )
    assert orjson.loads(encode(job)) == orjson.loads(raw)


def test_minimal_raw_document_decodes_with_defaults() -> None:
    job = decode_job(fields({k: v for k, v in GOOD.items() if k != "attempt"}))
    assert job.attempt == 1 and job.deadline_ms is None and job.payload == {"text": "hi"}


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ({MESSAGE_FIELD: b"{not json"}, "invalid_json"),
        ({MESSAGE_FIELD: b"\xff\xfe"}, "invalid_json"),
        ({MESSAGE_FIELD: b"[1, 2]"}, "invalid_message"),
        ({b"other": b"{}"}, "invalid_message"),
        (fields({**GOOD, "protocol": 2}), "unsupported_version"),
        (fields({k: v for k, v in GOOD.items() if k != "protocol"}), "unsupported_version"),
        (fields({**GOOD, "protocol": True}), "unsupported_version"),
        (fields({**GOOD, "protocol": 1.0}), "unsupported_version"),
        (fields({**GOOD, "protocol": "1"}), "unsupported_version"),
        (fields({**GOOD, "protocol": None}), "unsupported_version"),
        (fields({**GOOD, "kind": "signal"}), "unknown_kind"),
        (fields({**GOOD, "extra": 1}), "invalid_message"),
        (fields({**GOOD, "attempt": "1"}), "invalid_message"),
        (fields({**GOOD, "attempt": 0}), "invalid_message"),
        (fields({**GOOD, "role": "bad:role"}), "invalid_message"),
        (fields({**GOOD, "id": ""}), "invalid_message"),
        ({MESSAGE_FIELD: b" " * 2048}, "too_large"),
    ],
)
def test_every_malformed_entry_gets_its_reason(raw: dict[bytes, bytes], reason: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_job(raw, max_bytes=1024)
    assert info.value.reason == reason
    assert info.value.detail


def test_models_are_frozen_and_reject_extra_fields() -> None:
    job = Job(protocol=1, kind="job", id="a", role="r", created_at_ms=0)
    with pytest.raises(ValidationError):
        job.attempt = 2  # type: ignore[misc]
    with pytest.raises(ValidationError):
        Job(protocol=1, kind="job", id="a", role="r", created_at_ms=0, colour="red")  # type: ignore[call-arg]
