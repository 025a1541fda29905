"""`python -m bot`: validate the configuration, then run the bot (long polling, or webhook mode
when TELEGRAM_WEBHOOK_URL is set).

`python -m bot migrate` only brings the database schema up to date.

A bad configuration is reported before the app's imports (about three seconds of building
aiogram's ~300 pydantic models); those run with the cyclic garbage collector off, and what they
built, which lives as long as the process, is frozen out of every later collection (each full one
walked it all: a pause of about 0.2 s). Frozen again at exit, it is not walked once more on the
way out either: a restart is about a second shorter.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sys

from bot.config import ConfigError, load_settings
from bot.ops import logs


def main() -> int:
    try:
        settings = load_settings()
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format, settings.instance_name)
    gc.disable()
    from bot.app import StartupError, migrate_only, run

    gc.freeze()
    gc.enable()
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
    code = main()
    gc.freeze()  # everything is closed: the interpreter's teardown need not walk it for cycles
    sys.exit(code)
