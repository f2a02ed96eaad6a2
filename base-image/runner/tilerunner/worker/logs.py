"""Short lines for the worker's reasons and logs, and its log formatters (JSON or text).

Whatever a job holds (a 3 MB field, newlines), a reason in a result or a dead letter stays one
line of about REASON_LIMIT characters and a log field at most LOG_FIELD_LIMIT.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

REASON_LIMIT = 1000  # characters of a reason in a result, a dead letter, a log line
LOG_FIELD_LIMIT = 4000  # characters of any one log message or field


def one_line(text: object, limit: int = REASON_LIMIT) -> str:
    """`text` on one line and at most about `limit` characters (says how long it was)."""
    raw = str(text)
    flat = " ".join(raw[: 4 * limit].split())
    if len(flat) > limit or len(raw) > 4 * limit:
        return f"{flat[:limit]}... ({len(raw)} characters, cut)"
    return flat


def line_of(exc: BaseException, limit: int = REASON_LIMIT) -> str:
    """An exception's message as one_line, or its class name when it has none."""
    return one_line(exc, limit) or type(exc).__name__


def cap(value: str, limit: int = LOG_FIELD_LIMIT) -> str:
    """`value` cut at `limit` characters (a log line stays short, whatever a job holds)."""
    if len(value) > limit:
        return f"{value[:limit]}... ({len(value)} characters, cut)"
    return value


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: ts, level, msg, and the event fields given in `extra`."""

    FIELDS = ("event", "job_id", "attempt", "queue", "reason")

    def format(self, record: logging.LogRecord) -> str:
        """The record as one JSON line, every field capped."""
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "msg": cap(record.getMessage()),
        }
        for key in self.FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                doc[key] = cap(value) if isinstance(value, str) else value
        if record.exc_info:
            doc["exc"] = cap(self.formatException(record.exc_info), 4 * LOG_FIELD_LIMIT)
        return json.dumps(doc, default=str)


class TextLogFormatter(logging.Formatter):
    """`tilerunner: message`, the message cut at LOG_FIELD_LIMIT characters."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as `tilerunner: message` (and a capped traceback)."""
        text = "tilerunner: " + cap(record.getMessage())
        if record.exc_info:
            text += "\n" + cap(self.formatException(record.exc_info), 4 * LOG_FIELD_LIMIT)
        return text
