"""Logging as `python -m bot` sets it up: LOG_LEVEL for the bot, quieter libraries.

Whatever the level, no full phone number or note is logged: the bot's own lines mask numbers,
SQL is logged without its parameters (bot/storage/db.py; aiosqlite, which logs them, only from
INFO), and httpx, whose INFO lines carry full URLs (permission probes send the number in the
query), logs only warnings.
"""

from __future__ import annotations

import logging


def configure(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # aiosqlite logs each statement it runs at DEBUG, with its parameters.
    logging.getLogger("aiosqlite").setLevel(logging.INFO)
    # aioice logs every ICE check of every Meta call at INFO (addresses, states): noise.
    noisy = logging.NOTSET if level == "DEBUG" else logging.WARNING
    for name in ("aioice", "aiortc"):
        logging.getLogger(name).setLevel(noisy)
