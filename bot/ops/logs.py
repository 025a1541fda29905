"""Logging as `python -m bot` sets it up: LOG_LEVEL for the bot, quieter libraries.

Whatever the level, no full phone number or note is logged: the bot's own lines mask numbers,
SQL is logged without its parameters (bot/storage/db.py; aiosqlite, which logs them, only from
INFO), and httpx, whose INFO lines carry full URLs (permission probes send the number in the
query), logs only warnings.

LOG_FORMAT=json writes one JSON object per line (time, level, logger, message, instance, and
exc_info when there is a traceback), for replicas whose logs are collected together.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, with a closed set of keys: `extra=` attributes never leak in."""

    def __init__(self, instance: str) -> None:
        super().__init__()
        self.instance = instance

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "instance": self.instance,
        }
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(line)  # ASCII escapes keep newlines and any text inside the line


def configure(level: str, log_format: str = "text", instance: str = "") -> None:
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter(instance))
        logging.captureWarnings(True)  # a warning is a log line too, not bare text on stderr
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
    logging.getLogger().setLevel(level)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # aiosqlite logs each statement it runs at DEBUG, with its parameters.
    logging.getLogger("aiosqlite").setLevel(logging.INFO)
    # aioice logs every ICE check of every Meta call at INFO (addresses, states): noise.
    noisy = logging.NOTSET if level == "DEBUG" else logging.WARNING
    for name in ("aioice", "aiortc"):
        logging.getLogger(name).setLevel(noisy)
