"""Log output: plain text for people, or one JSON object per line for log pipelines.

Log lines about a message carry its ids as record attributes (``role``, ``message_id``,
``task_id``, ``node_id``, ``attempt``, ``entry_id``): :func:`message_fields` builds them for
``logger.info(..., extra=...)``. Payloads are never logged; URLs are logged redacted.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

#: Record attributes copied into JSON lines when a log call set them.
FIELDS = ("role", "message_id", "task_id", "node_id", "attempt", "entry_id", "consumer")


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
    """One JSON object per line: time, level, logger, message, the message fields, error."""

    def format(self, record: logging.LogRecord) -> str:
        """Format ``record`` as one line of JSON."""
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                doc[name] = value
        if record.exc_info:
            doc["error"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


def configure(level: str, fmt: str) -> None:
    """Send streamflow's logs to stderr as ``text`` or ``json`` at ``level``."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
