r"""Log output: plain text for people, or one JSON object per line for log pipelines.

Log lines about a message carry its ids as record attributes (``role``, ``message_id``,
``task_id``, ``node_id``, ``attempt``, ``entry_id``): :func:`message_fields` builds them for
``logger.info(..., extra=...)``; a handler's ``ctx.log`` sets them on every line it writes.
Both formats show them: JSON as fields, text as ``[role=... message_id=... attempt=...]`` after
the message. Payloads are never logged; URLs are logged redacted.

Text from outside (handler exception texts, names and fields read back from Redis) can hold
control characters (``\r``, ``\n``, ANSI escapes) and bidi or other format characters that
forge log lines or rewrite a terminal. :func:`printable` escapes them; the text formatter
applies it to every message and traceback line, and the CLI to every value it prints.
:func:`shown` also bounds the echo of rejected input.
"""

from __future__ import annotations

import logging
import sys
import warnings
from datetime import UTC, datetime
from typing import Any

import click
import orjson

from streamflow.errors import StreamflowWarning

#: The most characters of rejected input echoed in an error or a log line.
MAX_ECHO = 200
#: Marks where :func:`printable` cut a text.
ELISION = "…"
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


class BadKeys:
    """Keys of another type (or unreadable) met while reading, by kind: warned of and counted.

    Anyone with a worker's or publisher's rights may write another type of key at one of the
    namespace's names. A reader goes on without what the key holds, warns once and counts once
    per key, until the key reads again (:meth:`ok`).
    """

    def __init__(self, log: logging.Logger | None = None) -> None:
        self.counts: dict[str, int] = {}
        self._unreadable: set[str] = set()
        self._log = log or logging.getLogger("streamflow")

    def ok(self, key: str) -> None:
        """``key`` read as expected: a later problem with it is warned of again."""
        self._unreadable.discard(key)

    def bad(self, kind: str, key: str, message: str, *args: object) -> None:
        """``key`` could not be read: warn (``message % args``) and count, once until :meth:`ok`."""
        if key in self._unreadable:
            return
        self._unreadable.add(key)
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self._log.warning(message, *args)

    def seen(self, kind: str, key: str, problem: str | None) -> None:
        """Record a read of ``key``: ``problem`` is why it could not be read, or None."""
        if problem is None:
            self.ok(key)
        else:
            self.bad(kind, key, "registry key %s: %s", key, problem)


def _escape(char: str) -> str:
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(text: str, limit: int | None = None) -> str:
    r"""``text`` safe to put in one log line or terminal line.

    Every character that is not printable (C0 and C1 controls such as ``\r``, ``\n`` and
    ESC; format characters such as the bidi overrides U+202A-U+202E and isolates
    U+2066-U+2069; line and paragraph separators; unassigned code points) is written as a
    Python-style escape (``\n``, ``\x1b``, ``\u202e``).

    Args:
        text: Any text.
        limit: If given, the result is cut to at most this many characters plus
            :data:`ELISION`.
    """
    cut = limit is not None and len(text) > limit
    if cut:
        text = text[:limit]
    if not text.isprintable():
        text = "".join(c if c.isprintable() else _escape(c) for c in text)
    if limit is not None and len(text) > limit:
        text, cut = text[:limit], True
    return text + ELISION if cut else text


def shown(value: object, limit: int = MAX_ECHO) -> str:
    """``value`` (``str()`` of it) escaped by :func:`printable` and bounded to ``limit`` chars."""
    return printable(value if isinstance(value, str) else str(value), limit)


def terminal(text: str) -> str:
    r"""``text`` safe to print on a terminal, line breaks kept (for what the CLI composed).

    Every other character that is not printable is written as ``\uXXXX`` (a surrogate pair
    past U+FFFF): a valid JSON escape, so JSON output stays JSON. Values that must not add
    lines of their own go through :func:`printable` or :func:`shown` first.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == "\n" else _json_escape(c) for c in text)


def _json_escape(char: str) -> str:
    code = ord(char)
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def echo(message: str = "", *, err: bool = False) -> None:
    """``click.echo`` of ``message`` made safe by :func:`terminal` (every CLI output)."""
    click.echo(terminal(message), err=err)


#: Record attributes copied into JSON lines when a log call set them.
FIELDS = ("role", "message_id", "task_id", "node_id", "attempt", "entry_id", "consumer")
#: The ids of the OpenTelemetry span active where the line was logged, if any.
TRACE_FIELDS = ("trace_id", "span_id")


def trace_ids() -> tuple[str, str] | None:
    """The trace and span ids (hex) of the active OpenTelemetry span; None without one.

    Free when OpenTelemetry is not in use: it is only read if something imported it (this
    module never does, so that logging needs no extra).
    """
    api = sys.modules.get("opentelemetry.trace")
    if api is None:
        return None
    span = api.get_current_span().get_span_context()
    if not span.is_valid:
        return None
    return format(span.trace_id, "032x"), format(span.span_id, "016x")


def _fields(record: logging.LogRecord) -> list[tuple[str, Any]]:
    """The message fields ``record`` carries, then its trace ids (the active span's)."""
    fields = [
        (name, value) for name in FIELDS if (value := getattr(record, name, None)) is not None
    ]
    ids = getattr(record, "trace_id", None), getattr(record, "span_id", None)
    if ids[0] is None:
        # Read while the record is formatted: in the thread (and context) that logged it,
        # unless a queue handler moved it; set trace_id/span_id on the record to override.
        ids = trace_ids() or ids
    fields.extend((name, value) for name, value in zip(TRACE_FIELDS, ids, strict=True) if value)
    return fields


def message_fields(
    role: str,
    *,
    message_id: str | None = None,
    task_id: str | None = None,
    node_id: str | None = None,
    attempt: int | None = None,
    entry_id: str | None = None,
) -> dict[str, Any]:
    """The ``extra`` of a log call about one message (None values left out)."""
    fields = {
        "role": role,
        "message_id": message_id,
        "task_id": task_id,
        "node_id": node_id,
        "attempt": attempt,
        "entry_id": entry_id,
    }
    return {name: value for name, value in fields.items() if value is not None}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the message fields, error.

    The message fields include the active OpenTelemetry span's ``trace_id`` and ``span_id``.
    """

    def format(self, record: logging.LogRecord) -> str:
        """Format ``record`` as one line of JSON."""
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        doc.update(_fields(record))
        if record.exc_info:
            doc["error"] = self.formatException(record.exc_info)
        # orjson escapes C0 controls; bidi, C1 and other non-printable characters it leaves
        # raw, and they rewrite a terminal that shows the line: \uXXXX keeps it JSON.
        return terminal(orjson.dumps(doc, default=str).decode())


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message [role=... message_id=...]``; outside text cannot forge a line.

    The message fields the record carries (:data:`FIELDS`), then the active span's
    ``trace_id`` and ``span_id`` (:data:`TRACE_FIELDS`), follow the message in brackets. The
    message and every field are escaped by :func:`printable`; a traceback keeps its lines, each
    escaped and indented, so that no line of it can pass for a log record of its own.
    """

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        """Format the record's line with its message escaped."""
        record.message = printable(record.message)
        line = super().formatMessage(record)
        fields = [f"{name}={shown(value)}" for name, value in _fields(record)]
        return f"{line} [{' '.join(fields)}]" if fields else line

    def formatException(self, ei: Any) -> str:
        """The traceback, every line escaped and indented."""
        lines = super().formatException(ei).split("\n")
        return "\n".join("    " + printable(line) for line in lines)

    def formatStack(self, stack_info: str) -> str:
        """The stack, every line escaped and indented."""
        return "\n".join("    " + printable(line) for line in stack_info.split("\n"))


def configure(level: str, fmt: str) -> None:
    """Send streamflow's logs to stderr as ``text`` or ``json`` at ``level``."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    warnings.showwarning = _show_warning


_default_showwarning = warnings.showwarning


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """Show streamflow's warnings as one ``warning:`` line on stderr (no source location)."""
    if issubclass(category, StreamflowWarning):
        echo(f"warning: {message}", err=True)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)
