"""What a started bot leaves out of its memory: libraries only some settings need."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

STARTED = """
import asyncio, sys
from bot.app import CallbotApp
from tests.idle import idle_settings
from bot.shared.redis import redis_error

async def main():
    settings = idle_settings(sys.argv[1])
    app = CallbotApp(settings)
    await app.start()
    try:
        print("redis" in sys.modules, "cryptography" in sys.modules)
        try:
            raise ValueError("not a Redis error")
        except redis_error():
            print("caught")
        except ValueError:
            print("passed")
    finally:
        await app.close()
    from redis.exceptions import RedisError
    print(redis_error() is RedisError)

asyncio.run(main())
"""


def test_without_redis_url_a_started_bot_never_imports_redis(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", STARTED, str(tmp_path)],
        cwd=Path(__file__).resolve().parents[1],  # where `tests` is importable
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert out.stdout.split() == ["False", "False", "passed", "True"]
