"""Shared test bed: loopback fakes of Telegram and Pilot Status, and the real bot between them."""

from __future__ import annotations

import asyncio
import shutil
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiogram import Dispatcher
from aiogram.client.session.aiohttp import AiohttpSession

from bot.app import CallbotApp
from bot.config import Settings, load_settings
from bot.storage.db import create_engine, database_url, migrate
from tests.fakes.pilot_status import FakePilotStatus
from tests.fakes.telegram import FakeTelegram

pytest_plugins = ["tests.db_fixtures", "tests.redis_fixtures"]

TOKEN = "123456:" + "A" * 35
API_KEY = "ps_" + "a" * 48
OPERATOR = 111
ADMIN = 222
STRANGER = 333
GROUP = -100500
WEBHOOK_SECRET = "webhook-secret_" + "s" * 20
WEBHOOK_PATH = "/telegram/webhook"


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
        "stun_servers": "none",  # loopback only
        "web_host": "127.0.0.1",
        "web_port": 0,  # any free port
        # Telegram's send limits off: the fake does not enforce them unless a test asks
        # (tests/test_telegram_limits.py turns both on)
        "telegram_sends_per_second": 0,
        "telegram_group_sends_per_minute": 0,
        "telegram_chat_sends_per_second": 0,
    }
    return load_settings(**(values | overrides))


@dataclass
class RunningBot:
    app: CallbotApp
    telegram: FakeTelegram
    pilot: FakePilotStatus

    @property
    def settings(self) -> Settings:
        return self.app.settings

    @property
    def dp(self) -> Dispatcher:
        return self.app.dp

    task: asyncio.Task[None] | None = None

    @property
    def webhook_url(self) -> str:
        """Webhook mode: where Telegram delivers this bot's updates."""
        return str(self.settings.telegram_webhook_url)

    async def stop(self) -> None:
        """Stop polling (or, in webhook mode, drain) and close everything, once."""
        if self.task is None:
            return
        task, self.task = self.task, None
        if self.settings.webhook_mode:
            self.app.stop()
        else:
            await self.app.dp.stop_polling()
        await asyncio.wait_for(task, 10)
        await self.app.close()

    async def crash(self) -> None:
        """Die like a killed process: in-flight updates are cancelled, not finished."""
        for task in asyncio.all_tasks():
            if "_process_update" in task.get_coro().__qualname__:  # type: ignore[union-attr]
                task.cancel()
        await asyncio.sleep(0)
        await self.stop()


StartBot = Callable[..., Awaitable[RunningBot]]


@pytest.fixture(scope="session")
def migrated_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DATA_DIR whose SQLite database is migrated to head, once per run: `start_bot` gives each
    bot a copy (the app then finds its schema at head and leaves it). Migrations on a fresh
    database are the process tests' to run (tests/test_e2e_process.py, tests/test_config.py,
    tests/test_startup_locks.py) and tests/test_store.py's."""
    folder = tmp_path_factory.mktemp("migrated")

    async def build() -> None:
        engine = create_engine(database_url(None, folder))
        try:
            await migrate(engine)
        finally:
            await engine.dispose()

    with ThreadPoolExecutor(1) as thread:  # a loop of its own, outside pytest-asyncio's
        thread.submit(lambda: asyncio.run(build())).result()
    assert [p.name for p in folder.iterdir()] == ["callbot.db"], "closed: no WAL left to copy"
    return folder


@pytest.fixture
async def start_bot(
    telegram: FakeTelegram, pilot: FakePilotStatus, tmp_path: Path, migrated_data_dir: Path
) -> AsyncIterator[StartBot]:
    """Build the bot the way `python -m bot` does and run it against the fakes (long polling)."""
    running: list[RunningBot] = []

    async def start(
        data: dict[str, Any] | None = None, *, webhook: bool = False, **overrides: Any
    ) -> RunningBot:
        """`overrides` are settings; `data` replaces dispatcher dependencies before polling.

        `webhook=True`: webhook mode (TELEGRAM_WEBHOOK_URL on a free loopback port, with
        WEBHOOK_SECRET); the fake Telegram then delivers updates to it, nothing polls."""
        if webhook:
            port = free_port()
            overrides.setdefault("web_port", port)
            overrides.setdefault("telegram_webhook_url", f"http://127.0.0.1:{port}{WEBHOOK_PATH}")
            overrides.setdefault("telegram_webhook_secret", WEBHOOK_SECRET)
        overrides.setdefault("data_dir", str(tmp_path / f"data{len(running)}"))
        database = Path(overrides["data_dir"]) / "callbot.db"
        if overrides.get("database_url") is None and not database.exists():
            database.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(migrated_data_dir / "callbot.db", database)
        overrides.setdefault("telegram_edit_interval", 0.05)
        overrides.setdefault("call_poll_interval", 0.05)
        settings = settings_for(telegram, pilot, **overrides)
        app = CallbotApp(settings)
        close_without_tls_grace(app.bot.session)
        app.dp.workflow_data.update(data or {})
        started = asyncio.Event()
        app.dp.startup.register(started.set)
        await app.start()
        if settings.webhook_mode:
            task = asyncio.create_task(app.run_webhook(handle_signals=False))
        else:
            task = asyncio.create_task(app.run_polling(handle_signals=False, polling_timeout=1))
        await asyncio.wait_for(started.wait(), 10)
        harness = RunningBot(app, telegram, pilot, task)
        running.append(harness)
        return harness

    yield start
    for harness in running:
        await harness.stop()


def close_without_tls_grace(session: AiohttpSession) -> None:
    """aiogram waits 250 ms after closing its aiohttp session, for TLS connections to finish
    closing (aiohttp's graceful-shutdown advice). The fake Telegram speaks plain HTTP: nothing to
    wait for, and it was a quarter of a second of every test's teardown. The session itself is
    closed as before (an unclosed one is a warning, and the warnings are errors)."""

    async def close() -> None:
        if session._session is not None and not session._session.closed:
            await session._session.close()

    session.close = close  # type: ignore[method-assign]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
