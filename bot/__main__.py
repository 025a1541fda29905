"""`python -m bot`: validate the configuration, then run the bot (long polling, or webhook mode
when TELEGRAM_WEBHOOK_URL is set).

`python -m bot migrate` only brings the database schema up to date.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys

from bot.app import StartupError, migrate_only, run
from bot.config import ConfigError, load_settings
from bot.ops import logs


def main() -> int:
    try:
        settings = load_settings()
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format, settings.instance_name)
    try:
        if sys.argv[1:] == ["migrate"]:
            asyncio.run(migrate_only(settings))
            logging.getLogger("callbot").info("database schema is up to date")
            return 0
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run(settings))
    except StartupError as err:
        logging.getLogger("callbot").error("%s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
