"""Unit tests of the wire records, their entry fields and the JSON Schemas (no Redis)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import streamflow
from streamflow.protocol import encode
from streamflow.records import (
    CONTROL_SUBMITTED,
    ENTRY_FIELDS,
    RAW_FIELD_PREFIX,
    DeadLetter,
    decode_dead_letter,
    json_schemas,
)


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
    assert set(schemas) == {
        "job",
        "dead_letter",
        "cancel",
        "event",
        "result",
        "lifecycle",
        "lifecycle_jobs",
    }
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
        if path.name in ("protocol.py", "records.py"):  # where they are defined
            continue
        if "dashboard" in path.parts:  # HTTP headers and HMAC labels, not Redis entry fields
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            value = node.value if isinstance(node, ast.Constant) else None
            if isinstance(value, bytes) and re.fullmatch(rb"[a-z_]+:?", value):
                seen.add(value)
                known = value in allowed or (path.name, value) in NOT_FIELDS
                assert known, f"{path.relative_to(PACKAGE)} spells {value!r}: use protocol's"
    assert b"qc" in seen  # the scan reached hostile.py, so it reads the package
