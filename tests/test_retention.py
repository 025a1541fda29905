"""Retention: old deliveries, rings and permission requests go, old calls lose number and note,
the audit keeps what happened but not who was called; and no number or note reaches the log,
even at LOG_LEVEL=DEBUG."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.ops import logs
from bot.ops.retention import Retention
from bot.storage.db import sessionmaker
from bot.storage.oncall import OnCallStore
from bot.storage.retention import RetentionStore
from bot.storage.store import Audit, NewCall, Store, utcnow
from bot.storage.tables import CallRow, DeliveryRow, PermissionRequestRow, RingRow
from tests.conftest import OPERATOR, StartBot
from tests.test_lifecycle import command, deliver, event, shown, webhook_bot

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
OLD = NOW - timedelta(days=91)
RECENT = NOW - timedelta(days=89)
NUMBER = "+5511987654321"
NOTE = "canary-note-31337"


def new_call(call_id: str) -> NewCall:
    return NewCall(
        id=call_id,
        operator_id=OPERATOR,
        operator_name="Op",
        chat_id=OPERATOR,
        number_type="web",
        phone=NUMBER,
        phone_display="+55 11 98765-4321",
        masked=False,
        locale="en",
        note=NOTE,
    )


async def count(engine: AsyncEngine, model: type) -> int:
    async with engine.connect() as connection:
        return int((await connection.execute(select(func.count()).select_from(model))).scalar_one())


async def seed(store: Store, oncall: OnCallStore, at: datetime, tag: str, n: int) -> None:
    for i in range(n):
        who = Audit("call.requested", OPERATOR, {"to": "+55 11 9****-4321", "type": "web"})
        await store.create_call(new_call(f"cb_{tag}{i}"), at=at, audit=who)
        await store.apply_delivery(f"{tag}-key-{i}", [], at=at)
        await oncall.add_ring(NUMBER, at)
        await store.add_permission_request(
            phone=NUMBER,
            phone_display="+55 11 98765-4321",
            masked=False,
            operator_id=OPERATOR,
            chat_id=OPERATOR,
            locale="en",
            message_id=None,
            at=at,
        )
        await store.audit("permission.requested", subject="+55 11 9****-4321", at=at)


async def test_old_rows_are_pruned_and_redacted_in_batches(
    engine: AsyncEngine, store: Store
) -> None:
    oncall = OnCallStore(sessionmaker(engine))
    await seed(store, oncall, OLD, "old", 5)
    await seed(store, oncall, RECENT, "new", 2)
    retention = Retention(RetentionStore(sessionmaker(engine)), days=90, batch=2, clock=lambda: NOW)
    pruned = await retention.run_once()
    assert (pruned.deliveries, pruned.rings, pruned.permission_requests, pruned.calls) == (
        5,
        5,
        5,
        5,
    )
    assert pruned.audit == 10  # two entries per old call
    for model in (DeliveryRow, RingRow, PermissionRequestRow):
        assert await count(engine, model) == 2
    for i in range(5):
        old = await store.get_call(f"cb_old{i}")
        assert old is not None and (old.phone, old.phone_display, old.note) == ("", "", None)
        assert [h.status for h in old.history] == ["PENDING"]  # what happened stays
    recent = await store.get_call("cb_new0")
    assert recent is not None and (recent.phone, recent.note) == (NUMBER, NOTE)
    audit = await store.audit_since(NOW - timedelta(days=400))
    old_rows = [a for a in audit if a.at < NOW - timedelta(days=90)]
    assert {a.action for a in old_rows} == {"call.requested", "permission.requested"}
    assert all("4321" not in str((a.subject, a.detail)) for a in old_rows)
    assert [a.detail for a in old_rows if a.action == "call.requested"] == [{"type": "web"}] * 5
    new_rows = [a for a in audit if a.at > NOW - timedelta(days=90)]
    assert all("4321" in str((a.subject, a.detail)) for a in new_rows)
    assert (await retention.run_once()).total == 0  # done: nothing is looked at twice
    # a delivery past retention is forgotten: its key may be applied again
    assert await store.apply_delivery("old-key-0", [], at=NOW) == []


async def age_everything(engine: AsyncEngine, days: int) -> None:
    then = utcnow() - timedelta(days=days)
    async with engine.begin() as connection:
        await connection.execute(update(CallRow).values(created_at=then))
        await connection.execute(update(DeliveryRow).values(received_at=then))


async def test_the_running_bot_forgets_old_numbers_notes_and_deliveries(
    start_bot: StartBot,
) -> None:
    bot = await webhook_bot(start_bot, retention_interval_seconds=0.2)
    reply = await command(bot, f"/call {NUMBER} {NOTE}")
    assert NOTE in reply.plain
    pilot_id = next(iter(bot.pilot.calls))
    ended = event("call.ended", pilot_id, status="COMPLETED", duration=3, to=NUMBER[1:])
    assert (await deliver(bot, ended, key="k1")).status_code == 200
    await shown(bot, reply, ": ended")
    assert await count(bot.app.engine, DeliveryRow) == 1
    await age_everything(bot.app.engine, 91)
    for _ in range(100):
        record = await bot.app.store.get_call(pilot_id)
        if record is not None and record.note is None:
            break
        await asyncio.sleep(0.05)
    assert record is not None and (record.phone, record.note) == ("", None)
    assert await count(bot.app.engine, DeliveryRow) == 0
    listing = await command(bot, "/calls")
    assert "number removed" in listing.plain and "4321" not in listing.plain


@pytest.fixture
def debug_log() -> Iterator[io.StringIO]:
    """The log as `python -m bot` writes it at LOG_LEVEL=DEBUG, captured whole."""
    root = logging.getLogger()
    saved = (
        root.level,
        {
            n: logging.getLogger(n).level
            for n in ("httpx", "aiosqlite", "aioice", "aiortc", "sqlalchemy.engine")
        },
    )
    captured = io.StringIO()
    handler = logging.StreamHandler(captured)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logs.configure("DEBUG")
    # SQLAlchemy keeps its own loggers at WARNING; someone debugging SQL turns them on
    logging.getLogger("sqlalchemy.engine").setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield captured
    finally:
        root.removeHandler(handler)
        root.setLevel(saved[0])
        for name, level in saved[1].items():
            logging.getLogger(name).setLevel(level)


async def test_at_debug_no_number_or_note_reaches_the_log(
    start_bot: StartBot, debug_log: io.StringIO, tmp_path: Path
) -> None:
    bot = await webhook_bot(start_bot, log_level="DEBUG")
    reply = await command(bot, f"/call {NUMBER} {NOTE}")
    pilot_id = next(iter(bot.pilot.calls))
    for name, status in (("call.ringing", "RINGING"), ("call.ended", "COMPLETED")):
        payload = event(name, pilot_id, status=status, to=NUMBER[1:])
        assert (await deliver(bot, payload, key=name)).status_code == 200
    await shown(bot, reply, ": ended")
    await command(bot, "/calls")
    await bot.stop()
    text = debug_log.getvalue()
    assert "INSERT INTO calls" in text and "DEBUG bot." in text  # it did log SQL, at DEBUG
    for secret in (NOTE, "987654321", "98765-4321", "98765 4321"):
        assert secret not in text, secret
