"""The hub's log lines: plain text for a person at a terminal, or one JSON object per line
(`deparrow hub --log-format json`) for a log shipper (docs/operations.md).

A JSON line has ts (UTC, ISO 8601 with milliseconds), level, logger and msg, then `job` and
`node` where the log call passed them (`log.info(..., extra={"job": j, "node": n})`), and `exc`
with the traceback of a logged exception.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import TextIO

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"

# Fields a log call may add through `extra`, copied into the JSON line when present.
CONTEXT_FIELDS = ("job", "node", "user", "agent")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        return json.dumps(line, default=str, ensure_ascii=False)


def setup(log_format: str, level: int, stream: TextIO | None = None) -> None:
    """Configure the root logger once, for the whole process (the CLI calls this)."""
    if log_format not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {log_format!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
