"""Log and terminal output: text from outside is escaped and bounded (pure logic, no Redis)."""

from __future__ import annotations

import logging

import orjson
import pytest

from streamflow import logs

HOSTILE = "a\r\nERROR forged\x1b[31m\x9b2J\u202eevil\u2066\u200f\u2028\ufeff\U000e0041 ok"


def test_printable_escapes_every_control_bidi_and_format_character() -> None:
    shown = logs.printable(HOSTILE)
    assert shown.isprintable()
    assert shown == (
        "a\\r\\nERROR forged\\x1b[31m\\x9b2J\\u202eevil\\u2066\\u200f\\u2028\\ufeff\\U000e0041 ok"
    )
    assert (
        logs.printable("plain text, accents é and CJK 漢字") == "plain text, accents é and CJK 漢字"
    )


def test_shown_bounds_an_echo_with_an_elision_mark() -> None:
    assert logs.shown("x" * 10_000) == "x" * logs.MAX_ECHO + logs.ELISION
    assert len(logs.shown("\x1b" * 10_000)) == logs.MAX_ECHO + 1
    assert logs.shown("short") == "short"


def test_terminal_keeps_lines_and_keeps_json_valid() -> None:
    text = orjson.dumps({"detail": HOSTILE}, option=orjson.OPT_INDENT_2).decode()
    safe = logs.terminal(text)
    assert all(line.isprintable() for line in safe.split("\n"))
    assert orjson.loads(safe) == {"detail": HOSTILE}


@pytest.mark.parametrize("formatter", [logs.TextFormatter(), logs.JsonFormatter()])
def test_formatters_never_let_a_record_forge_a_line(formatter: logging.Formatter) -> None:
    try:
        raise ValueError(HOSTILE)
    except ValueError as exc:
        record = logging.LogRecord("t", logging.ERROR, __file__, 1, "failed: %s", (exc,), None)
        record.exc_info = (type(exc), exc, exc.__traceback__)
    out = formatter.format(record)
    lines = out.split("\n")
    assert all(line.isprintable() for line in lines), out
    assert not any(line.startswith("ERROR forged") for line in lines)
    # A traceback's lines are indented: only the record's own line starts at column 0.
    assert all(line.startswith("    ") for line in lines[1:])
