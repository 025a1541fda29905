"""Shared test bed: loopback fakes of Telegram and Pilot Status, and the real bot between them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiogram import Bot, Dispatcher

from bot.app import build_bot, build_dispatcher, build_pilot_client
from bot.config import Settings, load_settings
from bot.pilot_status import PilotStatusClient
from tests.fakes.pilot_status import FakePilotStatus
from tests.fakes.telegram import FakeTelegram

TOKEN = "123456:" + "A" * 35
API_KEY = "ps_" + "a" * 48
OPERATOR = 111
ADMIN = 222
STRANGER = 333
GROUP = -100500


@pytest.fixture
async def pilot() -> AsyncIterator[FakePilotStatus]:
    fake = FakePilotStatus(api_key=API_KEY, number_type="web")
    await fake.start()
    yield fake
    await fake.close()
    assert fake.contract_violations == [], "the client broke the OpenAPI contract"


@pytest.fixture
async def telegram() -> AsyncIterator[FakeTelegram]:
    fake = FakeTelegram(TOKEN)
    await fake.start()
    yield fake
    await fake.close()


def settings_for(telegram: FakeTelegram, pilot: FakePilotStatus, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "_env_file": None,
        "bot_token": TOKEN,
        "telegram_api_url": telegram.url,
        "pilot_status_api_key": API_KEY,
        "pilot_status_base_url": pilot.url,
        "operator_ids": str(OPERATOR),
        "admin_ids": str(ADMIN),
        "pilot_status_retry_backoff": 0.01,
        "pilot_status_read_timeout": 2.0,
    }
    return load_settings(**(values | overrides))


@dataclass
class RunningBot:
    settings: Settings
    bot: Bot
    dp: Dispatcher
    pilot_client: PilotStatusClient
    telegram: FakeTelegram
    pilot: FakePilotStatus


StartBot = Callable[..., Awaitable[RunningBot]]


@pytest.fixture
async def start_bot(telegram: FakeTelegram, pilot: FakePilotStatus) -> AsyncIterator[StartBot]:
    """Build the bot the way `python -m bot` does and run it against the fakes (long polling)."""
    running: list[tuple[RunningBot, asyncio.Task[None]]] = []

    async def start(data: dict[str, Any] | None = None, **overrides: Any) -> RunningBot:
        """`overrides` are settings; `data` replaces dispatcher dependencies before polling."""
        settings = settings_for(telegram, pilot, **overrides)
        client = build_pilot_client(settings)
        bot = build_bot(settings)
        dp = build_dispatcher(settings, client)
        dp.workflow_data.update(data or {})
        started = asyncio.Event()
        dp.startup.register(started.set)
        task = asyncio.create_task(dp.start_polling(bot, handle_signals=False, polling_timeout=1))
        await asyncio.wait_for(started.wait(), 10)
        harness = RunningBot(settings, bot, dp, client, telegram, pilot)
        running.append((harness, task))
        return harness

    yield start
    for harness, task in running:
        await harness.dp.stop_polling()
        await asyncio.wait_for(task, 10)
        await harness.pilot_client.aclose()
        await harness.bot.session.close()
