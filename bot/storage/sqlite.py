"""SQLite on the event loop's own thread, behind the async API SQLAlchemy's aiosqlite dialect uses.

aiosqlite hands every call (cursor, execute, fetch, close, commit, rollback) to a thread of its
own and back: about 40 hops per `/call`, each a wake-up of another thread and a GIL hand-over,
which cost more than the statements (bench/README.md, stop 17). Here each call runs at once: the
statements are point reads and writes of tens of microseconds (WAL, synchronous=NORMAL: a commit
writes to the page cache, no fsync but at a checkpoint).

One process uses the file (SqliteFileLock), so another writer is rare (a second engine in one
process, the sqlite3 shell). SQLite's own busy handler would block the loop while that writer
needs it to go on, so the connection has none: a locked database is retried after a sleep on
the loop, until `busy_seconds` have passed, as SQLite's handler would.

SQLAlchemy ends every `async with` of a session or connection in a task of its own
(`_run_to_completion`: its cleanup must not be cut short by a cancellation). That costs a turn
or two of the loop per transaction, with the one connection still checked out: every other
transaction waits behind the whole loop's queue, and under a burst the queue is the latency.
LoopEngine's connections and LoopSession end inline instead. That is as safe here: after the
commit (which suspends only while another writer holds the database), nothing in the close
suspends, so a cancellation cannot reach it, and the close runs in `finally`.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.ext.asyncio.session import _AsyncSessionContextManager

T = TypeVar("T")
FIRST_WAIT = 0.001  # seconds before the first retry of a locked database; doubled up to
MAX_WAIT = 0.05


def _locked(err: sqlite3.OperationalError) -> bool:
    return getattr(err, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


class LoopCursor:
    """aiosqlite's Cursor, as far as SQLAlchemy uses it."""

    def __init__(self, connection: LoopConnection, cursor: sqlite3.Cursor) -> None:
        self._connection = connection
        self._cursor = cursor

    async def execute(self, sql: str, parameters: Any = ()) -> LoopCursor:
        await self._connection._run(self._cursor.execute, sql, parameters)
        return self

    async def executemany(self, sql: str, parameters: Iterable[Any]) -> LoopCursor:
        await self._connection._run(self._cursor.executemany, sql, parameters)
        return self

    async def fetchone(self) -> Any:
        return self._cursor.fetchone()

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        return self._cursor.fetchmany(self._cursor.arraysize if size is None else size)

    async def fetchall(self) -> list[Any]:
        return self._cursor.fetchall()

    async def close(self) -> None:
        self._cursor.close()

    @property
    def description(self) -> Any:
        return self._cursor.description

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    @property
    def lastrowid(self) -> int | None:
        return self._cursor.lastrowid


class _Inline:
    """Stands in for aiosqlite's queue to its thread: SQLAlchemy's isolation_level setter puts
    (future, function) on it; the function runs at once."""

    def put_nowait(self, item: tuple[asyncio.Future[Any] | None, Callable[[], Any]]) -> None:
        future, function = item
        try:
            result = function()
        except BaseException as err:
            if future is not None:
                future.set_exception(err)
            return
        if future is not None:
            future.set_result(result)


class LoopConnection:
    """aiosqlite's Connection, as far as SQLAlchemy uses it, without aiosqlite's thread."""

    def __init__(self, connection: sqlite3.Connection, *, busy_seconds: float) -> None:
        self._conn = connection
        self._busy_seconds = busy_seconds
        self._tx = _Inline()

    @classmethod
    async def open(cls, database: str, *, busy_seconds: float = 30.0) -> LoopConnection:
        # timeout=0: no busy handler of SQLite's (see the module's docstring)
        connection = sqlite3.connect(database, timeout=0, check_same_thread=False)
        return cls(connection, busy_seconds=busy_seconds)

    async def _run(self, function: Callable[..., T], *args: Any) -> T:
        deadline = time.monotonic() + self._busy_seconds
        wait = FIRST_WAIT
        while True:
            try:
                return function(*args)
            except sqlite3.OperationalError as err:
                if not _locked(err) or time.monotonic() + wait > deadline:
                    raise
            await asyncio.sleep(wait)
            wait = min(wait * 2, MAX_WAIT)

    async def cursor(self) -> LoopCursor:
        return LoopCursor(self, self._conn.cursor())

    async def execute(self, sql: str, parameters: Any = ()) -> LoopCursor:
        cursor = await self.cursor()
        return await cursor.execute(sql, parameters)

    async def commit(self) -> None:
        await self._run(self._conn.commit)

    async def rollback(self) -> None:
        self._conn.rollback()

    async def close(self) -> None:
        self._conn.close()

    def stop(self) -> None:
        self._conn.close()

    async def create_function(self, *args: Any, **kwargs: Any) -> None:
        self._conn.create_function(*args, **kwargs)

    @property
    def isolation_level(self) -> str | None:
        return self._conn.isolation_level

    @isolation_level.setter
    def isolation_level(self, value: str | None) -> None:
        self._conn.isolation_level = value  # type: ignore[assignment]


class LoopAsyncConnection(AsyncConnection):
    """`async with engine.connect()` / `engine.begin()` on a LoopEngine: closed inline."""

    async def __aexit__(
        self,
        type_: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class LoopEngine(AsyncEngine):
    """The SQLite engine: its connections end inline (see the module's docstring)."""

    _connection_cls = LoopAsyncConnection


class LoopSession(AsyncSession):
    """A session on a LoopEngine: `async with sessions()` and `sessions.begin()` end inline."""

    async def __aexit__(
        self,
        type_: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _maker_context_manager(self) -> _AsyncSessionContextManager[LoopSession]:
        return _LoopBegun(self)


class _LoopBegun(_AsyncSessionContextManager[LoopSession]):
    async def __aexit__(
        self,
        type_: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.trans.__aexit__(type_, value, tb)  # commit, or roll back on an error
        finally:
            await self.async_session.close()  # gives the connection back; never suspends
