"""SQLite on the event loop's thread (bot/storage/sqlite.py): no thread hop per statement, and
a database locked by another writer is waited for on the loop, not in SQLite's busy handler."""

from __future__ import annotations

import asyncio
import gc
import json
import threading
import weakref
from pathlib import Path
from typing import Any

import pytest
from aiogram import Bot
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.methods import SendMessage
from sqlalchemy import text

from bot.shared.tasks import stop_all
from bot.storage.db import create_engine, sessionmaker
from bot.telegram.middlewares import KeepResponseModels

TOKEN = "123456:" + "A" * 35
ANSWER = json.dumps(
    {
        "ok": True,
        "result": {"message_id": 1, "date": 0, "chat": {"id": 1, "type": "private"}, "text": "x"},
    }
)


async def test_statements_run_on_the_loops_thread(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'callbot.db'}")
    try:
        async with engine.connect() as connection:
            raw = await connection.get_raw_connection()
            await raw.driver_connection.create_function("thread_id", 0, threading.get_ident)
            ran_on = await connection.scalar(text("SELECT thread_id()"))
            mode = await connection.scalar(text("PRAGMA journal_mode"))
    finally:
        await engine.dispose()
    assert ran_on == threading.get_ident()
    assert mode == "wal"


async def test_a_locked_database_is_waited_for_without_blocking_the_loop(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'callbot.db'}"
    first, second = create_engine(url), create_engine(url)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    try:
        async with first.begin() as connection:
            await connection.execute(text("CREATE TABLE t (n INTEGER)"))
        ticking = asyncio.create_task(ticker())
        async with first.begin() as holder:
            await holder.execute(text("INSERT INTO t VALUES (1)"))  # holds the write lock
            waiting = asyncio.create_task(_insert(second, 2))
            await asyncio.sleep(0.2)
            assert not waiting.done()
            assert ticks > 5  # the loop went on while the second writer waited
        await asyncio.wait_for(waiting, 10)
        ticking.cancel()
        async with second.connect() as connection:
            rows = (await connection.execute(text("SELECT n FROM t ORDER BY n"))).all()
        assert [n for (n,) in rows] == [1, 2]
    finally:
        await first.dispose()
        await second.dispose()


async def _insert(engine: Any, n: int) -> None:
    async with engine.begin() as connection:
        await connection.execute(text("INSERT INTO t VALUES (:n)"), {"n": n})


async def test_a_transaction_cancelled_while_the_database_is_locked_gives_its_connection_back(
    tmp_path: Path,
) -> None:
    # Sessions and connections of the SQLite engine end inline, not in a task of SQLAlchemy's
    # (bot/storage/sqlite.py): a cancellation must still not keep the engine's one connection.
    url = f"sqlite+aiosqlite:///{tmp_path / 'callbot.db'}"
    first, second = create_engine(url), create_engine(url)
    sessions = sessionmaker(second)

    async def insert_in_session(n: int) -> None:
        async with sessions.begin() as session:
            await session.execute(text("INSERT INTO t VALUES (:n)"), {"n": n})

    try:
        async with first.begin() as connection:
            await connection.execute(text("CREATE TABLE t (n INTEGER)"))
        for writer in (_insert(second, 2), insert_in_session(3)):
            async with first.begin() as holder:
                await holder.execute(text("INSERT INTO t VALUES (1)"))  # holds the write lock
                waiting = asyncio.create_task(writer)
                await asyncio.sleep(0.05)
                assert not waiting.done()
                waiting.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await waiting
            await asyncio.wait_for(insert_in_session(4), 5)  # the one connection is free
        async with second.connect() as connection:
            rows = (await connection.execute(text("SELECT n FROM t ORDER BY n"))).all()
        assert [n for (n,) in rows] == [1, 1, 4, 4]  # nothing of the cancelled writers
    finally:
        await first.dispose()
        await second.dispose()


async def test_answer_models_are_kept_across_garbage_collections() -> None:
    """aiogram's session builds `Response[Message]` for each answer; without something holding
    it, a garbage collection frees it, and the next answer builds it again."""
    session = AiohttpSession()
    bot = Bot(TOKEN, session=session)
    method = SendMessage(chat_id=1, text="x")
    keep = KeepResponseModels()

    async def send(bot: Bot, method: Any) -> Any:
        return session.check_response(bot, method, 200, ANSWER)

    try:
        answer = await keep(send, bot, method)
        model = weakref.ref(type(answer))
        del answer
        gc.collect()
        assert model() is not None
        assert type(await keep(send, bot, method)) is model()
    finally:
        await session.close()


async def test_stopping_background_tasks_cancels_again_one_that_lost_its_cancellation() -> None:
    rounds = 0

    async def swallows_one() -> None:
        nonlocal rounds
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                rounds += 1
                if rounds > 1:
                    raise

    task = asyncio.create_task(swallows_one())
    await asyncio.sleep(0)
    await asyncio.wait_for(stop_all([task], again_after=0.05), 5)
    assert task.cancelled()
    assert rounds == 2
