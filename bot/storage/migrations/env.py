"""Alembic environment: runs on a connection handed over by bot.storage.db.migrate, or, from the
`alembic` command line, on its own async engine."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlalchemy import Connection, pool
from sqlalchemy.ext.asyncio import create_async_engine

from bot.storage.tables import Base, Cut

config = context.config
target_metadata = Base.metadata


def render_item(kind: str, item: Any, autogen: AutogenContext) -> str | Literal[False]:
    """A `Cut(n)` column is a VARCHAR(n) in a revision: revisions never import the app."""
    if kind == "type" and isinstance(item, Cut):
        return f"sa.String(length={item.length})"
    return False


def run_on(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        render_item=render_item,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_with_own_engine() -> None:
    engine = create_async_engine(
        config.get_main_option("sqlalchemy.url") or "", poolclass=pool.NullPool
    )
    async with engine.begin() as connection:
        await connection.run_sync(run_on)
    await engine.dispose()


connection = config.attributes.get("connection")
if connection is not None:
    run_on(connection)
else:
    asyncio.run(run_with_own_engine())
