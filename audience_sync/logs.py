"""Logging set-up: readable lines for people, JSON lines for log shippers."""

from __future__ import annotations

import logging
import sys
import time
from datetime import UTC, datetime
from typing import Literal

import orjson

LogFormat = Literal["text", "json"]


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, and any traceback."""

    def format(self, record: logging.LogRecord) -> str:
        """Render a record as one line of JSON."""
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def setup_logging(level: str, fmt: LogFormat = "text") -> None:
    """Send every library's log records to stderr in one format, times in UTC."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        formatter = logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%SZ"
        )
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)

    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())

    # httpx logs every request URL at INFO; a URL can carry what should stay private.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # APScheduler's lines repeat ours ("Running job", "skipped: maximum number of
    # running instances"); the daemon logs each in its own words.
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
