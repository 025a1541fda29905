"""Engine, sessions and migrations (Alembic, applied at start)."""

from __future__ import annotations

import fcntl
import logging
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from tenacity import before_sleep_log, retry, retry_if_exception, stop_after_attempt, wait_random

from bot.storage.sqlite import LoopConnection, LoopEngine, LoopSession

if TYPE_CHECKING:
    from alembic.config import Config

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
# One PostgreSQL advisory lock key ("callbot" in ASCII) for every replica's migrations.
MIGRATION_LOCK = 0x63616C6C626F74
# And one for loading ONCALL_FILE at start: replicas starting together take turns.
ONCALL_FILE_LOCK = MIGRATION_LOCK + 1
# `revision: str = "0008"` and `down_revision: str | None = "0007"` in a revision file
_REVISION_LINE = re.compile(r'^(down_revision|revision)\b[^=\n]*= *(?:"([^"\n]+)"|None) *$', re.M)


def database_url(url: str | None, data_dir: Path) -> str:
    """DATABASE_URL with an async driver; default: a SQLite file under DATA_DIR."""
    if not url:
        return f"sqlite+aiosqlite:///{(data_dir / 'callbot.db').resolve()}"
    parsed = make_url(url)
    drivers = {
        "postgresql": "postgresql+asyncpg",
        "postgres": "postgresql+asyncpg",
        "sqlite": "sqlite+aiosqlite",
    }
    if parsed.drivername in drivers:
        parsed = parsed.set(drivername=drivers[parsed.drivername])
    return parsed.render_as_string(hide_password=False)


def create_engine(url: str) -> AsyncEngine:
    """hide_parameters: SQL logged at LOG_LEVEL=DEBUG, or in an error, never shows the values
    (numbers, notes)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        # One connection: SQLite has one writer anyway. Transactions queue for it in asyncio,
        # so a read-then-write (SELECT ... FOR UPDATE, which SQLite ignores) never acts on a
        # row another transaction is changing, and nobody sleeps in SQLite's busy handler.
        # Its statements run on the loop's thread, not aiosqlite's (bot/storage/sqlite.py).
        database = parsed.database or ":memory:"
        sync_engine = create_async_engine(
            url,
            async_creator=partial(LoopConnection.open, database, busy_seconds=30),
            pool_size=1,
            max_overflow=0,
            pool_timeout=60,
            hide_parameters=True,
        ).sync_engine
        event.listen(sync_engine, "connect", _sqlite_pragmas)
        return LoopEngine(sync_engine)
    return create_async_engine(
        url, pool_size=10, max_overflow=10, pool_pre_ping=True, hide_parameters=True
    )


def _sqlite_pragmas(dbapi_connection: object, _record: object) -> None:
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


# What PostgreSQL ends a transaction with when it must be run again: 40P01 it was chosen to
# break a deadlock, 40001 a serialization failure. It was rolled back whole.
_RUN_AGAIN = frozenset({"40P01", "40001"})


def conflicted(error: BaseException) -> bool:
    return isinstance(error, DBAPIError) and getattr(error.orig, "sqlstate", None) in _RUN_AGAIN


# A store method that is one transaction, run again (up to 3 times, after a short random pause)
# when PostgreSQL aborted it to break a deadlock: nothing of it was committed.
retry_conflicts = retry(
    retry=retry_if_exception(conflicted),
    stop=stop_after_attempt(3),
    wait=wait_random(0.01, 0.1),
    before_sleep=before_sleep_log(log, logging.WARNING),
    reraise=True,
)


def sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    session = LoopSession if isinstance(engine, LoopEngine) else AsyncSession
    return async_sessionmaker(engine, class_=session, expire_on_commit=False)


def alembic_config(url: str | None = None) -> Config:
    from alembic.config import Config  # Alembic only at start and in the migrate command

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if url:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


async def migrate(engine: AsyncEngine) -> None:
    """Bring the schema to the newest revision, on the app's own engine and event loop.

    On PostgreSQL the upgrade holds an advisory lock until it commits: replicas starting together
    take turns, and the later ones find the schema already at head. A database at head already
    (every start but the first after an upgrade) is left alone without importing Alembic, which
    would stay in the process's memory for nothing (~10 MiB).
    """
    if await schema_revision(engine) == head_revision():
        return

    def upgrade(connection: Connection) -> None:
        from alembic import command

        config = alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, "head")

    async with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            await connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK}
            )
        await connection.run_sync(upgrade)


@asynccontextmanager
async def one_at_a_time(engine: AsyncEngine, key: int) -> AsyncIterator[None]:
    """On PostgreSQL, one process at a time inside (a session advisory lock on a connection of
    its own, freed by PostgreSQL if the process dies); on SQLite, one process per file already."""
    if engine.dialect.name != "postgresql":
        yield
        return
    async with engine.connect() as connection:
        await connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
        try:
            yield
        finally:
            await connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})


class DatabaseInUse(Exception):
    """Another process holds the SQLite file's lock."""

    def __init__(self, path: Path, pid: str) -> None:
        super().__init__(f"{path} is in use by pid {pid}")
        self.path = path
        self.pid = pid


class SqliteFileLock:
    """One process per SQLite file: an exclusive lock on `<file>.lock`, held while the process
    runs. The OS drops it when the process dies, even by kill -9, so a restart is never refused."""

    def __init__(self, database: Path) -> None:
        self.database = database
        self._fd: int | None = None

    @classmethod
    def of(cls, engine: AsyncEngine) -> SqliteFileLock | None:
        """The lock for the engine's SQLite file; None for PostgreSQL or an in-memory database."""
        url = engine.url
        if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
            return None
        return cls(Path(url.database).resolve())

    def acquire(self) -> None:
        """Raises DatabaseInUse (with the holder's pid) without waiting."""
        self.database.parent.mkdir(parents=True, exist_ok=True)
        path = self.database.with_name(self.database.name + ".lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DatabaseInUse(self.database, holder) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        """The file stays: removing it would let two processes lock two different files."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def head_revision() -> str | None:
    """The newest migration this code ships: read from the revision files' `revision` and
    `down_revision` lines; any file that does not show both, or a history without exactly one
    head, is left to Alembic to tell."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in (MIGRATIONS / "versions").glob("*.py"):
        text = path.read_text("utf-8")
        found: dict[str, str | None] = {m[1]: m[2] for m in _REVISION_LINE.finditer(text)}
        revision, parent = found.get("revision"), found.get("down_revision", "")
        if not revision or parent == "":
            return _alembic_head()
        revisions.add(revision)
        if parent:
            parents.add(parent)
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 else _alembic_head()


def _alembic_head() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


async def schema_revision(engine: AsyncEngine) -> str | None:
    """The migration the database is at (None: never migrated). Raises when it does not answer."""
    async with engine.connect() as connection:
        tables = await connection.run_sync(
            lambda sync: sync.dialect.has_table(sync, "alembic_version")
        )
        if not tables:
            return None
        version = await connection.scalar(text("SELECT version_num FROM alembic_version"))
    return str(version) if version is not None else None
