"""The settings of a bot that starts and idles: no peer it could reach, its web app on a free
port (tests/test_idle_imports.py and bench/bench_memory.py start one in a process of its own)."""

from __future__ import annotations

from bot.config import Settings, load_settings


def idle_settings(data_dir: str) -> Settings:
    return load_settings(
        _env_file=None,
        bot_token="123456:" + "A" * 35,
        telegram_api_url="http://127.0.0.1:9",
        pilot_status_api_key="ps_" + "a" * 48,
        pilot_status_base_url="http://127.0.0.1:9",
        pilot_status_number_type="web",
        operator_ids="111",
        data_dir=data_dir,
        web_host="127.0.0.1",
        web_port=0,
    )
