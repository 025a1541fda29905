"""Database fixtures: every storage test runs on SQLite and on a real PostgreSQL server.

- `db_url`: URL of an EMPTY schema for one test, parametrized as "sqlite" (a file under tmp_path)
  and "postgresql" (this run's own database, its schema dropped and recreated before the test).
- `engine`: `create_engine(db_url)` already migrated to head; disposed after the test.
- `store`: a `Store` on that engine.

PostgreSQL: `TEST_POSTGRES_URL` (default `postgresql://postgres@127.0.0.1:5432/postgres`) names a
server and a maintenance database; the run creates `callbot_test_<hex>` there and drops it at the
end. Without a server the postgresql cases are skipped, unless `CALLBOT_REQUIRE_POSTGRES=1` (CI),
which turns the skip into a failure. Run only one backend with `-m postgresql` / `-m "not
postgresql"`.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.storage.db import create_engine, migrate, sessionmaker
from bot.storage.store import Store

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
CONNECT_TIMEOUT = 5.0
BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgresql),
]

T = TypeVar("T")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "postgresql: needs the PostgreSQL server (see db_fixtures)")


def _run(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine on a private loop in a private thread.

    Setup and teardown stay out of pytest-asyncio's loops (and out of the main thread's
    current-loop state), whatever loop scope the tests use, and sync tests can use them too.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="db-fixtures") as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


def _asyncpg_dsn(url: URL) -> str:
    """asyncpg speaks plain `postgresql://` DSNs."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


async def _execute(url: URL, *statements: str) -> None:
    connection = await asyncpg.connect(_asyncpg_dsn(url), timeout=CONNECT_TIMEOUT)
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


def _unavailable(reason: str) -> None:
    if os.environ.get("CALLBOT_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"{reason} (CALLBOT_REQUIRE_POSTGRES=1)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[URL]:
    """A database of our own on the test server for the whole run (sync: no event loop needed)."""
    server = make_url(os.environ.get("TEST_POSTGRES_URL") or DEFAULT_POSTGRES_URL)
    name = f"callbot_test_{uuid.uuid4().hex}"
    problem = None
    try:
        _run(lambda: _execute(server, f'CREATE DATABASE "{name}"'))
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
        problem = f"{type(error).__name__}: {error}"
    if problem:
        where = server.render_as_string(hide_password=True)
        _unavailable(f"PostgreSQL at {where} is not usable: {problem}")
    try:
        yield server.set(database=name)
    finally:
        _run(lambda: _execute(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _empty_postgres_schema(database: URL) -> None:
    # lock_timeout: a connection leaked by an earlier test fails this loudly instead of hanging.
    _run(
        lambda: _execute(
            database,
            "SET lock_timeout = '10s'",
            "DROP SCHEMA IF EXISTS public CASCADE",
            "CREATE SCHEMA public",
        )
    )


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """URL (async driver) of an empty schema, private to this test."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'callbot.db'}"
    database: URL = request.getfixturevalue("postgres_database")
    _empty_postgres_schema(database)
    return database.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    """The app's engine on `db_url`, migrated to head."""
    engine = create_engine(db_url)
    try:
        await migrate(engine)
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
async def store(engine: AsyncEngine) -> Store:
    return Store(sessionmaker(engine))
