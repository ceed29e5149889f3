"""Unit tests of the wire protocol (no Redis)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import orjson
import pytest
from pydantic import ValidationError

import streamflow
from streamflow.errors import ProtocolError
from streamflow.protocol import (
    CONTROL_SUBMITTED,
    ENTRY_FIELDS,
    MESSAGE_FIELD,
    RAW_FIELD_PREFIX,
    DeadLetter,
    Job,
    decode_dead_letter,
    decode_job,
    encode,
    encode_job_fields,
    json_schemas,
)

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


def test_dead_letter_round_trip_keeps_raw_fields() -> None:
    letter = DeadLetter(
        protocol=1,
        kind="dead_letter",
        reason="invalid_json",
        detail="bad",
        role="r",
        entry_id="1-0",
        consumer="c",
        dead_at_ms=1,
    )
    decoded, raw = decode_dead_letter(
        {b"dead_letter": encode(letter), b"raw:message": b"\xff{", b"raw:x": b"y"}
    )
    assert decoded == letter
    assert raw == {"message": b"\xff{", "x": b"y"}


def test_schema_lists_every_kind() -> None:
    schemas = json_schemas()
    assert set(schemas) == {"job", "dead_letter", "cancel", "event", "result", "lifecycle"}
    assert schemas["job"]["additionalProperties"] is False
    assert schemas["job"]["properties"]["protocol"]["const"] == 1
    assert {"protocol", "kind", "id", "role"} <= set(schemas["job"]["required"])
    assert {"id", "role", "payload", "created_at_ms"} <= set(schemas["job"]["properties"])


PACKAGE = Path(streamflow.__file__).parent
#: One ``redis.call('XADD', ...)`` or ``pcall`` of a Lua script: its arguments.
XADD = re.compile(r"redis\.p?call\('XADD',([^)]*)\)")


def lua_entry_fields() -> dict[str, list[str]]:
    """The field names each Lua script spells literally in the entries it adds."""
    found: dict[str, list[str]] = {}
    for path in sorted((PACKAGE / "lua").glob("*.lua")):
        for call in XADD.findall(path.read_text()):
            args = [arg.strip() for arg in call.split(",")]
            assert "'*'" in args, f"{path.name}: an XADD with an explicit id: {call}"
            # After the id come field, value pairs; a field may come from ARGV (not checked).
            names = args[args.index("'*'") + 1 :: 2]
            found.setdefault(path.name, []).extend(n[1:-1] for n in names if n.startswith("'"))
    return found


def test_every_entry_field_a_lua_script_spells_is_a_protocol_constant() -> None:
    found = lua_entry_fields()
    assert {"publish_many.lua", "cancel.lua", "emit.lua"} <= set(found)  # the parser found them
    for script, names in found.items():
        for name in names:
            assert name.encode() in ENTRY_FIELDS, f"{script} writes field {name!r}"


#: Short lowercase byte strings of the package that name no entry field, by module.
NOT_FIELDS = {("hostile.py", b"b"), ("hostile.py", b"qc"), ("hostile.py", b"qw")}


def test_every_entry_field_a_module_spells_is_a_protocol_constant() -> None:
    allowed = ENTRY_FIELDS | {RAW_FIELD_PREFIX, CONTROL_SUBMITTED}
    seen = set()
    for path in PACKAGE.rglob("*.py"):
        if path.name == "protocol.py":  # where they are defined
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            value = node.value if isinstance(node, ast.Constant) else None
            if isinstance(value, bytes) and re.fullmatch(rb"[a-z_]+:?", value):
                seen.add(value)
                known = value in allowed or (path.name, value) in NOT_FIELDS
                assert known, f"{path.relative_to(PACKAGE)} spells {value!r}: use protocol's"
    assert b"qc" in seen  # the scan reached hostile.py, so it reads the package
