"""Real `python -m bot` processes sharing a database: SQLite admits one process per file (and
lets a restart in after kill -9); replicas starting together on one PostgreSQL migrate once.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from bot.storage.db import DatabaseInUse, SqliteFileLock, head_revision
from tests.conftest import API_KEY, OPERATOR, TOKEN
from tests.fakes.pilot_status import FakePilotStatus
from tests.fakes.telegram import FakeTelegram
from tests.processes import BotProcess, run_bot_process

REFUSED = re.compile(
    r"callbot cannot start: another callbot process uses the SQLite database "
    r"(?P<path>\S+) \(pid (?P<pid>\d+)\); run one process per SQLite file, "
    r"or use PostgreSQL \(DATABASE_URL\) for several replicas"
)


Launch = Callable[..., Awaitable[BotProcess]]


@pytest.fixture
async def launch(
    tmp_path: Path, telegram: FakeTelegram, pilot: FakePilotStatus
) -> AsyncIterator[Launch]:
    """Run `python -m bot [args]` in tmp_path, on the .env an admin would write."""
    processes: list[BotProcess] = []

    async def start(*args: str, database_url: str | None = None, more: str = "") -> BotProcess:
        env_file = (
            f"BOT_TOKEN={TOKEN}\n"
            f"TELEGRAM_API_URL={telegram.url}\n"
            f"PILOT_STATUS_API_KEY={API_KEY}\n"
            f"PILOT_STATUS_BASE_URL={pilot.url}\n"
            "PILOT_STATUS_NUMBER_TYPE=web\n"
            f"OPERATOR_IDS={OPERATOR}\n"
            "WEB_PORT=0\n"
            "SPEECH_ENGINE=no-such-tts\n"
            + (f"DATABASE_URL={database_url}\n" if database_url else "")
            + more
        )
        started = await run_bot_process(tmp_path, env_file, *args)
        processes.append(started)
        return started

    yield start
    for process in processes:
        if process.process.returncode is None:
            process.process.kill()
            await process.exited()


async def test_a_second_process_on_the_same_sqlite_file_is_refused_with_one_clear_line(
    launch: Launch, tmp_path: Path
) -> None:
    first = await launch()
    await first.started(timeout=30)
    for args in ((), ("migrate",)):
        second = await launch(*args)
        assert await second.exited() == 1
        refusals = [line for line in second.log if REFUSED.search(line)]
        assert len(refusals) == 1, second.text
        found = REFUSED.search(refusals[0])
        assert found is not None
        assert found["pid"] == str(first.process.pid)
        assert Path(found["path"]) == (tmp_path / "data" / "callbot.db").resolve()
        assert "Traceback" not in second.text
    assert first.process.returncode is None  # the first one runs on, untouched


async def test_after_kill_9_a_new_process_on_the_same_sqlite_file_starts(launch: Launch) -> None:
    first = await launch()
    await first.started(timeout=30)
    first.process.send_signal(signal.SIGKILL)
    assert await first.exited() == -signal.SIGKILL
    again = await launch()
    await again.started(timeout=30)
    assert not REFUSED.search(again.text)
    third = await launch()  # the new one holds the file now, as the first did
    assert await third.exited() == 1
    found = REFUSED.search(third.text)
    assert found is not None and found["pid"] == str(again.process.pid), third.text


@pytest.mark.postgresql
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_three_replicas_starting_together_on_a_fresh_postgresql_migrate_once(
    launch: Launch, db_url: str
) -> None:
    replicas = await asyncio.gather(*(launch(database_url=db_url) for _ in range(3)))
    await asyncio.gather(*(replica.started(timeout=30) for replica in replicas))
    for replica in replicas:
        assert replica.process.returncode is None
        # Three pollers on one bot token: Telegram's Conflict is expected here (webhook mode
        # is how replicas share a token); any other error (a failed DDL) is not.
        errors = [
            line
            for line in replica.log
            if (" ERROR " in line or "Traceback" in line) and "TelegramConflictError" not in line
        ]
        assert errors == [], replica.text
    upgraded = [replica for replica in replicas if "Running upgrade" in replica.text]
    assert len(upgraded) == 1, [replica.text for replica in replicas]
    plain = make_url(db_url).set(drivername="postgresql").render_as_string(hide_password=False)
    connection = await asyncpg.connect(plain)
    try:
        versions = await connection.fetch("SELECT version_num FROM alembic_version")
    finally:
        await connection.close()
    assert [row["version_num"] for row in versions] == [head_revision()]


@pytest.mark.postgresql
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_three_replicas_starting_together_load_one_oncall_file_without_clashing(
    launch: Launch, db_url: str, tmp_path: Path
) -> None:
    contacts = "".join(f'c{n} = "+55119700{n:05d}"\n' for n in range(40))
    members = ", ".join(f'"c{n}"' for n in range(40))
    oncall = tmp_path / "oncall.toml"
    oncall.write_text(
        f'[contacts]\n{contacts}[teams.infra]\nchat_id = -100123\ntoken = "{"t" * 32}"\n'
        f"members = [{members}]\n"
    )
    replicas = await asyncio.gather(
        *(launch(database_url=db_url, more=f"ONCALL_FILE={oncall}\n") for _ in range(3))
    )
    await asyncio.gather(*(replica.started(timeout=30) for replica in replicas))
    for replica in replicas:
        assert "on-call file loaded: 40 contacts, 1 teams" in replica.text, replica.text
    plain = make_url(db_url).set(drivername="postgresql").render_as_string(hide_password=False)
    connection = await asyncpg.connect(plain)
    try:
        count = await connection.fetchval("SELECT count(*) FROM contacts")
    finally:
        await connection.close()
    assert count == 40


def test_the_lock_file_names_the_holder(tmp_path: Path) -> None:
    """What a second process reports as the holder's pid is what the first wrote."""
    database = tmp_path / "callbot.db"
    first, second = SqliteFileLock(database), SqliteFileLock(database)
    first.acquire()
    with pytest.raises(DatabaseInUse) as refused:
        second.acquire()
    assert refused.value.pid == str(os.getpid())
    first.release()
    second.acquire()  # released: the next one gets it
    second.release()
