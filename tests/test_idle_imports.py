"""What a started bot leaves out of its memory: libraries only some settings need."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

STARTED = """
import asyncio, sys
from bot.app import CallbotApp
from bot.config import load_settings
from bot.shared.redis import redis_error

async def main():
    settings = load_settings(
        _env_file=None,
        bot_token="123456:" + "A" * 35,
        telegram_api_url="http://127.0.0.1:9",
        pilot_status_api_key="ps_" + "a" * 48,
        pilot_status_base_url="http://127.0.0.1:9",
        pilot_status_number_type="web",
        operator_ids="111",
        data_dir=sys.argv[1],
        web_host="127.0.0.1",
        web_port=0,
    )
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
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert out.stdout.split() == ["False", "False", "passed", "True"]
