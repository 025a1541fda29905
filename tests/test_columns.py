"""Every text column takes any input on both backends: at its width whole, over it cut to fit.

PostgreSQL refuses a VARCHAR(n) value longer than n (SQLite keeps it whole), which used to turn
a 40-character severity or a 129-character Telegram name into a 500 on PostgreSQL only.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Integer,
    String,
    Table,
    Text,
    insert,
    select,
)
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.types import TypeDecorator

from bot.storage.tables import Base, Cut, UTCDateTime
from tests.conftest import OPERATOR, StartBot
from tests.test_lifecycle import PHONE, command
from tests.test_oncall import INFRA_CHAT, Clock, alert, generic, oncall_bot, post_in

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
LONG_NAME = "Ä" * 64 + " " + "B" * 64  # Telegram: first and last name, 64 characters each


def bounded(kind: Any) -> bool:
    """A VARCHAR(n): a String with a width (TypeDecorators by what they store)."""
    impl = kind.impl_instance if isinstance(kind, TypeDecorator) else kind
    return isinstance(impl, String) and not isinstance(impl, Text) and impl.length is not None


def text_columns() -> list[Column[Any]]:
    return [
        column
        for table in Base.metadata.sorted_tables
        for column in table.columns
        if bounded(column.type)
    ]


def test_every_bounded_text_column_fits_its_input() -> None:
    """A new VARCHAR column must be a `Cut`, or PostgreSQL refuses long input again."""
    plain = [str(c) for c in text_columns() if not isinstance(c.type, Cut)]
    assert plain == []
    # a cut could make two ids one: unique columns keep distinct values distinct
    unique = [c for c in text_columns() if c.primary_key or c.unique]
    assert [str(c) for c in unique if not c.type.key] == []
    assert len(text_columns()) > 30


def filler(column: Column[Any], serial: int) -> Any:
    kind = column.type
    if bounded(kind):
        return f"v{serial}"[: kind.length]
    if isinstance(kind, Text):
        return "text"
    if isinstance(kind, Integer | BigInteger):
        return serial
    if isinstance(kind, Boolean):
        return False
    if isinstance(kind, UTCDateTime):
        return NOW
    if isinstance(kind, JSON):
        return {}
    raise AssertionError(f"no filler for {column} ({kind!r})")


def row(table: Table, serial: int, **values: Any) -> dict[str, Any]:
    """A complete row: every column filled, foreign keys to the parents made first (serial 1)."""
    out: dict[str, Any] = {}
    for column in table.columns:
        if column.name in values:
            out[column.name] = values[column.name]
        elif column.foreign_keys:
            [fk] = column.foreign_keys
            out[column.name] = filler(fk.column, 1)
        elif column.primary_key and isinstance(column.type, Integer):
            continue  # autoincrement
        else:
            out[column.name] = filler(column, serial)
    return out


async def parents(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        for table in Base.metadata.sorted_tables:
            if not any(c.foreign_keys for c in table.columns) and table.name in (
                "calls",
                "teams",
            ):
                await connection.execute(insert(table).values(row(table, 1)))  # teams.id: 1


def cases() -> list[Any]:
    return [pytest.param(c, id=f"{c.table.name}.{c.name}") for c in text_columns()]


@pytest.mark.parametrize("column", cases())
async def test_a_text_column_keeps_its_maximum_and_cuts_what_is_longer(
    engine: AsyncEngine, column: Column[Any]
) -> None:
    await parents(engine)
    table = column.table
    assert isinstance(table, Table) and isinstance(column.type, Cut)
    width = column.type.length
    at_width = "é" * width  # characters, not bytes
    over = ["ç" * (width + 1), "ç" * width + "x" * 500]
    stored: dict[str, Any] = {}
    async with engine.begin() as connection:
        for serial, value in enumerate([at_width, *over], start=2):
            for fk in column.foreign_keys:  # the parent row it names, first
                parent = fk.column.table
                assert isinstance(parent, Table)
                values = row(parent, serial + 100, **{fk.column.name: value})
                await connection.execute(insert(parent).values(values))
            result = await connection.execute(
                insert(table).values(row(table, serial, **{column.name: value}))
            )
            stored[value] = result.inserted_primary_key
    async with engine.connect() as connection:
        [pk] = table.primary_key.columns
        for value, key in stored.items():
            read = (await connection.execute(select(column).where(pk == key[0]))).scalar_one()
            assert len(read) <= width
            if value == at_width:
                assert read == value
            elif column.type.key:
                # an identifier stays distinct and is found by the value it was stored under
                assert read != value and read.startswith(value[: width // 3])
                found = await connection.execute(select(pk).where(column == value))
                same = await connection.execute(select(pk).where(pk == key[0]))
                assert [r[0] for r in found] == [r[0] for r in same]
            else:
                assert read == value[: width - 1] + "…"
        if column.type.key:
            reads = {
                (await connection.execute(select(column).where(pk == k[0]))).scalar_one()
                for k in stored.values()
            }
            assert len(reads) == 3


# Through the real app, on both backends


async def test_an_alert_with_a_40_character_severity_is_posted(
    start_bot: StartBot, tmp_path: Path, db_url: str
) -> None:
    bot = await oncall_bot(start_bot, tmp_path, Clock(), database_url=db_url)
    severity = "s" * 40
    response = await alert(bot, generic(severity=severity, title="t" * 300, key="k" * 300))
    assert response.status_code == 200, response.text
    post = await post_in(bot, INFRA_CHAT, "ttttt")
    assert "[" + "S" * 31 + "…]" in post.plain  # as stored, from the first post on
    again = await alert(bot, generic(severity=severity, title="t" * 300, key="k" * 300))
    assert again.json() == {"result": "updated", "incident": response.json()["incident"]}


async def test_a_user_with_a_129_character_name_calls_and_acknowledges(
    start_bot: StartBot, tmp_path: Path, db_url: str
) -> None:
    assert len(LONG_NAME) == 129
    bot = await oncall_bot(start_bot, tmp_path, Clock(), database_url=db_url)
    reply = await command(bot, f"/call {PHONE} db down", first_name=LONG_NAME)
    assert ": started" in reply.plain and f"Started by {LONG_NAME[:127]}…" in reply.plain
    record = await bot.app.store.get_call(
        bot.pilot.calls_started()[-1].json["bizOpaqueCallbackData"]
    )
    assert record is not None and record.operator_name == LONG_NAME[:127] + "…"
    await alert(bot, generic())
    await bot.app.oncall.run_due()
    post = await post_in(bot, INFRA_CHAT, "calling alice")
    [(_, data)] = post.buttons()
    _, query = bot.telegram.press_button(
        user_id=OPERATOR,
        chat_id=INFRA_CHAT,
        message_id=post.message_id,
        data=data,
        chat_type="supergroup",
    )
    answer = await bot.telegram.wait_for_callback_answer(query)
    assert "wrong" not in answer.get("text", "").lower()
    acked = await post_in(bot, INFRA_CHAT, "acknowledged by ÄÄÄ")
    assert acked.buttons() == []
